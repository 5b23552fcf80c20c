"""Training throughput: Ray Train + DeepSpeed ZeRO-2 (2 workers) vs a plain single-process torch loop.

Same model (packaged MiniLM + LoRA), same rows, same global batch, same loss, one run. Prints samples/s of
each and the ratios to the plain loop. On a 2-core box the two Ray workers share the cores the plain loop has to
itself, so the ratio measures the platform's overhead, not a speed-up. Two rates for Ray Train:
- step: the median step's own compute (forward, backward, optimizer), as the history's samples_per_s;
- end to end: global batch x steps / wall time between the warm-up's last step and the run's last, so the waits in
  `ray.train.report` and the checkpoints count. Measured twice: with the shipped reporting (`run.report_poll_s`
  0.25 s, `run.log_every` 10) and with Ray Train's defaults (its controller polls every 2 s, a report per step).

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
from diffembed.train.config import RunConfig, TrainConfig
from diffembed.train.data import load_pairs, plan_batches
from diffembed.train.loop import build_trainable, train
from diffembed.train.losses import info_nce

DATA = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "data" / "tiny_pairs.jsonl"


def config(steps: int, global_batch: int, storage: str, **run) -> TrainConfig:
    return TrainConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 64},
        "data": {"train_files": [str(DATA)]},
        "optim": {"lr": 1e-4, "warmup_steps": 2, "max_steps": steps, "global_batch_size": global_batch},
        "deepspeed": {"zero_stage": 2},
        "run": {"name": "bench", "storage_path": storage, "num_workers": 2, "checkpoint_every": steps, **run},
    })


def plain_loop(cfg: TrainConfig) -> list[float]:
    """The same step in one process with a torch optimizer: no Ray, no DeepSpeed, no gather."""
    torch.manual_seed(0)
    embedder = Embedder(cfg.embedder.model_copy(update={"device": "cpu"}))
    embedder.model = build_trainable(embedder, cfg)
    optimizer = torch.optim.AdamW([p for p in embedder.model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    rates = []
    pairs, _ = load_pairs(cfg.data.train_files, cfg.data.format, cfg.data.hard_negatives, cfg.data.bad_rows)
    o, d = cfg.optim, cfg.data
    for rows in plan_batches(pairs, o.global_batch_size, o.max_steps, d.same_source_batches, d.shuffle_seed):
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

    def ray_rates(history: list[dict]) -> tuple[float, float]:
        """(median step samples/s, end-to-end samples/s after the warm-up)."""
        step = statistics.median(h["samples_per_s"] for h in history[args.warmup:])
        span = history[-1]["time"] - history[args.warmup - 1]["time"]
        return step, args.global_batch * (len(history) - args.warmup) / span

    defaults = RunConfig()  # the reporting a job runs with unless its config says otherwise
    runs = {f"shipped reporting (poll {defaults.report_poll_s} s, log_every {defaults.log_every})": {},
            "Ray Train defaults (poll 2 s, report every step)": {"report_poll_s": 2.0, "log_every": 1}}
    rates = {}
    with tempfile.TemporaryDirectory() as storage:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # before: reading the rows uses Ray Data
        cfg = config(args.steps, args.global_batch, storage)
        plain = statistics.median(plain_loop(cfg)[args.warmup:])
        for i, (label, run) in enumerate(runs.items()):
            metrics = train(config(args.steps, args.global_batch, f"{storage}/{i}", **run))
            rates[label] = ray_rates(json.loads((Path(metrics["checkpoint_dir"]) / "history.json").read_text()))
        ray.shutdown()
    print(f"global batch {args.global_batch}, {args.steps} steps, MiniLM + LoRA, CPU ({torch.get_num_threads()} threads)")
    print(f"  plain single-process torch loop : {plain:8.1f} samples/s")
    for label, (step, end_to_end) in rates.items():
        print(f"  Ray Train + ZeRO-2, 2 workers, {label}:")
        print(f"    step {step:8.1f} samples/s (ratio to plain {step / plain:.2f}), "
              f"end to end {end_to_end:8.1f} samples/s (ratio to plain {end_to_end / plain:.2f})")
    (_, shipped), (_, ray_defaults) = rates.values()
    print(f"  end to end, shipped reporting / Ray Train defaults: {shipped / ray_defaults:.2f}x")


if __name__ == "__main__":
    main()
