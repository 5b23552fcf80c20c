"""Retrieval metrics through pytrec_eval (trec_eval's own implementation), never hand-written."""

from __future__ import annotations

from typing import Mapping

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> relevance grade
Run = Mapping[str, Mapping[str, float]]  # query id -> doc id -> score

# pytrec_eval measure (with its cut-offs) -> the key it reports per query -> our name
TREC_MEASURES = {"ndcg_cut.1,10", "recall.10,100", "recip_rank"}
MEASURES = {"ndcg_cut_1": "ndcg@1", "ndcg_cut_10": "ndcg@10", "recall_10": "recall@10", "recall_100": "recall@100",
            "recip_rank": "mrr"}
MRR_CUTOFF = 10


def top_ranked(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Each query's first k documents in trec_eval's order (score descending, ties by doc id descending)."""
    return {
        q: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for q, docs in run.items()
    }


def evaluate(qrels: Qrels, run: Run) -> dict[str, float]:
    """Mean nDCG@1/@10, Recall@10/@100, MRR (uncut) and MRR@10 over every judged query.

    The mean runs over all queries in `qrels` (trec_eval's `-c`): a query the run has no entry for
    scores 0 instead of being left out. MRR@10 is pytrec_eval's `recip_rank` on the run cut to each
    query's top 10 (trec_eval's `recip_rank` has no cut-off of its own).
    """
    import pytrec_eval

    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    if not judged:
        return {name: 0.0 for name in (*MEASURES.values(), f"mrr@{MRR_CUTOFF}")}
    full = {q: {d: float(s) for d, s in run.get(q, {}).items()} for q in judged}
    per_query = pytrec_eval.RelevanceEvaluator(judged, TREC_MEASURES).evaluate(full)
    cut = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top_ranked(full, MRR_CUTOFF))

    def mean(results: dict, key: str) -> float:
        return float(np.mean([results.get(q, {}).get(key, 0.0) for q in judged]))

    out = {name: mean(per_query, key) for key, name in MEASURES.items()}
    out[f"mrr@{MRR_CUTOFF}"] = mean(cut, "recip_rank")
    return out


def dense_run(query_vectors: np.ndarray, doc_vectors: np.ndarray, query_ids: list[str], doc_ids: list[str],
              top_k: int = 100) -> dict[str, dict[str, float]]:
    """Exact inner-product retrieval: the top_k documents per query with their scores."""
    scores = query_vectors @ doc_vectors.T  # (Q, N)
    return top_k_run(scores, query_ids, doc_ids, top_k)


def top_k_run(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], top_k: int = 100
              ) -> dict[str, dict[str, float]]:
    """The top_k documents per query of a (Q, N) score matrix, as a run."""
    k = min(top_k, scores.shape[1])
    if k == 0:
        return {qid: {} for qid in query_ids}
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
    return {
        qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]}
        for i, qid in enumerate(query_ids)
    }
