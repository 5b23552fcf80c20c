"""The serving app's HTTP contract: pydantic models of every route's request and response bodies.

`/openapi.json` is built from these (see `openapi_schema`), so the published schema is what the ingress parses
and what it answers. Design choices:

- **Inputs** (`/v1/embeddings` `input`, `/embed` `inputs`): a text, a list of texts, one input as a list of
  token ids, or a list of such lists (OpenAI's semantics). Token ids are ids of the *served model's own
  tokenizer* (content ids, no special tokens: the encoder adds special tokens, the query instruction and
  windows exactly as for text).
- **input_type**: `"query"` (the configured query instruction, or `instruction` when sent) or `"document"` (the
  document policy). `/v1/embeddings` defaults to `document`; `/embed` defaults to `query` when an `instruction`
  is sent and to `document` otherwise. An `instruction` with `input_type: "document"` is a 422.
- **encoding_format** (one field, the same values on both embedding routes): `float` (list of floats),
  `base64` (little-endian float32 bytes, OpenAI's), `int8` / `uint8` (one integer per dimension, the fixed
  calibration of `diffembed.serving.quantize`), `binary` / `ubinary` (sign bits packed 8 per byte, ceil(D/8)
  integers). One format per request keeps both routes' response shapes unchanged: `/v1/embeddings` puts the
  value in `data[i].embedding`, `/embed` answers a bare list (TEI's shape) of such values.
- **Multivector models** (`mask_vectors: multi`, `ModelCard.vectors_per_input` K > 1): `/embed` answers K values
  per input (a list of K vectors, each in the requested encoding_format and `dimensions`); `/v1/embeddings`,
  whose OpenAI shape has one vector per input, is a 422 (`multivector_model`) naming `/embed` (a mean of the K
  vectors is not what the model's MaxSim scores).
- **Errors**: every error is `{"error": {"message", "type", "code", "request_id"}}` (`ErrorResponse`); every
  response carries an `X-Request-Id` header (the client's when it is a token of at most 128 characters of
  `[A-Za-z0-9._-]`, else a generated one).

Size limits (`LimitsArgs`) are deployment settings, not schema: exceeding one is a 413, not a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)
from pydantic.json_schema import models_json_schema

from diffembed.serving.quantize import EncodingFormat

# ---------------------------------------------------------------------------------------------- requests

TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, description="One input as token ids of the served model's "
                                          "tokenizer (content ids, no special tokens).")]
Text = Annotated[StrictStr, Field(min_length=1)]
Inputs = (
    Text
    | Annotated[list[Text], Field(min_length=1, description="Several texts.")]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, description="Several inputs as token ids.")]
)
InputType = Literal["query", "document"]
Dimensions = Annotated[StrictInt, Field(ge=1, le=1_000_000, description="Matryoshka: keep the first N dimensions "
                                                                          "(then normalise); at most the model's.")]
Instruction = Annotated[StrictStr, Field(description="The query instruction to use instead of the configured one.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)


class EmbeddingsRequest(_Request):
    """`POST /v1/embeddings` (OpenAI-compatible)."""

    input: Inputs
    model: StrictStr | None = Field(None, description="Ignored: the app serves one model.")
    encoding_format: EncodingFormat = "float"
    dimensions: Dimensions | None = None
    truncate: StrictBool | None = Field(None, description="Cut inputs over max_length. Default: the server's.")
    input_type: InputType = "document"
    instruction: Instruction | None = None

    @model_validator(mode="after")
    def _instruction_for_queries(self) -> EmbeddingsRequest:
        if self.instruction is not None and self.input_type != "query":
            raise ValueError("'instruction' applies to queries only: send input_type 'query'")
        return self


class EmbedRequest(_Request):
    """`POST /embed` (TEI-style)."""

    inputs: Inputs
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    instruction: Instruction | None = None
    input_type: InputType | None = Field(None, description="Default: query when an instruction is sent, else document.")
    dimensions: Dimensions | None = None
    encoding_format: EncodingFormat = "float"

    @model_validator(mode="after")
    def _check(self) -> EmbedRequest:
        if self.instruction is not None and self.input_type == "document":
            raise ValueError("'instruction' applies to queries only: send input_type 'query' or leave it out")
        if not self.normalize and self.encoding_format in ("int8", "uint8"):
            raise ValueError(f"encoding_format {self.encoding_format!r} is calibrated for unit vectors: "
                             "it needs normalize=true")
        return self

    @property
    def kind(self) -> InputType:
        return self.input_type or ("query" if self.instruction is not None else "document")


# Qdrant stores integers as int64: a larger one is rejected by a server (and never matches anything).
FilterInt = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
FilterValue = StrictStr | FilterInt | StrictBool | list[StrictStr | FilterInt | StrictBool]


class SearchRequest(_Request):
    """`POST /search`: the best documents of the collection for a query."""

    query: Text
    top_k: StrictInt = Field(10, ge=1, description="Documents to return; at most the server's max_top_k.")
    filter: dict[str, FilterValue] | None = Field(
        None, description="Payload conditions, all required: a value matches exactly, a list of strings or of "
        "integers matches any of them.")
    mode: Literal["dense", "sparse", "hybrid"] = "dense"
    instruction: Instruction | None = None

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


REQUEST_MODELS: tuple[type[BaseModel], ...] = (EmbeddingsRequest, EmbedRequest, SearchRequest)

# ---------------------------------------------------------------------------------------------- responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the schema says exactly what is sent


class ErrorDetail(_Response):
    message: str = Field(description="One line, safe to show to the caller.")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                      "overloaded_error, service_unavailable or server_error.")
    code: str | None = Field(description="A stable machine-readable reason, e.g. body_too_large, invalid_json.")
    request_id: str = Field(description="The request's id, also in the X-Request-Id header and the server's logs.")


class ErrorResponse(_Response):
    error: ErrorDetail


Vector = list[float] | list[int] | str  # float | int8/uint8/binary/ubinary | base64, by encoding_format


class Embedding(_Response):
    object: Literal["embedding"]
    index: int
    embedding: Vector


class Usage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(_Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class EmbedResponse(RootModel[list[Vector | list[Vector]]]):
    """One value per input, in order (TEI's bare list); for a multivector model (`vectors_per_input` K > 1) each
    input's value is its K vectors' values."""


class SearchHit(_Response):
    doc_id: str
    score: float
    chunk_index: int
    char_span: Annotated[list[int], Field(min_length=2, max_length=2)]
    token_span: Annotated[list[int], Field(min_length=2, max_length=2)]
    payload: dict[str, Any]


class SearchResponse(_Response):
    object: Literal["list"]
    mode: Literal["dense", "sparse", "hybrid"]
    data: list[SearchHit]


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    dimensions: int = Field(description="The full output dimension; `dimensions` in a request may ask for 1..this.")
    max_tokens: int = Field(description="Tokens per input (per window for documents), special tokens included.")
    vocab_size: int | None = Field(description="Token ids in inputs must be below this.")
    query_instruction: str | None
    encoding_formats: list[EncodingFormat]
    vectors_per_input: int = Field(description="1; K for a multivector model (mask_vectors: multi), whose inputs are "
                                   "K vectors each, scored by MaxSim: /embed returns them, /v1/embeddings refuses.")


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"]


class StoreStatus(_Response):
    collection: str
    points: int


class Readiness(_Response):
    status: Literal["ready"]
    encoder_replicas: int = Field(description="Running encoder replicas.")
    store: StoreStatus | None = Field(description="None when the app has no store (no /search).")


# ---------------------------------------------------------------------------------------------- OpenAPI

_ERRORS = {
    400: "The body is not valid JSON.",
    401: "Missing or wrong Bearer key.",
    404: "Not found (e.g. /search without a store).",
    413: "Over a size limit: body, inputs per request, characters or token ids per input.",
    422: "The body does not match the schema, or an input cannot be embedded as asked.",
    429: "Overloaded: retry after `Retry-After` seconds.",
    503: "A backend (encoder replicas, the store) is unavailable, or the request ran out of time; /search: also "
         "a collection embedded by another embedding function than the served model's (code collection_mismatch).",
}
_REQUEST_ID_HEADER = {"X-Request-Id": {"description": "The request's id.", "schema": {"type": "string"}}}
_RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                                       "schema": {"type": "integer", "minimum": 0}}}


def responses(ok: type[BaseModel], *errors: int, description: str = "Success") -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=`: the 200 body model and the listed error statuses, all with ErrorResponse bodies."""
    out: dict[int | str, dict[str, Any]] = {200: {"model": ok, "description": description,
                                                  "headers": _REQUEST_ID_HEADER}}
    for status in errors:
        headers = {**_REQUEST_ID_HEADER, **(_RETRY_AFTER_HEADER if status == 429 else {})}
        out[status] = {"model": ErrorResponse, "description": _ERRORS[status], "headers": headers}
    return out


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI `openapi_extra=` declaring `model` as the JSON body of a route that parses the body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def openapi_schema(app) -> dict[str, Any]:
    """FastAPI's schema of `app` plus the request models, which routes reference through `request_body` (FastAPI
    only collects models it parses itself)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema
