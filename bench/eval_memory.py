"""The evaluation job's driver memory before any model loads: the store backend's read vs a read of the texts.

`run_evaluation` first reads and checks every BEIR task (`load_tasks`). The exact backend encodes the corpus in its
own process, so it holds the texts; the store backend hands the corpus file to the batch job (Ray Data) and holds
only the ids. The baseline is the read of the texts, which is what the store backend did too before it streamed
(and what a remote evaluation task then received, pickled, with the task). Each read runs in its own process on
the same synthetic BEIR folder; memory is the growth of private resident memory over its level before the read,
sampled every 5 ms; "shipped" is the size of the pickled tasks, what `compute.num_gpus` sends to the GPU node.

    python bench/eval_memory.py [--docs 200000] [--doc-words 150]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_data_memory import PeakRSS  # noqa: E402  (the same sampler)


def write_beir(root: Path, docs: int, doc_words: int) -> Path:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(docs):
            f.write(json.dumps({"_id": f"doc{i}", "title": f"Title {i}",
                                "text": " ".join(rng.choices(words, k=doc_words))}) + "\n")
    queries = min(1000, docs)
    with open(root / "queries.jsonl", "w") as f:
        for q in range(queries):
            f.write(json.dumps({"_id": f"q{q}", "text": " ".join(rng.choices(words, k=8))}) + "\n")
    with open(root / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in range(queries):
            f.write(f"q{q}\tdoc{rng.randrange(docs)}\t1\n")
    return root


def read(root: str, backend: str) -> dict:
    from diffembed.eval.config import EvalConfig
    from diffembed.eval.runner import load_tasks

    cfg = EvalConfig.from_dict({"tasks": [{"name": "big", "kind": "beir", "path": root}],
                                "retrieval": {"backend": backend}})
    started = time.perf_counter()
    with PeakRSS() as rss:
        scored, _ = load_tasks(cfg)
    wall = time.perf_counter() - started
    return {"peak_mib": rss.growth_mib, "wall_s": wall, "shipped_mib": len(pickle.dumps(scored)) / 2**20,
            "retrievable": len(scored["big"].text_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--doc-words", type=int, default=150)
    parser.add_argument("--read", nargs=2, metavar=("ROOT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(*args.read)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = write_beir(Path(tmp) / "beir", args.docs, args.doc_words)
        size = (root / "corpus.jsonl").stat().st_size / 2**20
        results = {}
        for name, backend in (("texts (baseline)", "exact"), ("ids only (store backend)", "qdrant")):
            out = subprocess.run([sys.executable, __file__, "--read", str(root), backend], check=True,
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"corpus: {args.docs} documents, {size:.0f} MiB of JSONL")
    for name, r in results.items():
        print(f"{name:26s} peak +{r['peak_mib']:7.1f} MiB  shipped {r['shipped_mib']:7.1f} MiB  "
              f"{r['wall_s']:6.1f} s  ({r['retrievable']} retrievable documents)")
    base, ours = results["texts (baseline)"], results["ids only (store backend)"]
    assert base["retrievable"] == ours["retrievable"]
    print(f"ratio (baseline / ours): memory {base['peak_mib'] / ours['peak_mib']:.1f}x, "
          f"shipped {base['shipped_mib'] / ours['shipped_mib']:.1f}x, time {base['wall_s'] / ours['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
