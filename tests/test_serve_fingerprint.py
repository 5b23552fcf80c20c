"""Serve refuses to search a collection another embedding function filled (its stored fingerprint differs).

One real local Serve app over a collection the batch job filled under `documents.windows: best`, served with
`windows: first` (and another `aggregate`, a search-time setting the comparison ignores): /search answers 503
`collection_mismatch` naming the differing field, /readyz is not ready with the same reason, and the embedding
routes keep serving. The matching case is test_serve.py's app (its readiness now includes the comparison).
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from diffembed.serving.config import ServeArgs

DIFFERENCE = "function.documents.windows (stored 'best', now 'first')"


def readiness_after_start(url: str, timeout_s: float = 120) -> httpx.Response:
    """/readyz once the app has an encoder and its retriever answered (ready, or not ready for another reason than
    a replica still starting)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200 or "embedded by" in r.text:
                return r
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{url} gave no readiness verdict in {timeout_s} s")
        time.sleep(0.5)


def stored_collection(root, embedder: dict) -> dict:
    """The store config of a one-point collection carrying the fingerprint the batch job writes for `embedder`
    (`embed_corpus` computes it the same way; test_serve.py's app runs the batch job itself and serves its
    collection, which must match)."""
    import numpy as np

    from diffembed.config import EmbedderConfig
    from diffembed.index.config import StoreConfig
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.index.store import ChunkRecord, open_store

    store = {"path": str(root / "qdrant"), "collection": "docs", "sparse": True}
    cfg = StoreConfig.model_validate(store)
    with open_store(cfg) as s:
        s.ensure_collection(384, embedding_fingerprint(EmbedderConfig.model_validate(embedder), 384, cfg.distance,
                                                       cfg.sparse))
        vector = np.ones(384, np.float32) / np.sqrt(384)
        s.upsert([ChunkRecord("doc-0", 0, 1, vector, (0, 3), (0, 12), text="a stone hall")])
    return store


@pytest.fixture(scope="module")
def mismatched(ray_cluster, tmp_path_factory):
    """(URL, first /readyz verdict) of an app serving windows=first over a collection filled with windows=best."""
    from ray import serve
    from test_serve import EMBEDDER, free_port

    from diffembed.serving.app import app_builder

    assert EMBEDDER["documents"]["windows"] == "best"
    store = stored_collection(tmp_path_factory.mktemp("fingerprint"), EMBEDDER)
    served = {**EMBEDDER, "documents": {**EMBEDDER["documents"], "windows": "first", "aggregate": "softmax"}}
    args = ServeArgs.model_validate({
        "embedder": served, "store": store,
        "encoder": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": 1},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name="fingerprint", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    yield url, readiness_after_start(url)
    serve.shutdown()


def test_mismatched_collection_is_refused(mismatched):
    url, ready = mismatched
    assert ready.status_code == 503, ready.text
    reason = ready.json()["error"]
    assert reason["code"] == "not_ready" and reason["type"] == "service_unavailable"
    assert "collection 'docs' was embedded by a different embedding function" in reason["message"]
    assert DIFFERENCE in reason["message"]
    assert "aggregate" not in reason["message"]  # a search-time setting: not part of the comparison

    r = httpx.post(f"{url}/search", json={"query": "Which document is about the glacier?"}, timeout=60)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "collection_mismatch"
    assert DIFFERENCE in error["message"] and "aggregate" not in error["message"]
    assert error["request_id"] == r.headers["x-request-id"]
    again = httpx.post(f"{url}/search", json={"query": "castle", "mode": "hybrid"}, timeout=60)
    assert again.status_code == 503 and again.json()["error"]["code"] == "collection_mismatch"

    # the embedding routes do not use the collection
    assert httpx.post(f"{url}/v1/embeddings", json={"input": ["a castle"]}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/embed", json={"inputs": "a castle"}, timeout=60).status_code == 200
    still = httpx.get(f"{url}/readyz", timeout=10)
    assert still.status_code == 503 and DIFFERENCE in still.json()["error"]["message"]


def test_collection_without_fingerprint_is_served_with_a_warning(tmp_path):
    """A collection written before fingerprints existed: no comparison (the encoder is never asked), one warning."""
    from diffembed.index.config import StoreConfig
    from diffembed.index.store import open_store
    from diffembed.serving.retriever import RetrieverImpl

    cfg = {"path": str(tmp_path / "qdrant"), "collection": "old"}
    with open_store(StoreConfig.model_validate(cfg)) as store:
        store.ensure_collection(8, fingerprint=None)
        assert store.fingerprint() is None
    retriever = RetrieverImpl(cfg, encoder=None)  # no encoder call may happen

    async def probe() -> dict:
        await retriever.check_fit()
        return await retriever.ready()

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # Ray's "ray.serve" logger does not propagate to pytest's caplog
    logging.getLogger("ray.serve").addHandler(handler)
    try:
        assert asyncio.run(probe()) == {"collection": "old", "points": 0}
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    warnings = [r.getMessage() for r in records if "no embedding fingerprint" in r.getMessage()]
    assert len(warnings) == 1 and "'old'" in warnings[0]
    retriever.store.close()


def test_missing_collection_stays_undecided(tmp_path):
    """No collection yet: the comparison decides nothing (a later fill is compared), readiness says it is missing."""
    from diffembed.serving.errors import StoreUnavailable
    from diffembed.serving.retriever import RetrieverImpl

    retriever = RetrieverImpl({"path": str(tmp_path / "qdrant"), "collection": "later"}, encoder=None)
    asyncio.run(retriever.check_fit())
    assert not retriever._fit_known
    with pytest.raises(StoreUnavailable, match="does not exist"):
        asyncio.run(retriever.ready())
    retriever.store.close()


def test_mismatch_maps_to_503_collection_mismatch_with_the_whole_message():
    """Through Ray's wrapping: 503 `collection_mismatch` (not the generic store_unavailable), message not cut."""
    from ray.exceptions import RayTaskError

    from diffembed.index.fingerprint import mismatch_message
    from diffembed.serving.errors import CollectionMismatch
    from diffembed.serving.ingress import client_error

    stored = {"function": {f"field_{i}": "x" * 90 for i in range(4)}, "model": {"digest": "a" * 16}}
    wanted = {"function": {f"field_{i}": "y" * 90 for i in range(4)}, "model": {"digest": "b" * 16}}
    message = mismatch_message("docs", stored, wanted)
    assert message is not None and len(message) > 500
    error = client_error(RayTaskError("search", "tb", CollectionMismatch(message)).as_instanceof_cause())
    assert (error.status, error.type, error.code) == (503, "service_unavailable", "collection_mismatch")
    assert error.message == message
