"""The batch-embedding job end to end: real local Ray Data, Qdrant local mode, the packaged MiniLM."""

from __future__ import annotations

import json
import os
import random
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffembed import ConfigError, Embedder
from diffembed.batch.config import EmbedCorpusConfig
from diffembed.batch.pipeline import embed_corpus
from diffembed.index.config import StoreConfig
from diffembed.index.store import open_store

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river mountain forest harbour castle library market garden bridge tower valley meadow island "
         "desert glacier canyon lagoon orchard vineyard monastery").split()


def make_corpus(path: Path, n_docs: int = 24, seed: int = 0) -> list[dict]:
    """Documents of mixed length; every fourth one is long enough to need several windows."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = 40 if i % 4 == 0 else rng.randint(1, 4)
        text = " ".join(
            f"In document {i} the {rng.choice(WORDS)} near the {rng.choice(WORDS)} was visited on day {j}."
            for j in range(sentences)
        )
        docs.append({"id": f"doc-{i}", "text": text, "title": f"Title {i}"})
    docs[5]["text"] += " The zyxovian lantern glowed."  # a rare exact term for hybrid search
    docs.append({"id": "empty-1", "text": "   ", "title": " "})  # nothing to embed: counted as skipped, never dropped
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def config(tmp_path: Path, corpus: Path, store_path: Path, *overrides: str) -> EmbedCorpusConfig:
    return EmbedCorpusConfig.from_dict(
        {
            "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64, "documents": {"windows": "best", "overlap": 8}},
            "input": {"paths": [str(corpus)], "title_column": "title"},
            "encode": {"actors": 1, "batch_size": 8},
            "store": {"path": str(store_path), "collection": "docs", "sparse": True, "upsert_batch_size": 16},
        },
        list(overrides),
    )


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def all_points(store_path: Path, collection: str = "docs") -> dict[str, dict]:
    """Every point of an Edge collection: id -> {payload, vector: {name: dense list | (indices, values)}}."""
    # a killed job's store actor may take a moment to go away: wait for the store rather than fail
    with open_store(StoreConfig(path=str(store_path), collection=collection, lock_wait_s=60)) as store:
        return {p.id: {"payload": p.payload, "vector": p.vectors} for batch in store.iter_points() for p in batch}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(root / "corpus.jsonl")
    return root / "corpus.jsonl", docs


@pytest.fixture(scope="module")
def clean_run(ray_cluster, corpus, tmp_path_factory):
    path, docs = corpus
    store = tmp_path_factory.mktemp("clean") / "qdrant"
    cfg = config(path.parent, path, store)
    summary = embed_corpus(cfg)
    return cfg, summary, store, docs


def test_end_to_end_counts_and_search(clean_run, minilm):
    cfg, summary, store_path, docs = clean_run
    real = [d for d in docs if d["text"].strip()]
    emb = Embedder(cfg.embedder, backbone=minilm.backbone)
    expected_chunks = len(emb.document_segments([d["text"] for d in real], [d["title"] for d in real]))
    assert expected_chunks > len(real)  # long documents really were split
    assert summary["chunks_written"] == summary["points_in_collection"] == expected_chunks
    assert summary["documents_embedded"] == len(real)
    assert summary["skipped_rows"] == 1 and "empty text" in summary["skipped_by_reason"]
    with open_store(cfg.store) as store:
        sentence = docs[8]["text"].split(". ")[5] + "."  # from the middle of a long document
        hits = store.search(emb.encode_queries([sentence])[0], None, top_k=3)
        assert hits[0].doc_id == "doc-8"
        start = docs[8]["text"].index(sentence)  # the best chunk's span overlaps the sentence
        assert hits[0].char_span[0] < start + len(sentence) and hits[0].char_span[1] > start


def test_stored_vectors_equal_the_embedders_output(clean_run, minilm):
    cfg, _, store_path, docs = clean_run
    emb = Embedder(cfg.embedder, backbone=minilm.backbone)
    points = all_points(store_path)
    chunks = emb.encode_document_windows([docs[0]["text"]], [docs[0]["title"]])  # the policy joins the title
    stored = sorted((p["payload"]["chunk_index"], p) for p in points.values() if p["payload"]["doc_id"] == "doc-0")
    assert len(stored) == len(chunks.vectors)
    for (index, point), vector, span in zip(stored, chunks.vectors, chunks.token_spans):
        np.testing.assert_allclose(np.asarray(point["vector"]["dense"]), vector, atol=1e-5)
        assert (point["payload"]["token_start"], point["payload"]["token_end"]) == tuple(span)
        assert point["payload"]["title"] == "Title 0"


def test_hybrid_finds_the_rare_term(clean_run, minilm):
    cfg, _, _, _ = clean_run
    emb = Embedder(cfg.embedder, backbone=minilm.backbone)
    with open_store(cfg.store) as store:
        query = "zyxovian"
        for mode in ("sparse", "hybrid"):
            hits = store.search(emb.encode_queries([query])[0], query, top_k=5, mode=mode)
            assert hits[0].doc_id == "doc-5", mode


def test_rerun_writes_nothing_new(clean_run):
    cfg, _, store_path, _ = clean_run
    before = all_points(store_path)
    summary = embed_corpus(cfg)
    assert summary["documents_embedded"] == 0 and summary["documents_already_present"] == len(
        {p["payload"]["doc_id"] for p in before.values()})
    after = all_points(store_path)
    assert after.keys() == before.keys()


def test_killed_single_file_run_keeps_its_progress_and_the_rerun_equals_a_clean_run(ray_cluster, tmp_path):
    """One JSONL file read in bounded blocks: SIGKILL of the driver at >= 50 % of the documents leaves >= 40 % of
    the points (they were written as the run went), and the rerun ends equal to a clean run."""
    path = tmp_path / "one.jsonl"
    docs = make_corpus(path, n_docs=120, seed=1)
    overrides = ["store.upsert_batch_size=16", "embedder.max_length=64", "embedder.documents.overlap=8",
                 "encode.batch_size=8", "input.block_bytes=4096", "summary_path=null", "progress_every_s=0"]
    clean_store = tmp_path / "clean"
    embed_corpus(EmbedCorpusConfig.from_yaml(ROOT / "jobs/configs/embed_cpu.yaml",
                                             [f"input.paths=[{path}]", f"store.path={clean_store}", *overrides]),
                 progress=False)
    store = tmp_path / "qdrant"
    args = [sys.executable, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs/configs/embed_cpu.yaml"),
            f"input.paths=[{path}]", f"store.path={store}", *overrides]
    # the driver joins this session's Ray instance, as a job does on a running cluster: its death takes its actors,
    # not the cluster, and the rerun starts on the same cluster
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address()}
    err = open(tmp_path / "killed.err", "w")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    real = sum(1 for d in docs if d["text"].strip())
    killed_at = None
    for line in proc.stdout:  # kill the driver once half of the documents are reported written
        if line.startswith("progress:") and int(line.split()[1]) >= real // 2:
            killed_at = int(line.split()[1])
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    clean = all_points(clean_store)
    err.close()
    assert killed_at is not None and killed_at < real, (
        "the job finished before it could be killed: " + (tmp_path / "killed.err").read_text()[-3000:])
    partial = all_points(store)
    assert len(partial) >= 0.4 * len(clean)
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = all_points(store)
    assert final.keys() == clean.keys()  # same ids: no duplicates, nothing missing
    for pid, point in clean.items():
        assert final[pid]["payload"] == point["payload"]
        np.testing.assert_allclose(final[pid]["vector"]["dense"], point["vector"]["dense"], atol=1e-5)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run_job(*overrides: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    """jobs/embed_corpus.py in a process of its own: on its own local Ray, or joining the one at `ray_address`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs/configs/embed_cpu.yaml"),
         *overrides],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_bad_inputs_give_one_line_errors(capsys, tmp_path):
    good = json.dumps({"id": "a", "text": "hello", "title": "t"})
    cases = [
        ([f"input.paths=[{tmp_path / 'missing.jsonl'}]"], "missing.jsonl"),
        ([f"input.paths=[{write_lines(tmp_path / 'cols.jsonl', [good])}]", "input.text_column=body"], "body"),
        ([f"input.paths=[{write_lines(tmp_path / 'bad.jsonl', ['{oops'])}]", "input.bad_rows=fail"], "bad.jsonl:1"),
        # the driver checks the adapter the encoder actors would merge (no adapter_config.json), before Ray starts
        ([f"input.paths=[{write_lines(tmp_path / 'ok.jsonl', [good])}]", f"embedder.lora_adapter={tmp_path}"],
         f"LoRA adapter not found: no adapter_config.json in {tmp_path}"),
        ([f"input.paths=[{tmp_path / 'ok.jsonl'}]", f"embedder.lora_adapter={tmp_path / 'nowhere'}"],
         "LoRA adapter not found"),
    ]
    # the first as a user runs it (a process of its own: nothing else reaches its stderr), the rest in this process
    proc = run_job(*cases[0][0], f"store.path={tmp_path / 'q'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and cases[0][1] in lines[0], proc.stderr[-2000:]
    for overrides, needle in cases[1:]:
        code, _, _, lines = job(capsys, *overrides, f"store.path={tmp_path / 'q'}")
        assert code == 2 and len(lines) == 1 and needle in lines[0], (overrides, lines)
    assert not (tmp_path / "q" / "collection").exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_what_the_encoder_node_cannot_run_is_one_line(ray_cluster, tmp_path):
    """Only an encoder actor can find out that its node cannot run the model (here: `device: cuda` where there is no
    CUDA; likewise bf16 on an old GPU, flash-attn missing, no checkpoint at that path on that node). The job exits 2
    with that reason as its one `error:` line, naming the node: not a Ray traceback (the actor's constructor failing
    was reported as an internal Ray error, ~150 lines and exit 1)."""
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "text": "hello", "title": "t"})])
    # the driver joins this session's Ray instance, as a job does on a running cluster (its actors' logs, any
    # traceback among them, are forwarded to its stderr)
    proc = run_job(f"input.paths=[{corpus}]", f"store.path={tmp_path / 'q'}", "embedder.device=cuda",
                   "summary_path=null", ray_address=ray_address())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors and errors[-1].startswith(
        "error: device cuda requested but CUDA is not available on this machine (raised on node "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


JOB_MAIN = runpy.run_path(str(ROOT / "jobs" / "embed_corpus.py"))["main"]
SMALL = ["embedder.max_length=64", "embedder.documents.overlap=8", "encode.batch_size=8", "summary_path=null",
         "progress_every_s=0", "store.upsert_batch_size=16"]


def job(capsys, *overrides: str) -> tuple[int, dict | None, list[str], list[str]]:
    """jobs/embed_corpus.py's main() in this process: (exit code, summary, progress lines, stderr lines: all of
    them on failure, the `warning:` ones on success)."""
    code = JOB_MAIN(["--config", str(ROOT / "jobs/configs/embed_cpu.yaml"), *SMALL, *overrides])
    out, err = capsys.readouterr()
    progress = [line for line in out.splitlines() if line.startswith("progress:")]
    # The summary is the JSON object the job prints last; Ray's own processes may print lines of theirs into the
    # same stdout (e.g. `(raylet) WARNING: N PYTHON worker processes have been started`), never inside it.
    start = out.rindex("\n{") + 1 if "\n{" in out else 0
    if code == 0:  # Ray Data logs its own progress to stderr: keep the job's warning lines
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        return code, json.JSONDecoder().raw_decode(out, start)[0], progress, warnings
    return code, None, progress, err.strip().splitlines()


def row(doc_id, text, **extra) -> str:
    return json.dumps({"id": doc_id, "text": text, "title": f"T {doc_id}", **extra})


LONG = " ".join(f"The harbour bridge was painted on day {j} of the long summer." for j in range(30))


@pytest.mark.parametrize("name, lines, needle", [
    ("mid", [row("a", "hello there"), row("b", "fine"), "{broken", row("c", "more")], r"mid.jsonl:3: malformed JSON"),
    ("nontext", [row("a", "hello"), json.dumps({"id": "b", "text": 7, "title": "t"})], r"nontext.jsonl:2: non-text"),
    ("empty", [row("a", "hello"), row("b", "  ", title=" ")], r"empty.jsonl:2: empty text"),  # no title either
    ("notobject", [row("a", "hello"), "[1, 2]"], r"notobject.jsonl:2: not a JSON object"),
])
def test_bad_rows_fail_stops_before_writing_with_file_and_line(ray_cluster, capsys, tmp_path, name, lines, needle):
    path = write_lines(tmp_path / f"{name}.jsonl", lines)
    code, _, _, err = job(capsys, f"input.paths=[{path}]", f"store.path={tmp_path / 'q'}", "input.bad_rows=fail")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(needle, err[0]), err
    assert not (tmp_path / "q").exists()  # stopped before the collection was even created


def test_bad_rows_skip_counts_and_names_them(ray_cluster, capsys, tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        row("a", "hello there"), "{broken", json.dumps({"id": "n", "text": None}), row("e", "", title=None),
        row("b", "fine")])
    code, summary, _, err = job(capsys, f"input.paths=[{path}]", f"store.path={tmp_path / 'q'}")
    assert code == 0 and summary["documents_embedded"] == 2 and summary["skipped_rows"] == 3
    assert [e.split(": ")[0] for e in summary["skipped_examples"]] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert err == [f"warning: 3 bad rows skipped (first: {path}:2: malformed JSON line (Expecting property name "
                   f"enclosed in double quotes); {path}:3: empty text; {path}:4: empty text)"]


