"""The mining job's driver memory: this checkout vs an earlier one that read every row on the driver.

Both run `mine_negatives` (exact candidates) on the same synthetic pairs with a tiny random Dream-layout checkpoint
(`diffembed.testing.tiny`: the model's cost is beside the point here), each in its own process with its own local
Ray cluster, the code taken from its checkout (`PYTHONPATH`, which Ray's workers inherit). The baseline is the
commit before mining streamed its rows (ca3b1b4): the driver read and checked every row itself, shipped them to Ray
Data with `from_items`, held the exact pool, gathered every mined row and wrote the file at the end.

Memory is the growth of the driver's private resident memory (resident minus shared pages; Ray's object store is
shared) over its level just before the job, sampled every 5 ms. The two output files must be identical.

    python bench/mine_memory.py [--pairs 20000] [--doc-words 250] [--baseline-rev ca3b1b4]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_data_memory import PeakRSS, write_pairs  # noqa: E402  (the same sampler and synthetic pairs)


def run_job(pairs: list[str], model: str, output: str) -> dict:
    import ray

    from diffembed.mining.config import MineNegativesConfig
    from diffembed.mining.job import mine_negatives

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = MineNegativesConfig.from_dict({
        "embedder": {"model": model, "max_length": 64, "dtype": "fp32"},
        "input": {"files": pairs, "bad_rows": "skip"},
        "output": output,
        "candidates": {"source": "exact"},
        "negatives": {"per_query": 1, "window": 10},
        "encode": {"actors": 1, "batch_size": 256},
    })
    started = time.perf_counter()
    with PeakRSS() as rss:
        summary = mine_negatives(cfg)
    ray.shutdown()
    return {"driver_mib": rss.growth_mib, "wall_s": time.perf_counter() - started, "rows": summary["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--doc-words", type=int, default=250)
    parser.add_argument("--baseline-rev", default="ca3b1b4", help="the earlier commit to compare with")
    parser.add_argument("--job", nargs=3, metavar=("PAIRS_DIR", "MODEL", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        pairs_dir, model, output = args.job
        print(json.dumps(run_job(sorted(str(p) for p in Path(pairs_dir).glob("*.jsonl")), model, output)))
        return

    from diffembed.testing.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "pairs").mkdir()
        files = write_pairs(tmp / "pairs", args.pairs, args.doc_words)
        size = sum(Path(f).stat().st_size for f in files) / 2**20
        model = str(write_tiny_checkpoint("dream", tmp / "dream"))
        baseline = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(baseline),
                        args.baseline_rev], check=True)
        try:
            results = {}
            for name, src in (("baseline", baseline), ("ours", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(src / "platform"), "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run(
                    [sys.executable, __file__, "--job", str(tmp / "pairs"), model, str(tmp / f"{name}.jsonl")],
                    capture_output=True, text=True, env=env, cwd=tmp,
                )
                if proc.returncode:
                    sys.exit(f"{name} failed: {proc.stderr[-3000:]}")
                results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            same = (tmp / "baseline.jsonl").read_bytes() == (tmp / "ours.jsonl").read_bytes()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    print(f"{args.pairs} pairs in {len(files)} JSONL files, {size:.0f} MiB; exact mining, tiny Dream checkpoint")
    for name, r in results.items():
        print(f"{name:9} ({args.baseline_rev if name == 'baseline' else 'this checkout'}): driver memory growth "
              f"{r['driver_mib']:7.0f} MiB, wall {r['wall_s']:6.1f} s, {r['rows']} rows")
    base, ours = results["baseline"], results["ours"]
    print(f"driver memory growth, ours / baseline: {ours['driver_mib'] / base['driver_mib']:.3f}x "
          f"({ours['driver_mib'] / size:.2f}x vs {base['driver_mib'] / size:.2f}x the input size); "
          f"wall {ours['wall_s'] / base['wall_s']:.2f}x; outputs identical: {same}")


if __name__ == "__main__":
    main()
