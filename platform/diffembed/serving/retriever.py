"""The retriever deployment: query -> encoder (through its handle) -> Qdrant -> hits grouped per document.

Every Qdrant point is one chunk; a document can match with several chunks, so the retriever asks for more
chunks than `top_k` and keeps each document's best chunk. The embedded Qdrant Edge store (a `path`) is open in one
process, so with a path this deployment always runs exactly one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ray import serve

from diffembed.documents import best_hits
from diffembed.index.config import StoreConfig
from diffembed.serving.calls import DEFAULT_DEADLINE_S, call
from diffembed.serving.errors import BadSearchRequest, InvalidInput, StoreUnavailable, message_of, unwrap

__all__ = ["BadSearchRequest", "InvalidInput", "StoreUnavailable", "RetrieverImpl", "classify_store_error",
           "group_hits", "retriever_deployment"]

log = logging.getLogger("ray.serve")

CHUNK_OVERFETCH = 4  # chunks fetched per wanted document, before grouping by doc_id


def group_hits(hits: list, top_k: int) -> list[dict[str, Any]]:
    """Each document's best point (hits arrive best first), at most top_k documents, as JSON-ready dicts."""
    return [
        {
            "doc_id": h.doc_id,
            "score": h.score,
            "chunk_index": h.chunk_index,
            "char_span": list(h.char_span),
            "token_span": list(h.token_span),
            "payload": h.payload,
        }
        for h in best_hits(hits, top_k)
    ]


# Statuses a Qdrant server answers when the request itself is wrong (a bad filter path or value, a bad field).
# 404 is a missing collection; 401/403 (our API key), 408/429 (load) and 5xx are the store's side: 503.
_CLIENT_STATUSES = {400, 413, 422}
_CLIENT_GRPC_CODES = {"INVALID_ARGUMENT", "OUT_OF_RANGE"}


def _response_detail(exc) -> str:
    """The error text of a Qdrant REST error body (`{"status": {"error": ...}}`), else the raw body."""
    try:
        detail = exc.structured()["status"]["error"]
    except Exception:
        detail = exc.content.decode("utf-8", "replace") if isinstance(exc.content, bytes) else str(exc.content)
    return " ".join(str(detail).split())[:500] or (exc.reason_phrase or "")


def _grpc_code(exc: BaseException) -> str | None:
    try:
        import grpc
    except ImportError:  # pragma: no cover - qdrant-client depends on grpcio
        return None
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        return getattr(code, "name", str(code))
    return None


def _validation_text(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in errors()[:3])
        except Exception:
            pass
    return message_of(exc)


def classify_store_error(
    exc: BaseException,
    *,
    collection_exists: Callable[[], bool] | None = None,
    missing: str = "the collection does not exist",
    caller_input: bool = True,
) -> BadSearchRequest | StoreUnavailable:
    """What a failed Qdrant call means for the caller: `BadSearchRequest` (422) or `StoreUnavailable` (503).

    - a 400/413/422 response, a gRPC INVALID_ARGUMENT/OUT_OF_RANGE, or a client-side ValueError/TypeError
      (qdrant-client's request models, local mode's checks): the request was wrong -> BadSearchRequest;
    - a 404 response or gRPC NOT_FOUND (local mode: a ValueError while `collection_exists()` is False):
      the collection is missing -> StoreUnavailable(`missing`);
    - the embedded (Edge) store missing, busy in another process or damaged (`StoreError`), connection errors,
      timeouts, 401/403/408/429/5xx and anything else -> StoreUnavailable.

    `caller_input=False` says the call carried nothing from the caller that the store could reject (no
    filter): a rejected request is then the deployment's problem (e.g. a collection of another dimension),
    reported as StoreUnavailable too.
    """
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    from diffembed.index.store import StoreError

    exc = unwrap(exc)
    if isinstance(exc, (BadSearchRequest, StoreUnavailable)):
        return exc
    if isinstance(exc, StoreError):  # the embedded store is missing, busy (another process) or damaged
        return StoreUnavailable(message_of(exc))

    def rejected(detail: str) -> BadSearchRequest | StoreUnavailable:
        if caller_input:
            return BadSearchRequest(f"the store rejected the search: {detail}")
        return StoreUnavailable(f"the store rejected the search (check the collection and the model): {detail}")

    if isinstance(exc, UnexpectedResponse):
        status = exc.status_code
        if status == 404:
            return StoreUnavailable(missing)
        if status in _CLIENT_STATUSES:
            return rejected(_response_detail(exc))
        return StoreUnavailable(f"Qdrant unavailable: HTTP {status}: {_response_detail(exc)}")
    code = _grpc_code(exc)
    if code is not None:
        details = exc.details() if callable(getattr(exc, "details", None)) else None
        detail = " ".join(str(details or code).split())[:500]
        if code == "NOT_FOUND":
            return StoreUnavailable(missing)
        if code in _CLIENT_GRPC_CODES:
            return rejected(detail)
        return StoreUnavailable(f"Qdrant unavailable: gRPC {code}: {detail}")
    if isinstance(exc, ResponseHandlingException):  # transport errors (and unparsable responses)
        source = getattr(exc, "source", None) or exc
        return StoreUnavailable(f"Qdrant unavailable: {type(source).__name__}: {message_of(source)}")
    if isinstance(exc, (ValueError, TypeError)):  # client-side: request models, local mode's own checks
        if collection_exists is not None and not collection_exists():
            return StoreUnavailable(missing)
        return rejected(_validation_text(exc))
    return StoreUnavailable(f"Qdrant unavailable: {type(exc).__name__}: {message_of(exc)}")


