"""The hard-negative mining job: the picking rules on plain data, then the job end to end on real local Ray Data with
the packaged MiniLM (exact candidates, and a hybrid search of the batch job's Qdrant Edge collection), and the train
job reading what it wrote."""

from __future__ import annotations

import importlib
import inspect
import json
import random
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffembed import ConfigError
from diffembed.mining.config import MineNegativesConfig, NegativesConfig
from diffembed.mining.job import Candidate, mine_negatives, pick_negatives, rank_candidates, row_seed, same_document

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["os.path", "textwrap", "json", "shutil", "itertools", "functools", "statistics", "random", "heapq"]


def stdlib_pairs(n: int = 40) -> list[dict]:
    """Real text offline: a function's one-line docstring summary as the query, the rest of its docstring as the
    positive (the installed standard library's documentation; os.path's functions make each other hard)."""
    rows = []
    for mod in MODULES:
        module = importlib.import_module(mod)
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name)) if not name.startswith("_") else None
            first, _, rest = (doc or "").partition("\n")
            if len(first) >= 15 and len(rest.strip()) >= 40 and callable(getattr(module, name)):
                rows.append({"query": first.strip(), "positive": " ".join(rest.split())[:600],
                             "doc_id": f"{mod}.{name}", "source": mod, "meta": {"module": mod, "rank": len(rows)}})
    return rows[:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------ picking, no Ray


def test_rank_window_filter_and_seeded_draw():
    positive = "Return the base name of pathname p. This is the second half of the pair returned by split."
    found = [
        Candidate("own", positive, 0.99),  # the positive's own document
        Candidate("chunk", "This is the second half of the pair", 0.97),  # one of its chunks
        Candidate("a", "Return the directory name of pathname p.", 0.90),
        Candidate("a", "a later chunk of document a", 0.50),  # a document counts once, at its best chunk
        Candidate("b", "Split a pathname into a pair.", 0.80),
        Candidate("c", "Normalize a pathname.", 0.70),
        Candidate("d", "Join path components.", 0.60),
        Candidate("e", "Return the size of a file.", 0.40),
    ]
    ranked = rank_candidates(found, positive, positive_key="own")
    assert [c.key for c in ranked] == ["a", "b", "c", "d", "e"]
    cfg = NegativesConfig(per_query=2, skip_top=1, window=3, max_positive_ratio=0.95)
    # window = ranks 1..3 (b, c, d); the positive scores 0.8 -> ceiling 0.76 drops b; c and d remain
    negatives, dropped = pick_negatives(ranked, 0.8, cfg, seed=1)
    assert [c.key for c in negatives] == ["c", "d"] and dropped == 1
    one = NegativesConfig(per_query=1, window=5, max_positive_ratio=1.0)
    draws = {pick_negatives(ranked, 1.0, one, row_seed(s, "q", "p"))[0][0].key for s in range(20)}
    assert len(draws) > 1  # seeded, not always the top ...
    assert pick_negatives(ranked, 1.0, one, 7) == pick_negatives(ranked, 1.0, one, 7)  # ... and reproducible
    # a negative positive score: the ceiling sits below it
    assert pick_negatives([Candidate("x", "t", -0.2)], -0.2, one, 0) == ([], 1)
    assert same_document("  SECOND half\nof the pair ", positive) and not same_document("", positive)


def test_bad_config_and_input_are_one_line_errors(capsys, tmp_path):
    good = write_jsonl(tmp_path / "pairs.jsonl", stdlib_pairs(3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    cases = [
        ([f"input.files=[{tmp_path}/missing.jsonl]"], "missing.jsonl"),
        (["candidates.source=store"], "candidates.store"),
        (["negatives.per_query=5", "negatives.window=2"], "exceeds negatives.window"),
        (["candidates.source=store", f"candidates.store.path={tmp_path}/q", "candidates.store.collection=none"],
         "does not exist"),
    ]
    args = ["--config", str(ROOT / "jobs" / "configs" / "mine_exact.yaml"), f"input.files=[{good}]",
            f"output={tmp_path}/out.jsonl"]
    # the first as a user runs it (a process of its own: nothing else reaches its stderr), the rest in this process
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "mine_negatives.py"), *args, *cases[0][0]],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and cases[0][1] in lines[0], proc.stderr
    main = runpy.run_path(str(ROOT / "jobs" / "mine_negatives.py"))["main"]
    for overrides, needle in cases[1:]:
        code = main([*args, *overrides])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (overrides, lines)
    assert not list(tmp_path.glob("out.jsonl*"))


def test_a_bad_row_stops_the_job_before_any_encoding_in_one_line(ray_cluster, capsys, tmp_path):
    """The input is read and checked on the cluster (Ray tasks); with `input.bad_rows: fail` the first bad row in
    input order is the job's one error line, and no output (not even a parts folder) is left."""
    import runpy

    main = runpy.run_path(str(ROOT / "jobs" / "mine_negatives.py"))["main"]
    good = write_jsonl(tmp_path / "a.jsonl", stdlib_pairs(3))
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n{x\n")
    code = main(["--config", str(ROOT / "jobs" / "configs" / "mine_exact.yaml"), f"input.files=[{good},{bad}]",
                 f"output={tmp_path}/out.jsonl", "input.bad_rows=fail"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {bad}:2: bad training row: missing or empty 'positive' "
                                 "(input.bad_rows=skip skips it)"], err
    assert not list(tmp_path.glob("out.jsonl*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_what_the_encoder_node_cannot_run_is_one_line(ray_cluster, capsys, tmp_path):
    """An encoder actor's load failing on its node (`device: cuda` without CUDA) is the job's one error line, exit 2,
    and leaves no output or parts behind."""
    import runpy

    main = runpy.run_path(str(ROOT / "jobs" / "mine_negatives.py"))["main"]
    pairs = write_jsonl(tmp_path / "a.jsonl", stdlib_pairs(3))
    code = main(["--config", str(ROOT / "jobs" / "configs" / "mine_exact.yaml"), f"input.files=[{pairs}]",
                 f"output={tmp_path}/out.jsonl", "embedder.device=cuda", "summary_path=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: device cuda requested but CUDA is not available on this machine"
                                            " (raised on node "), err
    assert not list(tmp_path.glob("out.jsonl*"))


def test_shipped_configs_parse():
    for path in sorted(ROOT.glob("jobs/configs/mine_*.yaml")):
        MineNegativesConfig.from_yaml(path)


# ------------------------------------------------------------------------------------------ the job on Ray


def config(tmp_path: Path, pairs: Path | list[Path], out: str, **sections) -> MineNegativesConfig:
    return MineNegativesConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64},
        "input": {"files": [str(p) for p in (pairs if isinstance(pairs, list) else [pairs])], "bad_rows": "skip"},
        "output": str(tmp_path / out),
        "negatives": {"per_query": 2, "window": 8},
        "encode": {"batch_size": 16},
        **sections,
    })


def mean_scores(minilm, rows: list[dict], negatives: list[list[str]]) -> float:
    """The base model's mean cosine of each query with its negatives."""
    q = minilm.encode_queries([r["query"] for r in rows])  # (N, D), unit
    return float(np.mean([(minilm.encode_documents(negs) @ q[i]).mean() for i, negs in enumerate(negatives)]))


def check_mined(minilm, rows: list[dict], out: list[dict], pool: list[str]) -> None:
    """Every input field kept, the positive never a negative, and mined negatives harder than random ones."""
    assert len(out) == len(rows)
    for row, got in zip(rows, out):
        assert {k: v for k, v in got.items() if k != "negatives"} == {k: v for k, v in row.items() if k != "negatives"}
        assert len(got["negatives"]) <= 2
        assert all(not same_document(n, row["positive"]) for n in got["negatives"])
    # A docstring's first line matches the rest of it weakly: the false-negative filter leaves some rows short.
    mined_rows = [i for i, o in enumerate(out) if o["negatives"]]
    assert len(mined_rows) >= 0.75 * len(rows)
    rng = random.Random(0)
    random_negs = [rng.sample([p for p in pool if p != rows[i]["positive"]], 2) for i in mined_rows]
    picked = [rows[i] for i in mined_rows]
    mined = mean_scores(minilm, picked, [out[i]["negatives"] for i in mined_rows])
    chance = mean_scores(minilm, picked, random_negs)
    assert mined > chance + 0.1, (mined, chance)


def test_exact_mining_is_deterministic_harder_than_random_and_trains(ray_cluster, tmp_path, minilm, tiny_checkpoints):
    rows = stdlib_pairs()
    rows[0]["negatives"] = ["an old negative, replaced"]
    # Two files, the first with a bad row (skipped): the output keeps the input's order across files.
    first = write_jsonl(tmp_path / "pairs-a.jsonl", rows[:25])
    first.write_text(first.read_text() + json.dumps({"query": "no positive"}) + "\n")
    pairs = [first, write_jsonl(tmp_path / "pairs-b.jsonl", rows[25:])]
    summary = mine_negatives(config(tmp_path, pairs, "mined.jsonl", summary_path=str(tmp_path / "summary.json")))
    mine_negatives(config(tmp_path, pairs, "again.jsonl", candidates={"source": "exact", "searchers": 1}))
    # deterministic, and the same with one miner as with two (the default) sharing the pool
    assert (tmp_path / "mined.jsonl").read_bytes() == (tmp_path / "again.jsonl").read_bytes()
    assert summary["rows"] == len(rows) and summary["candidates"] == "exact"
    assert summary["skipped_rows"] == 1 and summary["skipped_examples"][0].startswith(f"{first}:26: missing")
    assert summary["resumed_rows"] == 0 and not list(tmp_path.glob("*.parts"))
    assert summary["mean_negative_score"] < summary["mean_positive_score"]
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == len(rows)
    out = read_jsonl(tmp_path / "mined.jsonl")
    check_mined(minilm, rows, out, [r["positive"] for r in rows])
    pool = {r["positive"] for r in rows}
    assert all(n in pool for o in out for n in o["negatives"])  # exact: negatives are other rows' positives

    # The train job reads the mined rows as its hard negatives.
    from diffembed.train.config import TrainConfig
    from diffembed.train.loop import train

    cfg = TrainConfig.from_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml", [
        f"embedder.model={tiny_checkpoints['dream']}", f"run.storage_path={tmp_path}", "deepspeed.enabled=false",
        f"data.train_files=[{tmp_path / 'mined.jsonl'}]", "data.hard_negatives=1",  # short rows: skipped
        "data.same_source_batches=false", "run.num_workers=1", "optim.max_steps=2", "run.checkpoint_every=2",
    ])
    assert train(cfg)["step"] == 2


def test_store_mining_never_returns_the_positives_chunks(ray_cluster, tmp_path, minilm):
    """Candidates from the batch job's collection (hybrid search; long documents stored as several windows)."""
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    rows = stdlib_pairs()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": r["doc_id"], "text": r["positive"]} for r in rows])
    embedder = {"model": "all-MiniLM-L6-v2", "max_length": 64, "documents": {"windows": "best", "overlap": 8}}
    store = {"path": str(tmp_path / "qdrant"), "collection": "docs", "sparse": True}
    embed_corpus(EmbedCorpusConfig.from_dict({"embedder": embedder, "input": {"paths": [str(corpus)]},
                                              "store": store}), progress=False)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = config(tmp_path, pairs, "mined.jsonl", embedder=embedder, candidates={
        "source": "store", "mode": "hybrid", "store": store, "positive_id_field": "doc_id"})
    summary = mine_negatives(cfg)
    assert summary["candidates"] == "store:hybrid" and summary["rows"] == len(rows)
    out = read_jsonl(tmp_path / "mined.jsonl")
    check_mined(minilm, rows, out, [r["positive"] for r in rows])
    # Another embedding function than the collection's is refused before any work.
    with pytest.raises(ConfigError, match="different embedding function"):
        mine_negatives(cfg.model_copy(update={"embedder": cfg.embedder.model_copy(update={"max_length": 32})}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_output_parts_resume_and_join_whole(tmp_path, s3_bucket, where):
    """Rows go to `<output>.parts/` in parts of `part_rows`; a failed run keeps its complete parts (not the one being
    written), a rerun of the same job resumes after them, another job's parts are removed, and the output appears
    whole only at the end (local path or URI)."""
    import pyarrow.fs as pafs

    from diffembed.mining.output import PartsOutput

    if where == "local":
        output = str(tmp_path / "out" / "mined.jsonl")
        fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    else:
        output = s3_bucket.uri("runs/mined.jsonl")
        fs, root = s3_bucket.fs, f"{s3_bucket.name}/runs"

    def listing(folder: str = "") -> list[str]:
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}{folder}", allow_not_found=True)))

    lines = [json.dumps({"query": f"q{i}"}) for i in range(7)]
    ones = lambda n: {"rows": [1] * n, "negatives": [2] * n}  # noqa: E731 (per-row totals)
    out = PartsOutput(output, "job-a", part_rows=3, total=7)
    assert out.resume() == 0
    with pytest.raises(RuntimeError, match="mining failed"):
        try:
            out.write([0, 1], lines[:2], ones(2))
            out.write([2, 3, 4], lines[2:5], ones(3))  # part [0, 3) complete, [3, 6) half written
            raise RuntimeError("mining failed")
        except BaseException:
            out.abort()
            raise
    assert listing() == ["mined.jsonl.parts"]  # no output yet
    assert listing("/mined.jsonl.parts") == ["000000000000-000000000003.json", "000000000000-000000000003.jsonl",
                                             "job.json"]
    again = PartsOutput(output, "job-a", part_rows=3, total=7)
    assert again.resume() == 3  # the rerun starts after the complete part
    with pytest.raises(RuntimeError, match="out of order"):
        again.write([4], lines[4:5], ones(1))
    again.write([3, 4, 5, 6], lines[3:], ones(4))
    again.join()
    assert listing() == ["mined.jsonl"]
    with fs.open_input_stream(f"{root}/mined.jsonl") as f:
        assert f.read().decode() == "".join(line + "\n" for line in lines)
    assert again.totals() == {"rows": 7, "negatives": 14}

    # another job (changed settings or input) never resumes these parts
    stale = PartsOutput(output, "job-a", part_rows=3, total=7)
    stale.resume()
    stale.write([0, 1, 2], lines[:3], ones(3))
    other = PartsOutput(output, "job-b", part_rows=3, total=7)
    assert other.resume() == 0 and listing("/mined.jsonl.parts") == ["job.json"]


def test_killed_mining_run_resumes_and_equals_a_clean_run(ray_cluster, tmp_path):
    """SIGKILL of the mining driver once a part of its output is written: the rerun keeps that part, mines only the
    rows after it, and writes the same bytes as an uninterrupted run."""
    import os
    import signal
    import time

    import ray

    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    # Store candidates from files of a part each: the rows are encoded and mined as they stream, a file's block at
    # a time, so once the first part is written the rest still takes seconds of encoding and the kill lands mid-run
    # (exact mining encodes every row first; one file is one block: either way all parts were written within
    # milliseconds, and a kill after the first could find them all written).
    rows = stdlib_pairs(60)
    for i in range(0, len(rows), 6):  # a file per part: blocks that reach the driver one after another
        write_jsonl(tmp_path / f"pairs{i:03d}.jsonl", rows[i:i + 6])
    pairs = tmp_path / "pairs*.jsonl"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": r["doc_id"], "text": r["positive"]} for r in rows])
    embed_corpus(EmbedCorpusConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64}, "input": {"paths": [str(corpus)]},
        "store": {"path": str(tmp_path / "qdrant"), "collection": "docs"}}), progress=False)
    overrides = [f"input.files=[{pairs}]", "negatives.per_query=2", "negatives.window=8", "encode.batch_size=2",
                 "part_rows=6", "embedder.max_length=64", "summary_path=null", "candidates.source=store",
                 f"candidates.store.path={tmp_path / 'qdrant'}", "candidates.store.collection=docs",
                 "candidates.positive_id_field=doc_id",
                 "candidates.store.lock_wait_s=60"]  # the rerun waits for the killed run's store actor to go
    clean = mine_negatives(MineNegativesConfig.from_yaml(ROOT / "jobs/configs/mine_exact.yaml",
                                                         [*overrides, f"output={tmp_path / 'clean.jsonl'}"]))
    assert clean["resumed_rows"] == 0 and clean["rows"] == len(rows)
    output = tmp_path / "mined.jsonl"
    args = [sys.executable, str(ROOT / "jobs" / "mine_negatives.py"), "--config",
            str(ROOT / "jobs/configs/mine_exact.yaml"), *overrides, f"output={output}"]
    # the driver joins this session's Ray instance (as a job on a running cluster): its death takes its actors only
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    parts = tmp_path / "mined.jsonl.parts"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    while proc.poll() is None and not [p for p in parts.glob("*.json") if p.name != "job.json"]:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not output.exists(), "the job finished before it could be killed"
    kept = sorted(p.name for p in parts.glob("0*.jsonl"))
    assert kept and len(kept) < len(rows) // 6
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["resumed_rows"] >= 6 and summary["resumed_rows"] % 6 == 0
    assert output.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()
    assert {k: v for k, v in summary.items() if k not in ("wall_s", "output", "resumed_rows")} == {
        k: v for k, v in clean.items() if k not in ("wall_s", "output", "resumed_rows")}
    assert not parts.exists()
