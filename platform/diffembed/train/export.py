"""Export: rebuild full fp32 weights from the final DeepSpeed checkpoint, merge LoRA, save a model directory.

The export holds safetensors weights in a stock transformers layout (Dream -> Qwen2, LLaDA -> Llama), the
tokenizer, `diffembed.json` (the resolved embedding function: attention, pooling, prompts, document policy) so that
`Embedder(EmbedderConfig(model=export_dir))` reproduces the trained embedder, the sentence-transformers
module files for BERT-style bases, and a PNG loss curve.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from diffembed.config import EmbedderConfig
from diffembed.train.config import TrainConfig

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def export_from_checkpoint(cfg: TrainConfig, checkpoint, history: list[dict[str, Any]] | None = None) -> Path:
    from diffembed.models.embedder import Embedder
    from diffembed.train.loop import build_trainable, checkpoint_state_dict

    out = cfg.export_path
    embedder = Embedder(cfg.embedder.model_copy(update={"device": "cpu", "dtype": "fp32"}))
    model = build_trainable(embedder, cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"gradient_checkpointing": False})}))
    with checkpoint.as_directory() as ckpt_dir:
        state = checkpoint_state_dict(ckpt_dir)  # DeepSpeed ZeRO shards or the torch backend's state dict
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {sorted(trainable & set(missing))[:4]}, "
                           f"unexpected {sorted(unexpected)[:4]}")
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    model.eval()

    tmp = out.with_name(out.name + ".partial")  # written aside, then renamed: no half-written export
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.is_causal = embedder.config.attention == "causal"
    model.save_pretrained(str(tmp), safe_serialization=True)
    embedder.tokenizer.save_pretrained(str(tmp))
    tok_cfg = tmp / "tokenizer_config.json"
    if tok_cfg.is_file():  # the export runs on stock classes only: drop remote-code pointers
        data = json.loads(tok_cfg.read_text())
        data.pop("auto_map", None)
        tok_cfg.write_text(json.dumps(data, indent=2))
    source = embedder.backbone.path
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    for sub in source.glob("[0-9]_*"):  # e.g. 1_Pooling/
        if sub.is_dir():
            shutil.copytree(sub, tmp / sub.name, dirs_exist_ok=True)
    write_embedder_config(tmp, embedder.config, layout_family(embedder.config.family))
    if history:
        plot_loss(history, tmp / "loss.png")
        (tmp / "train_history.json").write_text(json.dumps(history))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


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
