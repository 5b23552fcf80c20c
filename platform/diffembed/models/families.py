"""Backbone families: how each checkpoint layout maps onto a stock `transformers` class.

No family needs remote code. Dream checkpoints carry Qwen2 tensor names under `model_type: "Dream"`, so
their config is rebuilt as a `Qwen2Config`. LLaDA checkpoints carry OLMo-style names and config keys;
both are translated to Llama's (the tensor renaming is a `key_mapping` handed to `from_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the config classes are imported where a config is built, not with this module (a job's driver)
    from transformers import PreTrainedConfig

from diffembed.config import ConfigError

# Config keys that describe remote code or the original class, not the architecture.
_REMOTE_KEYS = {"auto_map", "architectures", "model_type", "transformers_version", "_name_or_path"}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    kind: str  # "diffusion" | "ar" | "encoder"
    model_types: tuple[str, ...]  # config.json model_type values that identify the family (lower-cased)
    build_config: Callable[[dict[str, Any], str], PreTrainedConfig]
    key_mapping: dict[str, str] | None = None
    head_keys: frozenset[str] = field(default_factory=frozenset)  # checkpoint tensors an embedder never uses
    tokenizer_class: str | None = None  # used when tokenizer_config.json names a remote-code tokenizer

    @property
    def default_attention(self) -> str:
        return "causal" if self.kind == "ar" else "bidirectional"

    def default_pooling(self, attention: str) -> str:
        return "last" if attention == "causal" else "mean"


def _native(raw: dict[str, Any], path: str) -> PreTrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def _dream(raw: dict[str, Any], path: str) -> PreTrainedConfig:
    from transformers import Qwen2Config

    kwargs = {k: v for k, v in raw.items() if k not in _REMOTE_KEYS}
    theta = kwargs.pop("rope_theta", 1e6)
    scaling = kwargs.pop("rope_scaling", None)
    kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta, **(scaling or {})})
    # Dream has no sliding window; its config leaves the Qwen2 keys in, sometimes as null.
    kwargs["use_sliding_window"] = False
    kwargs.pop("sliding_window", None)
    kwargs.pop("max_window_layers", None)
    return Qwen2Config(**kwargs)


def _llada(raw: dict[str, Any], path: str) -> PreTrainedConfig:
    from transformers import LlamaConfig

    unsupported = {
        "block_type": ("llama", None),
        "layer_norm_type": ("rms", None),
        "activation_type": ("silu", "swiglu", None),
        "alibi": (False, None),
        "rope": (True, None),
        "attention_layer_norm": (False, None),
        "multi_query_attention": (False, None),
    }
    for key, allowed in unsupported.items():
        if raw.get(key) not in allowed:
            raise ConfigError(f"{path}: LLaDA {key}={raw.get(key)!r} is not supported (expected one of {allowed})")
    missing = [k for k in ("d_model", "n_layers", "n_heads") if k not in raw]
    if missing:
        raise ConfigError(f"{path}: LLaDA config.json lacks {', '.join(missing)}")
    d_model = raw["d_model"]
    mlp = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d_model
    bias = bool(raw.get("include_bias", False))
    return LlamaConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=d_model,
        intermediate_size=mlp,
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"],
        num_key_value_heads=raw.get("n_kv_heads") or raw["n_heads"],
        hidden_act="silu",
        max_position_embeddings=raw.get("max_sequence_length", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)},
        attention_bias=bias or bool(raw.get("include_qkv_bias", False)),
        mlp_bias=bias,
        tie_word_embeddings=bool(raw.get("weight_tying", False)),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        mask_token_id=raw.get("mask_token_id"),
    )


_BLOCK = r"^model\.transformer\.blocks\.(\d+)\."
# OLMo/LLaDA tensor names -> Llama names (checkpoint keys are matched as regexes; one group per pattern).
LLADA_KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    _BLOCK + r"attn_norm\.": r"model.layers.\1.input_layernorm.",
    _BLOCK + r"q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    _BLOCK + r"k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    _BLOCK + r"v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    _BLOCK + r"attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    _BLOCK + r"ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    _BLOCK + r"ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    _BLOCK + r"up_proj\.": r"model.layers.\1.mlp.up_proj.",
    _BLOCK + r"ff_out\.": r"model.layers.\1.mlp.down_proj.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
}

_LM_HEAD = frozenset({"lm_head.weight"})

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("dream", "diffusion", ("dream",), _dream, head_keys=_LM_HEAD, tokenizer_class="Qwen2Tokenizer"),
        FamilySpec(
            "llada", "diffusion", ("llada",), _llada, key_mapping=LLADA_KEY_MAPPING, head_keys=_LM_HEAD,
            tokenizer_class="PreTrainedTokenizerFast",
        ),
        FamilySpec("qwen2", "ar", ("qwen2",), _native, head_keys=_LM_HEAD),
        FamilySpec("llama", "ar", ("llama",), _native, head_keys=_LM_HEAD),
        FamilySpec("mistral", "ar", ("mistral",), _native, head_keys=_LM_HEAD),
        FamilySpec("bert", "encoder", ("bert", "roberta", "xlm-roberta", "distilbert"), _native),
    )
}


def detect_family(raw: dict[str, Any], path: str) -> FamilySpec:
    model_type = str(raw.get("model_type", "")).lower()
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise ConfigError(
        f"unknown model family: model_type {raw.get('model_type')!r} in {path}/config.json "
        f"(known: {', '.join(FAMILIES)}; set family explicitly if the layout is one of them)"
    )


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None
