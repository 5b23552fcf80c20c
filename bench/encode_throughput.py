"""Encode throughput: our Embedder vs SentenceTransformer.encode, same model, texts and max_length, one run.

Prints tokens/s of each, the ratio (ours / sentence-transformers: the median over interleaved rounds, each round
timing both on the same machine state) and the worst cosine between the two outputs, in fp32 and then in bf16
(both sides in bf16), for our Embedder as configured by default and with `compile: true`. The texts are a
deterministic mix of short and long documents, so padding waste matters as it does on a real corpus.

    python bench/encode_throughput.py [--docs 600] [--max-length 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Callable

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


def interleaved(fns: dict[str, Callable[[], np.ndarray]], repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Each function once as a warm-up, then `repeats` rounds running each once per round, in turn: both sides see
    the same machine (a noisy neighbour, a frequency change) in every round. Seconds per round, last outputs."""
    outputs = {name: fn() for name, fn in fns.items()}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


def run(dtype: str, texts: list[str], max_length: int, repeats: int, st_batch_size: int, compiled: bool) -> None:
    from sentence_transformers import SentenceTransformer

    ours = {"ours": Embedder(EmbedderConfig(dtype=dtype, max_length=max_length))}
    if compiled:  # the same weights, inference through `compile: true` (compiles in the warm-up call)
        ours["ours compiled"] = Embedder(EmbedderConfig(dtype=dtype, max_length=max_length, compile=True),
                                         backbone=ours["ours"].backbone)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    reference = SentenceTransformer(str(packaged_minilm_path()), device="cpu", model_kwargs={"dtype": torch_dtype})
    reference.max_seq_length = max_length
    tokens = sum(len(s.ids) for s in ours["ours"].document_segments(texts))

    fns = {name: (lambda e=e: e.encode_documents(texts)) for name, e in ours.items()}
    fns["st"] = lambda: reference.encode(texts, batch_size=st_batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True)
    seconds, out = interleaved(fns, repeats)
    print(f"[{dtype}] {len(texts)} docs, {tokens} tokens, max_length {max_length}, {repeats} interleaved rounds\n"
          f"  sentence-transformers encode (batch {st_batch_size}): {tokens / min(seconds['st']):10.0f} tokens/s (best)")
    v_ref = out["st"]
    for name, embedder in ours.items():
        ratios = [st / us for st, us in zip(seconds["st"], seconds[name])]  # per round: same machine state
        v = out[name]
        cos = (v * v_ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(v_ref, axis=1))
        print(
            f"  diffembed Embedder{' compile: true' if name != 'ours' else ''} (token budget "
            f"{embedder.config.max_batch_tokens}): {tokens / min(seconds[name]):10.0f} tokens/s (best)\n"
            f"    ratio to sentence-transformers: median {statistics.median(ratios):.2f}x over rounds (min "
            f"{min(ratios):.2f}x, max {max(ratios):.2f}x; best/best {min(seconds['st']) / min(seconds[name]):.2f}x)"
            f"   min cosine: {cos.min():.6f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode's default is 32")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--no-compile", action="store_true", help="Skip the `compile: true` variant of ours.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    texts = make_texts(args.docs)
    for dtype in args.dtypes.split(","):
        run(dtype, texts, args.max_length, args.repeats, args.st_batch_size, not args.no_compile)


if __name__ == "__main__":
    main()
