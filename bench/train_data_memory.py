"""Where a training set lives during a run: memory of the driver and of one worker, ours vs gathering it all.

Both variants read the same JSONL pairs in Ray tasks on a local Ray cluster and plan one epoch of global batches
(`plan_positions`, the same plan), then one training worker (a fresh Ray worker process) walks rank 0's share of
every step, as `train_loop_per_worker` does, without a model.

  gathered  (baseline: what the job did before ca3b1b4) every pair is fetched to the driver (`read_pairs`), the
            plan becomes row dicts (`plan_batches`), `ray.put` once; each worker `ray.get`s the whole plan and
            slices its rows.
  places    (ours, `loop.build_plan`) the rows stay in Ray's object store as Arrow tables (`scan_pairs`); the
            driver plans over (block, offset) places; the worker fetches its rows a window at a time
            (`StepRows`).

Each variant runs in its own process (its own Ray cluster), so one's peak cannot hide the other's. Memory is the
growth of private resident memory (resident minus shared pages) over the process's level before the data is read
(driver) or before the plan is fetched (worker), sampled every 5 ms, libraries already imported; Ray's shared
object store, where the blocks live (mapped into the worker without a copy), is not counted in either.

    python bench/train_data_memory.py [--pairs 50000] [--doc-words 150] [--global-batch 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = ("gathered", "places")


class PeakRSS:
    """Peak resident memory growth (MiB) of this process over its level at start, sampled on a thread."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        """Private resident bytes: resident minus shared pages (a block mapped from Ray's object store is shared)."""
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(x) for x in f.read().split()[:3])
        return (resident - shared) * os.sysconf("SC_PAGE_SIZE")

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def write_pairs(directory: Path, pairs: int, doc_words: int, files: int = 4) -> list[str]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    paths = []
    for f in range(files):
        path = directory / f"pairs{f}.jsonl"
        with path.open("w") as out:
            for i in range(f, pairs, files):
                out.write(json.dumps({"query": text(12), "positive": text(doc_words), "negatives": [text(doc_words)],
                                      "source": "ab"[i % 2]}) + "\n")
        paths.append(str(path))
    return paths


def worker_walk(config: dict, variant: str, per_worker: int) -> dict:
    """What a training worker does with the plan, minus the model: every step's rows of rank 0."""
    import pyarrow  # noqa: F401  (a library's fixed cost, not the data's: loaded before measuring)
    import ray

    from diffembed.train.data import StepRows

    started = time.perf_counter()
    with PeakRSS() as rss:
        plan = ray.get(config["plan"])
        if variant == "gathered":
            steps, rows = len(plan), lambda step: plan[step][:per_worker]
        else:
            rows = StepRows(plan["blocks"], plan["block"], plan["offset"], 0, per_worker)
            steps = len(rows)
        texts = sum(len(r["positive"]) for step in range(steps) for r in rows(step))  # each step's rows, once
    return {"worker_mib": rss.growth_mib, "worker_s": time.perf_counter() - started, "steps": steps, "chars": texts}


def run_variant(variant: str, files: list[str], global_batch: int, workers: int, steps: int) -> dict:
    import pyarrow  # noqa: F401
    import ray
    import ray.data  # noqa: F401

    from diffembed.train.config import TrainConfig
    from diffembed.train.data import plan_batches, read_pairs
    from diffembed.train.loop import build_plan

    cfg = TrainConfig.from_dict({
        "data": {"train_files": files, "format": "jsonl", "hard_negatives": 1, "bad_rows": "skip",
                 "same_source_batches": False, "shuffle_seed": 0},
        "optim": {"global_batch_size": global_batch, "max_steps": steps}, "run": {"num_workers": workers}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    with PeakRSS() as rss:
        if variant == "gathered":
            pairs, _ = read_pairs(files, "jsonl", 1, "skip")
            plan = plan_batches(pairs, global_batch, steps, False, 0)
            ref = ray.put(plan)
            del pairs, plan
        else:
            ref = ray.put(build_plan(cfg))  # what train() hands the workers
    result = {"driver_mib": rss.growth_mib, "driver_s": time.perf_counter() - started}
    walk = ray.remote(num_cpus=1, max_calls=1)(worker_walk)  # a fresh worker process, as Ray Train starts one
    result.update(ray.get(walk.remote({"plan": ref}, variant, global_batch // workers)))
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--doc-words", type=int, default=150, help="words per positive and per negative")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="ranks sharing each global batch")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.files, args.global_batch, args.workers,
                                     args.pairs // args.global_batch)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        files = write_pairs(Path(tmp), args.pairs, args.doc_words)
        size = sum(Path(f).stat().st_size for f in files) / 2**20
        print(f"{args.pairs} pairs in {len(files)} JSONL files, {size:.0f} MiB; one epoch of global batches of "
              f"{args.global_batch}, rank 0 of {args.workers}")
        results = {}
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--global-batch", str(args.global_batch),
                 "--workers", str(args.workers), "--pairs", str(args.pairs), "--files", *files],
                capture_output=True, text=True,
            )
            if out.returncode:
                sys.exit(f"{variant} failed: {out.stderr[-3000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'variant':10} {'driver MiB':>11} {'driver s':>9} {'worker MiB':>11} {'worker s':>9} {'steps':>6}")
    for variant, r in results.items():
        print(f"{variant:10} {r['driver_mib']:11.0f} {r['driver_s']:9.1f} {r['worker_mib']:11.0f} "
              f"{r['worker_s']:9.2f} {r['steps']:6d}")
    base, ours = results["gathered"], results["places"]
    print(f"driver memory growth, places / gathered: {ours['driver_mib'] / base['driver_mib']:.3f}x "
          f"({ours['driver_mib'] / size:.2f}x vs {base['driver_mib'] / size:.2f}x the file size)")
    print(f"worker memory growth, places / gathered: {ours['worker_mib'] / base['worker_mib']:.3f}x "
          f"({ours['worker_mib'] / size:.2f}x vs {base['worker_mib'] / size:.2f}x the file size)")
    print(f"driver time, places / gathered: {ours['driver_s'] / base['driver_s']:.2f}x; "
          f"worker time for the whole epoch: {ours['worker_s']:.2f} s vs {base['worker_s']:.2f} s")


if __name__ == "__main__":
    main()
