"""The hard-negative mining job: the picking rules on plain data, then the job end to end on real local Ray Data with
the packaged MiniLM (exact candidates, and a hybrid search of the batch job's Qdrant Edge collection), and the train
job reading what it wrote."""

from __future__ import annotations

import importlib
import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_bad_config_and_input_are_one_line_errors(tmp_path):
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
    for overrides, needle in cases:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "mine_negatives.py"), "--config",
             str(ROOT / "jobs" / "configs" / "mine_exact.yaml"), f"input.files=[{good}]",
             f"output={tmp_path}/out.jsonl", *overrides],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (overrides, proc.stderr)
        assert not (tmp_path / "out.jsonl").exists()


def test_a_bad_row_stops_the_job_before_any_encoding_in_one_line(ray_cluster, capsys, tmp_path):
    """The input is read and checked on the cluster (Ray tasks); with `input.bad_rows: fail` the first bad row in
    input order is the job's one error line, and no output (not even a partial one) is left."""
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
    again = mine_negatives(config(tmp_path, pairs, "again.jsonl"))
    assert (tmp_path / "mined.jsonl").read_bytes() == (tmp_path / "again.jsonl").read_bytes()  # deterministic
    assert summary["rows"] == len(rows) and summary["candidates"] == "exact"
    assert summary["skipped_rows"] == 1 and summary["skipped_examples"][0].startswith(f"{first}:26: missing")
    assert not list(tmp_path.glob("*.partial"))
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
def test_output_appears_whole_or_not_at_all(tmp_path, s3_bucket, where):
    """The mined rows are appended to `<output>.partial` as they arrive and renamed at the end; a failed run leaves
    neither the output nor the partial file (local path or URI)."""
    import pyarrow.fs as pafs

    from diffembed.mining.job import _Output

    if where == "local":
        output = str(tmp_path / "out" / "mined.jsonl")
        listing = lambda: sorted(p.name for p in (tmp_path / "out").glob("*"))  # noqa: E731
        read = lambda: (tmp_path / "out" / "mined.jsonl").read_text()  # noqa: E731
    else:
        output = s3_bucket.uri("runs/mined.jsonl")
        listing = lambda: sorted(i.base_name for i in s3_bucket.fs.get_file_info(  # noqa: E731
            pafs.FileSelector(f"{s3_bucket.name}/runs", allow_not_found=True)))
        read = lambda: s3_bucket.fs.open_input_stream(f"{s3_bucket.name}/runs/mined.jsonl").read().decode()  # noqa
    with pytest.raises(RuntimeError, match="mining failed"):
        with _Output(output) as out:
            out.write(['{"query": "a"}'])
            if where == "local":  # written as the rows arrive (an S3 upload shows when it is closed)
                assert listing() == ["mined.jsonl.partial"]
            raise RuntimeError("mining failed")
    assert listing() == []
    with _Output(output) as out:
        out.write(['{"query": "a"}', '{"query": "b"}'])
        out.write([])
        out.write(['{"query": "c"}'])
    assert listing() == ["mined.jsonl"]
    assert read() == '{"query": "a"}\n{"query": "b"}\n{"query": "c"}\n'
