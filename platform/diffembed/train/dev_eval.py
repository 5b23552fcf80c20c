"""Dev-set retrieval quality for training: rows of {query, positive, negatives} become a small retrieval task."""

from __future__ import annotations

from diffembed.eval.metrics import dense_run, evaluate
from diffembed.train.data import Pair


def dev_ndcg(embedder, pairs: list[Pair]) -> dict[str, float]:
    """Corpus = every positive and negative text; each query's one relevant document is its positive."""
    doc_ids: dict[str, str] = {}
    for pair in pairs:
        for text in (pair.positive, *pair.negatives):
            doc_ids.setdefault(text, f"d{len(doc_ids)}")
    texts = list(doc_ids)
    docs = embedder.encode_documents(texts)
    queries = embedder.encode_queries([p.query for p in pairs], [p.instruction for p in pairs])
    qids = [f"q{i}" for i in range(len(pairs))]
    run = dense_run(queries, docs, qids, [doc_ids[t] for t in texts])
    qrels = {qid: {doc_ids[p.positive]: 1} for qid, p in zip(qids, pairs)}
    return evaluate(qrels, run)
