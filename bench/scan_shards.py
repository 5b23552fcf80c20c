"""Reading one large training file: one Ray task for the whole file vs one task per shard (`rowfiles.plan_shards`).

Both variants run `train.data.scan_pairs` on the same single JSONL file of pairs, on a local Ray cluster of
`--cpus` CPUs, and end with the same rows in Ray's object store (checked: same count, same bad rows).

  whole   (baseline: what `scan_rows` did before sharding) `shard_bytes` = the file's size: one task reads and
          checks the whole file.
  shards  (ours) the default `SHARD_BYTES` (or `--shard-mib`): byte ranges, one task each, as many at once as
          there are CPUs.

Each variant runs in its own process with its own Ray cluster. Memory is the peak private resident memory
(resident minus shared pages: Ray's object store, where the finished tables go, is not counted) of the busiest
Ray worker process of that cluster, sampled every 5 ms; time is the wall time of `scan_pairs`.

    python bench/scan_shards.py [--pairs 200000] [--doc-words 150] [--cpus 2] [--shard-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data_memory import PeakRSS, write_pairs  # noqa: E402

TAG = "DIFFEMBED_SCAN_BENCH"  # in the environment of this variant's driver and so of its Ray processes


class WorkerPeak(PeakRSS):
    """Peak private resident bytes of any one process whose environment carries TAG=<value> (the process list is
    refreshed every 0.2 s), sampled as `PeakRSS` samples its own."""

    def __init__(self, value: str):
        self.needle = f"{TAG}={value}".encode()
        self.pids: set[int] = set()
        self.refreshed = 0.0

    def _refresh(self):
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me and int(entry) not in self.pids:
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if self.needle in f.read().split(b"\0"):
                            self.pids.add(int(entry))
                except OSError:
                    pass
        self.refreshed = time.monotonic()

    def _rss(self) -> int:
        if time.monotonic() - self.refreshed > 0.2:
            self._refresh()
        peak = 0
        for pid in list(self.pids):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    _, resident, shared = (int(x) for x in f.read().split()[:3])
                peak = max(peak, (resident - shared) * os.sysconf("SC_PAGE_SIZE"))
            except OSError:
                self.pids.discard(pid)
        return peak


def run_variant(variant: str, path: str, cpus: int, shard_mib: int) -> dict:
    import ray

    from diffembed.rowfiles import SHARD_BYTES
    from diffembed.train.data import scan_pairs

    shard_bytes = os.path.getsize(path) + 1 if variant == "whole" else (shard_mib << 20 if shard_mib else SHARD_BYTES)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])  # workers up before measuring
    with WorkerPeak(os.environ[TAG]) as peak:
        started = time.perf_counter()
        rows = scan_pairs([path], "jsonl", 1, "skip", shard_bytes=shard_bytes)
        seconds = time.perf_counter() - started
    return {"variant": variant, "tasks": len(rows.blocks), "rows": len(rows), "bad": rows.bad.count,
            "scan_s": seconds, "worker_peak_mib": peak.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--doc-words", type=int, default=150)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--shard-mib", type=int, default=0, help="shard size of `shards` (0: SHARD_BYTES)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.path, args.cpus, args.shard_mib)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        [path] = write_pairs(Path(tmp), args.pairs, args.doc_words, files=1)
        size = os.path.getsize(path) / 2**20
        print(f"one JSONL file: {args.pairs} pairs, {size:.0f} MiB; Ray cluster of {args.cpus} CPUs")
        results = {}
        for variant in ("whole", "shards"):
            env = {**os.environ, TAG: f"{variant}-{os.getpid()}"}
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--path", path,
                                   "--cpus", str(args.cpus), "--shard-mib", str(args.shard_mib)],
                                  capture_output=True, text=True, env=env, check=True)
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    whole, shards = results["whole"], results["shards"]
    assert (whole["rows"], whole["bad"]) == (shards["rows"], shards["bad"]), results
    for r in (whole, shards):
        print(f"  {r['variant']:<7} {r['tasks']:>4} task(s)  scan {r['scan_s']:6.1f} s  "
              f"busiest worker {r['worker_peak_mib']:7.0f} MiB")
    print(f"busiest worker's memory, shards / whole: {shards['worker_peak_mib'] / whole['worker_peak_mib']:.3f}x "
          f"({shards['worker_peak_mib']:.0f} vs {whole['worker_peak_mib']:.0f} MiB for a {size:.0f} MiB file)")
    print(f"scan time, shards / whole: {shards['scan_s'] / whole['scan_s']:.2f}x "
          f"({shards['scan_s']:.1f} vs {whole['scan_s']:.1f} s)")


if __name__ == "__main__":
    main()
