"""Long-document policies on the development benchmark: nDCG@10 of each window policy x score aggregation.

Each policy embeds the corpus once (exact cosine, the evaluation job's `exact` backend math); every aggregation
is scored on the dev queries (to choose) and on the test queries (to report). Baseline: `first` (truncate to
one window), the shipped default before late chunking.

    python bench/quality_windows.py data/devbench runs/bench/windows.json        # ~15-30 min on 2 CPU cores
    python bench/quality_windows.py data/devbench out.json --policies first late_chunk:128:64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffembed.config import EmbedderConfig
from diffembed.documents import window_scores
from diffembed.eval.beir import load_beir
from diffembed.eval.metrics import evaluate, top_k_run
from diffembed.models.embedder import Embedder

AGGREGATIONS = [("best", {})] + [("first_prior", {"first_weight": w}) for w in (0.2, 0.3, 0.5)] + [
    ("softmax", {"temperature": t}) for t in (0.02, 0.05, 0.1)]
DEFAULT_POLICIES = ["first", "mean:0:32", "best:0:32", "late_chunk:64:62", "late_chunk:64:64", "late_chunk:128:64",
                    "late_chunk:256:64"]


def policy_overrides(spec: str) -> list[str]:
    """'late_chunk:128:64' -> windows, chunk_tokens, overlap overrides."""
    windows, *rest = spec.split(":")
    out = [f"documents.windows={windows}"]
    if rest and windows == "late_chunk":
        out.append(f"documents.chunk_tokens={rest[0]}")
    if len(rest) > 1:
        out.append(f"documents.overlap={rest[1]}")
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a devbench folder (python -m diffembed.eval.devbench DIR builds one)")
    ap.add_argument("out", help="results JSON")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    args = ap.parse_args(argv)
    if not Path(args.data, "corpus.jsonl").exists():
        from diffembed.eval.devbench import main as build
        build([args.data])
    splits = {s: load_beir(args.data, split=s) for s in ("dev", "test")}
    corpus = splits["test"]
    doc_ids = [d for d, t in corpus.corpus.items() if t.strip()]
    texts, titles = [corpus.corpus[d] for d in doc_ids], [corpus.titles.get(d) for d in doc_ids]
    rows = []
    for spec in args.policies:
        emb = Embedder(EmbedderConfig.from_dict({"model": args.model, "max_length": args.max_length},
                                                policy_overrides(spec)))
        start = time.perf_counter()
        stored = emb.encode_document_windows(texts, titles)
        seconds = time.perf_counter() - start
        vectors = unit(stored.vectors)
        for name, params in AGGREGATIONS:
            if len(vectors) == len(doc_ids) and name != "best":
                continue  # one vector per document: nothing to aggregate
            row = {"policy": spec, "aggregate": name, **params, "points": len(vectors),
                   "encode_s": round(seconds, 1)}
            for split, data in splits.items():
                qids = list(data.queries)
                queries = unit(emb.encode_queries([data.queries[q] for q in qids]))
                scores = window_scores(queries @ vectors.T, stored.text_index, name, **params)  # (Q, N)
                row[f"{split}_ndcg@10"] = round(evaluate(data.qrels, top_k_run(scores, qids, doc_ids, 100))["ndcg@10"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    best = max(rows, key=lambda r: r["dev_ndcg@10"])
    base = next((r for r in rows if r["policy"] == "first"), None)  # the baseline, when it was among --policies
    ratio = f" ({best['test_ndcg@10'] / base['test_ndcg@10']:.3f}x the baseline)" if base else ""
    if base:
        print(f"baseline first (truncate): test nDCG@10 {base['test_ndcg@10']}")
    print(f"best on dev: {best['policy']} {best['aggregate']} {({k: best[k] for k in ('first_weight', 'temperature') if k in best})}"
          f" -> test {best['test_ndcg@10']}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
