"""What `compile: true` costs a replica at start-up, and what running one-row batches eagerly costs a request.

Three parts, one run, serve/config.yaml's embedder (MiniLM, `dtype: auto`, late chunks) on `--threads` intra-op
threads (1, as a shipped replica):

1. `Embedder.warm_up` in a fresh process with an empty inductor cache (cold: a new replica on a new node), then in
   a second fresh process on the cache the first one filled (warm: a replica restarted on the same node). Each
   prints the seconds and the number of graphs compiled. Baseline, the same way on a cache of its own: what a
   replica compiled before one-row batches ran eagerly, `warm_up` plus a one-row batch through a compiled module.
2. One row (a query sent alone; a single document window) through the eager module, which the Embedder uses for
   one-row batches, against the same row through a compiled graph built for it (what the Embedder ran before it
   sent one-row batches to the eager module): the median of interleaved rounds, ratio eager / compiled time.

    python bench/compile_warmup.py [--threads 1] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def served_config() -> dict:
    import yaml

    (app,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    return app["args"]["embedder"]


def warm_up_child(threads: int, one_row_compiled: bool) -> None:
    """Runs in a fresh process: one JSON line with warm_up's seconds and the graphs it compiled."""
    import torch
    from torch._dynamo.utils import counters

    from diffembed import Embedder, EmbedderConfig

    torch.set_num_threads(threads)
    embedder = Embedder(EmbedderConfig.model_validate(served_config()))
    start = time.perf_counter()
    embedder.warm_up()
    if one_row_compiled:  # the baseline: the one-row graph a replica also compiled before
        batch = embedder.collate(embedder.query_segments(["warm up"]))
        with torch.no_grad():
            torch.compile(embedder.model, dynamic=True)(input_ids=batch["input_ids"],
                                                        attention_mask=batch["attention_mask"])
    print(json.dumps({"seconds": time.perf_counter() - start, "graphs": counters["stats"]["unique_graphs"]}))


def warm_up_in_fresh_process(cache: str, threads: int, one_row_compiled: bool = False) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads)] + (["--one-row-compiled"] * one_row_compiled)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_row_latency(threads: int, rounds: int) -> None:
    import torch

    from diffembed import Embedder, EmbedderConfig

    torch.set_num_threads(threads)
    embedder = Embedder(EmbedderConfig.model_validate({**served_config(), "compile": False}))
    compiled = torch.compile(embedder.model, dynamic=True)
    rows = {
        "query alone (~12 tokens)": embedder.query_segments(["how do I compress a file with gzip in python"]),
        "one full window (256 tokens)": embedder.document_segments([" ".join(["harbour lights at dusk"] * 80)])[:1],
    }
    for name, segments in rows.items():
        batch = embedder.collate(segments)  # the same input both ways (the tokenizer's (1, T) mask)

        def run(model) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return time.perf_counter() - start

        run(compiled), run(embedder.model)  # the compiled graph for one row is built here, outside the timing
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(rounds):  # interleaved: both see the same machine state
            times["eager"].append(run(embedder.model))
            times["compiled"].append(run(compiled))
        eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"  {name:30s} eager {eager * 1e3:7.2f} ms   compiled {comp * 1e3:7.2f} ms   "
              f"eager / compiled time {eager / comp:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-row-compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        warm_up_child(args.threads, args.one_row_compiled)
        return
    results = {}
    for label, one_row in (("ours (one-row batches eager)", False), ("baseline (+ one-row graph)", True)):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            results[label] = [warm_up_in_fresh_process(cache, args.threads, one_row) for _ in ("cold", "warm")]
    print(f"warm_up, serve/config.yaml's embedder, {args.threads} thread(s): empty inductor cache / warm cache")
    for label, (cold, warm) in results.items():
        print(f"  {label:30s} {cold['seconds']:6.1f} s ({cold['graphs']} graph(s)) / {warm['seconds']:6.1f} s")
    (ours_cold, ours_warm), (base_cold, base_warm) = results.values()
    print(f"  start-up, baseline / ours: cold {base_cold['seconds'] / ours_cold['seconds']:.2f}x, "
          f"warm {base_warm['seconds'] / ours_warm['seconds']:.2f}x")
    print("one-row batches:")
    one_row_latency(args.threads, args.rounds)


if __name__ == "__main__":
    main()
