"""Multivector embedders (mask-token readout, `mask_vectors: multi`: K vectors per input, scored by MaxSim) end to
end: the batch job writes Qdrant multivectors, Qdrant Edge (and the server path) ranks by MaxSim exactly as the
evaluation's exact backend does, hybrid search works on them, a collection of the other kind is refused in one
line, and the served vectors are the batch job's.

Real local Ray (the batch job), real Qdrant Edge, qdrant-client's local mode as the server stand-in, the
packaged MiniLM (BERT has [MASK]) and a tiny Dream checkpoint (the diffusion family's <|mask|>).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qdrant_client import QdrantClient

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.batch.config import EmbedCorpusConfig
from diffembed.batch.pipeline import embed_corpus
from diffembed.eval.beir import RetrievalData
from diffembed.eval.config import EvalConfig
from diffembed.eval.runner import exact_run, search_run, similarities
from diffembed.index.config import StoreConfig
from diffembed.index.fingerprint import embedding_fingerprint
from diffembed.index.server import ServerStore
from diffembed.index.store import ChunkRecord, open_store

pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

K = 4
EMBEDDER = {"model": "all-MiniLM-L6-v2", "max_length": 48, "pooling": "mask", "mask_tokens": K,
            "mask_vectors": "multi", "documents": {"windows": "best", "overlap": 8}}
TOPICS = ["river", "mountain", "forest", "harbour", "castle", "library", "market", "garden", "bridge", "glacier"]
QUERIES = {f"q{i}": f"what is said about the {t}" for i, t in enumerate(TOPICS)}


def make_docs() -> dict[str, dict]:
    docs = {}
    for i, topic in enumerate(TOPICS):
        n = 12 if i % 3 == 0 else 2  # some documents span several windows
        docs[f"doc-{i}"] = {"text": " ".join(f"Document {i} talks about the {topic}, sentence {j}." for j in range(n)),
                            "title": f"About the {topic}", "lang": "en" if i % 2 else "de"}
    docs["doc-4"]["text"] += " The zyxovian lantern glowed in the hall."  # a rare exact term for hybrid search
    return docs


@pytest.fixture(scope="module")
def collection(ray_cluster, tmp_path_factory):
    """The batch job's multivector collection (real Ray Data, Qdrant Edge, BM25 on)."""
    root = tmp_path_factory.mktemp("multi")
    docs = make_docs()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, **doc}) + "\n" for d, doc in docs.items()))
    store = {"path": str(root / "qdrant"), "collection": "multi", "sparse": True, "upsert_batch_size": 16}
    job = {"embedder": EMBEDDER, "input": {"paths": [str(corpus)], "title_column": "title",
                                          "metadata_columns": ["lang"]},
           "encode": {"actors": 1, "batch_size": 4}, "store": store}
    summary = embed_corpus(EmbedCorpusConfig.from_dict(job), progress=False)
    return root, store, docs, summary, job


@pytest.fixture(scope="module")
def embedder(minilm):
    return Embedder(EmbedderConfig.model_validate(EMBEDDER), backbone=minilm.backbone)


def stored(store: dict) -> dict[tuple[str, int], np.ndarray]:
    """(doc_id, chunk_index) -> the point's stored multivector (K, D)."""
    with open_store(StoreConfig(**store)) as s:
        return {(p.payload["doc_id"], p.payload["chunk_index"]): np.asarray(p.vectors["dense"], np.float32)
                for page in s.iter_points() for p in page}


def test_batch_job_writes_multivectors_and_edge_ranks_by_exact_maxsim(collection, embedder):
    root, store, docs, summary, _ = collection
    ids = list(docs)
    windows = embedder.encode_document_windows([docs[d]["text"] for d in ids], [docs[d]["title"] for d in ids])
    assert windows.vectors.shape[1:] == (K, 384)
    points = stored(store)
    assert summary["chunks_written"] == len(points) == len(windows.vectors) > len(docs)
    keys = [(ids[t], int(c)) for t, c in zip(windows.text_index, windows.chunk_index)]
    np.testing.assert_allclose(np.stack([points[k] for k in keys]), windows.vectors, atol=1e-5)
    meta = json.loads((root / "qdrant" / "multi" / "collection.json").read_text())
    assert meta["multivector"] is True and meta["size"] == 384

    queries = embedder.encode_queries(list(QUERIES.values()))  # (Q, K, D)
    assert queries.shape == (len(QUERIES), K, 384)
    exact = similarities(queries, windows.vectors)  # (Q, M) MaxSim, in numpy
    with open_store(StoreConfig(**store)) as s:
        for q, query in enumerate(queries):
            hits = s.search(query, None, top_k=len(keys))
            assert len(hits) == len(keys)
            scores = {(h.doc_id, h.chunk_index): h.score for h in hits}
            for m, key in enumerate(keys):
                assert scores[key] == pytest.approx(float(exact[q, m]), abs=1e-4)
            order = [keys[m] for m in np.argsort(-exact[q], kind="stable")]
            assert [(h.doc_id, h.chunk_index) for h in hits[:3]] == order[:3]
        # hybrid: dense MaxSim fused with BM25 on the same points, by the engine (RRF) or here (weighted)
        rare = embedder.encode_queries(["the zyxovian lantern"])[0]
        for mode, fusion in (("sparse", {}), ("hybrid", {}), ("hybrid", {"fusion": "weighted", "dense_weight": 0.3})):
            hits = s.search(rare, "zyxovian lantern", top_k=3, mode=mode, **fusion)
            assert hits[0].doc_id == "doc-4", (mode, fusion)
        filtered = s.search(queries[0], None, top_k=20, filter={"meta.lang": "en"})
        assert filtered and {h.payload["meta"]["lang"] for h in filtered} == {"en"}


