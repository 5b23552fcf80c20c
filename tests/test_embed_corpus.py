"""The batch-embedding job end to end: real local Ray Data, Qdrant local mode, the packaged MiniLM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
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
    docs.append({"id": "empty-1", "text": "   ", "title": "nothing"})  # counted as skipped, never dropped
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
    docs = make_corpus(path, n_docs=240, seed=1)
    overrides = ["store.upsert_batch_size=16", "embedder.max_length=64", "embedder.documents.overlap=8",
                 "encode.batch_size=8", "input.block_bytes=4096", "summary_path=null", "progress_every_s=0"]
    clean_store = tmp_path / "clean"
    embed_corpus(EmbedCorpusConfig.from_yaml(ROOT / "jobs/configs/embed_cpu.yaml",
                                             [f"input.paths=[{path}]", f"store.path={clean_store}", *overrides]),
                 progress=False)
    store = tmp_path / "qdrant"
    args = [sys.executable, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs/configs/embed_cpu.yaml"),
            f"input.paths=[{path}]", f"store.path={store}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    real = sum(1 for d in docs if d["text"].strip())
    killed_at = None
    for line in proc.stdout:  # kill the driver once half of the documents are reported written
        if line.startswith("progress:") and int(line.split()[1]) >= real // 2:
            killed_at = int(line.split()[1])
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    clean = all_points(clean_store)
    assert killed_at is not None and killed_at < real, "the job finished before it could be killed"
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


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs/configs/embed_cpu.yaml"),
         *overrides],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )


def test_bad_inputs_give_one_line_errors(tmp_path):
    good = json.dumps({"id": "a", "text": "hello", "title": "t"})
    cases = [
        ([f"input.paths=[{tmp_path / 'missing.jsonl'}]"], "missing.jsonl"),
        ([f"input.paths=[{write_lines(tmp_path / 'cols.jsonl', [good])}]", "input.text_column=body"], "body"),
        ([f"input.paths=[{write_lines(tmp_path / 'bad.jsonl', ['{oops'])}]"], "bad.jsonl:1"),
    ]
    for overrides, needle in cases:
        proc = run_job(*overrides, f"store.path={tmp_path / 'q'}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (overrides, proc.stderr[-2000:])
    assert not (tmp_path / "q" / "collection").exists()  # nothing was written


def test_malformed_line_mid_file_is_reported_with_its_line(ray_cluster, tmp_path):
    good = json.dumps({"id": "a", "text": "hello there", "title": "t"})
    path = write_lines(tmp_path / "mid.jsonl", [good, good.replace('"a"', '"b"'), "{broken", good])
    cfg = config(tmp_path, path, tmp_path / "q")
    with pytest.raises(Exception, match=r"mid.jsonl:3"):
        embed_corpus(cfg)


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
    from diffembed.batch.reading import iter_range_lines, line_number, plan_ranges

    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": i, "text": "word " * (i % 13)}) + "\n" for i in range(120)]
    path.write_text("".join(lines))
    name = f"file://{path}" if uri else str(path)
    ranges = plan_ranges([name], 200)
    assert len(ranges) > 10
    got = [(offset, raw) for r in ranges for offset, raw in iter_range_lines(name, r["start"], r["end"])]
    assert [raw.decode() for _, raw in got] == lines
    assert [line_number(name, offset) for offset, _ in got[::17]] == list(range(1, 121, 17))
