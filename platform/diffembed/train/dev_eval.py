"""Dev-set retrieval quality for training: rows of {query, positive, negatives} become a small retrieval task."""

from __future__ import annotations

import numpy as np
import torch

from diffembed.eval.metrics import evaluate, top_k_run
from diffembed.train.data import Pair
from diffembed.train.losses import similarity

TOP_K = 100
QUERY_BLOCK = 256  # queries scored at once: bounds a multivector block's (b, N, K, K) dot products


def dev_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """(Q, N) scores by the training loss's `similarity`: dot products of single vectors (Q, D) x (N, D), MaxSim
    (divided by K: the same ranking) of multivectors (Q, K, D) x (N, K, D)."""
    d = torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32))  # (N, [K,] D)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (Q, [K,] D)
    return torch.cat([similarity(block, d) for block in q.split(QUERY_BLOCK)]).numpy()  # (Q, N)


def dev_ndcg(embedder, pairs: list[Pair]) -> dict[str, float]:
    """Corpus = every positive and negative text; each query's one relevant document is its positive."""
    doc_ids: dict[str, str] = {}
    for pair in pairs:
        for text in (pair.positive, *pair.negatives):
            doc_ids.setdefault(text, f"d{len(doc_ids)}")
    texts = list(doc_ids)
    docs = embedder.encode_documents(texts)  # (N, D), or (N, K, D) for a multivector
    queries = embedder.encode_queries([p.query for p in pairs], [p.instruction for p in pairs])
    qids = [f"q{i}" for i in range(len(pairs))]
    run = top_k_run(dev_scores(queries, docs), qids, [doc_ids[t] for t in texts], TOP_K)
    qrels = {qid: {doc_ids[p.positive]: 1} for qid, p in zip(qids, pairs)}
    return evaluate(qrels, run)
