"""Tiny random checkpoints in the exact on-disk layout of the real backbones.

7B weights cannot be downloaded here, so tests and CPU smoke configs build a few-hundred-kB checkpoint
per family that the *real* loader reads: Dream (Qwen2 tensor names, `model_type: "Dream"`, `auto_map` to
remote code, a remote-code tokenizer class with vocab.json/merges.txt), LLaDA (OLMo tensor names and config
keys, tokenizer.json), and stock Qwen2 / Llama / Mistral written by `save_pretrained`. Weights are sharded
safetensors with an index, as on the Hub. Tokenizers follow the real ones: byte-level BPE for Qwen2 / Llama-3 /
LLaDA / Dream, SentencePiece-style BPE (Metaspace "▁", byte fallback, `<s>` prepended) for Mistral.

`ensure_tiny_checkpoint` builds one into a shared cache directory (`tiny:<family>` model names) safely under
concurrency: one builder at a time (a file lock), a private temp directory per build, a `.complete` marker
written last, an atomic rename to publish, and any entry without a valid marker (a crashed writer, an older
format) moved aside and rebuilt rather than loaded.

Usage: `python -m diffembed.testing.tiny dream /tmp/tiny-dream`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where a checkpoint is written: finding a built one needs neither.

log = logging.getLogger(__name__)

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
    if family == "mistral":
        return _train_sentencepiece_tokenizer(family, vocab_size)
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


def _train_sentencepiece_tokenizer(family: str, vocab_size: int) -> Tokenizer:
    """Mistral-7B's tokenizer as transformers converts it: BPE over "▁"-marked words, `<unk>` `<s>` `</s>` at ids
    0-2, the 256 byte tokens `<0x00>`..`<0xFF>` next (byte fallback for anything else), `<s>` prepended."""
    specials, bos, *_ = _SPECIALS[family]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Words never merge across a space (SentencePiece's split_by_whitespace), so train on split words.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(_CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=vocab_size,
                                                                             special_tokens=specials))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tok


def _write_tokenizer(family: str, tok: Tokenizer, directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, mask, _ = _SPECIALS[family]
    unk = "<unk>" if family == "mistral" else None
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)
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
    config["tokenizer_class"] = {"qwen2": "Qwen2Tokenizer", "mistral": "LlamaTokenizer"}.get(
        family, "PreTrainedTokenizerFast"
    )
    if family == "mistral":  # as Mistral-7B-Instruct-v0.2's tokenizer_config.json
        config.update(add_bos_token=True, add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False)
    if family == "qwen2":
        tok.model.save(str(directory))  # Qwen2.5 ships vocab.json + merges.txt beside tokenizer.json
    cfg_path.write_text(json.dumps(config, indent=2))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every token visibly influences every other one it may attend to."""
    import torch

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
    dtype: str = "float32",
) -> Path:
    """Write a random tiny checkpoint of `family` into `directory` and return the directory.

    With the real widths (e.g. hidden 3584, 28 heads, 4 KV heads, intermediate 18944 for Dream-7B) and a few layers
    it is a faithful 7B-shaped model for memory and speed work; `dtype="bfloat16"` stores it as the real one is."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

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
    if dtype != "float32":
        model.to(getattr(torch, dtype))

    if family in ("qwen2", "llama", "mistral"):
        # save_pretrained writes nothing (no config, no weights) on a torch.distributed rank other than 0, e.g. in
        # Ray Train worker 1; this checkpoint is a local file every caller needs, whatever its rank.
        model.should_save_on_this_rank = lambda is_main_process: True
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
            "n_layers": layers, "precision": "amp_bf16", "torch_dtype": dtype,
            "residual_dropout": 0.0, "rms_norm_eps": 1e-5,
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
            "tie_word_embeddings": False, "torch_dtype": dtype, "transformers_version": "4.46.2",
            "use_cache": True, "use_sliding_window": False, "vocab_size": vocab, **ids,
        }
    save_torch_state_dict(state, str(directory), max_shard_size=SHARD_SIZE)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


MARKER = ".complete"  # written last into a built entry: {"stamp": ..., "files": {name: size}}


def _stamp(family: str) -> str:
    """What a cached entry must have been built from: this generator's source, the family, the library versions
    that write the files. Any change (a new tokenizer layout, a transformers upgrade) means a rebuild."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{family}|{version('transformers')}|{version('tokenizers')}".encode())
    return digest.hexdigest()[:16]


