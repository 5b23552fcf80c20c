"""Copying an Edge collection to a server (`diffembed.index.copy`, `jobs/copy_collection.py`).

The server is ServerStore over qdrant-client's local mode, the stand-in for a real server's client API (no
Qdrant server can be installed here); the CLI cannot reach a server, so only its error paths run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.copy import CopyConfig, copy_collection
from diffembed.index.edge import EdgeStore
from diffembed.index.server import ServerStore
from diffembed.index.store import ChunkRecord, StoreError

# qdrant-client's background version check against the unreachable test URL
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
N_DOCS = 100  # x 3 chunks = 300 points
# Pseudo-words with Zipf frequencies, and every point's text of its own length: BM25 scores without ties, so the
# hybrid prefetch (top_k * HYBRID_PREFETCH per side) takes the same candidates on both backends. (Tied BM25
# scores at that cut, common with short texts from a small vocabulary, are broken differently by Edge and the
# stand-in, and the fused results then differ.)
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "pe", "du", "ga", "ho"]
_rng = np.random.default_rng(11)
VOCAB = sorted({"".join(_rng.choice(_SYLLABLES, 3)) for _ in range(400)})[:200]
_ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
FINGERPRINT = {"version": 1, "model": {"name": "/m", "digest": "abc"},
               "function": {"pooling": "mean", "documents": {"windows": "best"}},
               "vector": {"size": DIM, "distance": "cosine"}, "sparse": "bm25-idf-v1"}


def fill_source(root: Path, collection: str = "docs") -> StoreConfig:
    rng = np.random.default_rng(0)
    cfg = StoreConfig(path=str(root / "edge"), collection=collection, sparse=True)
    recs = [
        ChunkRecord(doc_id=f"d{d}", chunk_index=i, n_chunks=3, vector=rng.standard_normal(DIM).astype(np.float32),
                    token_span=(i * 10, i * 10 + 12), char_span=(i * 50, i * 50 + 60),
                    text=" ".join(rng.choice(VOCAB, size=12 + 3 * d + i, p=_ZIPF / _ZIPF.sum())), title=f"title {d}",
                    metadata={"lang": "en" if d % 2 else "de", "n": d})
        for d in range(N_DOCS) for i in range(3)
    ]
    with EdgeStore(cfg) as store:
        store.ensure_collection(DIM, FINGERPRINT)
        store.upsert(recs)
    return cfg


def stand_in(root: Path, collection: str = "docs", **kw) -> ServerStore:
    """A ServerStore over qdrant-client's local mode (the server stand-in)."""
    cfg = StoreConfig(path=str(root / "unused"), collection=collection, sparse=True, **kw)
    return ServerStore(cfg, client=QdrantClient(path=str(root / "standin")))


def points(store) -> dict[str, tuple]:
    out = {}
    for page in store.iter_points(100):
        for p in page:
            assert p.id not in out  # no duplicates
            out[p.id] = (p.vectors, p.payload)
    return out


def assert_same_points(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for pid, (va, pa) in a.items():
        vb, pb = b[pid]
        assert pa == pb
        assert va.keys() == vb.keys()
        np.testing.assert_allclose(va["dense"], vb["dense"], rtol=1e-6, atol=1e-7)
        if "bm25" in va:
            sa, sb = dict(zip(*va["bm25"])), dict(zip(*vb["bm25"]))
            assert sa.keys() == sb.keys()
            np.testing.assert_allclose([sa[k] for k in sa], [sb[k] for k in sa], rtol=1e-6)


def assert_same_ranking(a, b) -> None:
    """The same ids in the same order, up to exact score ties: RRF ties are common (a point ranked r by dense only
    and one ranked r by BM25 only) and each backend orders them its own way, also choosing among the tied points
    at the top_k cut."""

    def groups(hits) -> list[tuple[float, set[str]]]:
        out: list[tuple[float, set[str]]] = []
        for h in hits:
            if out and abs(out[-1][0] - h.score) < 1e-6:
                out[-1][1].add(h.id)
            else:
                out.append((h.score, {h.id}))
        return out

    ga, gb = groups(a), groups(b)
    assert len(a) == len(b) and len(ga) == len(gb)
    assert [ids for _, ids in ga[:-1]] == [ids for _, ids in gb[:-1]]
    assert len(ga[-1][1]) == len(gb[-1][1])  # the last group may continue past the cut: its members may differ
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)


