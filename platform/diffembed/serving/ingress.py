"""HTTP ingress: OpenAI-compatible /v1/embeddings, TEI-style /embed, /search, /v1/models, /healthz.

Every handler reads the raw body itself (size limit before parsing, JSON errors as 400, schema errors as 422),
so no client input can produce a 500; every error body is `{"error": {"message", "type", "code"}}`.
The deployments' typed errors (`diffembed.serving.errors`, under Ray's RayTaskError wrapping) become HTTP
statuses in one place, `client_error`: InvalidInput/BadSearchRequest -> 422, StoreUnavailable -> 503.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class on the route methods.

import asyncio
import base64
import hmac
import json
import logging
import time
from typing import Annotated, Any, Awaitable, Callable, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffembed.serving.errors import InvalidInput, StoreUnavailable, message_of, unwrap

log = logging.getLogger("ray.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def error_response(status: int, message: str, type: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code}}, status_code=status)


def client_error(exc: BaseException) -> APIError | None:
    """The HTTP error a deployment's typed exception (under any RayTaskError wrapping) stands for; None for an
    internal failure (a 500)."""
    cause = unwrap(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, StoreUnavailable):
        return APIError(503, message_of(cause), "service_unavailable", "store_unavailable")
    if isinstance(cause, InvalidInput):
        return APIError(422, message_of(cause), code=getattr(cause, "code", None) or "invalid_input")
    return None


# ---------------------------------------------------------------------------------------------- request models

class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)


class EmbeddingsRequest(_Req):
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    truncate: StrictBool | None = None


class EmbedRequest(_Req):
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    instruction: StrictStr | None = None
    dimensions: StrictInt | None = Field(None, ge=1)


# Qdrant stores integers as int64: a larger one is rejected by a server (and never matches anything).
FilterInt = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class SearchRequest(_Req):
    query: StrictStr
    top_k: StrictInt = Field(10, ge=1)
    filter: dict[str, StrictStr | FilterInt | StrictBool | list[StrictStr | FilterInt | StrictBool]] | None = None
    mode: Literal["dense", "sparse", "hybrid"] = "dense"
    instruction: StrictStr | None = None

    @field_validator("filter")
    @classmethod
    def _filter_matches(cls, spec):
        # a list becomes a Qdrant MatchAny, which holds only strings or only integers (not booleans)
        for key, value in (spec or {}).items():
            if not key.strip():
                raise ValueError("a filter key must be a non-empty payload path")
            if isinstance(value, list) and not (all(isinstance(v, str) for v in value) or all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"filter {key!r}: a list must hold only strings or only integers")
        return spec


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- app

app = FastAPI(title="diffembed", version="0.1.0")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, str(exc.errors()[:3]), "invalid_request_error")


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
        self.requests = Counter("diffembed_requests", description="HTTP requests by route and status.",
                                tag_keys=("route", "status"))
        self.latency = Histogram("diffembed_request_latency_ms", description="HTTP request latency (ms).",
                                 boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                 tag_keys=("route",))

    # -- plumbing -------------------------------------------------------------------------------------

    async def _serve(self, request: Request, route: str, handler: Callable[[], Awaitable[Any]],
                     auth: bool = True) -> JSONResponse:
        started = time.perf_counter()
        try:
            if auth:
                self._check_auth(request)
            result = await handler()
            response = result if isinstance(result, JSONResponse) else JSONResponse(result)
        except Exception as exc:
            error = client_error(exc)
            if error is None:  # an internal failure: logged, reported as 500 with a JSON body
                log.exception("unhandled error on %s", route)
                response = error_response(500, f"internal error: {type(unwrap(exc)).__name__}", "server_error")
            else:
                response = error_response(error.status, error.message, error.type, error.code)
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
        return response

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
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(422, "request body must be a JSON object", code="invalid_body")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise APIError(422, _validation_message(exc), code="invalid_body") from None

    def _texts(self, value: str | list[str], field: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise APIError(422, f"'{field}' is empty", code="empty_input")
        if len(texts) > self.limits.max_inputs_per_request:
            raise APIError(413, f"'{field}' has {len(texts)} items; at most {self.limits.max_inputs_per_request} "
                           "per request", code="too_many_inputs")
        for i, text in enumerate(texts):
            if not text.strip():
                raise APIError(422, f"'{field}'[{i}] is empty", code="empty_input")
            if len(text) > self.limits.max_chars_per_input:
                raise APIError(413, f"'{field}'[{i}] has {len(text)} characters; at most "
                               f"{self.limits.max_chars_per_input}", code="input_too_long")
        return texts

    def _instruction(self, instruction: str | None) -> None:
        if instruction is not None and len(instruction) > self.limits.max_chars_per_input:
            raise APIError(413, f"'instruction' has {len(instruction)} characters; at most "
                           f"{self.limits.max_chars_per_input}", code="input_too_long")

    async def _info_cached(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    async def _embed(self, texts: list[str], **kwargs: Any):
        from diffembed.serving.encoder import InputTooLong

        info = await self._info_cached()
        dims = kwargs.get("dimensions")
        if dims is not None and dims > info["dimension"]:
            raise APIError(422, f"dimensions={dims} exceeds the model's {info['dimension']}",
                           code="invalid_dimensions")
        if kwargs.get("truncate") is None:
            kwargs["truncate"] = self.limits.truncate_default
        try:
            return await self.encoder.embed.remote(texts, **kwargs)
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

    # -- routes ---------------------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        async def handle():
            req: EmbeddingsRequest = await self._parse(request, EmbeddingsRequest)
            texts = self._texts(req.input, "input")
            result = await self._embed(texts, kind="document", truncate=req.truncate, dimensions=req.dimensions,
                                       normalize=True if req.dimensions else None)
            data = []
            for i, vec in enumerate(result.vectors):
                if req.encoding_format == "base64":
                    emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
                else:
                    emb = vec.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
            total = int(sum(result.tokens))
            return {"object": "list", "data": data, "model": self.args.model_name,
                    "usage": {"prompt_tokens": total, "total_tokens": total}}

        return await self._serve(request, "/v1/embeddings", handle)

    @app.post("/embed")
    async def embed(self, request: Request) -> JSONResponse:
        async def handle():
            req: EmbedRequest = await self._parse(request, EmbedRequest)
            texts = self._texts(req.inputs, "inputs")
            self._instruction(req.instruction)
            kind = "query" if req.instruction is not None else "document"
            result = await self._embed(texts, kind=kind, instruction=req.instruction, truncate=req.truncate,
                                       dimensions=req.dimensions, normalize=req.normalize)
            return result.vectors.tolist()

        return await self._serve(request, "/embed", handle)

    @app.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        async def handle():
            if self.retriever is None:
                raise APIError(404, "search is not configured (no store in the serving config)", "not_found_error")
            req: SearchRequest = await self._parse(request, SearchRequest)
            self._texts(req.query, "query")
            self._instruction(req.instruction)
            if req.top_k > self.limits.max_top_k:
                raise APIError(422, f"top_k must be at most {self.limits.max_top_k}", code="invalid_top_k")
            if req.mode != "dense" and not self.args.store.sparse:
                raise APIError(422, f"{req.mode} search needs a collection with BM25 vectors (store.sparse=true)",
                               code="mode_unavailable")
            # the retriever raises InvalidInput/BadSearchRequest (422) or StoreUnavailable (503): see client_error
            results = await self.retriever.search.remote(req.query, top_k=req.top_k, mode=req.mode,
                                                         filter=req.filter, instruction=req.instruction)
            return {"object": "list", "mode": req.mode, "data": results}

        return await self._serve(request, "/search", handle)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        async def handle():
            info = await self._info_cached()
            return {"object": "list", "data": [{"id": self.args.model_name, "object": "model", "created": 0,
                                                "owned_by": "diffembed", "dimension": info["dimension"],
                                                "max_length": info["max_length"]}]}

        return await self._serve(request, "/v1/models", handle)

    @app.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        async def handle():
            status: dict[str, Any] = {}
            try:
                await asyncio.wait_for(self.encoder.ready.remote(), timeout=5)
                status["encoder"] = "ok"
                if self.retriever is not None:
                    status["store"] = await asyncio.wait_for(self.retriever.ready.remote(), timeout=5)
                    status["retriever"] = "ok"
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                status["error"] = f"{type(cause).__name__}: {cause}"
                return JSONResponse({"status": "unavailable", **status}, status_code=503)
            return {"status": "ok", **status}

        return await self._serve(request, "/healthz", handle, auth=False)


def ingress_deployment(args) -> serve.Deployment:
    return serve.deployment(IngressImpl).options(
        name="Ingress", num_replicas=args.ingress_replicas, ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=256,
    )
