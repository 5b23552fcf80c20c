"""HTTP ingress: OpenAI-compatible /v1/embeddings, TEI-style /embed, /search, /v1/models, /healthz, /readyz.

The bodies are the models of `diffembed.serving.api`, declared in `/openapi.json`; handlers still read the raw
body themselves, so the size limit is checked before parsing (413), invalid JSON is a 400 and a schema error a
422, and no client input can produce a 5xx. Every error body is `{"error": {"message", "type", "code",
"request_id"}}`. The deployments' typed errors (`diffembed.serving.errors`, under Ray's RayTaskError wrapping)
become HTTP statuses in one place, `client_error`: InvalidInput/BadSearchRequest -> 422, Overloaded (a callee's
full queue) -> 429 with Retry-After, StoreUnavailable / a lost replica / the request deadline -> 503.

A collection embedded by another embedding function than the served model's (its stored fingerprint differs:
another model, document policy, size or distance) is CollectionMismatch: /search answers 503 with code
`collection_mismatch` and the one-line difference (503, not a 4xx: the deployment is wrong, not the request; no
search can succeed until the config or the collection changes), and /readyz is not ready with the same message.
/v1/embeddings and /embed do not use the collection and keep serving.

Request ids: Serve's proxy sets the `x-request-id` request header (the client's, else a generated UUID), uses it
as `serve.get_request_context().request_id` and echoes it in the response's `X-Request-ID`. The ingress keeps that
id when it is a sane token (<= 128 characters of [A-Za-z0-9._-]); otherwise it makes its own and adds it as a
second `X-Request-Id` header (the proxy's echo of the client's value cannot be removed from a deployment). The
error body and the ingress's log lines carry the ingress's id.

The proxy answers some requests without the ingress: a full ingress queue (429 + Retry-After, plain text) and an
app that is not running (503).

A multivector model (`mask_vectors: multi`: K vectors per input, scored by MaxSim) answers /embed with K vectors
per input (each in the request's encoding_format; `dimensions` truncates each); /v1/embeddings, whose OpenAI shape
is one vector per input, refuses it (422 `multivector_model`, naming /embed); /search takes its K query vectors
to a multivector collection.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class on the route methods.

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from typing import Any, Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffembed.serving import api
from diffembed.serving.api import EmbeddingsRequest, EmbedRequest, SearchRequest
from diffembed.serving.calls import call, overloaded, replica_lost
from diffembed.serving.errors import CollectionMismatch, InvalidInput, StoreUnavailable, message_of, unwrap
from diffembed.serving.quantize import ENCODING_FORMATS, encode

log = logging.getLogger("ray.serve")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate (lone or paired)
READY_TTL_S = 1.0  # /readyz answers from a check at most this old
READY_TIMEOUT_S = 2.0  # each readiness check (Serve's status, the store) gets this long


class VectorJSONResponse(JSONResponse):
    """JSON through orjson: numpy rows are written directly (float32 at its shortest exact repr), several times
    faster than `json.dumps` over `tolist()` floats and about half the bytes."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.retry_after_s = retry_after_s


def client_error(exc: BaseException) -> APIError | None:
    """The HTTP error a deployment's typed exception (under any RayTaskError wrapping) stands for; None for an
    internal failure (a 500)."""
    cause = unwrap(exc)
    if isinstance(cause, APIError):
        return cause
    busy = overloaded(exc)
    if busy is not None:
        return APIError(429, message_of(busy), "overloaded_error", "overloaded", retry_after_s=busy.retry_after_s)
    if isinstance(cause, CollectionMismatch):  # the message names up to four differing fields: keep it whole
        return APIError(503, message_of(cause, limit=2000), "service_unavailable", "collection_mismatch")
    if isinstance(cause, StoreUnavailable):
        return APIError(503, message_of(cause), "service_unavailable", "store_unavailable")
    if isinstance(cause, InvalidInput):
        return APIError(422, message_of(cause), code=getattr(cause, "code", None) or "invalid_input")
    if isinstance(cause, TimeoutError):
        return APIError(503, "the request did not finish within the server's deadline; retry later",
                        "service_unavailable", "timeout")
    if replica_lost(exc):
        return APIError(503, f"no replica could serve the request ({type(cause).__name__}); retry later",
                        "service_unavailable", "replica_unavailable")
    return None


