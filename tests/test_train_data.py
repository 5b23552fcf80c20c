"""Training rows: validation with file and row, skip-or-fail, single-source global batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffembed.config import ConfigError
from diffembed.files import expand_files
from diffembed.train.data import load_pairs, plan_batches
from diffembed.train.deepspeed import check_zero_options, deepspeed_config
from diffembed.train.config import TrainConfig


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_rows_are_reported_with_file_and_row(tmp_path):
    good = json.dumps({"query": "q", "positive": "p", "negatives": ["n"]})
    path = write(tmp_path / "pairs.jsonl", [
        good,
        json.dumps({"query": "", "positive": "p", "negatives": ["n"]}),  # row 2: empty query
        "{not json",  # row 3
        json.dumps({"query": "q", "negatives": ["n"]}),  # row 4: no positive
        json.dumps({"query": "q", "positive": "p", "negatives": []}),  # row 5: no hard negative
        good,
    ])
    pairs, bad = load_pairs([path], "auto", hard_negatives=1, bad_rows="skip")
    assert len(pairs) == 2 and bad.count == 4
    assert [e.split(": ")[0] for e in bad.examples] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    with pytest.raises(ConfigError, match=rf"{path}:2: .*'query'"):
        load_pairs([path], "auto", hard_negatives=1, bad_rows="fail")


def test_parquet_rows(tmp_path):
    table = pa.table({"query": ["a", "b"], "positive": ["pa", "pb"], "negatives": [["na"], ["nb"]],
                      "source": ["x", "y"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    pairs, bad = load_pairs([str(tmp_path / "pairs.parquet")], "auto", 1, "fail")
    assert [(p.query, p.source, p.negatives) for p in pairs] == [("a", "x", ["na"]), ("b", "y", ["nb"])]


def test_same_source_batches(tmp_path):
    rows = [json.dumps({"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"], "source": "ab"[i % 2]})
            for i in range(40)]
    pairs, _ = load_pairs([write(tmp_path / "p.jsonl", rows)], "auto", 1, "fail")
    plan = plan_batches(pairs, global_batch=8, steps=10, same_source=True, seed=0)
    assert len(plan) == 10 and all(len(b) == 8 for b in plan)
    assert all(len({r["source"] for r in batch}) == 1 for batch in plan)
    assert {batch[0]["source"] for batch in plan} == {"a", "b"}
    mixed = plan_batches(pairs, global_batch=8, steps=5, same_source=False, seed=0)
    assert any(len({r["source"] for r in batch}) == 2 for batch in mixed)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        expand_files([str(tmp_path / "nope*.jsonl")], "data.train_files")


def test_deepspeed_config_follows_the_train_config():
    cfg = TrainConfig.from_dict({"data": {"train_files": ["x"]}, "optim": {"global_batch_size": 16},
                                 "run": {"num_workers": 4},
                                 "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}})
    ds = deepspeed_config(cfg, use_gpu=True)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed_config(cfg, use_gpu=False)["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="offload_params"):
        TrainConfig.from_dict({"data": {"train_files": ["x"]}, "deepspeed": {"zero_stage": 2, "offload_params": True}})


def test_zero_options_reach_deepspeed_and_typos_fail_before_the_run():
    def cfg(**deepspeed):
        return TrainConfig.from_dict({"data": {"train_files": ["x"]}, "deepspeed": {"zero_stage": 3, **deepspeed}})

    tuned = cfg(zero_options={"stage3_param_persistence_threshold": 0, "overlap_comm": True})
    zero = deepspeed_config(tuned, use_gpu=False)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["overlap_comm"] is True  # overrides the default
    check_zero_options(tuned)
    check_zero_options(cfg())  # nothing to check: DeepSpeed is not even imported for it
    with pytest.raises(ConfigError, match="^deepspeed.zero_options: stage3_param_persistance_threshold: Extra"):
        check_zero_options(cfg(zero_options={"stage3_param_persistance_threshold": 0}))
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        check_zero_options(cfg(zero_options={"reduce_bucket_size": "large"}))
    with pytest.raises(ConfigError, match="zero_options need deepspeed.enabled"):
        cfg(enabled=False, zero_options={"reduce_bucket_size": 10})
    with pytest.raises(ConfigError, match="set deepspeed.zero_stage instead of stage"):
        cfg(zero_options={"stage": 1})


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("train_*.yaml")):
        cfg = TrainConfig.from_yaml(path)
        assert cfg.optim.global_batch_size % cfg.run.num_workers == 0, path
    paper = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "jobs/configs/train_dream7b_lora.yaml")
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout, paper.loss.scale) == (16, 32, 0.05, 50.0)
    assert (paper.optim.lr, paper.optim.warmup_steps, paper.optim.global_batch_size) == (5e-5, 100, 16)
    assert (paper.embedder.attention, paper.embedder.pooling, paper.embedder.max_length) == (
        "bidirectional", "mean", 4096)


def test_ray_data_reader_matches_the_local_one(ray_cluster, tmp_path):
    from diffembed.train.data import read_pairs

    good = json.dumps({"query": "q", "positive": "p", "negatives": ["n"], "source": "s"})
    a = write(tmp_path / "a.jsonl", [good, "{bad", good.replace('"q"', '"q2"')])
    b = write(tmp_path / "b.jsonl", [json.dumps({"query": "x", "positive": ""}), good])
    local = load_pairs([a, b], "auto", 1, "skip")
    ray_read = read_pairs([a, b], "auto", 1, "skip")
    assert [p.query for p in ray_read[0]] == [p.query for p in local[0]] == ["q", "q2", "q"]
    assert ray_read[1].examples == local[1].examples and ray_read[1].count == 2
    with pytest.raises(ConfigError, match=rf"{a}:2"):
        read_pairs([a, b], "auto", 1, "fail")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    for reader in (load_pairs, read_pairs):  # a whole unreadable file is fatal even with skip, one line
        with pytest.raises(ConfigError, match=rf"^{broken}: not a readable Parquet file \("):
            reader([a, str(broken)], "auto", 1, "skip")


def test_rows_holding_unicode_line_separators_are_one_row(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (`ensure_ascii=False` writes them so); a line is cut
    at "\\n" only, so such a row is one good row, not three malformed ones."""
    row = {"query": "q\u2028one", "positive": "p\u2029two\x85three\x0bfour", "negatives": ["n\x1cfive"]}
    path = tmp_path / "web.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(row) + "\n", encoding="utf-8")
    pairs, bad = load_pairs([str(path)], "auto", 1, "fail")
    assert bad.count == 0 and [(p.query, p.positive, p.negatives) for p in pairs] == [
        (row["query"], row["positive"], row["negatives"])] * 2


