"""Batch-embedding throughput, one run, one corpus, the packaged MiniLM on CPU, local Qdrant:

  1. the job end to end (Ray Data read -> actor pool encode -> Qdrant local upsert), docs/s;
  2. encode-only: the same Embedder called in-process on the same texts (no Ray, no Qdrant), docs/s;
  3. a plain script: sentence-transformers encode + qdrant-client upload_points of the same model, docs/s.

Prints job/encode-only (overhead of the platform; target >= 0.8) and job/plain-script (target >= 1.0).
Documents are truncated at the same max_length everywhere, so all three do the same model work.

`--rss` instead measures the driver's peak RSS for a corpus of 10k and of 100k short documents (each run in a
fresh process, tiny:qwen2 so the model costs nothing) and prints the ratio: nothing on the driver may grow with
the corpus (target <= 1.2).

    python bench/embed_corpus_throughput.py [--docs 3000] [--max-length 256] [--batch-size 256]
    python bench/embed_corpus_throughput.py --rss
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_throughput import make_texts  # noqa: E402  (same mixed-length generator)


def job(corpus: Path, store: Path, max_length: int, batch_size: int) -> float:
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    cfg = EmbedCorpusConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": max_length},
        "input": {"paths": [str(corpus)]},
        "encode": {"actors": 1, "batch_size": batch_size},
        "store": {"path": str(store), "collection": "bench", "upsert_batch_size": 512},
    })
    start = time.perf_counter()
    summary = embed_corpus(cfg)
    elapsed = time.perf_counter() - start
    assert summary["documents_embedded"] > 0
    return summary["documents_embedded"] / elapsed


def encode_only(texts: list[str], max_length: int) -> float:
    from diffembed import Embedder, EmbedderConfig

    emb = Embedder(EmbedderConfig(max_length=max_length))
    emb.encode_documents(texts[:32])  # warm-up
    start = time.perf_counter()
    emb.encode_documents(texts)
    return len(texts) / (time.perf_counter() - start)


def plain_script(texts: list[str], store: Path, max_length: int) -> float:
    from qdrant_client import QdrantClient, models
    from sentence_transformers import SentenceTransformer

    from diffembed.models.loading import packaged_minilm_path

    start = time.perf_counter()
    model = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
    model.max_seq_length = max_length
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
    client = QdrantClient(path=str(store))
    client.create_collection("plain", vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                         distance=models.Distance.COSINE))
    client.upload_points("plain", [
        models.PointStruct(id=str(uuid.uuid4()), vector=v.tolist(), payload={"text": t})
        for v, t in zip(vectors, texts)
    ], batch_size=512)
    client.close()
    return len(texts) / (time.perf_counter() - start)


def driver_rss(docs: int) -> int:
    """Peak RSS (bytes) of a fresh driver process that runs the job on `docs` short documents."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--rss-child", str(docs)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[-1])


def rss_child(docs: int) -> None:
    import resource

    import ray

    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            for i in range(docs):
                f.write(json.dumps({"id": f"d{i}", "text": f"short document number {i} about item {i % 97}"}) + "\n")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        summary = embed_corpus(EmbedCorpusConfig.from_dict({
            "embedder": {"model": "tiny:qwen2", "max_length": 32},
            "input": {"paths": [str(corpus)], "block_bytes": 1 << 20},
            "encode": {"actors": 1, "batch_size": 512},
            "store": {"path": str(Path(tmp, "q")), "collection": "rss", "upsert_batch_size": 1024},
        }), progress=False)
        assert summary["documents_embedded"] == docs
        ray.shutdown()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="encode.batch_size of the job")
    parser.add_argument("--rss", action="store_true", help="driver peak RSS at 10k vs 100k documents")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    if args.rss:
        small, large = driver_rss(10_000), driver_rss(100_000)
        print(f"driver peak RSS: 10k docs {small / 2**20:.0f} MiB, 100k docs {large / 2**20:.0f} MiB, "
              f"ratio 100k/10k: {large / small:.2f} (target <= 1.2)")
        return
    import ray

    texts = make_texts(args.docs, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ours = job(corpus, Path(tmp, "q1"), args.max_length, args.batch_size)
        ray.shutdown()
        alone = encode_only(texts, args.max_length)
        plain = plain_script(texts, Path(tmp, "q2"), args.max_length)
    print(f"{args.docs} docs, max_length {args.max_length}, packaged MiniLM, CPU, 1 encoder actor, "
          f"encode.batch_size {args.batch_size}")
    print(f"  job end to end (Ray Data + actor + local Qdrant): {ours:7.1f} docs/s")
    print(f"  encode-only, same Embedder in-process:            {alone:7.1f} docs/s")
    print(f"  plain script (ST encode + qdrant upload_points):  {plain:7.1f} docs/s")
    print(f"  ratio job/encode-only: {ours / alone:.2f}   ratio job/plain-script: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