def verify_tiny_checkpoint(directory: str | Path) -> dict[str, int]:
    """Check that every file of a checkpoint parses (JSON, safetensors headers, the tokenizer, every indexed shard
    present); returns {file name: size}. Raises ValueError naming what is wrong."""
    from safetensors import safe_open

    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != MARKER}
    for required in ("config.json", "tokenizer_config.json"):
        if required not in files:
            raise ValueError(f"{directory}: no {required} (has {sorted(files)})")
    try:
        for name in files:
            if name.endswith(".json"):
                json.loads((directory / name).read_text())
            elif name.endswith(".safetensors"):
                with safe_open(str(directory / name), framework="pt") as fh:
                    fh.keys()
        if "tokenizer.json" in files:
            Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif "vocab.json" in files and "merges.txt" in files:
            models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        else:
            raise ValueError("no tokenizer.json and no vocab.json + merges.txt")
    except Exception as exc:
        raise ValueError(f"{directory}: {exc.__class__.__name__}: {exc}") from exc
    index = directory / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    if missing := sorted(shards - set(files)):
        raise ValueError(f"{directory}: weight files missing: {missing}")
    return files


def _complete(path: Path, stamp: str) -> bool:
    """An entry is usable only with a marker of this stamp whose files are all there at their recorded sizes."""
    try:
        marker = json.loads((path / MARKER).read_text())
        return marker["stamp"] == stamp and all(
            (path / name).stat().st_size == size for name, size in marker["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_aside(path: Path, root: Path, why: str) -> None:
    """Move `path` out of the way (one atomic rename), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale.", dir=root))
    log.warning("tiny checkpoint %s is %s: moved aside and rebuilt", path, why)
    path.rename(aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def ensure_tiny_checkpoint(family: str, root: str | Path) -> Path:
    """`root/<family>`, a complete tiny checkpoint, built there once; safe for any number of threads and processes
    calling it at once. Returns without locking when the entry is complete (marker of this generator's stamp)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    from filelock import FileLock

    root = Path(root)
    path = root / family
    stamp = _stamp(family)
    if _complete(path, stamp):
        return path
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{family}.lock")):  # one builder; threads of one process exclude each other too
        if _complete(path, stamp):  # built while we waited
            return path
        # Under the lock, any other `.<family>.*` directory is a dead builder's leftover (temp or moved-aside).
        for leftover in root.glob(f".{family}.*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
        if path.exists() or path.is_symlink():
            why = "stale or damaged (its marker does not match)" if (path / MARKER).is_file() else "incomplete (no marker)"
            _remove_aside(path, root, why)
        tmp = Path(tempfile.mkdtemp(prefix=f".{family}.tmp.", dir=root))
        try:
            write_tiny_checkpoint(family, tmp)
            files = verify_tiny_checkpoint(tmp)
            for name in files:
                _fsync(tmp / name)
            # The marker last: whatever has it was written whole and checked.
            with open(tmp / MARKER, "w") as fh:
                json.dump({"stamp": stamp, "family": family, "files": files}, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            _fsync(tmp)
            try:
                tmp.rename(path)  # atomic publish; `path` is gone (removed above, under the lock)
            except OSError:
                if not _complete(path, stamp):  # only a builder that ignored the lock could have put it there
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            _fsync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint in a real backbone's layout.")
    parser.add_argument("family", choices=TINY_FAMILIES)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.family, args.directory, seed=args.seed))


if __name__ == "__main__":
    main()
