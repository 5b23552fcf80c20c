"""Batch-job scaling, 1 -> 2 encoder actors on two logical nodes, with a fixed per-batch cost per actor.

A 2-core machine cannot show how the job scales over GPUs: two CPU encoders would share the same two cores. So
each actor call waits a fixed `encode.simulated_batch_s` (a GPU's per-batch time stand-in, the model is tiny) and
the cluster is Ray's local multi-node `ray.cluster_utils.Cluster`: a head node for reading and writing and two
worker nodes with one `encoder_node` resource each, so each actor lands on its own node, as on cluster.yaml's
inference pool. The baseline is the same job with one actor, run in the same process on the same cluster.

Prints docs/s for 1 and 2 actors, over the whole job and in the steady state (first written batch to last,
leaving out actor start-up), and the efficiency = (rate with 2 / rate with 1) / 2; target >= 0.9.

    python bench/embed_corpus_scaling.py [--docs 960] [--batch-size 16] [--batch-s 0.25]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(corpus: Path, store: Path, actors: int, batch_size: int, batch_s: float) -> tuple[float, float]:
    """(docs/s over the whole job, docs/s in the steady state) with `actors` encoder actors."""
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    cfg = EmbedCorpusConfig.from_dict({
        "embedder": {"model": "tiny:qwen2", "max_length": 64},
        "input": {"paths": [str(corpus)], "block_bytes": 4096},
        "encode": {"actors": actors, "batch_size": batch_size, "simulated_batch_s": batch_s, "torch_threads": 1,
                   "resources_per_actor": {"encoder_node": 1}},
        "store": {"path": str(store), "collection": "bench", "upsert_batch_size": batch_size},
        "progress_every_s": 0,
    })
    lines = FirstLineClock()
    start = time.perf_counter()
    with contextlib.redirect_stdout(lines):  # one progress line per written batch: the steady-state clock
        summary = embed_corpus(cfg)
    end = time.perf_counter()
    first_docs = int(lines.first_line.split()[1])
    steady = (summary["documents_embedded"] - first_docs) / (end - lines.first_at)
    return summary["documents_embedded"] / (end - start), steady


class FirstLineClock(io.StringIO):
    """Captured stdout that notes when the first progress line (the first written batch) came."""

    first_at: float = 0.0
    first_line: str = ""

    def write(self, text: str) -> int:
        if not self.first_line and text.startswith("progress:"):
            self.first_at, self.first_line = time.perf_counter(), text
        return super().write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=960)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-s", type=float, default=0.25, help="fixed cost per actor call, seconds")
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"encoder_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} about the river and the "
                                                                       f"mountain, part {i % 7}"}) + "\n"
                                  for i in range(args.docs)))
        for actors in (1, 2):
            results[actors] = run(corpus, Path(tmp, f"q{actors}"), actors, args.batch_size, args.batch_s)
    ray.shutdown()
    cluster.shutdown()
    batches = -(-args.docs // args.batch_size)
    print(f"{args.docs} docs in {batches} batches of {args.batch_size}, {args.batch_s} s fixed cost per batch, "
          f"tiny:qwen2, 2 logical worker nodes (1 encoder actor each) + head")
    for actors, (whole, steady) in results.items():
        print(f"  {actors} actor(s): {whole:7.1f} docs/s whole job, {steady:7.1f} docs/s steady state")
    print(f"  efficiency 1 -> 2 actors: whole job {results[2][0] / results[1][0] / 2:.2f}, "
          f"steady state {results[2][1] / results[1][1] / 2:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