def test_exact_eval_backend_equals_the_store(collection, embedder, tmp_path):
    """The evaluation's exact backend (MaxSim in numpy, then `policy_scores` over windows) and its store backend
    (Qdrant's MaxSim, each document's best point) give the same documents and scores."""
    _, store, docs, _, _ = collection
    data = RetrievalData("multi", corpus={d: doc["text"] for d, doc in docs.items()}, queries=QUERIES, qrels={},
                         titles={d: doc["title"] for d, doc in docs.items()})
    cfg = EvalConfig.from_dict({"name": "t", "embedder": EMBEDDER, "output_dir": str(tmp_path / "out"),
                                "tasks": [{"name": "p", "kind": "passkey", "lengths": [64]}],
                                "retrieval": {"backend": "qdrant", "top_k": 10}})
    exact = exact_run(embedder, data, 10)
    by_store = search_run(cfg, embedder, data, StoreConfig(**store))
    for qid, want in exact.items():
        assert sorted(by_store[qid], key=by_store[qid].get, reverse=True) == sorted(want, key=want.get, reverse=True)
        for doc_id, score in want.items():
            assert by_store[qid][doc_id] == pytest.approx(score, abs=1e-4)


def test_other_kind_of_collection_is_a_one_line_error(collection, minilm, tmp_path):
    _, store, _, _, job = collection
    single = {**EMBEDDER, "pooling": "mean"}
    single.pop("mask_tokens"), single.pop("mask_vectors")
    with pytest.raises(ConfigError, match=r"^collection 'multi' stores multivectors .* one vector per input") as err:
        embed_corpus(EmbedCorpusConfig.from_dict({**job, "embedder": single}), progress=False)
    assert "\n" not in str(err.value)

    # a single-vector collection opened with the multivector model's fingerprint (the job's, evaluation's check)
    cfg = StoreConfig(path=str(tmp_path / "qdrant"), collection="single")
    fingerprint = embedding_fingerprint(EmbedderConfig.model_validate(EMBEDDER), 384, "cosine", False)
    with open_store(cfg) as s:
        s.ensure_collection(384, embedding_fingerprint(EmbedderConfig.model_validate(single), 384, "cosine", False))
        with pytest.raises(ConfigError, match=r"stores one vector per point and this model is a multivector model"):
            s.ensure_collection(384, fingerprint)
    assert fingerprint["function"]["mask_vectors"] == "multi"


def test_server_backend_copy_and_search(collection, embedder, tmp_path):
    """The server path (qdrant-client's local mode standing in): a copy of the Edge collection is a MaxSim
    multivector collection that ranks as Edge does and refuses a single-vector model."""
    from diffembed.index.copy import CopyConfig, copy_collection

    _, store, _, _, _ = collection
    target = ServerStore(StoreConfig(path=str(tmp_path / "unused"), collection="multi", sparse=True),
                         client=QdrantClient(path=str(tmp_path / "standin")))
    try:
        summary = copy_collection(CopyConfig.model_validate({"source": store, "target": {"url": "http://unused:1"}}),
                                  progress=False, target_store=target)
        assert summary["points_copied"] == summary["points_in_target"] > 10
        info = target.client.get_collection("multi").config.params.vectors["dense"]
        assert info.multivector_config is not None and info.multivector_config.comparator.value == "max_sim"
        query = embedder.encode_queries(["the castle on the hill"])[0]  # (K, D)
        with open_store(StoreConfig(**store)) as edge:
            want = [(h.doc_id, h.chunk_index, h.score) for h in edge.search(query, None, top_k=5)]
        got = [(h.doc_id, h.chunk_index, h.score) for h in target.search(query, None, top_k=5)]
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], atol=1e-4)
        with pytest.raises(ConfigError, match="stores multivectors"):
            target.ensure_collection(384, None, multivector=False)
        target.ensure_collection(384, None, multivector=True)  # the same kind: fits
    finally:
        target.close()


