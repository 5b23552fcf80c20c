"""The evaluation job: an embedder scored on BEIR-layout datasets and LongEmbed-style synthetic tasks.

Every task becomes a `RetrievalData` (documents, judged queries, qrels); documents are retrieved either
exactly in this process or through the platform's own path (the embed_corpus batch job into Qdrant, then
the store interface's `search`), and the run is scored with pytrec_eval. Long documents are handled as in the batch
job and the service: the embedder's document policy (`embedder.documents`) decides a document's vector(s) —
its first window, its windows averaged, or every window (`best`) / late-chunked chunk (`late_chunk`) with the
document scored from its windows' scores as `documents.aggregate` says (best, first_prior, softmax). Both
backends rank by cosine similarity (MaxSim for a multivector embedder, `mask_vectors: multi`), so they agree on
the same data. Through the store, the candidate documents are those of the points a search retrieved
(over-fetched); for first_prior / softmax the points a candidate needs and the search missed (its first chunk /
its other chunks) are scored exactly by one more search filtered to them (`document_points`; in hybrid mode
fused scores are rank-based, so only the retrieved points count and a missing first chunk counts 0).

Hybrid search fuses dense and BM25 by `retrieval.fusion` (rrf, dbsf, weighted), or by the collection's stored
setting. `retrieval.tune_fusion` first scores every fusion on each BEIR task's dev split from one pair of
dense and BM25 lists per query (fused here with `diffembed.index.fusion.fuse`, which the stores' own fusion
equals), stores the best with the task's collection and then scores the test split through the store, which
now uses it by default.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.config import ConfigError
from diffembed.documents import aggregate_hits, policy_scores
from diffembed.eval.beir import RetrievalData, beir_root, load_beir, read_beir_corpus, split_qrels
from diffembed.eval.config import EvalConfig, TaskConfig
from diffembed.eval.metrics import evaluate, top_k_run
from diffembed.eval.report import write_results
from diffembed.files import is_uri, join

METRICS = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "mrr@10")
QUERY_BLOCK = 256  # queries scored against all chunks at once (bounds the (Q, M) score matrix)
MAXSIM_BLOCK = 1 << 24  # multivectors: query-vector x document-vector dot products held at once (64 MiB)


def load_tasks(cfg: EvalConfig) -> tuple[dict[str, RetrievalData], dict[str, RetrievalData]]:
    """Read (and so check) every BEIR task before any model is loaded: bad data fails in seconds.

    Returns the scored splits and, with `retrieval.tune_fusion`, the tuning splits (ConfigError when a task has
    none); both share their task's corpus, read once. The exact backend holds the corpus texts (it encodes them
    in this process); the store backend only the document ids: the batch job reads the documents from the
    corpus file itself, so a corpus of millions of documents is never held here or shipped to a remote task.
    Except for a local folder when the evaluation runs as a remote task (`compute`): the folder is on this
    node, so its texts are read here and travel with the task (a URI is read where the task runs).
    """
    tune, tune_split = cfg.retrieval.tune_fusion, cfg.retrieval.tune_split
    scored: dict[str, RetrievalData] = {}
    tuning: dict[str, RetrievalData] = {}
    for t in cfg.tasks:
        if t.kind != "beir":
            continue
        if tune and tune_split == t.split:
            raise ConfigError(f"task {t.name!r}: tune_split {tune_split!r} is the scored split; tune on another (dev)")
        root = beir_root(t.path)
        texts = cfg.retrieval.backend == "exact" or (cfg.compute.remote and not is_uri(root))
        for split in [t.split, *([tune_split] if tune else [])]:
            split_qrels(root, split)  # a missing split fails before the corpus is read
        corpus = read_beir_corpus(join(root, "corpus.jsonl"), texts=texts)
        if corpus.batch_input() is None and not texts:  # the batch job cannot read this file: hold and pass texts
            corpus = read_beir_corpus(join(root, "corpus.jsonl"), texts=True)
        scored[t.name] = load_beir(root, t.split, name=t.name, max_queries=t.max_queries, corpus=corpus)
        if tune:
            tuning[t.name] = load_beir(root, tune_split, name=t.name, corpus=corpus)
    return scored, tuning


def _texts(data: RetrievalData) -> tuple[list[str], list[str], list[str | None]]:
    """(doc ids, texts, titles) of the documents that have text; empty ones can never be retrieved."""
    if data.corpus is None:
        raise ValueError(f"{data.name}: read without its texts (load_beir(texts=False))")
    ids = data.text_ids
    return ids, [data.corpus[d] for d in ids], [data.titles.get(d) for d in ids]


# ------------------------------------------------------------------------------------------- backends


def stored_vectors(embedder, data: RetrievalData):
    """(doc ids, what the index stores for them): the batch job's vectors, computed in this process."""
    doc_ids, texts, titles = _texts(data)
    return doc_ids, embedder.encode_document_windows(texts, titles)


