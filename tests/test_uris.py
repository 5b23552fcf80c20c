"""Inputs given as URIs (`file://`, and `s3://` on the loopback S3 server of tests/s3.py) expand, read and embed
exactly as the same files read locally; a missing URI is a one-line ConfigError before anything runs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffembed.batch.config import EmbedCorpusConfig, InputConfig
from diffembed.batch.pipeline import embed_corpus
from diffembed.batch.reading import expand_inputs, plan_units, unit_rows
from diffembed.config import ConfigError
from diffembed.files import expand_files, open_input
from diffembed.train.data import load_pairs, read_pairs
from test_embed_corpus import all_points, make_corpus

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_globs_over_file_and_s3_uris(tmp_path, s3_bucket):
    files = {"c/2.jsonl": "{}\n", "c/1.jsonl": "{}\n", "c/10.jsonl": "{}\n", "c/notes.txt": "x",
             "c/sub/3.jsonl": "{}\n", "other/4.jsonl": "{}\n"}
    tree(tmp_path, files)
    for name in files:  # written out of order: the listing order must not matter
        s3_bucket.put(name, files[name])
    for base in (f"file://{tmp_path}", f"s3://{s3_bucket.name}"):
        assert expand_files([f"{base}/c/*.jsonl"], "t") == [f"{base}/c/{n}.jsonl" for n in ("1", "10", "2")]
        assert expand_files([f"{base}/c/*/*.jsonl", f"{base}/c/1.jsonl"], "t") == [
            f"{base}/c/sub/3.jsonl", f"{base}/c/1.jsonl"]  # `*` never crosses a `/`; patterns keep their order
        assert expand_files([f"{base}/*/[34].jsonl"], "t") == [f"{base}/other/4.jsonl"]
        with open_input(expand_files([f"{base}/c/1*.jsonl"], "t")[0]) as f:
            assert f.readline() == b"{}\n"
        for pattern in (f"{base}/c/*.parquet", f"{base}/c/missing.jsonl", f"{base}/nowhere/*.jsonl"):
            with pytest.raises(ConfigError, match=r"^data.train_files: no file matches '.*'$"):
                expand_files([pattern], "data.train_files")
        fmt, found = expand_inputs(InputConfig(paths=[f"{base}/c"]))  # a folder: its .txt/.md files
        assert (fmt, found) == ("text", [f"{base}/c/notes.txt"])
        with pytest.raises(ConfigError, match="no file matches"):
            expand_inputs(InputConfig(paths=[f"{base}/*"]))  # only folders match: nothing to read


def test_text_folder_ids_are_the_same_locally_and_on_s3(tmp_path, s3_bucket):
    files = {"docs/a.txt": "alpha text", "docs/sub/b.md": "beta text"}
    tree(tmp_path, files)
    for name, text in files.items():
        s3_bucket.put(name, text)
    read = {}
    for where, folder in (("local", str(tmp_path / "docs")), ("s3", s3_bucket.uri("docs"))):
        cfg = InputConfig(paths=[folder])
        read[where] = [(r["doc_id"], r["text"]) for u in plan_units(cfg) for r in unit_rows(u, cfg)]
    assert read["s3"] == read["local"] == [("a.txt", "alpha text"), ("sub/b.md", "beta text")]


def embed(paths: list[str], store: Path, *overrides: str) -> tuple[dict, dict]:
    cfg = EmbedCorpusConfig.from_dict(
        {
            "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64, "documents": {"windows": "best", "overlap": 8}},
            "input": {"paths": paths, "title_column": "title", "block_bytes": 1024},
            "encode": {"actors": 1, "batch_size": 8},
            "store": {"path": str(store), "collection": "docs", "sparse": False, "upsert_batch_size": 16},
            "progress_every_s": 0,
        },
        list(overrides),
    )
    summary = embed_corpus(cfg)
    return summary, {k: (p["payload"]["doc_id"], p["payload"]["chunk_index"], np.asarray(p["vector"]["dense"]))
                     for k, p in all_points(store).items()}


def test_batch_job_over_s3_globs_equals_the_local_read(ray_cluster, s3_bucket, tmp_path):
    """JSONL (in 1 KiB byte ranges: several ranged S3 reads per file) and Parquet corpora in S3, given as globs,
    embed to the same points (ids, doc ids, chunks, vectors) as the JSONL corpus read from local files."""
    docs = make_corpus(tmp_path / "all.jsonl", n_docs=10, seed=3)
    halves = {"part-0": docs[:6], "part-1": docs[6:]}
    for name, part in halves.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
        s3_bucket.upload(tmp_path / f"{name}.jsonl", f"corpus/{name}.jsonl")
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"{name}.parquet", row_group_size=4)
        s3_bucket.upload(tmp_path / f"{name}.parquet", f"parquet/{name}.parquet")
    local_summary, local = embed([str(tmp_path / "part-*.jsonl")], tmp_path / "local")
    assert local_summary["documents_embedded"] == len(docs) - 1  # the empty one is skipped
    for glob in ("corpus/*.jsonl", "parquet/*.parquet"):
        summary, remote = embed([s3_bucket.uri(glob)], tmp_path / glob.split("/")[0])
        assert summary["documents_embedded"] == local_summary["documents_embedded"], glob
        assert summary["skipped_rows"] == local_summary["skipped_rows"] == 1, glob
        assert remote.keys() == local.keys(), glob
        for key, (doc_id, chunk, vector) in local.items():
            assert remote[key][:2] == (doc_id, chunk)
            np.testing.assert_allclose(remote[key][2], vector, atol=1e-5)


def test_training_pairs_from_s3_equal_the_local_read(ray_cluster, s3_bucket, tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"], "source": "ab"[i % 2]} for i in range(9)]
    lines = [json.dumps(r) for r in rows[:5]] + ['{"query": "broken"'] + [json.dumps(r) for r in rows[5:7]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[7:]), tmp_path / "b.parquet")
    s3_bucket.upload(tmp_path / "a.jsonl", "pairs/a.jsonl")
    s3_bucket.upload(tmp_path / "b.parquet", "pairs/b.parquet")
    local_files = expand_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], "data.train_files")
    s3_files = expand_files([s3_bucket.uri("pairs/a.jsonl"), s3_bucket.uri("pairs/b.*")], "data.train_files")
    assert s3_files == [s3_bucket.uri("pairs/a.jsonl"), s3_bucket.uri("pairs/b.parquet")]
    local_pairs, local_bad = load_pairs(local_files, "auto", 1, "skip")
    assert [p.query for p in local_pairs] == [r["query"] for r in rows]
    for reader in (load_pairs, read_pairs):  # in this process, and with Ray Data (workers read S3 too)
        pairs, bad = reader(s3_files, "auto", 1, "skip")
        assert pairs == local_pairs, reader.__name__
        assert bad.count == local_bad.count == 1
        assert bad.examples[0].startswith(f"{s3_bucket.uri('pairs/a.jsonl')}:6: "), bad.examples  # names the URI
    with pytest.raises(ConfigError, match=rf"^{s3_bucket.uri('pairs/a.jsonl')}:6: bad training row"):
        read_pairs(s3_files, "auto", 1, "fail")


JOB_MAIN = runpy.run_path(str(ROOT / "jobs" / "embed_corpus.py"))["main"]


@pytest.mark.parametrize("path, needle", [
    ("s3://{bucket}/missing.jsonl", "no file matches 's3://{bucket}/missing.jsonl'"),
    ("s3://{bucket}/corpus/*.jsonl", "no file matches 's3://{bucket}/corpus/*.jsonl'"),
    ("s3://no-such-bucket-here/x.jsonl", "s3://no-such-bucket-here/x.jsonl"),
    ("s3://no-such-bucket-here/*.jsonl", "s3://no-such-bucket-here"),
    ("nosuchscheme://x/y.jsonl", "nosuchscheme://x/y.jsonl"),
])
def test_a_missing_uri_is_one_line_before_anything_runs(capsys, tmp_path, s3_bucket, path, needle):
    path, needle = path.format(bucket=s3_bucket.name), needle.format(bucket=s3_bucket.name)
    code = JOB_MAIN(["--config", str(ROOT / "jobs/configs/embed_cpu.yaml"), f"input.paths=[{path}]",
                     f"store.path={tmp_path / 'q'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "q").exists()  # nothing was written
    from diffembed.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^data.train_files: .*") as info:
        TrainConfig.from_dict({"data": {"train_files": [path]}}).check_files()
    assert "\n" not in str(info.value) and needle in str(info.value)


def test_beir_folder_on_s3_loads_as_the_local_one(s3_bucket):
    from diffembed.eval.beir import load_beir

    sample = ROOT / "jobs" / "configs" / "data" / "beir_sample"
    for path in sorted(p for p in sample.rglob("*") if p.is_file()):
        s3_bucket.upload(path, f"beir_sample/{path.relative_to(sample)}")
    local, remote = load_beir(sample, "dev"), load_beir(s3_bucket.uri("beir_sample"), "dev")
    assert remote.name == local.name == "beir_sample"
    assert (remote.corpus, remote.titles, remote.queries, remote.qrels) == (
        local.corpus, local.titles, local.queries, local.qrels)
    with pytest.raises(ConfigError, match=r"no split 'nope' \(available: dev, test\)"):
        load_beir(s3_bucket.uri("beir_sample"), "nope")
