"""The store interface on both backends: ids, schema checks, resume bookkeeping, search modes.

`edge` is the embedded default (Qdrant Edge). `server` is ServerStore driven through qdrant-client's local mode,
a stand-in for a real server's client API (no server can be installed here); server-only behaviour (cluster
layout, retries, indexing threshold) is tested against that stand-in or a fake of its few calls.
"""

from __future__ import annotations

import numpy as np
import pytest
from qdrant_client import models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import wait_none

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.sparse import document_vector, query_vector, term_id, terms
from diffembed.index.edge import EdgeStore
from diffembed.index.server import PAUSED_KEY, ServerStore, is_transient
from diffembed.index.store import ChunkRecord, point_id

DIM = 16


def server_store(tmp_path, **kw) -> ServerStore:
    """ServerStore over qdrant-client's local mode: the stand-in for a Qdrant server's client API."""
    from qdrant_client import QdrantClient

    cfg = StoreConfig(path=str(tmp_path / "q"), collection="test", **kw)
    return ServerStore(cfg, client=QdrantClient(path=str(tmp_path / "standin")))


@pytest.fixture(params=["edge", "server"])
def make_store(request, tmp_path):
    def make(root=None, **kw):
        root = root or tmp_path
        if request.param == "server":
            return server_store(root, **kw)
        return EdgeStore(StoreConfig(path=str(root / "q"), collection="test", **kw))

    return make


def records(doc_id: str, n_chunks: int, rng, indices=None, texts=None, dim=DIM, **kw) -> list[ChunkRecord]:
    indices = range(n_chunks) if indices is None else indices
    return [
        ChunkRecord(
            doc_id=doc_id,
            chunk_index=i,
            n_chunks=n_chunks,
            vector=rng.standard_normal(dim).astype(np.float32),
            token_span=(i * 10, i * 10 + 12),
            char_span=(i * 50, i * 50 + 60),
            text=texts[i] if texts else f"chunk {i} of {doc_id}",
            title=f"title {doc_id}",
            **kw,
        )
        for i in indices
    ]


def test_point_ids_are_deterministic_and_reupsert_overwrites(make_store, tmp_path):
    assert point_id("c", "doc", 0) == point_id("c", "doc", 0)
    assert len({point_id("c", "doc", 0), point_id("c", "doc", 1), point_id("d", "doc", 0), point_id("c", "do", 0)}) == 4
    rng = np.random.default_rng(0)
    recs = records("a", 3, rng) + records("b", 2, rng)
    with make_store(upsert_batch_size=2) as store:
        store.ensure_collection(DIM)
        store.upsert(recs)
        assert store.count() == 5
        store.upsert(recs)
        store.ensure_collection(DIM)  # existing, compatible: a no-op
        assert store.count() == 5


def test_dimension_mismatch_is_one_line_config_error(make_store, tmp_path):
    with make_store() as store:
        store.ensure_collection(384)
        with pytest.raises(ConfigError) as err:
            store.ensure_collection(768)
    msg = str(err.value)
    assert "384" in msg and "768" in msg and "'test'" in msg and "'dense'" in msg and "\n" not in msg
    with make_store(distance="dot") as store, pytest.raises(ConfigError, match="dot"):
        store.ensure_collection(384)
    with make_store(sparse=True) as store, pytest.raises(ConfigError, match="bm25"):
        store.ensure_collection(384)


def test_complete_docs_and_delete_docs(make_store, tmp_path):
    rng = np.random.default_rng(1)
    with make_store() as store:
        store.ensure_collection(DIM)
        store.upsert(records("full", 3, rng) + records("partial", 3, rng, indices=[0, 2]) + records("one", 1, rng))
        assert store.complete_docs(["full", "partial", "one", "absent"]) == {"full", "one"}
        store.delete_docs(["partial", "absent"])
        assert store.count() == 4
        assert store.complete_docs(["partial"]) == set()
        store.delete_docs([])
        # a doc re-chunked into fewer chunks keeps stale points: incomplete until deleted and rewritten
        store.upsert(records("full", 2, rng))
        assert "full" not in store.complete_docs(["full"])


def test_complete_docs_pages_through_many_ids(make_store, tmp_path):
    rng = np.random.default_rng(2)
    recs = [r for d in range(300) for r in records(f"d{d}", 2, rng, dim=4)]
    with make_store(upsert_batch_size=128) as store:
        store.ensure_collection(4)
        store.upsert(recs)
        assert store.complete_docs([f"d{d}" for d in range(300)]) == {f"d{d}" for d in range(300)}