@pytest.mark.parametrize("overrides, needle", [
    (["input.paths=[{tmp}/missing.jsonl]"], "missing.jsonl"),
    (["input.paths=[{tmp}/ok.jsonl]", "input.text_column=body"], "unknown column(s) ['body']"),
    (["input.paths=[{tmp}/ok.jsonl]", "input.bad_rows=maybe"], "bad_rows"),
])
def test_config_and_input_errors_are_one_line(capsys, tmp_path, overrides, needle):
    write_lines(tmp_path / "ok.jsonl", [row("a", "hello")])
    code, _, _, err = job(capsys, *[o.format(tmp=tmp_path) for o in overrides], f"store.path={tmp_path / 'q'}")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_duplicate_ids_last_occurrence_wins_whatever_the_blocks(ray_cluster, capsys, tmp_path):
    """Duplicates across blocks and files: reported once, counted, the LAST occurrence stored (with its own
    chunk count), the same on every run, and the progress lines carry the share of the input and an ETA."""
    first = [row(f"d{i}", f"Document {i} talks about the meadow and the river.") for i in range(40)]
    first[3] = row("d3", LONG)  # long first version: several chunks
    a = write_lines(tmp_path / "a.jsonl", first + [row("d7", "Second version of seven, still in file a.")])
    b = write_lines(tmp_path / "b.jsonl", [row("d3", "The short final version of three."),
                                           row("d7", "Final version of seven, in file b.")])
    stores = []
    for run in range(2):
        store = tmp_path / f"q{run}"
        code, summary, progress, err = job(capsys, f"input.paths=[{a},{b}]", f"store.path={store}",
                                           "input.block_bytes=1024", f"encode.batch_size={4 + 3 * run}")
        assert code == 0, err
        assert summary["duplicates"] == 3 and summary["duplicate_ids"] == 2 and summary["documents_embedded"] == 40
        assert err == [f"warning: 2 duplicate document ids (first: 'd3' at {a}:4 and {b}:1, 'd7' at {a}:8 and "
                       f"{a}:41 and {b}:2); the last occurrence of each is embedded, 3 earlier rows skipped"]
        assert progress and all("ETA" in line for line in progress) and "100% of input" in progress[-1]
        stores.append(all_points(store))
    assert stores[0].keys() == stores[1].keys()
    assert [p["payload"] for p in stores[0].values()] == [stores[1][k]["payload"] for k in stores[0]]
    by_doc = {}
    for p in stores[0].values():
        by_doc.setdefault(p["payload"]["doc_id"], []).append(p["payload"])
    assert len(by_doc["d3"]) == 1 and by_doc["d3"][0]["text"] == "The short final version of three."
    assert [p["text"] for p in by_doc["d7"]] == ["Final version of seven, in file b."]