def test_served_multivectors_equal_the_batch_jobs(collection, embedder):
    from diffembed.serving.encoder import EncoderImpl

    _, store, docs, _, _ = collection
    points = stored(store)
    encoder = EncoderImpl(EMBEDDER)
    assert encoder.info()["vectors_per_input"] == K
    short = [d for d in docs if (d, 1) not in points]  # one window: its point 0 is the document's vector
    texts = [f"{docs[d]['title']} {docs[d]['text']}" for d in short]  # the policy's title join
    served = encoder.embed_unbatched(texts, kind="document", truncate=False)
    assert served.vectors.shape == (len(short), K, 384)
    for doc_id, vectors in zip(short, served.vectors):
        np.testing.assert_allclose(vectors, points[(doc_id, 0)], atol=1e-5)
    long = f"{docs['doc-0']['title']} {docs['doc-0']['text']}"
    first = encoder.embed_unbatched([long], kind="document", truncate=True)  # best: its first window, point 0
    np.testing.assert_allclose(first.vectors[0], points[("doc-0", 0)], atol=1e-5)
    queries = encoder.embed_unbatched(list(QUERIES.values()), kind="query")
    np.testing.assert_allclose(queries.vectors, embedder.encode_queries(list(QUERIES.values())), atol=1e-5)
    # Matryoshka truncation applies to each of the K vectors (then each is unit length again)
    small = encoder.embed_unbatched(texts[:2], kind="document", dimensions=32)
    assert small.vectors.shape == (2, K, 32)
    np.testing.assert_allclose(np.linalg.norm(small.vectors, axis=-1), 1.0, atol=1e-5)
    cut = served.vectors[:2, :, :32]
    np.testing.assert_allclose(small.vectors, cut / np.linalg.norm(cut, axis=-1, keepdims=True), atol=1e-5)


def test_tiny_dream_multivector_in_edge_ranks_by_maxsim(tmp_path):
    """The diffusion family: a tiny Dream's <|mask|> readout, stored and searched as MaxSim multivectors."""
    from diffembed.testing.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint("dream", tmp_path / "dream", seed=0)
    cfg = EmbedderConfig(model=str(path), pooling="mask", mask_tokens=3, mask_vectors="multi", max_length=32)
    emb = Embedder(cfg)
    texts = [f"document {i} about {t}" for i, t in enumerate(TOPICS)]
    docs = emb.encode_documents(texts)  # (N, 3, D)
    queries = emb.encode_queries(["about rivers", "a castle", "the glacier"])
    assert docs.shape == (len(texts), 3, emb.dimension) and queries.shape == (3, 3, emb.dimension)
    with open_store(StoreConfig(path=str(tmp_path / "qdrant"), collection="dream")) as s:
        s.ensure_collection(emb.dimension, embedding_fingerprint(cfg, emb.dimension, "cosine", False))  # -> multi
        s.upsert([ChunkRecord(f"d{i}", 0, 1, v, (0, 1), (0, 1), text=t) for i, (v, t) in enumerate(zip(docs, texts))])
        exact = similarities(queries, docs)  # (3, N)
        for q, query in enumerate(queries):
            hits = s.search(query, None, top_k=len(texts))
            np.testing.assert_allclose([h.score for h in hits], np.sort(exact[q])[::-1], atol=1e-4)
            assert hits[0].doc_id == f"d{int(np.argmax(exact[q]))}"


def test_serve_app_on_a_multivector_collection(collection, embedder):
    """The live app: /embed returns each input's K vectors, /v1/embeddings refuses the model (one vector per input
    is its shape), /v1/models says K, /search ranks the multivector collection by MaxSim."""
    import httpx
    from ray import serve

    from diffembed.serving.config import ServeArgs
    from test_serve import start_app

    _, store, _, _, _ = collection
    points = stored(store)  # read before the app's retriever holds the store
    keys = list(points)
    query = "the zyxovian lantern"
    exact = similarities(embedder.encode_queries([query]), np.stack([points[k] for k in keys]))[0]  # (M,) MaxSim
    best: dict[str, float] = {}
    for m in np.argsort(-exact, kind="stable"):
        best.setdefault(keys[m][0], float(exact[m]))
    args = ServeArgs.model_validate({"embedder": EMBEDDER, "store": store,
                                     "encoder": {"num_cpus": 0.5, "torch_threads": 1}})
    url = start_app(args, "multi")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            texts = ["The castle stands on the hill.", "A short one."]
            got = client.post("/embed", json={"inputs": texts})
            assert got.status_code == 200
            np.testing.assert_allclose(np.array(got.json(), np.float32), embedder.encode_documents(texts), atol=1e-5)
            codes = client.post("/embed", json={"inputs": texts, "encoding_format": "ubinary", "dimensions": 64}).json()
            assert [[len(v) for v in vectors] for vectors in codes] == [[8] * K] * 2  # K codes of 64 bits each
            refused = client.post("/v1/embeddings", json={"input": texts})
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "multivector_model"
            assert "/embed" in refused.json()["error"]["message"]
            assert client.get("/v1/models").json()["data"][0]["vectors_per_input"] == K
            found = client.post("/search", json={"query": query, "top_k": 3})
            assert found.status_code == 200, found.text
            hits = found.json()["data"]
            assert [h["doc_id"] for h in hits] == list(best)[:3]
            np.testing.assert_allclose([h["score"] for h in hits], list(best.values())[:3], atol=1e-4)
    finally:
        serve.shutdown()