def test_dense_search_returns_nearest_with_spans_and_payload(make_store, tmp_path):
    rng = np.random.default_rng(3)
    recs = records("a", 3, rng, metadata={"lang": "en"}) + records("b", 2, rng, metadata={"lang": "de"})
    with make_store() as store:
        store.ensure_collection(DIM)
        store.upsert(recs)
        target = recs[4]
        hits = store.search(target.vector + 0.01 * rng.standard_normal(DIM).astype(np.float32), None, top_k=3)
        assert len(hits) == 3
        top = hits[0]
        assert (top.doc_id, top.chunk_index) == ("b", 1)
        assert top.id == point_id("test", "b", 1)
        assert top.token_span == target.token_span and top.char_span == target.char_span
        assert top.payload["text"] == target.text and top.payload["title"] == "title b"
        assert top.payload["n_chunks"] == 2 and top.payload["meta"] == {"lang": "de"}
        assert top.score > hits[1].score


def test_payload_filter_restricts_results(make_store, tmp_path):
    rng = np.random.default_rng(4)
    recs = records("a", 3, rng, metadata={"lang": "en"}) + records("b", 2, rng, metadata={"lang": "de"})
    with make_store(store_text=False) as store:
        store.ensure_collection(DIM)
        store.upsert(recs)
        hits = store.search(recs[4].vector, None, top_k=10, filter={"doc_id": "a"})
        assert {h.doc_id for h in hits} == {"a"} and len(hits) == 3
        hits = store.search(recs[0].vector, None, top_k=10, filter={"meta.lang": ["de", "fr"]})
        assert {h.doc_id for h in hits} == {"b"}
        hits = store.search(recs[0].vector, None, top_k=10, filter={"doc_id": ["a", "b"], "chunk_index": 0})
        assert sorted(h.doc_id for h in hits) == ["a", "b"]
        assert "text" not in hits[0].payload


TEXTS = [
    "The committee discussed the annual budget and the new parking rules.",
    "A zyxovian crystal was found in the cave by the survey team.",
    "Weather forecasts predict rain for the whole weekend in the north.",
    "Recipes for bread usually need flour, water, salt and yeast.",
]


def test_sparse_and_hybrid_find_the_rare_term(make_store, tmp_path):
    rng = np.random.default_rng(5)
    recs = [r for i, t in enumerate(TEXTS) for r in records(f"doc{i}", 1, rng, texts=[t])]
    with make_store(sparse=True) as store:
        store.ensure_collection(DIM)
        store.upsert(recs)
        dense = rng.standard_normal(DIM).astype(np.float32)  # unrelated to any document
        for mode in ("sparse", "hybrid"):
            hits = store.search(dense, "where are zyxovian crystals?", top_k=3, mode=mode)
            assert hits[0].doc_id == "doc1", mode
        assert store.search(None, "the and of", mode="sparse") == []  # stopwords only
        assert len(store.search(dense, "the", top_k=2, mode="hybrid")) == 2  # falls back to dense alone
        with pytest.raises(ValueError):
            store.search(None, "zyxovian", mode="hybrid")
    with make_store(tmp_path / "other") as store, pytest.raises(ConfigError, match="sparse"):
        store.search(dense, "zyxovian", mode="sparse")


def test_bm25_vectors():
    assert terms("The Running queries!") == ["run", "queri"]
    empty = document_vector("")
    assert empty.indices == [] and empty.values == []
    assert document_vector("the of and").indices == [] and query_vector("").indices == []
    doc = document_vector("cats cats cats dogs")
    weights = dict(zip(doc.indices, doc.values))
    assert weights[term_id("cat")] > weights[term_id("dog")] > 0
    assert weights[term_id("cat")] < 2.2  # saturates below k1 + 1
    assert all(0 <= i < 2**32 for i in doc.indices) and doc.indices == sorted(doc.indices)
    q = query_vector("cat cats dog")
    assert sorted(q.indices) == sorted({term_id("cat"), term_id("dog")}) and q.values == [1.0, 1.0]


def test_empty_text_still_upserts_with_sparse(make_store, tmp_path):
    rng = np.random.default_rng(6)
    recs = records("empty", 2, rng, texts=["", "   "]) + records("none", 1, rng, texts=None)
    recs[-1].text = None
    with make_store(sparse=True, store_text=False) as store:
        store.ensure_collection(DIM)
        store.upsert(recs)
        assert store.count() == 3
        assert store.complete_docs(["empty", "none"]) == {"empty", "none"}