# ---------------------------------------------------------------------------------------------- request ids

def request_id(request: Request) -> str:
    """This request's id: the proxy's `x-request-id` (the client's or Serve's own) when sane, else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id")
        rid = given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def with_request_id(request: Request, response: Response) -> Response:
    """Add X-Request-Id unless Serve's proxy will echo the same value (it echoes the request's header)."""
    rid = request_id(request)
    if request.headers.get("x-request-id") != rid:
        response.headers["X-Request-Id"] = rid
    return response


def error_response(request: Request, error: APIError, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": error.message, "type": error.type, "code": error.code,
                      "request_id": request_id(request)}}
    headers = dict(headers or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return with_request_id(request, JSONResponse(body, status_code=error.status, headers=headers))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- app

app = FastAPI(
    title="diffembed", version="0.2.0",
    description="Embeddings (OpenAI-compatible and TEI-style) and search over a Qdrant collection. Every error is "
    "`{\"error\": {\"message\", \"type\", \"code\", \"request_id\"}}`.",
)
app.openapi = lambda: api.openapi_schema(app)  # type: ignore[method-assign]

_KINDS = {404: "not_found_error", 405: "invalid_request_error"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes (404) and wrong methods (405, with Starlette's `Allow` header) as JSON errors."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), _KINDS.get(exc.status_code, "invalid_request_error"), code)
    return error_response(request, error, headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return error_response(request, APIError(422, message or "invalid request", code="invalid_body"))


_BODY_ROUTE_ERRORS = (400, 401, 413, 422, 429, 503)


@serve.ingress(app)
class IngressImpl:
    def __init__(self, encoder, retriever, args: dict[str, Any]):
        from ray.serve.metrics import Counter, Histogram

        from diffembed.serving.config import ServeArgs

        self.args = ServeArgs.model_validate(args)
        self.limits = self.args.limits
        self.encoder = encoder
        self.retriever = retriever
        self._info: dict[str, Any] | None = None
        self._ready: tuple[float, dict[str, Any] | APIError] | None = None
        self._ready_lock = asyncio.Lock()
        self.requests = Counter("diffembed_requests", description="HTTP requests by route and status.",
                                tag_keys=("route", "status"))
        self.latency = Histogram("diffembed_request_latency_ms", description="HTTP request latency (ms).",
                                 boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                 tag_keys=("route",))

    # -- plumbing -------------------------------------------------------------------------------------

    async def _serve(self, request: Request, route: str, handler: Callable[[], Awaitable[Any]],
                     auth: bool = True) -> Response:
        started = time.perf_counter()
        try:
            if auth:
                self._check_auth(request)
            result = await handler()
            response = result if isinstance(result, Response) else VectorJSONResponse(result)
            response = with_request_id(request, response)
        except Exception as exc:
            response = self._failure(request, route, exc)
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
        return response

    def _failure(self, request: Request, route: str, exc: Exception) -> Response:
        rid = request_id(request)
        error = client_error(exc)
        if error is None:  # an internal failure: logged with its traceback, a 500 with a JSON body
            log.exception("%s failed (request_id=%s)", route, rid)
            error = APIError(500, f"internal error: {type(unwrap(exc)).__name__}", "server_error", "internal")
        elif error.status == 429:  # the configured pause is the least a client is told to wait
            error.retry_after_s = max(error.retry_after_s or 0.0, self.args.retry_after_s)
        if error.status >= 429 and route != "/readyz":  # "not ready" is a readiness probe's answer, not a fault
            log.warning("%s -> %d %s: %s (request_id=%s)", route, error.status, error.code, error.message, rid)
        else:
            log.info("%s -> %d %s: %s (request_id=%s)", route, error.status, error.code, error.message, rid)
        return error_response(request, error)

    def _check_auth(self, request: Request) -> None:
        key = self.args.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", "invalid_api_key")

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_large
        body = b"".join(chunks)
        try:
            data = json.loads(body)
            if SURROGATE_ESCAPE.search(body):  # `"\ud800"` parses but is no text: no tokenizer or store takes it
                json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (ValueError, UnicodeError):
            raise APIError(400, "request body is not valid JSON (UTF-8 text)", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(422, "request body must be a JSON object", code="invalid_body")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise APIError(422, _validation_message(exc), code="invalid_body") from None

    def _inputs(self, value: str | list, field: str) -> list[str] | list[list[int]]:
        """The request's inputs as a list of texts or a list of token-id lists, within the size limits."""
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            items = [value]  # one text, or one input as token ids
        else:
            items = list(value)
        if len(items) > self.limits.max_inputs_per_request:
            raise APIError(413, f"'{field}' has {len(items)} items; at most {self.limits.max_inputs_per_request} "
                           "per request", code="too_many_inputs")
        for i, item in enumerate(items):
            if isinstance(item, str) and not item.strip():
                raise APIError(422, f"'{field}'[{i}] is empty", code="empty_input")
            if len(item) > self.limits.max_chars_per_input:  # a token id stands for at least one character
                unit = "characters" if isinstance(item, str) else "token ids"
                raise APIError(413, f"'{field}'[{i}] has {len(item)} {unit}; at most "
                               f"{self.limits.max_chars_per_input}", code="input_too_long")
        return items

    def _instruction(self, instruction: str | None) -> None:
        if instruction is not None and len(instruction) > self.limits.max_chars_per_input:
            raise APIError(413, f"'instruction' has {len(instruction)} characters; at most "
                           f"{self.limits.max_chars_per_input}", code="input_too_long")

    async def _call(self, method: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """A call to another deployment within the request deadline: retried when its replica died, 429 when
        its queue is full (`calls.call`), 503 when the deadline passes."""
        deadline = self.args.request_timeout_s
        return await asyncio.wait_for(call(method, *args, deadline_s=deadline, what=what, **kwargs), deadline)

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._call(self.encoder.info, what="encoder.info")
        return self._info

    async def _embed(self, inputs: list[str] | list[list[int]], **kwargs: Any):
        from diffembed.serving.encoder import InputTooLong

        info = await self._model_info()
        dims = kwargs.get("dimensions")
        if dims is not None and dims > info["dimension"]:
            raise APIError(422, f"dimensions={dims} exceeds the model's {info['dimension']}",
                           code="invalid_dimensions")
        # token ids outside the vocabulary: the encoder's InvalidTokenIds (422, code invalid_token_ids) below
        if kwargs.get("truncate") is None:
            kwargs["truncate"] = self.limits.truncate_default
        try:
            return await self._call(self.encoder.embed, inputs, what="encoder.embed", **kwargs)
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, InputTooLong):
                raise APIError(422, message_of(cause), code="input_too_long") from None
            if isinstance(cause, ValueError):
                # the Embedder refused the caller's input (e.g. an instruction that leaves a query no tokens
                # at max_length); inputs reach it validated, so a ValueError there is about the input
                code = cause.code if isinstance(cause, InvalidInput) else "invalid_input"
                raise APIError(422, message_of(cause), code=code) from None
            raise

    # -- readiness ------------------------------------------------------------------------------------

    def _running_encoders(self) -> int:
        """Running replicas of the encoder, from Serve's controller (never through the encoder's queue)."""
        status = serve.status()
        app_status = status.applications.get(self.encoder.app_name)
        deployment = app_status.deployments.get(self.encoder.deployment_name) if app_status else None
        return 0 if deployment is None else int(deployment.replica_states.get("RUNNING", 0))

    async def _check_ready(self) -> dict[str, Any] | APIError:
        def unready(message: str) -> APIError:
            return APIError(503, message, "service_unavailable", "not_ready")

        try:
            replicas = await asyncio.wait_for(asyncio.to_thread(self._running_encoders), READY_TIMEOUT_S)
        except Exception as exc:
            return unready(f"Serve's status is unavailable: {type(exc).__name__}: {message_of(unwrap(exc))}")
        scaled_to_zero = self.args.encoder.autoscaling is not None and self.args.encoder.autoscaling.min_replicas == 0
        if replicas < 1 and not scaled_to_zero:  # a scale-to-zero encoder starts on demand: still ready
            return unready("the encoder has no running replica yet")
        store = None
        if self.retriever is not None:
            try:
                store = await asyncio.wait_for(self.retriever.ready.remote(), READY_TIMEOUT_S)
            except Exception as exc:
                cause = unwrap(exc)
                if isinstance(cause, CollectionMismatch):  # the store answers; the collection is not the model's
                    return unready(message_of(cause, limit=2000))
                return unready(f"the store is not ready: {message_of(cause)}")
        return {"status": "ready", "encoder_replicas": replicas, "store": store}

    async def _readiness(self) -> dict[str, Any]:
        """The last readiness check when it is under READY_TTL_S old; concurrent probes share one check."""
        async with self._ready_lock:
            if self._ready is None or time.monotonic() - self._ready[0] > READY_TTL_S:
                self._ready = (time.monotonic(), await self._check_ready())
            result = self._ready[1]
        if isinstance(result, APIError):
            raise APIError(result.status, result.message, result.type, result.code)
        return result

    # -- routes ---------------------------------------------------------------------------------------

    @app.post("/v1/embeddings", responses=api.responses(api.EmbeddingsResponse, *_BODY_ROUTE_ERRORS),
              openapi_extra=api.request_body(EmbeddingsRequest), summary="Embed inputs (OpenAI-compatible)")
    async def embeddings(self, request: Request) -> JSONResponse:
        async def handle():
            req: EmbeddingsRequest = await self._parse(request, EmbeddingsRequest)
            inputs = self._inputs(req.input, "input")
            self._instruction(req.instruction)
            per_input = (await self._model_info()).get("vectors_per_input", 1)
            if per_input > 1:  # no single vector of a multivector model means what its MaxSim scores
                raise APIError(422, f"{self.args.model_name} is a multivector model ({per_input} vectors per input, "
                               "scored by MaxSim) and /v1/embeddings returns one vector per input; use /embed, "
                               "which returns all of them", code="multivector_model")
            unit = bool(req.dimensions) or req.encoding_format in ("int8", "uint8")  # the calibration needs it
            result = await self._embed(inputs, kind=req.input_type, instruction=req.instruction,
                                       truncate=req.truncate, dimensions=req.dimensions,
                                       normalize=True if unit else None)
            data = [{"object": "embedding", "index": i, "embedding": value}
                    for i, value in enumerate(encode(result.vectors, req.encoding_format))]
            total = int(sum(result.tokens))
            return {"object": "list", "data": data, "model": self.args.model_name,
                    "usage": {"prompt_tokens": total, "total_tokens": total}}

        return await self._serve(request, "/v1/embeddings", handle)

    @app.post("/embed", responses=api.responses(api.EmbedResponse, *_BODY_ROUTE_ERRORS),
              openapi_extra=api.request_body(EmbedRequest), summary="Embed inputs (TEI-style)")
    async def embed(self, request: Request) -> JSONResponse:
        async def handle():
            req: EmbedRequest = await self._parse(request, EmbedRequest)
            inputs = self._inputs(req.inputs, "inputs")
            self._instruction(req.instruction)
            result = await self._embed(inputs, kind=req.kind, instruction=req.instruction, truncate=req.truncate,
                                       dimensions=req.dimensions, normalize=req.normalize)
            if result.vectors.ndim == 3:  # a multivector model: each input's K vectors, each encoded
                return VectorJSONResponse([encode(vectors, req.encoding_format) for vectors in result.vectors])
            return VectorJSONResponse(encode(result.vectors, req.encoding_format))

        return await self._serve(request, "/embed", handle)

    @app.post("/search", responses=api.responses(api.SearchResponse, 404, *_BODY_ROUTE_ERRORS),
              openapi_extra=api.request_body(SearchRequest), summary="Search the collection")
    async def search(self, request: Request) -> JSONResponse:
        async def handle():
            if self.retriever is None:
                raise APIError(404, "search is not configured (no store in the serving config)", "not_found_error",
                               "no_store")
            req: SearchRequest = await self._parse(request, SearchRequest)
            self._inputs(req.query, "query")
            self._instruction(req.instruction)
            if req.top_k > self.limits.max_top_k:
                raise APIError(422, f"top_k must be at most {self.limits.max_top_k}", code="invalid_top_k")
            if req.mode != "dense" and not self.args.store.sparse:
                raise APIError(422, f"{req.mode} search needs a collection with BM25 vectors (store.sparse=true)",
                               code="mode_unavailable")
            # the retriever raises InvalidInput/BadSearchRequest (422) or StoreUnavailable (503): see client_error
            results = await self._call(self.retriever.search, req.query, what="retriever.search", top_k=req.top_k,
                                       mode=req.mode, filter=req.filter, instruction=req.instruction)
            return {"object": "list", "mode": req.mode, "data": results}

        return await self._serve(request, "/search", handle)

    @app.get("/v1/models", responses=api.responses(api.ModelList, 401, 429, 503), summary="The served model")
    async def models(self, request: Request) -> JSONResponse:
        async def handle():
            info = await self._model_info()
            return {"object": "list", "data": [{
                "id": self.args.model_name, "object": "model", "created": 0, "owned_by": "diffembed",
                "dimensions": info["dimension"], "max_tokens": info["max_length"],
                "vocab_size": info.get("vocab_size"), "query_instruction": info.get("query_instruction"),
                "encoding_formats": list(ENCODING_FORMATS), "vectors_per_input": info.get("vectors_per_input", 1),
            }]}

        return await self._serve(request, "/v1/models", handle)

    @app.get("/healthz", responses=api.responses(api.Health, description="The ingress is alive"),
             summary="Liveness")
    async def healthz(self, request: Request) -> JSONResponse:
        """Liveness: answered by the ingress alone (no call to another deployment), so a busy or restarting
        encoder never makes a liveness probe fail. Use /readyz to wait for the app to serve."""

        async def handle():
            return {"status": "ok"}

        return await self._serve(request, "/healthz", handle, auth=False)

    @app.get("/readyz", responses=api.responses(api.Readiness, 503, description="Ready to serve"),
             summary="Readiness")
    async def readyz(self, request: Request) -> JSONResponse:
        """Readiness: 200 when the encoder has a running replica (Serve's status, not a call into its queue) and
        the store, when configured, answers with a collection the served model embedded (its fingerprint); 503
        otherwise. Checked at most once per READY_TTL_S."""

        async def handle():
            return await self._readiness()

        return await self._serve(request, "/readyz", handle, auth=False)


def ingress_deployment(args) -> serve.Deployment:
    """The Ingress deployment: bounded queue; beyond it Serve's proxy answers 429 with Retry-After itself."""
    from ray.serve.config import BackpressureConfig

    return serve.deployment(IngressImpl).options(
        name="Ingress", num_replicas=args.ingress_replicas, ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=args.ingress_max_ongoing_requests, max_queued_requests=args.ingress_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s),
    )
