"""Training throughput: Ray Train + DeepSpeed ZeRO-2 (2 workers) vs a plain single-process torch loop.

Same model (packaged MiniLM + LoRA), same rows, same global batch, same loss, one run. Prints samples/s of
each (median step after warm-up) and the ratio Ray/plain. On a 2-core box the two Ray workers share the
cores the plain loop has to itself, so the ratio measures the platform's overhead, not a speed-up.

    python bench/train_throughput.py [--steps 30] [--global-batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from diffembed.models.embedder import Embedder
from diffembed.train.config import TrainConfig
from diffembed.train.loop import build_plan, build_trainable, train
from diffembed.train.losses import info_nce

DATA = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "data" / "tiny_pairs.jsonl"


def config(steps: int, global_batch: int, storage: str) -> TrainConfig:
    return TrainConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64},
        "data": {"train_files": [str(DATA)]},
        "optim": {"lr": 1e-4, "warmup_steps": 2, "max_steps": steps, "global_batch_size": global_batch},
        "deepspeed": {"zero_stage": 2},
        "run": {"name": "bench", "storage_path": storage, "num_workers": 2, "checkpoint_every": steps,
                "log_every": 1},
    })


def plain_loop(cfg: TrainConfig) -> list[float]:
    """The same step in one process with a torch optimizer: no Ray, no DeepSpeed, no gather."""
    torch.manual_seed(0)
    embedder = Embedder(cfg.embedder.model_copy(update={"device": "cpu"}))
    embedder.model = build_trainable(embedder, cfg)
    optimizer = torch.optim.AdamW([p for p in embedder.model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    rates = []
    for rows in build_plan(cfg):
        start = time.perf_counter()
        q = embedder.forward(embedder.collate(embedder.query_segments([r["query"] for r in rows],
                                                                       [r["instruction"] for r in rows])))
        p = embedder.forward(embedder.collate(embedder.document_segments([r["positive"] for r in rows], windows="first")))
        n = embedder.forward(embedder.collate(embedder.document_segments(
            [x for r in rows for x in r["negatives"]], windows="first")))
        loss = info_nce(q, p, n, scale=cfg.loss.scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(embedder.model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        rates.append(len(rows) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    args = parser.parse_args()
    import json

    import ray

    with tempfile.TemporaryDirectory() as storage:
        cfg = config(args.steps, args.global_batch, storage)
        plain = statistics.median(plain_loop(cfg)[args.warmup:])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        metrics = train(cfg)
        history = json.loads((Path(metrics["checkpoint_dir"]) / "history.json").read_text())
        ours = statistics.median(h["samples_per_s"] for h in history[args.warmup:])
        ray.shutdown()
    print(f"global batch {args.global_batch}, {args.steps} steps, MiniLM + LoRA, CPU ({torch.get_num_threads()} threads)")
    print(f"  plain single-process torch loop : {plain:8.1f} samples/s")
    print(f"  Ray Train + ZeRO-2, 2 workers   : {ours:8.1f} samples/s")
    print(f"  ratio Ray/plain: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
