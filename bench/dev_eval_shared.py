"""In-training dev evaluation on several ranks: shared encoding (each rank a world-th of the texts, then an
all-gather: `dev_eval.dev_ndcg(..., shard)`) vs every rank encoding everything (how it ran before, and how ZeRO-3
still must).

Two processes in a gloo group, one intra-op thread each (a rank per core, as a rank per GPU), the packaged MiniLM,
synthetic dev rows (a query, its positive, two negatives). Both ways run in the same processes, alternately; the
metrics must agree.

    python bench/dev_eval_shared.py [--pairs 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.multiprocessing as mp

WORLD = 2
WORDS = ("river stone forest query passage model vector index search token layer window the a of and to in is "
         "for on with as by that this from at are be it an or was which").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rank(rank: int, port: int, pairs: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    from diffembed import Embedder, EmbedderConfig
    from diffembed.train.data import Pair
    from diffembed.train.dev_eval import dev_ndcg

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rng = random.Random(0)
    queries = [_text(rng, 8) for _ in range(pairs)]  # each positive starts with its query's words
    dev = [Pair(query=q, positive=f"{q} {_text(rng, rng.randint(30, 120))}",
                negatives=[_text(rng, rng.randint(30, 120)) for _ in range(2)]) for q in queries]
    embedder = Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=128))
    dev_ndcg(embedder, dev[:8], (rank, WORLD))  # warm-up
    seconds: dict[str, list[float]] = {"every rank encodes everything": [], "shared": []}
    metrics = {}
    for _ in range(repeats):
        for name, shard in (("every rank encodes everything", None), ("shared", (rank, WORLD))):
            dist.barrier()
            start = time.perf_counter()
            metrics[name] = dev_ndcg(embedder, dev, shard)
            dist.barrier()  # an evaluation ends for the run when its slowest rank ends
            seconds[name].append(time.perf_counter() - start)
    if rank == 0:
        out.put((seconds, metrics))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args.pairs, args.repeats, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    seconds, metrics = out.get()
    for p in procs:
        p.join()
    print(f"dev evaluation of {args.pairs} rows ({3 * args.pairs} texts + {args.pairs} queries), packaged MiniLM, "
          f"{WORLD} gloo ranks x 1 thread; median of {args.repeats}")
    base, shared = (statistics.median(seconds[k]) for k in ("every rank encodes everything", "shared"))
    print(f"every rank encodes everything (baseline): {base:6.2f} s   shared: {shared:6.2f} s   "
          f"speed-up {base / shared:.2f}x")
    same = all(abs(metrics["shared"][k] - v) < 1e-6 for k, v in metrics["every rank encodes everything"].items())
    print(f"nDCG@10 {metrics['shared']['ndcg@10']:.4f}; metrics equal: {same}")


if __name__ == "__main__":
    main()