def exact_run(embedder, data: RetrievalData, top_k: int, instruction: str | None = None
              ) -> dict[str, dict[str, float]]:
    """Brute-force cosine retrieval over what the index would store (the document policy's vectors); a
    document of several vectors (`best`, `late_chunk`) scores as the policy's `aggregate` says."""
    return exact_runs(embedder, data, top_k, instruction)[None]


def exact_runs(embedder, data: RetrievalData, top_k: int, instruction: str | None = None,
               dimensions: list[int] | tuple[int, ...] = ()) -> dict[int | None, dict[str, dict[str, float]]]:
    """`exact_run` at the full size (key None) and at each Matryoshka prefix size in `dimensions` (the first d
    coordinates, re-normalised), from one encoding of the corpus and queries."""
    doc_ids, stored = stored_vectors(embedder, data)
    qids = list(data.queries)
    width = stored.vectors.shape[-1]
    too_wide = [d for d in dimensions if d > width]
    if too_wide:
        raise ValueError(f"retrieval.dimensions {too_wide} exceed the embedder's {width}")
    if not doc_ids:
        return {d: {q: {} for q in qids} for d in (None, *dimensions)}
    # (Q, D), or (Q, K, D) for a multivector embedder
    all_queries = embedder.encode_queries([data.queries[q] for q in qids], instruction=instruction)
    runs: dict[int | None, dict[str, dict[str, float]]] = {}
    for d in (None, *dimensions):
        vectors = _unit(stored.vectors[..., :d])  # (M, d) or (M, K, d)
        queries = _unit(all_queries[..., :d])  # (Q, d) or (Q, K, d)
        run: dict[str, dict[str, float]] = {}
        for block in range(0, len(qids), QUERY_BLOCK):
            scores = policy_scores(similarities(queries[block : block + QUERY_BLOCK], vectors), stored.text_index,
                                   embedder.config.documents)  # (b, N)
            run.update(top_k_run(scores, qids[block : block + QUERY_BLOCK], doc_ids, top_k))
        runs[d] = run
    return runs


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def similarities(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(Q, M) scores of unit queries against unit stored vectors: dot products of (Q, D) and (M, D), or MaxSim of
    multivectors (Q, Kq, D) and (M, Kd, D) — for each query vector its best dot product with the point's
    vectors, summed — as a multivector collection scores them. Multivectors go in blocks of points, so at most
    about MAXSIM_BLOCK dot products are held at once."""
    if queries.ndim == 2:
        return queries @ vectors.T
    (q, kq, dim), (m, kd, _) = queries.shape, vectors.shape
    flat = queries.reshape(q * kq, dim)  # (Q*Kq, D)
    out = np.empty((q, m), dtype=np.float32)
    step = max(1, MAXSIM_BLOCK // max(1, q * kq * kd))  # points per block
    for start in range(0, m, step):
        block = vectors[start : start + step]  # (b, Kd, D)
        dots = (flat @ block.reshape(-1, dim).T).reshape(q, kq, len(block), kd)  # (Q, Kq, b, Kd)
        out[:, start : start + len(block)] = dots.max(axis=3).sum(axis=1)  # (Q, b)
    return out


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

    doc_ids = data.text_ids
    with open_store(store_cfg) as store:
        exists = store.exists()
        if exists and not cfg.retrieval.reuse_collections:
            store.drop()  # stale vectors would score a different model
        elif exists:
            dim = model_dimension(cfg.embedder)  # size, distance, BM25, embedding function: ConfigError if unfit
            store.ensure_collection(dim, embedding_fingerprint(cfg.embedder, dim, store_cfg.distance, store_cfg.sparse))
            if len(store.complete_docs(doc_ids)) == len(doc_ids):
                return {"collection": store_cfg.collection, "reused": True, "documents": len(doc_ids)}
    if data.corpus is None:  # read without texts: the job reads the BEIR corpus file itself
        source = InputConfig(**data.batch_input)
    else:  # documents held here (synthetic tasks, a local BEIR folder of a remote evaluation): written for the job
        corpus_file = Path(cfg.output_dir) / "corpora" / f"{collection_name(cfg, data.name)}.jsonl"
        corpus_file.parent.mkdir(parents=True, exist_ok=True)
        with open(corpus_file, "w", encoding="utf-8") as f:
            for doc_id, text, title in zip(*_texts(data)):
                f.write(json.dumps({"id": doc_id, "text": text, "title": title}) + "\n")
        source = InputConfig(paths=[str(corpus_file)], format="jsonl", id_column="id", text_column="text",
                             title_column="title")
    job = EmbedCorpusConfig(
        embedder=cfg.embedder,
        input=source,
        encode=cfg.retrieval.encode,
        store=store_cfg,
        skip_existing=True,
    )
    return embed_corpus(job, progress=progress)


def search_run(cfg: EvalConfig, embedder, data: RetrievalData, store_cfg, instruction: str | None = None
               ) -> dict[str, dict[str, float]]:
    """Every query through the store interface's `search` (dense, sparse or hybrid), each document's chunks
    aggregated under the embedder's document policy (`aggregate_hits`)."""
    from diffembed.index.store import open_store, search_documents

    mode, top_k = cfg.retrieval.mode, cfg.retrieval.top_k
    qids = list(data.queries)
    dense = None
    if mode != "sparse":
        dense = embedder.encode_queries([data.queries[q] for q in qids], instruction=instruction)  # (Q, [K,] D)
    run: dict[str, dict[str, float]] = {}
    policy = embedder.config.documents
    # None: the collection's stored (tuned) fusion, as the service would search it
    fusion = {"fusion": cfg.retrieval.fusion, "dense_weight": cfg.retrieval.dense_weight} if mode == "hybrid" else {}
    with open_store(store_cfg) as store:
        for i, qid in enumerate(qids):
            ranked = search_documents(store, None if dense is None else dense[i], data.queries[qid], top_k, mode,
                                      policy, **fusion)
            run[qid] = {hit.doc_id: score for hit, score in ranked}
    return run


def used_fusion(cfg: EvalConfig, store_cfg) -> dict[str, Any]:
    """The fusion a hybrid `search_run` used: the config's, else the collection's stored one, else RRF."""
    from diffembed.index.fusion import resolve
    from diffembed.index.store import open_store

    with open_store(store_cfg) as store:
        used = resolve(store.search_settings(), cfg.retrieval.fusion, cfg.retrieval.dense_weight)
    return used.model_dump(mode="json")


def fusion_grid(cfg: EvalConfig) -> list[Any]:
    """The settings `tune_fusion` tries, in tie-breaking order (rrf first: the default wins a tie)."""
    from diffembed.index.fusion import FusionSettings

    return [FusionSettings(fusion="rrf"), FusionSettings(fusion="dbsf")] + [
        FusionSettings(fusion="weighted", dense_weight=w) for w in sorted(set(cfg.retrieval.fusion_weights))
    ]


def tune_fusion(cfg: EvalConfig, embedder, dev: RetrievalData, store_cfg, instruction: str | None = None
                ) -> dict[str, Any]:
    """Score every fusion of `fusion_grid` on the dev queries, store the best with the collection, return the grid.

    Each query's dense and BM25 point lists are fetched once, as deep as a hybrid search prefetches them, and
    fused here (`fuse_hits`, the stores' own fusion), then each document's points are aggregated as in
    `search_run` (a fused score is rank-based: a first chunk outside the fused list counts 0 for first_prior).
    """
    from diffembed.index.store import CHUNK_OVERFETCH, HYBRID_PREFETCH, fuse_hits, open_store

    top_k = cfg.retrieval.top_k
    limit = top_k * CHUNK_OVERFETCH  # points a hybrid search asks for
    qids = list(dev.queries)
    dense = embedder.encode_queries([dev.queries[q] for q in qids], instruction=instruction)  # (Q, [K,] D)
    grid = fusion_grid(cfg)
    policy = embedder.config.documents
    runs: list[dict[str, dict[str, float]]] = [{} for _ in grid]
    with open_store(store_cfg) as store:
        for i, qid in enumerate(qids):
            text = dev.queries[qid]
            dense_hits = store.search(dense[i], None, top_k=HYBRID_PREFETCH * limit, mode="dense")
            sparse_hits = store.search(None, text, top_k=HYBRID_PREFETCH * limit, mode="sparse")
            for run, settings in zip(runs, grid):
                fused = fuse_hits(dense_hits, sparse_hits, settings, limit)
                run[qid] = {h.doc_id: score for h, score in aggregate_hits(fused, top_k, policy)}
        rows = [{"fusion": s.fusion, "dense_weight": s.dense_weight if s.fusion == "weighted" else None,
                 "ndcg@10": evaluate(dev.qrels, run)["ndcg@10"]} for s, run in zip(grid, runs)]
        best = max(range(len(grid)), key=lambda j: (rows[j]["ndcg@10"], -j))  # first of equals: rrf before others
        chosen = grid[best].model_copy(update={"tuned_on": f"{dev.name}/{dev.meta.get('split')}",
                                               "ndcg_at_10": round(rows[best]["ndcg@10"], 6)})
        store.set_search_settings(chosen)
    return {"split": dev.meta.get("split"), "queries": len(qids), "grid": rows,
            "chosen": chosen.model_dump(mode="json")}


# ------------------------------------------------------------------------------------------- the job


def _entry(data: RetrievalData, run: dict[str, dict[str, float]]) -> dict[str, Any]:
    metrics = evaluate(data.qrels, run)
    return {**{m: metrics[m] for m in METRICS}, "queries": len(data.queries), "documents": data.size}


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
    beir, dev = load_tasks(cfg)  # ConfigError on bad data, before any model loads or any node is asked for
    if not cfg.compute.remote:
        results = _evaluate_here(cfg, beir, progress, dev)
    else:
        import ray

        if not ray.is_initialized():
            ray.init()
        task = ray.remote(max_retries=0, **cfg.compute.ray_remote_args())(_evaluate_here)
        results = ray.get(task.remote(cfg, beir, progress, dev))  # the data travels with the task
        results["compute"] = {"ray_task": True, **cfg.compute.bundle()}
    results["wall_s"] = round(time.perf_counter() - started, 2)
    write_results(results, cfg.output_dir)
    return results


def _evaluate_here(cfg: EvalConfig, beir: dict[str, RetrievalData], progress: bool = True,
                   dev: dict[str, RetrievalData] | None = None) -> dict[str, Any]:
    """The evaluation itself, wherever it runs; `beir` holds the BEIR tasks already read and checked, `dev`
    their tuning splits (with `retrieval.tune_fusion`)."""
    from diffembed.models.embedder import Embedder

    embedder = Embedder(cfg.embedder)
    tasks: dict[str, dict[str, Any]] = {}
    primary: dict[str, tuple[str, float]] = {}
    timing: dict[str, float] = {}
    indexing: dict[str, dict[str, Any]] = {}
    tuning: dict[str, dict[str, Any]] = {}
    fusion_used: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks:
        entries = []
        for data in _datasets(task, beir, embedder.tokenizer):
            t0 = time.perf_counter()
            by_dimension: dict[str, dict[str, Any]] = {}
            if cfg.retrieval.backend == "exact":
                runs = exact_runs(embedder, data, cfg.retrieval.top_k, task.instruction, cfg.retrieval.dimensions)
                run = runs.pop(None)
                by_dimension = {str(d): _entry(data, r) for d, r in runs.items()}
            else:
                store_cfg = store_config(cfg, data.name)
                indexing[data.name] = index_corpus(cfg, data, store_cfg, progress)
                if dev and task.name in dev:
                    tuning[data.name] = tune_fusion(cfg, embedder, dev[task.name], store_cfg, task.instruction)
                    if progress:
                        chosen = tuning[data.name]["chosen"]
                        print(f"tune {data.name}: {_setting_label(chosen)} (dev nDCG@10 {chosen['ndcg_at_10']:.4f})",
                              flush=True)
                run = search_run(cfg, embedder, data, store_cfg, task.instruction)
                if cfg.retrieval.mode == "hybrid":
                    fusion_used[data.name] = used_fusion(cfg, store_cfg)
            entry = tasks[data.name] = _entry(data, run)
            if by_dimension:
                entry["by_dimension"] = by_dimension
                if progress:
                    sizes = ", ".join(f"{d}: {e[task.primary_metric]:.4f}" for d, e in by_dimension.items())
                    print(f"eval {data.name}: {task.primary_metric} by dimension {sizes}", flush=True)
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
            **({"fusion": fusion_used} if fusion_used else {}),
        },
        "timing_s": timing,
        **({"indexing": indexing} if indexing else {}),
        **({"fusion_tuning": tuning} if tuning else {}),
    }
    return results


def _setting_label(setting: dict[str, Any]) -> str:
    if setting["fusion"] == "weighted":
        return f"weighted (dense_weight {setting['dense_weight']:g})"
    return setting["fusion"]
