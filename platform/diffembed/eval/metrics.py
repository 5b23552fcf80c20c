"""Retrieval metrics through pytrec_eval (trec_eval's own implementation), never hand-written."""

from __future__ import annotations

from typing import Mapping

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> relevance grade
Run = Mapping[str, Mapping[str, float]]  # query id -> doc id -> score

MEASURES = {"ndcg_cut.1": "ndcg@1", "ndcg_cut.10": "ndcg@10", "recall.10": "recall@10", "recall.100": "recall@100",
            "recip_rank": "mrr"}


def evaluate(qrels: Qrels, run: Run) -> dict[str, float]:
    """Mean nDCG@1/@10, Recall@10/@100 and MRR over the queries that have judgements."""
    import pytrec_eval

    measures = {m.split(".")[0] for m in MEASURES}
    per_query = pytrec_eval.RelevanceEvaluator({q: dict(d) for q, d in qrels.items()}, measures).evaluate(
        {q: dict(d) for q, d in run.items()}
    )
    out = {}
    for trec_name, name in MEASURES.items():
        key = trec_name.replace(".", "_")
        values = [scores[key] for scores in per_query.values() if key in scores]
        out[name] = float(np.mean(values)) if values else 0.0
    return out


def dense_run(query_vectors: np.ndarray, doc_vectors: np.ndarray, query_ids: list[str], doc_ids: list[str],
              top_k: int = 100) -> dict[str, dict[str, float]]:
    """Exact inner-product retrieval: the top_k documents per query with their scores."""
    scores = query_vectors @ doc_vectors.T  # (Q, N)
    k = min(top_k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
    return {
        qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]}
        for i, qid in enumerate(query_ids)
    }
