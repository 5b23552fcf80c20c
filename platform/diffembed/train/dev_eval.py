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


def encode_shared(encode, items: list, shard: tuple[int, int] | None) -> np.ndarray:
    """`encode(items)` -> (len(items), ...) vectors, each rank of `shard` = (rank, world) encoding every world-th
    item (round robin: long and short items spread evenly) and receiving the others' from an all-gather of the
    default process group; every rank returns all of them, in the items' order. Without `shard`, encodes all here.
    Every rank of the group must call it with the same items."""
    if shard is None or shard[1] == 1:
        return encode(items)
    rank, world = shard
    mine = items[rank::world]
    local = encode(mine) if mine else None
    parts: list[np.ndarray | None] = [None] * world
    torch.distributed.all_gather_object(parts, local)  # pickled numpy: any shape, (n_r, [K,] D) per rank
    first = next(p for p in parts if p is not None)
    out = np.empty((len(items), *first.shape[1:]), dtype=first.dtype)  # (N, [K,] D)
    for r, part in enumerate(parts):
        if part is not None:
            out[r::world] = part
    return out


def dev_ndcg(embedder, pairs: list[Pair], shard: tuple[int, int] | None = None) -> dict[str, float]:
    """Corpus = every positive and negative text; each query's one relevant document is its positive.

    With `shard` = (rank, world), the ranks of a training run share the encoding (`encode_shared`): each encodes a
    world-th of the texts, so an evaluation takes 1/world of the time it takes one rank. Only for weights every rank
    holds whole (DDP, ZeRO 1-2): under ZeRO-3 every forward is collective, so every rank must encode everything."""
    doc_ids: dict[str, str] = {}
    for pair in pairs:
        for text in (pair.positive, *pair.negatives):
            doc_ids.setdefault(text, f"d{len(doc_ids)}")
    texts = list(doc_ids)
    docs = encode_shared(embedder.encode_documents, texts, shard)  # (N, D), or (N, K, D) for a multivector
    queries = encode_shared(lambda part: embedder.encode_queries([p.query for p in part],
                                                                 [p.instruction for p in part]), pairs, shard)
    qids = [f"q{i}" for i in range(len(pairs))]
    run = top_k_run(dev_scores(queries, docs), qids, [doc_ids[t] for t in texts], TOP_K)
    qrels = {qid: {doc_ids[p.positive]: 1} for qid, p in zip(qids, pairs)}
    return evaluate(qrels, run)