def test_a_shorter_document_leaves_no_orphan_chunks(ray_cluster, capsys, tmp_path):
    store = tmp_path / "q"
    long = write_lines(tmp_path / "v1.jsonl", [row("x", LONG), row("y", "Unchanged short one.")])
    code, summary, _, _ = job(capsys, f"input.paths=[{long}]", f"store.path={store}")
    assert code == 0 and summary["chunks_written"] > 3
    short = write_lines(tmp_path / "v2.jsonl", [row("x", "Now only a sentence."), row("y", "Unchanged short one.")])
    code, summary, _, _ = job(capsys, f"input.paths=[{short}]", f"store.path={store}", "skip_existing=false")
    assert code == 0
    points = [p["payload"] for p in all_points(store).values()]
    assert sorted((p["doc_id"], p["chunk_index"], p["n_chunks"]) for p in points) == [("x", 0, 1), ("y", 0, 1)]


def test_changed_document_policy_or_max_length_is_never_silently_skipped(ray_cluster, capsys, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [row("x", LONG)])
    store = tmp_path / "q"
    assert job(capsys, f"input.paths=[{path}]", f"store.path={store}")[0] == 0
    for change, needle in (("embedder.max_length=32", "max_length (stored 64, now 32)"),
                           ("embedder.documents.windows=first", "documents.windows (stored 'late_chunk', now 'first')")):
        code, _, _, err = job(capsys, f"input.paths=[{path}]", f"store.path={store}", change)
        assert code == 2 and len(err) == 1 and needle in err[0], err
    code, summary, _, _ = job(capsys, f"input.paths=[{path}]", f"store.path={store}", "embedder.max_length=32",
                              "recreate=true")
    assert code == 0 and summary["documents_embedded"] == 1 and summary["documents_already_present"] == 0


