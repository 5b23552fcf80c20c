"""Late chunking (`documents.windows: late_chunk`) through the store paths: the batch job's points, the evaluation's
store search and the Serve retriever aggregate a document's chunks as `documents.aggregate` says, ranking as the
exact `policy_scores` do; the served vector of a long document (truncate) is the index's point 0.

Real local Ray (the batch job), real Qdrant Edge, the packaged MiniLM.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.batch.config import EmbedCorpusConfig
from diffembed.batch.pipeline import embed_corpus
from diffembed.documents import DocumentPolicy, aggregate_hits, policy_scores
from diffembed.eval.beir import RetrievalData
from diffembed.eval.config import EvalConfig
from diffembed.eval.runner import exact_run, search_run, similarities, stored_vectors
from diffembed.index.config import StoreConfig
from diffembed.index.store import Hit, open_store

EMBEDDER = {"model": "all-MiniLM-L6-v2", "max_length": 64,
            "documents": {"windows": "late_chunk", "chunk_tokens": 16, "overlap": 8}}
TOPICS = "river mountain forest harbour castle library market garden bridge glacier".split()
TOP_K = 10  # the evaluation's smallest top_k: every document of the corpus below is ranked


def make_docs(seed: int = 0) -> dict[str, dict]:
    """Ten documents of one topic each: the even ones long (~9 chunks), the odd ones short (~3 chunks), and a note of
    one chunk."""
    rng = random.Random(seed)
    docs = {}
    for i, topic in enumerate(TOPICS):
        n = 14 if i % 2 == 0 else 3
        sentences = [f"This document is about the {topic}."]
        sentences += [f"Sentence {j} mentions the {rng.choice(TOPICS)} and the {rng.choice(TOPICS)}." for j in range(n)]
        docs[f"doc-{i}"] = {"text": " ".join(sentences), "title": f"On the {topic}"}
    docs["note"] = {"text": "A short note.", "title": None}
    return docs


QUERIES = {f"q{i}": f"the {topic} and the {TOPICS[(3 * i) % len(TOPICS)]}" for i, topic in enumerate(TOPICS)}


@pytest.fixture(scope="module")
def collection(ray_cluster, tmp_path_factory):
    """The batch job's late-chunked collection of `make_docs()` (real Ray, Qdrant Edge)."""
    root = tmp_path_factory.mktemp("late")
    docs = make_docs()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, **doc}) + "\n" for d, doc in docs.items()))
    store = {"path": str(root / "qdrant"), "collection": "late", "upsert_batch_size": 16}
    summary = embed_corpus(EmbedCorpusConfig.from_dict({
        "embedder": EMBEDDER, "input": {"paths": [str(corpus)], "title_column": "title"},
        "encode": {"actors": 1, "batch_size": 4}, "store": store}), progress=False)
    return root, store, docs, summary


@pytest.fixture(scope="module")
def exact(collection, minilm):
    """aggregate -> {qid: {doc_id: score}} for every document: the exact backend's `policy_scores` over every
    chunk (what `exact_run` ranks by), from one encoding of corpus and queries."""
    _, _, docs, _ = collection
    emb = with_aggregate(minilm, "best")
    doc_ids, windows = stored_vectors(emb, retrieval_data(docs))
    scores = similarities(emb.encode_queries(list(QUERIES.values())), windows.vectors)  # (Q, M)

    def run(aggregate: str) -> dict[str, dict[str, float]]:
        policy = with_aggregate(minilm, aggregate).config.documents
        per_doc = policy_scores(scores, windows.text_index, policy)  # (Q, N)
        return {q: dict(zip(doc_ids, map(float, row))) for q, row in zip(QUERIES, per_doc)}

    return run


def retrieval_data(docs: dict[str, dict]) -> RetrievalData:
    return RetrievalData("late", corpus={d: doc["text"] for d, doc in docs.items()}, queries=QUERIES, qrels={},
                         titles={d: doc["title"] for d, doc in docs.items() if doc["title"]})


def ranked(scores: dict[str, float], top_k: int | None = None) -> list[str]:
    return sorted(scores, key=scores.get, reverse=True)[:top_k]


def with_aggregate(minilm, aggregate: str) -> Embedder:
    cfg = EmbedderConfig.model_validate({**EMBEDDER, "documents": {**EMBEDDER["documents"], "aggregate": aggregate}})
    return Embedder(cfg, backbone=minilm.backbone)


