"""The evaluation job: an embedder scored on BEIR-layout datasets and LongEmbed-style synthetic tasks.

Every task becomes a `RetrievalData` (documents, judged queries, qrels); documents are retrieved either
exactly in this process or through the platform's own path (the embed_corpus batch job into Qdrant, then
the store interface's `search`), and the run is scored with pytrec_eval. Long documents are handled as in the batch
job and the service: the embedder's document policy (`embedder.documents`) decides a document's vector(s) —
its first window, its windows averaged, or every window with the document scored by its best one. Both
backends rank by cosine similarity, so they agree on the same data.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.documents import best_hits, best_window_scores
from diffembed.eval.beir import RetrievalData, load_beir
from diffembed.eval.config import EvalConfig, TaskConfig
from diffembed.eval.metrics import evaluate, top_k_run
from diffembed.eval.report import write_results

METRICS = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "mrr@10")
QUERY_BLOCK = 256  # queries scored against all chunks at once (bounds the (Q, M) score matrix)
CHUNK_OVERFETCH = 4  # Qdrant: chunks fetched per wanted document before keeping each document's best chunk


def load_tasks(cfg: EvalConfig) -> dict[str, RetrievalData]:
    """Read (and so validate) every BEIR task before any model is loaded: bad data fails in seconds."""
    return {
        t.name: load_beir(t.path, t.split, name=t.name, max_queries=t.max_queries)
        for t in cfg.tasks
        if t.kind == "beir"
    }


def _texts(data: RetrievalData) -> tuple[list[str], list[str], list[str | None]]:
    """(doc ids, texts, titles) of the documents that have text; empty ones can never be retrieved."""
    ids = [d for d, text in data.corpus.items() if text.strip()]
    return ids, [data.corpus[d] for d in ids], [data.titles.get(d) for d in ids]


# ------------------------------------------------------------------------------------------- backends


def stored_vectors(embedder, data: RetrievalData):
    """(doc ids, what the index stores for them): the batch job's vectors, computed in this process."""
    doc_ids, texts, titles = _texts(data)
    return doc_ids, embedder.encode_document_windows(texts, titles)


def exact_run(embedder, data: RetrievalData, top_k: int, instruction: str | None = None
              ) -> dict[str, dict[str, float]]:
    """Brute-force cosine retrieval over what the index would store (the document policy's vectors); a
    document scores as its best vector (its only one unless the policy is `best`)."""
    doc_ids, stored = stored_vectors(embedder, data)
    qids = list(data.queries)
    if not doc_ids:
        return {q: {} for q in qids}
    vectors = _unit(stored.vectors)  # (M, D)
    queries = _unit(embedder.encode_queries([data.queries[q] for q in qids], instruction=instruction))  # (Q, D)
    run: dict[str, dict[str, float]] = {}
    for block in range(0, len(qids), QUERY_BLOCK):
        scores = best_window_scores(queries[block : block + QUERY_BLOCK] @ vectors.T, stored.text_index)  # (b, N)
        run.update(top_k_run(scores, qids[block : block + QUERY_BLOCK], doc_ids, top_k))
    return run


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def collection_name(cfg: EvalConfig, data_name: str) -> str:
    raw = f"{cfg.retrieval.store.collection}-{cfg.name}-{data_name}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def store_config(cfg: EvalConfig, data_name: str):
    """The task's collection: the configured store, one collection per task, BM25 on when the mode needs it."""
    store = cfg.retrieval.store
    update: dict[str, Any] = {
        "collection": collection_name(cfg, data_name),
        "sparse": store.sparse or cfg.retrieval.mode != "dense",
    }
    if not store.url and "path" not in store.model_fields_set:
        update["path"] = str(Path(cfg.output_dir) / "qdrant")
    return store.model_copy(update=update)


def index_corpus(cfg: EvalConfig, data: RetrievalData, store_cfg, progress: bool = False) -> dict[str, Any]:
    """Write the task's corpus into its collection through the embed_corpus batch job (Ray Data)."""
    from diffembed.batch.config import EmbedCorpusConfig, InputConfig
    from diffembed.batch.pipeline import embed_corpus, model_dimension
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.index.store import open_store

    doc_ids, texts, titles = _texts(data)
    with open_store(store_cfg) as store:
        exists = store.exists()
        if exists and not cfg.retrieval.reuse_collections:
            store.drop()  # stale vectors would score a different model
        elif exists:
            dim = model_dimension(cfg.embedder)  # size, distance, BM25, embedding function: ConfigError if unfit
            store.ensure_collection(dim, embedding_fingerprint(cfg.embedder, dim, store_cfg.distance, store_cfg.sparse))
            if len(store.complete_docs(doc_ids)) == len(doc_ids):
                return {"collection": store_cfg.collection, "reused": True, "documents": len(doc_ids)}
    corpus_file = Path(cfg.output_dir) / "corpora" / f"{collection_name(cfg, data.name)}.jsonl"
    corpus_file.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus_file, "w", encoding="utf-8") as f:
        for doc_id, text, title in zip(doc_ids, texts, titles):
            f.write(json.dumps({"id": doc_id, "text": text, "title": title}) + "\n")
    job = EmbedCorpusConfig(
        embedder=cfg.embedder,
        input=InputConfig(paths=[str(corpus_file)], format="jsonl", id_column="id", text_column="text",
                          title_column="title"),
        encode=cfg.retrieval.encode,
        store=store_cfg,
        skip_existing=True,
    )
    return embed_corpus(job, progress=progress)