def test_dimension_mismatch_is_caught_before_writing(ray_cluster, corpus, tmp_path):
    path, _ = corpus
    store = tmp_path / "q"
    with open_store(config(tmp_path, path, store).store) as s:
        s.ensure_collection(768)
    with pytest.raises(ConfigError, match="768"):
        embed_corpus(config(tmp_path, path, store))
    with open_store(config(tmp_path, path, store).store) as s:
        assert s.count() == 0


def test_folder_of_text_files(ray_cluster, tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Harbour\nThe harbour lights were repaired in spring.")
    (folder / "sub" / "b.txt").write_text("Glacier measurements show a retreat of twelve metres.")
    (folder / "empty.txt").write_text("")
    cfg = EmbedCorpusConfig.from_dict({
        "input": {"paths": [str(folder)]},
        "store": {"path": str(tmp_path / "q"), "collection": "docs"},
    })
    summary = embed_corpus(cfg)
    assert summary["documents_embedded"] == 2 and summary["skipped_rows"] == 1
    ids = {p["payload"]["doc_id"] for p in all_points(tmp_path / "q").values()}
    assert ids == {"a.md", "sub/b.txt"}


@pytest.mark.parametrize("uri", [False, True])
def test_byte_ranges_own_every_line_once_local_and_file_uri(tmp_path, uri):
    """Ranges of a few hundred bytes (lines straddle their ends) yield every line exactly once, in order, and a
    byte offset resolves to its line number; the same through a pyarrow `file://` URI."""
    from diffembed.files import iter_range_lines, line_number, plan_ranges

    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": i, "text": "word " * (i % 13)}) + "\n" for i in range(120)]
    path.write_text("".join(lines))
    name = f"file://{path}" if uri else str(path)
    ranges = plan_ranges([name], 200)
    assert len(ranges) > 10
    got = [(offset, raw) for r in ranges for offset, raw in iter_range_lines(name, r["start"], r["end"])]
    assert [raw.decode() for _, raw in got] == lines
    assert [line_number(name, offset) for offset, _ in got[::17]] == list(range(1, 121, 17))
