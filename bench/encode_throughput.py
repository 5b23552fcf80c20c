"""Encode throughput: our Embedder vs SentenceTransformer.encode, same model, texts and max_length, one run.

Prints tokens/s of each, the ratio (ours / sentence-transformers) and the worst cosine between the two
outputs, in fp32 and then in bf16 (both sides in bf16). The texts are a deterministic mix of short and long
documents, so padding waste matters as it does on a real corpus.

    python bench/encode_throughput.py [--docs 600] [--max-length 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from diffembed import Embedder, EmbedderConfig
from diffembed.models.loading import packaged_minilm_path

WORDS = (
    "diffusion language model embedding retrieval passage query document attention bidirectional causal "
    "token window chunk vector index search ranking contrastive negative positive batch gradient layer "
    "the a of and to in is for on with as by that this from at are be it an or was which"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: many short, some medium, a tail of documents longer than max_length."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        kind = rng.random()
        length = rng.randint(5, 30) if kind < 0.5 else rng.randint(30, 150) if kind < 0.8 else rng.randint(200, 600)
        texts.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    return texts


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(dtype: str, texts: list[str], max_length: int, repeats: int, st_batch_size: int) -> None:
    from sentence_transformers import SentenceTransformer

    ours = Embedder(EmbedderConfig(dtype=dtype, max_length=max_length))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    reference = SentenceTransformer(str(packaged_minilm_path()), device="cpu", model_kwargs={"dtype": torch_dtype})
    reference.max_seq_length = max_length
    tokens = sum(len(s.ids) for s in ours.document_segments(texts))

    t_ours, v_ours = timed(lambda: ours.encode_documents(texts), repeats)
    t_ref, v_ref = timed(
        lambda: reference.encode(texts, batch_size=st_batch_size, normalize_embeddings=True, convert_to_numpy=True),
        repeats,
    )
    cos = (v_ours * v_ref).sum(1) / (np.linalg.norm(v_ours, axis=1) * np.linalg.norm(v_ref, axis=1))
    print(
        f"[{dtype}] {len(texts)} docs, {tokens} tokens, max_length {max_length}\n"
        f"  sentence-transformers encode (batch {st_batch_size}): {tokens / t_ref:10.0f} tokens/s\n"
        f"  diffembed Embedder (token budget {ours.config.max_batch_tokens}): {tokens / t_ours:10.0f} tokens/s\n"
        f"  ratio ours / sentence-transformers: {t_ref / t_ours:.2f}x   min cosine: {cos.min():.6f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode's default is 32")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    texts = make_texts(args.docs)
    for dtype in args.dtypes.split(","):
        run(dtype, texts, args.max_length, args.repeats, args.st_batch_size)


if __name__ == "__main__":
    main()
