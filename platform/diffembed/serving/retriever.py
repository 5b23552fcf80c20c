"""The retriever deployment: query -> encoder (through its handle) -> Qdrant -> hits grouped per document.

Every Qdrant point is one chunk; a document can match with several chunks, so the retriever asks for more
chunks than `top_k` and keeps each document's best chunk. Local-mode Qdrant (a `path`) is locked to one
process, so with a path this deployment always runs exactly one replica.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from diffembed.index.config import StoreConfig

CHUNK_OVERFETCH = 4  # chunks fetched per wanted document, before grouping by doc_id


def group_hits(hits: list, top_k: int) -> list[dict[str, Any]]:
    """Best chunk per doc_id, in score order (hits arrive best first), at most top_k documents."""
    best: dict[str, Any] = {}
    for hit in hits:
        if hit.doc_id not in best:
            best[hit.doc_id] = hit
    docs = sorted(best.values(), key=lambda h: h.score, reverse=True)[:top_k]
    return [
        {
            "doc_id": h.doc_id,
            "score": h.score,
            "chunk_index": h.chunk_index,
            "char_span": list(h.char_span),
            "token_span": list(h.token_span),
            "payload": h.payload,
        }
        for h in docs
    ]


class StoreUnavailable(RuntimeError):
    """Qdrant is unreachable or the collection does not exist (yet): the ingress answers 503."""


class RetrieverImpl:
    def __init__(self, store: dict[str, Any], encoder):
        from diffembed.index.store import QdrantStore

        self.cfg = StoreConfig.model_validate(store)
        self.store = QdrantStore(self.cfg)
        self.encoder = encoder
        self._lock = asyncio.Lock()  # the local client is not meant for concurrent use

    async def _store_call(self, fn, *args, **kwargs):
        async with self._lock:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except (ValueError, TypeError):  # a bad filter value: the caller's fault
                exists = await asyncio.to_thread(self._exists)
                if not exists:
                    raise StoreUnavailable(self._missing()) from None
                raise
            except Exception as exc:
                raise StoreUnavailable(f"Qdrant unavailable: {type(exc).__name__}: {exc}") from None

    def _exists(self) -> bool:
        try:
            return bool(self.store.client.collection_exists(self.cfg.collection))
        except Exception:
            return False

    def _missing(self) -> str:
        where = self.cfg.url or f"local path {self.cfg.path!r}"
        return f"collection {self.cfg.collection!r} does not exist at {where}; fill it with the embed_corpus job first"

    async def ready(self) -> dict[str, Any]:
        """Raises when Qdrant or the collection is unreachable."""
        return {"collection": self.cfg.collection, "points": await self._store_call(self.store.count)}

    async def search(self, query: str, top_k: int = 10, mode: str = "dense", filter: dict | None = None,
                     instruction: str | None = None) -> list[dict[str, Any]]:
        dense = None
        if mode != "sparse":
            result = await self.encoder.embed.remote([query], kind="query", instruction=instruction)
            dense = result.vectors[0]
        hits = await self._store_call(self.store.search, dense, query, top_k=top_k * CHUNK_OVERFETCH, mode=mode,
                                      filter=filter)
        return group_hits(hits, top_k)

    def __del__(self):
        try:
            self.store.close()
        except Exception:
            pass


def retriever_deployment(args) -> serve.Deployment:
    store: StoreConfig = args.store
    replicas = 1 if not store.url else args.retriever_replicas
    return serve.deployment(RetrieverImpl).options(
        name="Retriever", num_replicas=replicas, ray_actor_options={"num_cpus": args.retriever_num_cpus},
        max_ongoing_requests=64,
    )
