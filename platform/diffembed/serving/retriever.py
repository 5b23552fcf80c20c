"""The retriever deployment: query -> encoder (through its handle) -> Qdrant -> hits grouped per document.

Every Qdrant point is one chunk; a document can match with several chunks, so the retriever asks for more
chunks than `top_k` and scores each document from its retrieved chunks as the served model's document policy says
(`documents.aggregate`, read from the encoder's `info`): its best chunk (`best`), or `first_prior` / `softmax`
(`diffembed.documents.aggregate_hits`); the points a candidate needs and the search missed (first_prior: its chunk
0; softmax: its other chunks) are scored exactly by one more search in the same mode filtered to them
(`document_points`; a hybrid search's fused scores are rank-based: only the fused list counts, a missing chunk 0
counts 0). Each result shows the document's best chunk with the document's score. A multivector model's K query
vectors search a multivector collection (MaxSim). The embedded Qdrant Edge store (a `path`) is open in one
process, so with a path this deployment always runs exactly one replica.

Before its first search (and in readiness) the retriever compares the collection's stored embedding fingerprint
(`diffembed.index.fingerprint`) with the served model's, which the encoder computes (`encoder.fingerprint`): a
collection embedded by another model or another document policy is `CollectionMismatch` (the ingress: 503
`collection_mismatch`, /readyz not ready) naming what differs, once found for good; a collection without a
fingerprint (written before they existed) is served with one warning. A missing collection is not decided: it
is looked at again on the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ray import serve

from diffembed.documents import DocumentPolicy
from diffembed.index.config import StoreConfig
from diffembed.serving.calls import DEFAULT_DEADLINE_S, call
from diffembed.serving.errors import (
    BadSearchRequest,
    CollectionMismatch,
    InvalidInput,
    StoreUnavailable,
    message_of,
    unwrap,
)

__all__ = ["BadSearchRequest", "CollectionMismatch", "InvalidInput", "StoreUnavailable", "RetrieverImpl",
           "classify_store_error", "document_hit", "retriever_deployment"]

log = logging.getLogger("ray.serve")


def document_hit(hit, score: float) -> dict[str, Any]:
    """A ranked document as /search returns it: its best point's location and payload, the document's score."""
    return {
        "doc_id": hit.doc_id,
        "score": score,
        "chunk_index": hit.chunk_index,
        "char_span": list(hit.char_span),
        "token_span": list(hit.token_span),
        "payload": hit.payload,
    }


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
        self._policy: DocumentPolicy | None = None  # the served model's document policy (from the encoder's info)
        self._fit_known = False  # whether the collection's fingerprint has been compared with the served model's
        self._mismatch: str | None = None  # the comparison's one-line mismatch (None: it fits)
        self._fit_task: asyncio.Future | None = None
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
        """Raises when Qdrant or the collection is unreachable, or the collection does not fit the served model
        (`CollectionMismatch`). Cheap on any size: an estimated count (and the fingerprints compared once)."""
        points = await self._store_call(self.store.count, exact=False)
        await self.check_fit()
        return {"collection": self.cfg.collection, "points": points}

    async def check_fit(self) -> None:
        """`CollectionMismatch` when the collection was embedded by another embedding function than the served
        model's. Compared once; concurrent callers share the comparison, and a caller that gives up (a readiness
        probe's timeout) leaves it running for the next. A failed comparison (store or encoder unavailable)
        raises and is tried again on the next call."""
        if not self._fit_known:
            if self._fit_task is None or self._fit_task.done():
                self._fit_task = asyncio.ensure_future(self._compare_fingerprints())
            await asyncio.shield(self._fit_task)
        if self._mismatch is not None:
            raise CollectionMismatch(self._mismatch)

    async def _compare_fingerprints(self) -> None:
        from diffembed.index.fingerprint import mismatch_message

        if not await self._store_call(self.store.exists):
            return  # undecided: the search (or readiness) reports the missing collection as before
        stored = await self._store_call(self.store.fingerprint)
        name = self.cfg.collection
        if stored is None:
            log.warning("collection %r has no embedding fingerprint (written before fingerprints existed): served "
                        "without checking that the served model embedded it", name)
        else:
            wanted = await call(self.encoder.fingerprint, self.cfg.distance, bool(self.cfg.sparse),
                                deadline_s=self.deadline_s, what="encoder.fingerprint")
            if not self.cfg.sparse:  # dense search only: BM25 vectors the collection may hold are never used
                wanted = {**wanted, "sparse": stored.get("sparse")}
            self._mismatch = mismatch_message(name, stored, wanted)
            if self._mismatch is not None:
                log.error("/search refused: %s", self._mismatch)
        self._fit_known = True

    async def policy(self) -> DocumentPolicy:
        """The served model's document policy (how a document's chunk scores aggregate), asked once."""
        if self._policy is None:
            info = await call(self.encoder.info, deadline_s=self.deadline_s, what="encoder.info")
            self._policy = DocumentPolicy.model_validate(info["documents"])
        return self._policy

    def _ranked(self, dense, query: str, top_k: int, mode: str, filter: dict | None,
                policy: DocumentPolicy) -> list[dict[str, Any]]:
        """Documents ranked from their points (`search_documents`) as JSON-ready dicts."""
        from diffembed.index.store import search_documents

        return [document_hit(h, score)
                for h, score in search_documents(self.store, dense, query, top_k, mode, policy, filter)]

    async def search(self, query: str, top_k: int = 10, mode: str = "dense", filter: dict | None = None,
                     instruction: str | None = None) -> list[dict[str, Any]]:
        check_filter(filter)
        await self.check_fit()
        policy = await self.policy()
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
            dense = result.vectors[0]  # (D,), or (K, D) for a multivector model
        return await self._store_call(self._ranked, dense, query, top_k, mode, filter, policy,
                                      caller_input=bool(filter))

    def __del__(self):
        try:
            self.store.close()
        except Exception:
            pass


HEAD_NODE = "node:__internal_head__"  # a resource only the head node has (Ray's own)


def retriever_deployment(args) -> serve.Deployment:
    """One replica on the head node for the embedded Edge store (its folder is on the disk of the node whose job
    wrote it: a submitted job's driver runs on the head; Ray would otherwise place a replica on any node with
    CPU), any number anywhere for a server."""
    store: StoreConfig = args.store
    options: dict = {"num_cpus": args.retriever_num_cpus}
    replicas = args.retriever_replicas
    if not store.url:  # Edge: one process per path, on the head
        options["resources"], replicas = {HEAD_NODE: 0.001}, 1
    return serve.deployment(RetrieverImpl).options(
        name="Retriever", num_replicas=replicas, ray_actor_options=options, max_ongoing_requests=64,
    )
