"""Hybrid fusion beyond RRF: DBSF and weighted, in both stores (real Qdrant Edge; qdrant-client's local mode as
the server's stand-in) and in the evaluation, and the tuned setting stored with the collection.

The hand-made case: four documents whose dense scores (cosines, exact by construction) and BM25 scores (one
query term, stored term weights, so BM25 = idf * weight) are chosen so that RRF, DBSF and weighted fusion
rank differently:
    dense  a .90  b .10  c .09  d .08      (a far ahead)
    sparse b 5.0  c 4.9  a 4.8  d 0.1      (a close third)
RRF (ranks only): b (1/61+1/60) > a (1/60+1/62) > c > d. DBSF (scores): a's dense lead outweighs its small
BM25 gap: a first. Weighted at dense_weight 0: BM25's order b, c, a, d; at 1: dense's a, b, c, d.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from qdrant_client import QdrantClient

from diffembed.index.config import StoreConfig
from diffembed.index.edge import EdgeStore
from diffembed.index.fusion import FusionSettings, dbsf_normalise, fuse, resolve
from diffembed.index.server import ServerStore
from diffembed.index.sparse import SPARSE_VECTOR_NAME, term_id, terms
from diffembed.index.store import StoredPoint, point_id

DENSE = {"a": 0.90, "b": 0.10, "c": 0.09, "d": 0.08}
SPARSE = {"b": 5.0, "c": 4.9, "a": 4.8, "d": 0.1}
QUERY_TEXT = "zyxovian"
QUERY = np.array([1.0, 0.0], dtype=np.float32)


def ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: -kv[1])


def order(fused) -> list[str]:
    return [key for key, _ in fused]


def test_fusion_orders_on_the_hand_made_case():
    lists = [ranked(DENSE), ranked(SPARSE)]
    assert order(fuse(lists, FusionSettings(fusion="rrf"))) == ["b", "a", "c", "d"]
    assert order(fuse(lists, FusionSettings(fusion="dbsf")))[0] == "a"
    assert order(fuse(lists, FusionSettings(fusion="weighted", dense_weight=0.0)))[:3] == ["b", "c", "a"]
    assert order(fuse(lists, FusionSettings(fusion="weighted", dense_weight=1.0)))[:3] == ["a", "b", "c"]
    # weight 0.5 is DBSF halved: the same order
    assert order(fuse(lists, FusionSettings(fusion="weighted", dense_weight=0.5))) == order(
        fuse(lists, FusionSettings(fusion="dbsf")))


def test_dbsf_normalisation_matches_qdrant():
    x = [5.0, 4.9, 4.8, 0.1]
    mean, std = np.mean(x), np.std(x, ddof=1)  # Qdrant: sample std, mean +- 3 std onto [0, 1]
    assert np.allclose(dbsf_normalise(x), [(v - (mean - 3 * std)) / (6 * std) for v in x])
    assert dbsf_normalise([3.0]).tolist() == [0.5] and dbsf_normalise([2.0, 2.0]).tolist() == [0.5, 0.5]


def test_resolve_prefers_the_call_then_the_stored_setting():
    tuned = FusionSettings(fusion="weighted", dense_weight=0.3)
    assert resolve(None, None, None) == FusionSettings()  # RRF by default
    assert resolve(tuned, None, None) is tuned
    assert resolve(tuned, "dbsf", None).fusion == "dbsf"
    assert resolve(tuned, "weighted", None).dense_weight == 0.3
    assert resolve(None, None, 0.8) == FusionSettings(fusion="weighted", dense_weight=0.8)
    for bad in [("rrf", 0.2), ("max", None), ("weighted", 1.5)]:
        with pytest.raises(ValueError):
            resolve(None, *bad)


# ---------------------------------------------------------------------------------------- on real stores


def hand_made_points(collection: str) -> list[StoredPoint]:
    tid = term_id(terms(QUERY_TEXT)[0])
    points = []
    for doc, cos in DENSE.items():
        vectors = {"dense": [cos, math.sqrt(1 - cos * cos)], SPARSE_VECTOR_NAME: ([tid], [SPARSE[doc]])}
        points.append(StoredPoint(point_id(collection, doc, 0), vectors,
                                  {"doc_id": doc, "chunk_index": 0, "n_chunks": 1}))
    # one more document without the term: the term's IDF is positive, so BM25 = idf * weight keeps the order
    other = {"dense": [0.0, 1.0], SPARSE_VECTOR_NAME: ([tid + 1], [1.0])}
    points.append(StoredPoint(point_id(collection, "e", 0), other, {"doc_id": "e", "chunk_index": 0, "n_chunks": 1}))
    return points


@pytest.fixture(params=["edge", "server"])
def store(request, tmp_path):
    cfg = StoreConfig(path=str(tmp_path / "q"), collection="fusion", sparse=True)
    s = EdgeStore(cfg) if request.param == "edge" else ServerStore(cfg, client=QdrantClient(path=str(tmp_path / "s")))
    s.ensure_collection(2, None)
    s.upsert_points(hand_made_points(cfg.collection))
    yield s
    s.close()


def docs(hits) -> list[str]:
    return [h.doc_id for h in hits]


def test_stores_rank_the_hand_made_case_by_each_fusion(store):
    search = lambda **kw: docs(store.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid", **kw))  # noqa: E731
    assert search() == ["b", "a", "c", "d"]  # RRF by default
    assert search(fusion="rrf") == ["b", "a", "c", "d"]
    assert search(fusion="dbsf")[0] == "a"
    assert search(fusion="weighted", dense_weight=0.0)[:3] == ["b", "c", "a"]
    assert search(dense_weight=1.0)[:3] == ["a", "b", "c"]


@pytest.mark.parametrize("settings", [FusionSettings(fusion="rrf"), FusionSettings(fusion="dbsf"),
                                      FusionSettings(fusion="weighted", dense_weight=0.3)])
def test_store_and_evaluation_fusion_agree_on_the_same_lists(store, settings):
    """The store's hybrid search (the engine's RRF/DBSF, or client-side weighted) equals `fuse` over the
    store's own dense and BM25 lists, which is what the evaluation's fusion tuning computes."""
    dense = [(h.id, h.score) for h in store.search(QUERY, None, top_k=20, mode="dense")]
    sparse = [(h.id, h.score) for h in store.search(None, QUERY_TEXT, top_k=20, mode="sparse")]
    expected = fuse([dense, sparse], settings)[:4]
    hits = store.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid", fusion=settings.fusion,
                        dense_weight=settings.dense_weight if settings.fusion == "weighted" else None)
    assert [h.id for h in hits] == [pid for pid, _ in expected]
    assert np.allclose([h.score for h in hits], [score for _, score in expected], atol=1e-5)


def test_tuned_setting_round_trips_and_is_the_default(store, tmp_path):
    assert store.search_settings() is None
    tuned = FusionSettings(fusion="weighted", dense_weight=0.0, tuned_on="devbench/dev", ndcg_at_10=0.9)
    store.set_search_settings(tuned)
    assert store.search_settings() == tuned
    # what the Serve retriever calls (no fusion argument) now fuses by the stored setting
    assert docs(store.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid"))[:3] == ["b", "c", "a"]
    assert docs(store.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid", fusion="rrf")) == ["b", "a", "c", "d"]
    if isinstance(store, EdgeStore):  # another process opening the collection later reads it from collection.json
        store.close()
        with EdgeStore(store.cfg) as reopened:
            assert reopened.search_settings() == tuned
            assert docs(reopened.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid"))[:3] == ["b", "c", "a"]
    store.set_search_settings(None)
    assert store.search_settings() is None


def test_copy_to_a_server_carries_the_tuned_setting(tmp_path):
    from diffembed.index.copy import CopyConfig, copy_collection

    source_cfg = StoreConfig(path=str(tmp_path / "edge"), collection="fusion", sparse=True)
    tuned = FusionSettings(fusion="dbsf", tuned_on="devbench/dev")
    with EdgeStore(source_cfg) as source:
        source.ensure_collection(2, None)
        source.upsert_points(hand_made_points("fusion"))
        source.set_search_settings(tuned)
    target_cfg = StoreConfig(path=str(tmp_path / "unused"), collection="fusion", sparse=True)
    with ServerStore(target_cfg, client=QdrantClient(path=str(tmp_path / "server"))) as target:  # the stand-in
        copy_collection(CopyConfig(source=source_cfg, target=target_cfg), progress=False, target_store=target)
        assert target.search_settings() == tuned
        assert docs(target.search(QUERY, QUERY_TEXT, top_k=4, mode="hybrid"))[0] == "a"  # DBSF's order
