"""Exact mining with one miner vs several (`candidates.searchers`), sharing one pool in Ray's object store.

Runs `mine_negatives` (exact candidates) twice on the same synthetic pairs, one local Ray cluster, a tiny random
Dream-layout checkpoint (`diffembed.testing.tiny`): with one miner actor (how exact mining ran before) and with
`--searchers` of them, alternately, `--repeats` times each. Both encode the same rows the same way, so the wall
ratio understates the mining stage's own speed-up. The output files must be identical.

    python bench/mine_throughput.py [--pairs 20000] [--doc-words 20] [--searchers 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_pairs(path: Path, pairs: int, doc_words: int) -> None:
    """Random words; each positive repeats its query's words, so it outscores most of the pool even under a random
    model and the rows below it are negatives to pick."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with path.open("w") as out:
        for _ in range(pairs):
            query = " ".join(rng.choices(words, k=12))
            out.write(json.dumps({"query": query, "positive": f"{query} {' '.join(rng.choices(words, k=doc_words))}"})
                      + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--doc-words", type=int, default=20)
    parser.add_argument("--searchers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import ray

    from diffembed.mining.config import MineNegativesConfig
    from diffembed.mining.job import mine_negatives
    from diffembed.testing.tiny import write_tiny_checkpoint

    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pairs(tmp / "pairs.jsonl", args.pairs, args.doc_words)
        model = str(write_tiny_checkpoint("dream", tmp / "dream"))
        walls: dict[int, list[float]] = {1: [], args.searchers: []}
        outputs, summaries = set(), {}
        for run in range(args.repeats):
            for searchers in (1, args.searchers):
                out = tmp / f"out{searchers}_{run}.jsonl"
                cfg = MineNegativesConfig.from_dict({
                    "embedder": {"model": model, "max_length": 64, "dtype": "fp32"},
                    "input": {"files": [str(tmp / "pairs.jsonl")]},
                    "output": str(out),
                    "candidates": {"source": "exact", "searchers": searchers},
                    # a random model scores every pair ~0.99: the false-negative filter would drop them all
                    "negatives": {"per_query": 2, "window": 10, "max_positive_ratio": 1.0},
                    "encode": {"actors": 1, "batch_size": 256},
                })
                summaries[searchers] = mine_negatives(cfg)
                walls[searchers].append(summaries[searchers]["wall_s"])
                outputs.add(out.read_bytes())
    ray.shutdown()
    print(f"{args.pairs} pairs, exact mining, tiny Dream checkpoint, {os.cpu_count()} cores, "
          f"{args.repeats} alternating runs each")
    for searchers, wall in walls.items():
        s = summaries[searchers]
        print(f"  {searchers} miner(s){' (baseline)' if searchers == 1 else ''}: wall {statistics.median(wall):6.1f} s "
              f"(runs {', '.join(f'{w:.1f}' for w in wall)}), {s['rows']} rows, {s['negatives']} negatives")
    base, ours = statistics.median(walls[1]), statistics.median(walls[args.searchers])
    print(f"median wall, {args.searchers} miners / 1: {ours / base:.2f}x (speed-up {base / ours:.2f}x); "
          f"outputs identical: {len(outputs) == 1}")


if __name__ == "__main__":
    main()
