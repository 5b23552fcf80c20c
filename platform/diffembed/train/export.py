"""Export: the base model with the trained weights folded in, saved as a stock model directory.

The export holds safetensors weights in a stock transformers layout (Dream -> Qwen2, LLaDA -> Llama) and in the
base checkpoint's own dtype (a bf16 base stays bf16), the tokenizer, `diffembed.json` (the resolved embedding
function: attention, pooling, prompts, document policy) so that `Embedder(EmbedderConfig(model=export_dir))`
reproduces the trained embedder, the sentence-transformers module files for BERT-style bases, the training history
and a PNG loss curve.

Sized for 7B: it runs as a Ray task on a training-worker-sized slot (`export_remote`; never on the small head node
the driver sits on), loads the base once in its dtype, reads only the trained parameters from the checkpoint (the
LoRA adapter; full fine-tuning streams one tensor at a time), merges each LoRA pair in fp32 straight into its base
weight, and writes safetensors shard by shard: host memory peaks near the model's own size
(`bench/export_memory.py`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffembed.config import EmbedderConfig
from diffembed.train import storage
from diffembed.train.checkpoints import checkpoint_state_dict, read_history
from diffembed.train.config import TrainConfig

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SHARD_SIZE = "2GB"  # the largest safetensors file the export writes (one shard is serialised at a time)
PEFT_PREFIX = "base_model.model."  # peft's wrapper in front of the backbone's own parameter names
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.[^.]+\.weight$")  # <module>.lora_A.<adapter>.weight
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MERGE_CHUNK = 1 << 22  # fp32 elements merged at a time (16 MiB)


def export_remote(cfg: TrainConfig, checkpoint, runtime_env: dict[str, Any] | None = None) -> str:
    """`export_from_checkpoint` as a Ray task that asks for what one training worker asks for
    (`cfg.worker_resources()`: its CPUs, a GPU when training uses them, custom resources such as the training
    pool's), so it lands on a training node with a training node's memory; returns the export's location."""
    import ray

    bundle = dict(cfg.worker_resources())
    task = ray.remote(
        num_cpus=bundle.pop("CPU", 0),
        num_gpus=bundle.pop("GPU", 0),
        resources=bundle or None,
        max_retries=0,  # a failed export leaves the checkpoint: rerunning it is the repair
        runtime_env=runtime_env,
    )(_export_task)
    return ray.get(task.remote(cfg.model_dump(mode="json"), checkpoint))


def _export_task(cfg: dict[str, Any], checkpoint) -> str:
    return export_from_checkpoint(TrainConfig.model_validate(cfg), checkpoint)


def export_from_checkpoint(cfg: TrainConfig, checkpoint, history: list[dict[str, Any]] | None = None,
                           shard_size: str | int = SHARD_SIZE) -> str:
    """Export the model of a Ray checkpoint to `cfg.export_uri` and return it. A local target is written to
    `<export>.partial` and renamed into place; a URI target is written to a local temp dir and uploaded the same
    way (`storage.upload`): a failed export never leaves a half-written model under the final name."""
    target = cfg.export_uri
    with checkpoint.as_directory() as ckpt_dir:
        history = read_history(ckpt_dir) if history is None else history
        local = storage.local_path(target)
        if local is not None and not storage.is_uri(target):
            tmp = local.with_name(local.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_export(cfg, ckpt_dir, tmp, history, shard_size)
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
        else:
            with tempfile.TemporaryDirectory(prefix="diffembed-export-") as tmp:
                write_export(cfg, ckpt_dir, Path(tmp), history, shard_size)
                storage.upload(Path(tmp), target)
    return target


def base_dtype(embedder: EmbedderConfig) -> str:
    """The base checkpoint's own dtype as an EmbedderConfig dtype (its config.json `dtype`/`torch_dtype`);
    fp32 when it names none."""
    from diffembed.models.loading import read_json, resolve_model_path

    raw = read_json(resolve_model_path(embedder.model, weights=False) / "config.json")
    return DTYPE_NAMES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), "fp32")