def pair_lines(n: int, bad_every: int = 0) -> list[str]:
    """JSONL lines of pairs of varied length (some longer than a small shard), blank lines, a CRLF line, a U+2028
    inside a string, and a malformed line every `bad_every` rows."""
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("{not json" if i % 2 else json.dumps({"query": "", "positive": "p"}))
            continue
        lines.append(json.dumps({"query": f"q{i}" + " word" * (i % 23), "positive": f"p{i}\u2028" + "x" * (i * 7 % 300),
                                 "negatives": [f"n{i}"], "source": "ab"[i % 2]}, ensure_ascii=False)
                     + ("\r" if i % 11 == 0 else ""))
        if i % 9 == 0:
            lines.append("")
    return lines


@pytest.mark.parametrize("shard_bytes", [41, 97, 1000, 1 << 30])
def test_sharded_scan_equals_the_local_read(ray_cluster, tmp_path, shard_bytes):
    """A file cut into shards (JSONL byte ranges that end mid-line; Parquet row-group runs) is read by several
    tasks: the same rows in the same order, and every bad row named by its line / row number in the file, as the
    in-process reader names it."""
    from diffembed.rowfiles import plan_shards
    from diffembed.train.data import read_pairs

    a = write(tmp_path / "a.jsonl", pair_lines(60, bad_every=7))
    b = write(tmp_path / "b.jsonl", pair_lines(9, bad_every=4))
    rows = [json.loads(line) for line in pair_lines(40) if line]
    for i in (5, 17, 33):
        rows[i] = {**rows[i], "positive": ""}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=6)
    files = [a, str(tmp_path / "c.parquet"), b]
    shards = plan_shards(files, "auto", shard_bytes)
    assert len(shards) == 3 if shard_bytes == 1 << 30 else len(shards) >= 10
    assert sorted({s["path"] for s in shards}, key=files.index) == files
    local, local_bad = load_pairs(files, "auto", 1, "skip")
    pairs, bad = read_pairs(files, "auto", 1, "skip", shard_bytes=shard_bytes)
    assert pairs == local and len(pairs) == 52 + 37 + 7  # every good row once, in input order
    assert bad.count == local_bad.count == 8 + 3 + 2 and bad.examples == local_bad.examples
    assert f"{tmp_path / 'c.parquet'}:34: missing or empty 'positive'" in bad.examples
    with pytest.raises(ConfigError, match=rf"^{a}:8: bad training row: "):
        read_pairs(files, "auto", 1, "fail", shard_bytes=shard_bytes)