def stored_points(store: dict) -> dict[str, list]:
    """doc_id -> its stored dense vectors in chunk order."""
    with open_store(StoreConfig(**store)) as s:
        rows: dict[str, list] = {}
        for page in s.iter_points():
            for p in page:
                rows.setdefault(p.payload["doc_id"], []).append((p.payload["chunk_index"], p.vectors["dense"]))
    return {d: [np.asarray(v, np.float32) for _, v in sorted(r)] for d, r in rows.items()}


def test_batch_job_writes_one_point_per_chunk(collection, minilm):
    _, store, docs, summary = collection
    emb = Embedder(EmbedderConfig.model_validate(EMBEDDER), backbone=minilm.backbone)
    ids = list(docs)
    chunks = emb.encode_document_windows([docs[d]["text"] for d in ids], [docs[d]["title"] for d in ids])
    points = stored_points(store)
    assert summary["chunks_written"] == len(chunks.vectors) > 5 * len(docs)
    for i, doc_id in enumerate(ids):
        np.testing.assert_allclose(np.stack(points[doc_id]), chunks.vectors[chunks.text_index == i], atol=1e-5)
    assert len(points["doc-0"]) > 5 and len(points["note"]) == 1


def test_served_truncated_vector_is_the_batch_jobs_point_0(collection):
    """The golden test: a long document served with truncate=true gets exactly its first chunk's late-chunked
    vector (pooled from the same forward pass over its first window), the index's point 0."""
    from diffembed.serving.encoder import EncoderImpl, InputTooLong

    _, store, docs, _ = collection
    points = stored_points(store)
    encoder = EncoderImpl(EMBEDDER)
    long = f"{docs['doc-0']['title']} {docs['doc-0']['text']}"  # the policy's title join
    with pytest.raises(InputTooLong, match=r"input\[0\] is \d+ chunks .*late_chunk.*truncate=true"):
        encoder.embed_unbatched([long], kind="document", truncate=False)
    served = encoder.embed_unbatched([long, docs["note"]["text"]], kind="document", truncate=True)
    assert served.vectors.shape == (2, 384)
    np.testing.assert_allclose(served.vectors[0], points["doc-0"][0], atol=1e-5)
    np.testing.assert_allclose(served.vectors[1], points["note"][0], atol=1e-5)
    assert float(served.vectors[0] @ points["doc-0"][1]) < 0.999  # chunk 0, not another chunk
    # a one-chunk document needs no truncation; token ids give the same vectors as the text
    alone = encoder.embed_unbatched([docs["note"]["text"]], kind="document", truncate=False)
    np.testing.assert_allclose(alone.vectors[0], points["note"][0], atol=1e-5)
    ids = encoder.embedder.tokenizer(long, add_special_tokens=False)["input_ids"]
    by_ids = encoder.embed_unbatched([ids], kind="document", truncate=True)
    np.testing.assert_allclose(by_ids.vectors[0], points["doc-0"][0], atol=1e-5)


def eval_config(tmp_path: Path) -> EvalConfig:
    return EvalConfig.from_dict({
        "name": "t", "embedder": EMBEDDER, "output_dir": str(tmp_path / "out"),
        "tasks": [{"name": "p", "kind": "passkey", "lengths": [64]}],
        "retrieval": {"backend": "qdrant", "top_k": TOP_K},
    })


@pytest.mark.parametrize("aggregate", ["best", "first_prior", "softmax"])
def test_store_search_aggregates_like_exact_policy_scores(collection, minilm, exact, tmp_path, aggregate):
    _, store, docs, _ = collection
    emb = with_aggregate(minilm, aggregate)
    every = exact(aggregate)
    by_store = search_run(eval_config(tmp_path), emb, retrieval_data(docs), StoreConfig(**store))
    if aggregate == "first_prior":  # the evaluation's exact backend ranks by the same scores
        for qid, run in exact_run(emb, retrieval_data(docs), TOP_K).items():
            assert ranked(run) == ranked(every[qid], TOP_K)
            assert all(score == pytest.approx(every[qid][d], abs=1e-5) for d, score in run.items())
    for qid, want in every.items():
        got = by_store[qid]
        assert ranked(got) == ranked(want, TOP_K), qid
        for doc_id, score in got.items():
            assert score == pytest.approx(want[doc_id], abs=1e-5), (qid, doc_id)

    # the search alone misses points the aggregate needs (over-fetch: 4 points per wanted document); without
    # scoring them, the documents' scores would differ
    policy = emb.config.documents
    queries = emb.encode_queries(list(QUERIES.values()))
    with open_store(StoreConfig(**store)) as s:
        hits = [s.search(q, None, top_k=4 * TOP_K) for q in queries]
    partial = [{h.doc_id: score for h, score in aggregate_hits(h, TOP_K, policy)} for h in hits]
    differs = sum(any(abs(p[d] - every[q][d]) > 1e-4 for d in p) for p, q in zip(partial, QUERIES))
    assert (differs > 0) == (aggregate != "best")


