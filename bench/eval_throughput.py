"""Evaluation job vs a plain script, same model, same data, one run.

The data is a synthetic passkey task (documents of `--length` tokens, written once in BEIR layout so both
sides read the same files). Ours: `run_evaluation` with the exact backend (BEIR loading with validation,
token-budget encoding, best-window scoring, pytrec_eval, JSON + Markdown reports). Baseline: the script a
user would write: read the JSONL files, `SentenceTransformer.encode` queries and documents, a numpy dot
product, pytrec_eval. Prints both wall times, the ratio (baseline time / our time: > 1 means we are faster)
and both nDCG@1 values (they must agree).

    python bench/eval_throughput.py [--docs 400] [--queries 100] [--length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from diffembed import Embedder, EmbedderConfig
from diffembed.eval.config import EvalConfig
from diffembed.eval.metrics import evaluate
from diffembed.eval.runner import run_evaluation
from diffembed.eval.synthetic import passkey_task
from diffembed.models.loading import packaged_minilm_path


def write_beir(data, root: Path) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, text in data.corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in data.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(root / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in data.qrels.items():
            for doc_id, grade in docs.items():
                f.write(f"{qid}\t{doc_id}\t{grade}\n")
    return root


def plain_script(root: Path, max_length: int) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    corpus = [json.loads(line) for line in open(root / "corpus.jsonl")]
    queries = [json.loads(line) for line in open(root / "queries.jsonl")]
    qrels: dict[str, dict[str, int]] = {}
    for line in list(open(root / "qrels" / "test.tsv"))[1:]:
        qid, doc_id, grade = line.split()
        qrels.setdefault(qid, {})[doc_id] = int(grade)
    model = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
    model.max_seq_length = max_length
    docs = model.encode([d["text"] for d in corpus], normalize_embeddings=True, batch_size=32)
    qs = model.encode([q["text"] for q in queries], normalize_embeddings=True, batch_size=32)
    scores = qs @ docs.T  # (Q, N)
    top = np.argsort(-scores, axis=1)[:, :100]
    run = {q["_id"]: {corpus[j]["_id"]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(queries)}
    return evaluate(qrels, run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    tokenizer = Embedder(EmbedderConfig()).tokenizer
    data = passkey_task(tokenizer, args.length, n_queries=args.queries, n_documents=args.docs, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_beir(data, Path(tmp) / "passkey")
        cfg = EvalConfig.from_dict({
            "embedder": {"max_length": 256, "documents": {"windows": "first"}}, "output_dir": str(Path(tmp) / "out"),
            "tasks": [{"name": "passkey", "kind": "beir", "path": str(root)}],
        })
        plain_script(root, 256)  # warm-up: file cache, model load paths
        t0 = time.perf_counter()
        base = plain_script(root, 256)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = run_evaluation(cfg, progress=False)["tasks"]["passkey"]
        t_ours = time.perf_counter() - t0
    print(f"{args.docs} documents x {args.length} tokens, {args.queries} queries")
    print(f"plain script (ST encode + numpy + pytrec_eval): {t_base:.2f} s  nDCG@1 {base['ndcg@1']:.4f}")
    print(f"evaluation job (exact backend):                 {t_ours:.2f} s  nDCG@1 {ours['ndcg@1']:.4f}")
    print(f"ratio (plain time / job time): {t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