def check_filter(spec: dict[str, Any] | None) -> None:
    """BadSearchRequest naming the first filter entry that cannot become a Qdrant condition."""
    from diffembed.index.store import validate_filter

    for key, value in (spec or {}).items():
        try:
            validate_filter({key: value})
        except (ValueError, TypeError) as exc:
            if isinstance(value, (list, tuple)):
                why = "a list must hold only strings or only integers"
            else:
                why = _validation_text(exc)
            raise BadSearchRequest(f"filter {key!r}: {why}") from None


class RetrieverImpl:
    def __init__(self, store: dict[str, Any], encoder, deadline_s: float = DEFAULT_DEADLINE_S):
        from diffembed.index.store import open_store

        self.cfg = StoreConfig.model_validate(store)
        self.store = open_store(self.cfg)
        self.encoder = encoder
        self.deadline_s = deadline_s
        # the embedded store is one in-process shard: its calls go one at a time (concurrent reads measured no
        # faster: bench/store_throughput.py); a server takes them concurrently
        self._lock = asyncio.Lock() if self.store.backend == "edge" else contextlib.nullcontext()

    async def _store_call(self, fn, *args, caller_input: bool = False, **kwargs):
        """Run a store call in a thread; its failure becomes BadSearchRequest (422) or StoreUnavailable (503)."""
        async with self._lock:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except Exception as exc:
                error = await asyncio.to_thread(
                    classify_store_error, exc, collection_exists=self._exists, missing=self._missing(),
                    caller_input=caller_input,
                )
            if isinstance(error, StoreUnavailable):
                log.warning("store call %s failed: %s", getattr(fn, "__name__", fn), error)
            raise error from None

    def _exists(self) -> bool:
        try:
            return bool(self.store.exists())
        except Exception:
            return False

    def _missing(self) -> str:
        where = self.cfg.url or f"the embedded store {self.cfg.path!r}"
        return f"collection {self.cfg.collection!r} does not exist at {where}; fill it with the embed_corpus job first"

    async def ready(self) -> dict[str, Any]:
        """Raises when Qdrant or the collection is unreachable. Cheap on any size: an estimated count."""
        return {"collection": self.cfg.collection, "points": await self._store_call(self.store.count, exact=False)}

    async def search(self, query: str, top_k: int = 10, mode: str = "dense", filter: dict | None = None,
                     instruction: str | None = None) -> list[dict[str, Any]]:
        check_filter(filter)
        dense = None
        if mode != "sparse":
            try:
                result = await call(self.encoder.embed, [query], kind="query", instruction=instruction,
                                    deadline_s=self.deadline_s, what="encoder.embed")
            except Exception as exc:
                cause = unwrap(exc)
                if isinstance(cause, ValueError):  # the Embedder refused the caller's query or instruction
                    raise InvalidInput(message_of(cause)) from None
                raise
            dense = result.vectors[0]
        hits = await self._store_call(self.store.search, dense, query, top_k=top_k * CHUNK_OVERFETCH, mode=mode,
                                      filter=filter, caller_input=bool(filter))
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
