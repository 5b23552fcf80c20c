"""What a training checkpoint holds and how it is written, read back and found.

A Ray checkpoint directory holds the backend's files — DeepSpeed's per-rank ZeRO shards under tag `ds`
(`diffembed.train.deepspeed`), or the torch backend's `torch/model.pt` + `torch/training_state.pt` — plus rank 0's
`metrics.json`, `history.json` (every step so far, across restarts) and, in the final one, `probe_embeddings.json`.

Only what training changes is saved: with LoRA the adapter (a few MB) and its optimizer state, never the frozen
base weights (~15 GB at 7B), which every reader — resume, export — reloads from the base checkpoint anyway.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from diffembed.train import storage

TORCH_DIR = "torch"  # the torch backend's files inside a Ray checkpoint directory
TORCH_MODEL_FILE = "model.pt"  # trainable parameters by name
TORCH_STATE_FILE = "training_state.pt"  # optimizer, scheduler, step
PROBE_FILE = "probe_embeddings.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's name for the directories it reports into the run directory


def trainable_state(model) -> dict[str, Any]:
    """The parameters training changes (the LoRA adapter, or every weight in full fine-tuning), by name."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def check_fits(model, result) -> None:
    """After `load_state_dict(strict=False)`: every trainable parameter came back and nothing was left over."""
    missing, unexpected = result
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {sorted(trainable & set(missing))[:4]}, "
                           f"unexpected {sorted(unexpected)[:4]}")


def save_torch(directory: str, module, optimizer, scheduler, client_state: dict[str, Any]) -> None:
    import torch

    folder = Path(directory, TORCH_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state(module), folder / TORCH_MODEL_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "client": client_state},
        folder / TORCH_STATE_FILE,
    )


def load_torch(directory: str, module, optimizer, scheduler, device) -> dict[str, Any]:
    """Restore the torch backend's trainable weights and optimizer/scheduler state; returns the client state."""
    import torch

    folder = Path(directory, TORCH_DIR)
    if not (folder / TORCH_MODEL_FILE).is_file():
        raise RuntimeError(f"{directory} holds no torch checkpoint (written with deepspeed.enabled: true?)")
    state = torch.load(folder / TORCH_MODEL_FILE, map_location=device, weights_only=True)
    check_fits(module, module.load_state_dict(state, strict=False))
    saved = torch.load(folder / TORCH_STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["client"]


def checkpoint_state_dict(directory: str, lazy: bool = False) -> dict[str, Any]:
    """The trained parameters in a checkpoint directory, by the trained module's names, whichever backend wrote
    it: the torch backend's as saved, or fp32 weights rebuilt from DeepSpeed's ZeRO-2/3 shards. Only trainable
    parameters (with LoRA: the adapter). `lazy`: values are materialised one at a time by `.contiguous()`, so a
    full fine-tune's weights need not all sit in memory at once (torch files are memory-mapped)."""
    path = Path(directory, TORCH_DIR, TORCH_MODEL_FILE)
    if path.is_file():
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
        return state if lazy else {name: t.float() for name, t in state.items()}
    from diffembed.train.deepspeed import fp32_state_dict

    return fp32_state_dict(directory, lazy=lazy)


def read_history(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory, HISTORY_FILE)
    return json.loads(path.read_text()) if path.is_file() else []


def report(engine, metrics: dict[str, Any], save: bool, attempt: int, rank: int, probe=None, history=()) -> None:
    """`ray.train.report` this step's metrics, with a checkpoint when `save`: the backend's files (all ranks for
    DeepSpeed, rank 0 for torch) and rank 0's metrics, history and — at the end — the probe embeddings."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not engine.save(tmp, {"step": metrics["step"], "attempt": attempt}, rank):
            ray.train.report(metrics)  # the torch backend: rank 0 alone reports the checkpoint
            return
        if rank == 0:
            Path(tmp, METRICS_FILE).write_text(json.dumps(metrics))
            Path(tmp, HISTORY_FILE).write_text(json.dumps(list(history)))  # every step so far, across restarts
            if probe is not None:  # the final model's embeddings of the probe texts, to check exports against
                Path(tmp, PROBE_FILE).write_text(json.dumps(probe))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def resume_checkpoint(location: str):
    """The checkpoint `--resume` continues from, as a `ray.train.Checkpoint` on its location's filesystem (a local
    path or a URI): `location` itself when it is one checkpoint directory (`<run>/checkpoint_*`, holding
    metrics.json: to go back to an earlier one than the last), else the newest checkpoint of that earlier run's
    directory (`<storage_path>/<name>`)."""
    import ray.train
    from pyarrow.fs import FileType

    from diffembed.config import ConfigError

    try:
        fs, path = storage.filesystem(location)
        if (Path(path).name.startswith(CHECKPOINT_PREFIX)
                and fs.get_file_info(f"{path}/{METRICS_FILE}").type == FileType.File):
            return ray.train.Checkpoint(path, filesystem=fs)
        found = storage.list_dirs(location, CHECKPOINT_PREFIX)
    except (OSError, ValueError) as exc:  # an unknown scheme, unreachable store, not a directory
        raise ConfigError(f"--resume: cannot list {location}: {exc}") from exc
    if not found:
        raise ConfigError(f"--resume: no {CHECKPOINT_PREFIX}* directories in {location} (nor is it one)")
    newest = max(found, key=lambda item: (item[1], item[0]))[0]
    fs, path = storage.filesystem(newest)
    return ray.train.Checkpoint(path, filesystem=fs)