def test_workers_fetch_the_rows_the_plan_names(ray_cluster, tmp_path):
    """The driver plans over row places only; each rank's `StepRows` (as a Ray Train worker runs it, in another
    process) fetches exactly its slice of the plan the in-process reader gives, from several blocks, across
    fetch windows, and from the middle of the run as a restart does."""
    import ray

    from diffembed.train.data import StepRows
    from diffembed.train.loop import build_plan

    files = []
    for f in range(3):
        rows = [json.dumps({"query": f"q{f}-{i}", "positive": f"p{f}-{i}", "negatives": [f"n{f}-{i}", "x"],
                            "source": "ab"[i % 2], **({"instruction": "find"} if i % 3 else {})}) for i in range(20)]
        files.append(write(tmp_path / f"pairs{f}.jsonl", rows[:7] + ["{bad"] + rows[7:]))
    cfg = TrainConfig.from_dict({"data": {"train_files": files}, "optim": {"global_batch_size": 8, "max_steps": 13},
                                 "run": {"num_workers": 2}})
    plan = build_plan(cfg)
    assert len(plan["blocks"]) >= 3 and plan["block"].shape == plan["offset"].shape == (13, 8)
    assert all(isinstance(ref, ray.ObjectRef) for ref in plan["blocks"])  # the driver holds no row text
    pairs, bad = load_pairs(files, "auto", 1, "skip")
    assert bad.count == 3
    expected = plan_batches(pairs, 8, 13, cfg.data.same_source_batches, cfg.data.shuffle_seed)

    @ray.remote
    def fetch(plan, rank, start):
        rows = StepRows(plan["blocks"], plan["block"], plan["offset"], rank, 4, window_rows=12)  # 3 steps a fetch
        return [rows(step) for step in range(start, len(rows))]

    ref = ray.put(plan)
    for rank in (0, 1):
        for start in (0, 7):
            got = ray.get(fetch.remote(ref, rank, start))
            assert got == [batch[rank * 4 : (rank + 1) * 4] for batch in expected[start:]], (rank, start)


def test_progress_line_counts_time_left_from_this_attempts_rate():
    from diffembed.train.worker import progress_line

    metrics = {"step": 30, "loss": 0.51234, "lr": 4.5e-05, "samples_per_s": 12.34, "tokens_per_s": 5678.9}
    # resumed at step 20: 10 steps in 50 s, 70 to go -> 350 s
    line = progress_line(metrics, 100, 10, 50.0)
    assert line == ("step 30/100  loss 0.5123  lr 4.5e-05  12.3 samples/s  5679 tokens/s  elapsed 0m50s  "
                    "left ~5m50s")
    long = progress_line({**metrics, "dev_ndcg@10": 0.61234, "dev_mrr@10": 0.5}, 10_000, 30, 3 * 3600.0)
    assert long.endswith("elapsed 3h00m  left ~997h00m  dev nDCG@10 0.6123")