def search_run(cfg: EvalConfig, embedder, data: RetrievalData, store_cfg, instruction: str | None = None
               ) -> dict[str, dict[str, float]]:
    """Every query through the store interface's `search` (dense, sparse or hybrid), each document's best chunk."""
    from diffembed.index.store import open_store

    mode, top_k = cfg.retrieval.mode, cfg.retrieval.top_k
    qids = list(data.queries)
    dense = None
    if mode != "sparse":
        dense = embedder.encode_queries([data.queries[q] for q in qids], instruction=instruction)  # (Q, D)
    run: dict[str, dict[str, float]] = {}
    with open_store(store_cfg) as store:
        points = store.count()
        for i, qid in enumerate(qids):
            run[qid] = _best_chunk_per_doc(
                store, None if dense is None else dense[i], data.queries[qid], top_k, mode, points
            )
    return run


def _best_chunk_per_doc(store, dense, text: str, top_k: int, mode: str, points: int) -> dict[str, float]:
    """Each document's best point, top_k documents; fetches more points until top_k documents are found."""
    limit = top_k * CHUNK_OVERFETCH
    while True:
        hits = store.search(dense, text, top_k=limit, mode=mode)  # best first
        best = best_hits(hits, top_k)
        if len(best) >= top_k or len(hits) < limit or limit >= points:
            return {hit.doc_id: hit.score for hit in best}
        limit *= 2


# ------------------------------------------------------------------------------------------- the job


def _entry(data: RetrievalData, run: dict[str, dict[str, float]]) -> dict[str, Any]:
    metrics = evaluate(data.qrels, run)
    return {**{m: metrics[m] for m in METRICS}, "queries": len(data.queries), "documents": len(data.corpus)}


def _average(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: float(np.mean([e[m] for e in entries])) for m in METRICS}
    out["queries"] = sum(e["queries"] for e in entries)
    out["documents"] = sum(e["documents"] for e in entries)
    return out


def _datasets(task: TaskConfig, beir: dict[str, RetrievalData], tokenizer) -> list[RetrievalData]:
    if task.kind == "beir":
        return [beir[task.name]]
    from diffembed.eval.synthetic import synthetic_tasks

    return synthetic_tasks(task, tokenizer)


def run_evaluation(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Score `cfg.embedder` on every task; writes <output_dir>/results.json and results.md, returns the results.

    `tasks` holds one entry per BEIR task, and for a synthetic task one per length ('passkey@256') plus
    the task's own entry averaged over its lengths; `primary` names each entry's headline metric
    (nDCG@10 for BEIR, nDCG@1 for passkey/needle) with its value. With `compute.num_gpus` or
    `compute.resources` set, the work runs as one Ray task on a node that has them (a GPU worker rather than
    the CPU head node a submitted job's driver runs on); the results come back and are written here.
    """
    started = time.perf_counter()
    beir = load_tasks(cfg)  # ConfigError on bad data, before any model loads or any node is asked for
    if not cfg.compute.remote:
        results = _evaluate_here(cfg, beir, progress)
    else:
        import ray

        if not ray.is_initialized():
            ray.init()
        task = ray.remote(max_retries=0, **cfg.compute.ray_remote_args())(_evaluate_here)
        results = ray.get(task.remote(cfg, beir, progress))  # the data travels with the task
        results["compute"] = {"ray_task": True, **cfg.compute.bundle()}
    results["wall_s"] = round(time.perf_counter() - started, 2)
    write_results(results, cfg.output_dir)
    return results


def _evaluate_here(cfg: EvalConfig, beir: dict[str, RetrievalData], progress: bool = True) -> dict[str, Any]:
    """The evaluation itself, wherever it runs; `beir` holds the BEIR tasks already read and checked."""
    from diffembed.models.embedder import Embedder

    embedder = Embedder(cfg.embedder)
    tasks: dict[str, dict[str, Any]] = {}
    primary: dict[str, tuple[str, float]] = {}
    timing: dict[str, float] = {}
    indexing: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks:
        entries = []
        for data in _datasets(task, beir, embedder.tokenizer):
            t0 = time.perf_counter()
            if cfg.retrieval.backend == "exact":
                run = exact_run(embedder, data, cfg.retrieval.top_k, task.instruction)
            else:
                store_cfg = store_config(cfg, data.name)
                indexing[data.name] = index_corpus(cfg, data, store_cfg)
                run = search_run(cfg, embedder, data, store_cfg, task.instruction)
            entry = tasks[data.name] = _entry(data, run)
            primary[data.name] = (task.primary_metric, entry[task.primary_metric])
            timing[data.name] = round(time.perf_counter() - t0, 2)
            entries.append(entry)
            if progress:
                print(f"eval {data.name}: {entry['documents']} documents, {entry['queries']} queries: "
                      f"{task.primary_metric} {entry[task.primary_metric]:.4f} ({timing[data.name]} s)", flush=True)
        if task.synthetic:
            entry = tasks[task.name] = _average(entries)
            primary[task.name] = (task.primary_metric, entry[task.primary_metric])
    resolved = embedder.config
    results: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.embedder.model,
        "tasks": tasks,
        "primary": primary,
        "embedder": resolved.model_dump(mode="json"),
        "retrieval": {
            "backend": cfg.retrieval.backend,
            "mode": cfg.retrieval.mode,
            "top_k": cfg.retrieval.top_k,
            "documents": resolved.documents.model_dump(mode="json"),
            "max_length": resolved.max_length,
        },
        "timing_s": timing,
        **({"indexing": indexing} if indexing else {}),
    }
    return results
