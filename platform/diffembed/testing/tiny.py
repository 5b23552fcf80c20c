"""Tiny random checkpoints in the exact on-disk layout of the real backbones.

7B weights cannot be downloaded here, so tests and CPU smoke configs build a few-hundred-kB checkpoint
per family that the *real* loader reads: Dream (Qwen2 tensor names, `model_type: "Dream"`, `auto_map` to
remote code, a remote-code tokenizer class with vocab.json/merges.txt), LLaDA (OLMo tensor names and config
keys, tokenizer.json), and stock Qwen2 / Llama / Mistral written by `save_pretrained`. Weights are sharded
safetensors with an index, as on the Hub.

Usage: `python -m diffembed.testing.tiny dream /tmp/tiny-dream`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_FAMILIES = ("dream", "llada", "qwen2", "llama", "mistral")
SHARD_SIZE = "200KB"  # small enough that every tiny checkpoint is sharded with an index, like the real ones

_CORPUS = """\
Diffusion language models denoise masked tokens with attention that sees the whole sequence.
Autoregressive models read left to right; the last token summarises what came before it.
Retrieval ranks passages by the cosine similarity of their embeddings to a query embedding.
Long documents such as reports, meeting transcripts and novels need long context encoders.
The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat in the sun.
Given a web search query, retrieve relevant passages that answer the query.
Instruct: Query: passage: title: section: the a an of to in on for with by from at as is are was were.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols . , ; : ! ? ( ) [ ] { } - _ / + = * & % $ # @
"""

# Special tokens per family: (all specials, bos, eos, pad, mask, tokenizer adds bos?)
_SPECIALS = {
    "dream": (["<|endoftext|>", "<|beginoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"],
              "<|beginoftext|>", "<|endoftext|>", "<|endoftext|>", "<|mask|>", False),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", None, False),
    "llada": (["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"],
              "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|mdm_mask|>", True),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
              "<|begin_of_text|>", "<|end_of_text|>", None, None, True),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None, None, True),
}


def _train_tokenizer(family: str, vocab_size: int) -> Tokenizer:
    specials, bos, *_, add_bos = _SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _write_tokenizer(family: str, tok: Tokenizer, directory: Path) -> None:
    specials, bos, eos, pad, mask, _ = _SPECIALS[family]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if mask:
        fast.add_special_tokens({"mask_token": mask})
    if family == "dream":
        # Dream ships vocab.json + merges.txt and a remote-code tokenizer class (no tokenizer.json).
        tok.model.save(str(directory))
        added = {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
            for t in specials
        }
        config = {
            "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": [t for t in specials if t not in (bos, eos, mask)],
            "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
            "bos_token": bos, "eos_token": eos, "pad_token": pad, "mask_token": mask,
            "clean_up_tokenization_spaces": False, "model_max_length": 131072, "padding_side": "right",
            "split_special_tokens": False, "tokenizer_class": "DreamTokenizer", "unk_token": None,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return
    fast.save_pretrained(str(directory))
    cfg_path = directory / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    config["tokenizer_class"] = {"qwen2": "Qwen2Tokenizer"}.get(
        family, "PreTrainedTokenizerFast"
    )
    if family == "qwen2":
        tok.model.save(str(directory))  # Qwen2.5 ships vocab.json + merges.txt beside tokenizer.json
    cfg_path.write_text(json.dumps(config, indent=2))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every token visibly influences every other one it may attend to."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise * (0.3 / param.shape[-1] ** 0.5 if param.ndim > 1 else 0.05))


def _llada_name(key: str) -> str:
    """Llama tensor name -> LLaDA/OLMo tensor name (inverse of families.LLADA_KEY_MAPPING)."""
    fixed = {"model.embed_tokens.": "model.transformer.wte.", "model.norm.": "model.transformer.ln_f.",
             "lm_head.": "model.transformer.ff_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    layer = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
             "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
             "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not m or m.group(2) not in layer:
        raise KeyError(key)
    return f"model.transformer.blocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"


def write_tiny_checkpoint(
    family: str,
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
) -> Path:
    """Write a random tiny checkpoint of `family` into `directory` and return the directory."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(family, vocab_size=512)
    _write_tokenizer(family, tok, directory)
    vocab = tok.get_vocab_size()
    vocab = (vocab + 63) // 64 * 64  # padded embedding rows, as real checkpoints have
    specials, bos, eos, pad, mask, _ = _SPECIALS[family]
    ids = {"bos_token_id": tok.token_to_id(bos) if bos else None, "eos_token_id": tok.token_to_id(eos),
           "pad_token_id": tok.token_to_id(pad) if pad else None}
    dims = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    if family in ("dream", "qwen2"):
        rope = {"rope_type": "default", "rope_theta": 1e6}
        model = Qwen2ForCausalLM(Qwen2Config(**dims, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                                             rope_parameters=rope, tie_word_embeddings=False, **ids))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**dims, num_key_value_heads=kv_heads, sliding_window=None,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                 **ids))
    else:  # llama and llada share the Llama computation; LLaDA has no GQA
        rope = {"rope_type": "default", "rope_theta": 5e5}
        model = LlamaForCausalLM(LlamaConfig(**dims, num_key_value_heads=heads if family == "llada" else kv_heads,
                                             rms_norm_eps=1e-5, rope_parameters=rope, **ids))
    _randomize(model, seed)

    if family in ("qwen2", "llama", "mistral"):
        model.save_pretrained(str(directory), max_shard_size=SHARD_SIZE)
        return directory
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if family == "llada":
        state = {_llada_name(k): v for k, v in state.items()}
        config = {
            "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False,
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
            "d_model": hidden_size, "embedding_dropout": 0.0, "embedding_size": vocab,
            "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_device": "meta",
            "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "mask_token_id": tok.token_to_id(mask),
            "max_sequence_length": max_positions, "mlp_hidden_size": intermediate_size, "mlp_ratio": 4,
            "model_type": "llada", "multi_query_attention": None, "n_heads": heads, "n_kv_heads": heads,
            "n_layers": layers, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5,
            "rope": True, "rope_full_precision": True, "rope_theta": 5e5, "scale_logits": False,
            "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab, "weight_tying": False,
            **ids,
        }
    else:  # dream
        config = {
            "architectures": ["DreamModel"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
            "intermediate_size": intermediate_size, "mask_token_id": tok.token_to_id(mask),
            "max_position_embeddings": max_positions, "max_window_layers": layers, "model_type": "Dream",
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1e6, "sliding_window": None,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.2",
            "use_cache": True, "use_sliding_window": False, "vocab_size": vocab, **ids,
        }
    save_torch_state_dict(state, str(directory), max_shard_size=SHARD_SIZE)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint in a real backbone's layout.")
    parser.add_argument("family", choices=TINY_FAMILIES)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.family, args.directory, seed=args.seed))


if __name__ == "__main__":
    main()