def test_int8_quantization_and_on_disk(tmp_path):
    rng = np.random.default_rng(7)
    with server_store(tmp_path, quantization="int8", on_disk_vectors=True, distance="dot") as store:
        store.ensure_collection(DIM)
        params = store.client.get_collection("test").config.params.vectors["dense"]
        assert params.on_disk is True and params.distance == models.Distance.DOT
        assert params.quantization_config.scalar.type == models.ScalarType.INT8
        recs = records("a", 4, rng)
        store.upsert(recs)
        with store.bulk_load():  # a no-op in local mode
            pass
        assert store.search(recs[2].vector, None, top_k=1)[0].chunk_index == 2


def test_cluster_layout_reaches_create_collection(tmp_path):
    """shards / replicas go to Qdrant's create_collection (a server honours them, local mode ignores them)."""
    with server_store(tmp_path, shards=6, replication_factor=2, write_consistency_factor=2) as store:
        real, seen = store.client.create_collection, []

        def spy(*args, **kwargs):  # the real local call still runs
            seen.append({k: kwargs[k] for k in ("shard_number", "replication_factor", "write_consistency_factor")})
            return real(*args, **kwargs)

        store.client.create_collection = spy
        store.ensure_collection(DIM)
        assert seen == [{"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 2}]
        assert store.client.collection_exists("test")
    with pytest.raises(ConfigError, match="write_consistency_factor"):
        StoreConfig.from_dict({"replication_factor": 2, "write_consistency_factor": 3})
    with pytest.raises(ConfigError, match="shards"):
        StoreConfig.from_dict({"shards": 0})


def test_retries_transient_errors_only(tmp_path, monkeypatch):
    assert is_transient(ResponseHandlingException(ConnectionError("refused")))
    assert is_transient(UnexpectedResponse(503, "Service Unavailable", b"", None))
    assert not is_transient(UnexpectedResponse(400, "Bad Request", b"", None))
    assert is_transient(TimeoutError()) and not is_transient(ValueError())
    rng = np.random.default_rng(8)
    with server_store(tmp_path, max_retries=3) as store:
        store.ensure_collection(DIM)
        store._retrying = store._retrying.copy(wait=wait_none())
        real, calls = store.client.upsert, []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) < 3:
                raise ResponseHandlingException(ConnectionError("reset"))
            return real(*args, **kwargs)

        monkeypatch.setattr(store.client, "upsert", flaky)
        store.upsert(records("a", 1, rng))
        assert len(calls) == 3 and store.count() == 1

        def bad_request(*args, **kwargs):
            calls.append(1)
            raise UnexpectedResponse(400, "Bad Request", b"", None)

        calls.clear()
        monkeypatch.setattr(store.client, "upsert", bad_request)
        with pytest.raises(UnexpectedResponse):
            store.upsert(records("a", 1, rng))
        assert len(calls) == 1


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("QDRANT_API_KEY", "secret")
    cfg = StoreConfig(url="http://qdrant:6333")
    assert cfg.api_key == "secret" and "secret" not in repr(cfg)
    assert StoreConfig(api_key="given").api_key == "given"


class FakeServer:
    """Just enough of QdrantClient for bulk_load's server path (threshold and collection metadata)."""

    def __init__(self, threshold, metadata=None):
        self.threshold, self.metadata, self.updates = threshold, dict(metadata or {}), []

    def get_collection(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(config=SimpleNamespace(
            optimizer_config=SimpleNamespace(indexing_threshold=self.threshold), metadata=dict(self.metadata)))

    def update_collection(self, name, optimizers_config=None, metadata=None):
        if optimizers_config is not None:
            self.updates.append(optimizers_config.indexing_threshold)
            self.threshold = optimizers_config.indexing_threshold
        for key, value in (metadata or {}).items():
            if value is None:
                self.metadata.pop(key, None)
            else:
                self.metadata[key] = value

    def close(self):
        pass


def fake_server_store(fake) -> ServerStore:
    return ServerStore(StoreConfig(url="http://qdrant:6333", collection="test"), client=fake)


@pytest.mark.parametrize("previous, expected", [(20000, [0, 20000]), (None, [0, 10000]), (0, [])])
def test_bulk_load_pauses_indexing_on_a_server_and_restores_it_on_error(previous, expected):
    fake = FakeServer(previous)
    store = fake_server_store(fake)
    with pytest.raises(RuntimeError), store.bulk_load():
        assert fake.threshold == 0
        if previous:
            assert fake.metadata[PAUSED_KEY] == previous  # recorded before pausing
        raise RuntimeError("writer failed")
    assert fake.updates == expected and PAUSED_KEY not in fake.metadata


def test_bulk_load_repairs_a_threshold_left_paused_by_a_killed_load():
    """A load SIGKILLed while paused leaves threshold 0 and the recorded value: the next load restores it."""
    fake = FakeServer(0, {PAUSED_KEY: 20000})
    with fake_server_store(fake).bulk_load():
        assert fake.threshold == 0
    assert fake.threshold == 20000 and PAUSED_KEY not in fake.metadata


def test_fingerprint_mismatch_is_one_line_naming_what_differs(make_store):
    base = {"version": 1, "model": {"name": "/a/model", "digest": "abc"},
            "function": {"pooling": "mean", "max_length": 256, "documents": {"windows": "first"}},
            "vector": {"size": DIM, "distance": "cosine"}, "sparse": None}
    with make_store() as store:
        store.ensure_collection(DIM, base)
        assert store.fingerprint() == base
        moved = {**base, "model": {"name": "/elsewhere/model", "digest": "abc"}}  # same weights, other path
        store.ensure_collection(DIM, moved)
        other = {**base, "function": {**base["function"], "pooling": "last", "documents": {"windows": "best"}}}
        with pytest.raises(ConfigError) as err:
            store.ensure_collection(DIM, other)
    msg = str(err.value)
    assert "function.pooling (stored 'mean', now 'last')" in msg and "function.documents.windows" in msg
    assert "recreate" in msg and "\n" not in msg


def test_edge_int8_quantization_on_disk_and_index_build(tmp_path):
    rng = np.random.default_rng(9)
    cfg = StoreConfig(path=str(tmp_path / "q"), collection="test", quantization="int8", on_disk_vectors=True,
                      distance="dot")
    with EdgeStore(cfg) as store:
        store.ensure_collection(DIM)
        recs = records("a", 40, rng)
        with store.bulk_load():  # flush + optimize (HNSW) at the end
            store.upsert(recs)
        assert store.count() == 40
        assert store.search(recs[7].vector, None, top_k=1)[0].chunk_index == 7
    assert '"Dot"' in (tmp_path / "q" / "test" / "shard" / "edge_config.json").read_text()


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_int8_quantized_multivector_collection_ranks_by_maxsim(backend, tmp_path):
    """A multivector collection (mask readout, K vectors per point) with int8 quantization and on-disk originals:
    search ranks by MaxSim over the point's vectors, as the exact sum of per-query-vector maxima orders them, after
    the bulk load's index build; the stored fingerprint's function marks it as multivector."""
    rng = np.random.default_rng(3)
    k, n = 4, 60
    kw = dict(quantization="int8", on_disk_vectors=True, distance="cosine")
    store = (EdgeStore(StoreConfig(path=str(tmp_path / "q"), collection="mv", **kw)) if backend == "edge"
             else server_store(tmp_path, **kw))
    vectors = rng.standard_normal((n, k, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    recs = [ChunkRecord(doc_id=f"d{i}", chunk_index=0, n_chunks=1, vector=vectors[i], token_span=(0, 1),
                        char_span=(0, 1), text=f"point {i}") for i in range(n)]
    with store:
        store.ensure_collection(DIM, {"function": {"pooling": "mask", "mask_vectors": "multi"}})
        with store.bulk_load():
            store.upsert(recs)
        for target in (5, 41):
            query = vectors[target] + 0.3 * rng.standard_normal((k, DIM)).astype(np.float32)
            query /= np.linalg.norm(query, axis=1, keepdims=True)
            exact = (query @ vectors.reshape(-1, DIM).T).reshape(k, n, k).max(axis=2).sum(axis=0)  # (N,) MaxSim
            hits = store.search(query, None, top_k=5)
            assert hits[0].doc_id == f"d{target}" == f"d{int(exact.argmax())}"
            assert [h.doc_id for h in hits[:3]] == [f"d{i}" for i in np.argsort(-exact)[:3]]
            assert hits[0].score == pytest.approx(exact.max(), abs=0.05 * k)  # int8: close to the exact MaxSim