def test_copy_keeps_points_fingerprint_and_ranking(tmp_path):
    src_cfg = fill_source(tmp_path)
    with stand_in(tmp_path) as target:
        cfg = CopyConfig(source=src_cfg, target=target.cfg, batch_size=64)
        summary = copy_collection(cfg, progress=False, target_store=target)
        assert summary["points_copied"] == summary["points_in_target"] == summary["points_in_source"] == 3 * N_DOCS
        assert summary["points_already_present"] == 0 and summary["points_per_s"] > 0
        with EdgeStore(src_cfg) as source:
            assert target.fingerprint() == source.fingerprint() == FINGERPRINT
            assert_same_points(points(source), points(target))
            rng = np.random.default_rng(7)
            for _ in range(4):
                text = " ".join(rng.choice(VOCAB[5:60], 2))
                dense = rng.standard_normal(DIM).astype(np.float32)
                sparse = [h.score for h in source.search(dense, text, top_k=40, mode="sparse")]
                assert len(sparse) == 40 and len(set(np.round(sparse, 6))) == 40  # the fixture's premise: no ties
                for mode in ("dense", "hybrid"):
                    edge_hits = source.search(dense, text, top_k=10, mode=mode)
                    server_hits = target.search(dense, text, top_k=10, mode=mode)
                    assert len(edge_hits) == 10
                    if mode == "dense":  # distinct random vectors: no ties at all
                        assert [h.id for h in edge_hits] == [h.id for h in server_hits]
                    assert_same_ranking(edge_hits, server_hits)
        # a rerun over a complete target writes nothing
        again = copy_collection(cfg, progress=False, target_store=target)
        assert again["points_copied"] == 0 and again["points_already_present"] == again["points_in_target"] == 300


def test_interrupted_copy_resumes_without_redoing_pages(tmp_path, monkeypatch):
    src_cfg = fill_source(tmp_path)
    with stand_in(tmp_path) as target:
        cfg = CopyConfig(source=src_cfg, target=target.cfg, batch_size=50)
        real, calls = target.upsert_points, []

        def flaky(pts):
            if len(calls) == 2:
                raise ConnectionError("connection reset by peer")
            calls.append(len(pts))
            real(pts)

        monkeypatch.setattr(target, "upsert_points", flaky)
        with pytest.raises(StoreError) as err:
            copy_collection(cfg, progress=False, target_store=target)
        assert "stopped after 100 new points" in str(err.value) and "rerun" in str(err.value)
        assert "\n" not in str(err.value) and target.count() == 100
        monkeypatch.setattr(target, "upsert_points", real)
        summary = copy_collection(cfg, progress=False, target_store=target)
        assert summary["points_already_present"] == 100 and summary["points_copied"] == 200
        assert summary["points_in_target"] == 300
        with EdgeStore(src_cfg) as source:
            assert_same_points(points(source), points(target))


def test_target_with_other_fingerprint_fails_before_writing(tmp_path):
    src_cfg = fill_source(tmp_path)
    other = {**FINGERPRINT, "function": {**FINGERPRINT["function"], "pooling": "last"}}
    with stand_in(tmp_path) as target:
        target.ensure_collection(DIM, other)
        with pytest.raises(ConfigError) as err:
            copy_collection(CopyConfig(source=src_cfg, target=target.cfg), progress=False, target_store=target)
        assert "function.pooling (stored 'last', now 'mean')" in str(err.value) and "\n" not in str(err.value)
        assert target.count() == 0


def test_bad_inputs_are_one_line_errors(tmp_path):
    src_cfg = fill_source(tmp_path)
    with pytest.raises(ConfigError, match="same collection"):
        copy_collection(CopyConfig(source=src_cfg, target=src_cfg), progress=False)
    server = StoreConfig(url="http://qdrant:6333", collection="docs")
    with pytest.raises(ConfigError, match="same collection"):
        copy_collection(CopyConfig(source=server, target=server), progress=False)
    with pytest.raises(ConfigError, match="target.url"):
        copy_collection(CopyConfig(source=src_cfg, target={"path": str(tmp_path / "x")}), progress=False)
    with pytest.raises(ConfigError, match="target.distance is 'dot'"):
        copy_collection(CopyConfig(source=src_cfg, target={"url": "http://127.0.0.1:9", "distance": "dot"}),
                        progress=False)
    missing = src_cfg.model_copy(update={"collection": "nope"})
    with pytest.raises(StoreError, match="'nope' does not exist") as err:
        copy_collection(CopyConfig(source=missing, target=server), progress=False)
    assert "\n" not in str(err.value)
    # nothing listens on port 9: connection refused, reported in one line after the store's retries
    unreachable = StoreConfig(url="http://127.0.0.1:9", collection="docs", max_retries=1, timeout_s=5)
    with pytest.raises(StoreError, match="cannot reach the target Qdrant server http://127.0.0.1:9") as err:
        copy_collection(CopyConfig(source=src_cfg, target=unreachable), progress=False)
    assert "\n" not in str(err.value)


def test_renamed_target_warns(tmp_path, capsys):
    src_cfg = fill_source(tmp_path)
    with stand_in(tmp_path, collection="docs-v2") as target:
        summary = copy_collection(CopyConfig(source=src_cfg, target=target.cfg), progress=True, target_store=target)
    assert summary["points_copied"] == 300 and summary["target_collection"] == "docs-v2"
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "'docs-v2'" in warning[0] and "keep the name 'docs'" in warning[0]


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "copy_collection.py"), "--config",
         str(ROOT / "jobs/configs/copy_to_server.yaml"), *overrides],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "QDRANT_API_KEY": ""},
    )


def test_cli_errors_exit_2_with_one_line(tmp_path):
    proc = run_job(f"source.path={tmp_path / 'absent'}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: source collection")
    src_cfg = fill_source(tmp_path)
    proc = run_job(f"source.path={src_cfg.path}", "target.url=http://127.0.0.1:9", "target.max_retries=1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "error: cannot reach" in proc.stderr