@pytest.mark.parametrize("aggregate", ["first_prior", "softmax"])
def test_retriever_ranks_like_exact(collection, minilm, exact, aggregate):
    """The Serve retriever's search-and-aggregate step (its store call, without Serve) on the same collection."""
    from diffembed.serving.retriever import RetrieverImpl

    _, store, _, _ = collection
    emb = with_aggregate(minilm, aggregate)
    every = exact(aggregate)
    queries = emb.encode_queries(list(QUERIES.values()))
    retriever = RetrieverImpl(store, encoder=None)
    try:
        for (qid, query), vector in zip(QUERIES.items(), queries):
            results = retriever._ranked(vector, query, 3, "dense", None, emb.config.documents)
            want = every[qid]
            assert [r["doc_id"] for r in results] == ranked(want, 3), qid
            for r in results:  # each document's score, shown with its best chunk
                assert r["score"] == pytest.approx(want[r["doc_id"]], abs=1e-5)
                assert r["payload"]["doc_id"] == r["doc_id"] and r["payload"]["n_chunks"] >= 1
            only = retriever._ranked(vector, query, 3, "dense", {"doc_id": ["doc-0"]}, emb.config.documents)
            assert [r["doc_id"] for r in only] == ["doc-0"]  # the caller's filter holds for the extra lookup too
            assert only[0]["score"] == pytest.approx(want["doc-0"], abs=1e-5)
    finally:
        retriever.store.close()


def hit(doc: str, chunk: int, score: float, n_chunks: int = 3) -> Hit:
    return Hit(id=f"{doc}{chunk}", score=score, doc_id=doc, chunk_index=chunk, token_span=(0, 1), char_span=(0, 1),
               payload={"doc_id": doc, "chunk_index": chunk, "n_chunks": n_chunks})


def test_aggregate_hits_fetches_what_the_search_missed():
    hits = [hit("a", 2, 0.9), hit("b", 0, 0.8), hit("a", 1, 0.7), hit("c", 1, 0.6, n_chunks=2)]
    calls = []

    def fetch(ids, first_only, limit):
        calls.append((ids, first_only, limit))
        every = {"a": [0.1, 0.7, 0.9], "b": [0.8, 0.2, 0.1], "c": [0.5, 0.6]}
        return [hit(d, i, s) for d in ids for i, s in enumerate(every[d]) if not first_only or i == 0]

    first = DocumentPolicy(windows="late_chunk", aggregate="first_prior", first_weight=0.5)
    ranked = aggregate_hits(hits, 3, first, fetch)
    assert calls == [(["a", "c"], True, 2)]  # b's chunk 0 was retrieved
    assert [(h.doc_id, h.chunk_index, round(s, 6)) for h, s in ranked] == [("b", 0, 0.8), ("c", 1, 0.55),
                                                                          ("a", 2, 0.5)]
    calls.clear()
    soft = DocumentPolicy(windows="late_chunk", aggregate="softmax", temperature=0.1)
    ranked = dict((h.doc_id, s) for h, s in aggregate_hits(hits, 3, soft, fetch))
    assert calls == [(["a", "b", "c"], False, 8)]  # every document has points the search missed
    for doc, scores in {"a": [0.1, 0.7, 0.9], "b": [0.8, 0.2, 0.1], "c": [0.5, 0.6]}.items():
        w = np.exp(np.array(scores) / 0.1)
        assert ranked[doc] == pytest.approx(float((w * scores).sum() / w.sum()))
    # best (and a one-vector policy) is each document's best hit, as before
    assert [(h.doc_id, s) for h, s in aggregate_hits(hits, 2, DocumentPolicy(windows="late_chunk"))] == [
        ("a", 0.9), ("b", 0.8)]
    assert [h.doc_id for h, _ in aggregate_hits(hits, 3, DocumentPolicy(aggregate="first_prior"))] == ["a", "b", "c"]


def test_mteb_adapter_rejects_late_chunk(minilm):
    from diffembed.eval.mteb_adapter import MTEBEncoder

    with pytest.raises(ConfigError, match="late_chunk stores one per chunk"):
        MTEBEncoder(with_aggregate(minilm, "best"))
