"""Batch-embedding throughput, one run, one corpus, the packaged MiniLM on CPU, local Qdrant:

  1. the job end to end (Ray Data read -> actor pool encode -> Qdrant local upsert), docs/s;
  2. encode-only: the same Embedder called in-process on the same texts (no Ray, no Qdrant), docs/s;
  3. a plain script: sentence-transformers encode + qdrant-client upload_points of the same model, docs/s.

Prints job/encode-only (overhead of the platform; target >= 0.8) and job/plain-script (target >= 1.0).
Documents are truncated at the same max_length everywhere, so all three do the same model work.

    python bench/embed_corpus_throughput.py [--docs 1500] [--max-length 256]
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


def job(corpus: Path, store: Path, max_length: int) -> float:
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    cfg = EmbedCorpusConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": max_length},
        "input": {"paths": [str(corpus)]},
        "encode": {"actors": 1, "batch_size": 256},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    import ray

    texts = make_texts(args.docs, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ours = job(corpus, Path(tmp, "q1"), args.max_length)
        ray.shutdown()
        alone = encode_only(texts, args.max_length)
        plain = plain_script(texts, Path(tmp, "q2"), args.max_length)
    print(f"{args.docs} docs, max_length {args.max_length}, packaged MiniLM, CPU")
    print(f"  job end to end (Ray Data + actor + local Qdrant): {ours:7.1f} docs/s")
    print(f"  encode-only, same Embedder in-process:            {alone:7.1f} docs/s")
    print(f"  plain script (ST encode + qdrant upload_points):  {plain:7.1f} docs/s")
    print(f"  ratio job/encode-only: {ours / alone:.2f}   ratio job/plain-script: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