def write_export(cfg: TrainConfig, ckpt_dir: str, out: Path, history: list[dict[str, Any]],
                 shard_size: str | int = SHARD_SIZE) -> None:
    """Write the export into the existing directory `out`."""
    from diffembed.models.embedder import Embedder

    embedder = Embedder(cfg.embedder.model_copy(
        update={"device": "cpu", "dtype": base_dtype(cfg.embedder), "compile": False}))  # never encodes
    model = embedder.model
    state = checkpoint_state_dict(ckpt_dir, lazy=True)  # trained parameters only, read one at a time
    if cfg.lora.enabled:
        merge_lora(model, state, scaling=cfg.lora.alpha / cfg.lora.r)
    else:
        load_full(model, state)
    del state
    model.eval()
    model.config.is_causal = embedder.config.attention == "causal"
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=shard_size)
    embedder.tokenizer.save_pretrained(str(out))
    tok_cfg = out / "tokenizer_config.json"
    if tok_cfg.is_file():  # the export runs on stock classes only: drop remote-code pointers
        data = json.loads(tok_cfg.read_text())
        data.pop("auto_map", None)
        tok_cfg.write_text(json.dumps(data, indent=2))
    source = embedder.backbone.path
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    for sub in source.glob("[0-9]_*"):  # e.g. 1_Pooling/
        if sub.is_dir():
            shutil.copytree(sub, out / sub.name, dirs_exist_ok=True)
    write_embedder_config(out, embedder.config, layout_family(embedder.config.family))
    if history:
        plot_loss(history, out / "loss.png")
        (out / "train_history.json").write_text(json.dumps(history))


def merge_lora(model, state, scaling: float) -> int:
    """Fold every trained LoRA pair into its base weight: W <- round(W + scaling * B @ A), the sum in fp32 and
    one rounding to W's dtype. (peft's `merge_and_unload` adds a delta already cast to the adapter's dtype into
    the weight in place: with a bf16 adapter that rounds twice.) `state`: peft-named adapter tensors, lazy or not.
    Returns how many weights were merged."""
    import torch

    modules = dict(model.named_modules())
    buffers = {name for name, _ in model.named_buffers()}
    pairs: dict[str, dict[str, Any]] = {}
    for name, value in state.items():
        name = name.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = value
        elif name not in buffers:  # buffers (position ids) may ride along in ZeRO checkpoints; never trained
            raise RuntimeError(f"checkpoint does not fit the LoRA model: unexpected {name}")
    for path, ab in pairs.items():
        module = modules.get(path)
        if module is None or set(ab) != {"A", "B"}:
            raise RuntimeError(f"checkpoint does not fit the model: LoRA pair for {path} ({sorted(ab)})")
        a = ab["A"].contiguous().float()  # (r, in)
        b = ab["B"].contiguous().float()  # (out, r)
        weight = module.weight  # (out, in), the base's dtype
        rows = max(1, MERGE_CHUNK // weight.shape[1])  # row blocks: the fp32 temporaries stay small at 7B width
        with torch.no_grad():
            for start in range(0, weight.shape[0], rows):
                block = weight[start : start + rows]  # (rows, in), a view
                block.copy_(torch.addmm(block.float(), b[start : start + rows], a, alpha=scaling))  # fp32, 1 rounding
    if not pairs:
        raise RuntimeError("checkpoint holds no LoRA weights (trained with lora.enabled: false?)")
    return len(pairs)


def load_full(model, state) -> None:
    """Full fine-tuning: copy every trained tensor into the base model (cast to its dtype), one at a time."""
    import torch

    params = dict(model.named_parameters())
    targets = {**dict(model.named_buffers()), **params}
    unexpected = sorted(set(state) - set(targets))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value.contiguous())


def layout_family(family: str) -> str:
    """The family whose layout the exported weights have (the save is in stock transformers names)."""
    return {"dream": "qwen2", "llada": "llama"}.get(family, family)


def write_embedder_config(directory: Path, config: EmbedderConfig, family: str) -> None:
    """diffembed.json: the embedding function only (never dtype, device, batch budgets or the attention kernel:
    those belong to the machine that loads the export)."""
    data = config.embedding_function()
    data["family"] = family
    (directory / "diffembed.json").write_text(json.dumps(data, indent=2))


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if h.get("loss") is not None]
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
