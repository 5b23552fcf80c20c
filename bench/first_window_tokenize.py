"""`first`-window documents: tokenizing a prefix of each long text vs tokenizing it whole (same process, same texts).

A `first` window (the default document policy, and what training and mining embed) reads a text's first
`max_length` tokens only; `Embedder.first_tokens` tokenizes a prefix of a long text instead of all of it, with the
same ids. Documents: lognormal word counts (median ~1,100 words, long tail to ~60k), synthetic English-like words.
Baseline: the same `document_segments` call with every text tokenized whole (the prefix rule turned off).

Printed per model: segment building time (tokenization + windows) whole vs prefix, and for the packaged MiniLM on
CPU the end-to-end `encode_documents` time of both (the forward pass included), each the best of `--rounds`.

    python bench/first_window_tokenize.py [--docs 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from diffembed import Embedder, EmbedderConfig
from diffembed.models import embedder as embedder_module


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)] + ["the", "of", "and", "a", "to", "in", "is", "retrieval."] * 400
    return [" ".join(rng.choices(words, k=max(5, int(rng.lognormvariate(7.0, 1.0))))) for _ in range(n)]


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(emb: Embedder, docs: list[str], rounds: int, encode: bool) -> dict[str, float]:
    out = {}
    shipped = embedder_module.FIRST_WINDOW_CHARS_PER_TOKEN
    for name, ratio in (("whole", 10**12), ("prefix", shipped)):
        embedder_module.FIRST_WINDOW_CHARS_PER_TOKEN = ratio
        try:
            out[f"segments_{name}"] = best(lambda: emb.document_segments(docs, windows="first", spans=False), rounds)
            if encode:
                out[f"encode_{name}"] = best(lambda: emb.encode_documents(docs), rounds)
        finally:
            embedder_module.FIRST_WINDOW_CHARS_PER_TOKEN = shipped
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    docs = documents(args.docs)
    words = sorted(len(d.split()) for d in docs)
    print(f"{len(docs)} documents, words: median {words[len(words) // 2]}, max {words[-1]}, "
          f"{sum(len(d) for d in docs) / 2**20:.1f} MiB")
    from diffembed.testing.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        models = [("all-MiniLM-L6-v2 (256)", EmbedderConfig(model="all-MiniLM-L6-v2"), True),
                  ("Dream layout, tiny BPE (4096)", EmbedderConfig(
                      model=str(write_tiny_checkpoint("dream", f"{tmp}/dream")), max_length=4096), False)]
        for name, cfg, encode in models:
            r = timed(Embedder(cfg), docs, args.rounds, encode)
            line = (f"{name}: segments whole {r['segments_whole']:.3f} s, prefix {r['segments_prefix']:.3f} s "
                    f"-> {r['segments_whole'] / r['segments_prefix']:.2f}x")
            if encode:
                line += (f"; encode_documents whole {r['encode_whole']:.2f} s, prefix {r['encode_prefix']:.2f} s "
                         f"-> {r['encode_whole'] / r['encode_prefix']:.2f}x")
            print(line)


if __name__ == "__main__":
    main()
