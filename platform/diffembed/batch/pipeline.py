"""Corpus -> Qdrant: read (Ray Data) -> skip what is already indexed -> encode on an actor pool -> upsert.

Idempotent and resumable: point ids are uuid5(collection, doc_id, chunk), a document counts as present only
when all its chunks are, and documents that are partly present (a crash mid-document) are deleted and
rewritten. Writes go through the driver, the one process holding the embedded (Edge) store open; against a
Qdrant server the same code runs unchanged. The collection carries the embedding fingerprint: a rerun with
another embedding function stops before writing (or, with `recreate`, starts the collection over).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.batch.config import EmbedCorpusConfig
from diffembed.config import EmbedderConfig

log = logging.getLogger(__name__)


class EncodeActor:
    """A Ray Data actor: loads the Embedder once, turns a batch of documents into one row per stored point
    (per document, or per window under the `best` document policy).

    Rows that cannot be embedded come out as one marker row (`chunk_index` -1, `skip` set) so the driver
    counts them; documents in the `done` set (already fully indexed) are dropped.
    """

    def __init__(self, embedder: dict[str, Any], threads: int, done=None):
        import ray
        import torch

        from diffembed.models.embedder import Embedder

        # Ray pins an actor to OMP_NUM_THREADS=num_cpus (1): on CPU the encoder would use one core while the
        # rest of the pipeline (reading, writing) needs next to none. Give torch the cores we were told to.
        torch.set_num_threads(threads)
        self.embedder = Embedder(EmbedderConfig.model_validate(embedder))
        self.done: set[str] = ray.get(done) if done is not None else set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        skip = np.array([bool(s) for s in batch["skip"]], dtype=bool)
        todo = np.array([not s and str(d) not in self.done for d, s in zip(batch["doc_id"], batch["skip"])],
                        dtype=bool)
        texts = [str(t) for t in batch["text"][todo]]
        titles = [t if isinstance(t, str) else None for t in batch["title"][todo]]
        chunks = self.embedder.encode_document_windows(texts, titles)  # the document policy decides the points
        rows = np.flatnonzero(todo)[chunks.text_index]  # (M,) batch row of each chunk
        marks = np.flatnonzero(skip)  # (K,) batch rows reported as skipped
        n_chunks = np.bincount(chunks.text_index, minlength=len(texts))[chunks.text_index]  # (M,)
        k, dim = len(marks), self.embedder.dimension
        take = np.concatenate([rows, marks]).astype(np.int64)  # (M + K,)

        def ints(values: np.ndarray) -> np.ndarray:
            return np.concatenate([values.astype(np.int64), np.full(k, -1, dtype=np.int64)])

        return {
            "doc_id": batch["doc_id"][take],
            "title": batch["title"][take],
            "meta": batch["meta"][take],
            "skip": batch["skip"][take],
            "where": batch["where"][take],
            "chunk_index": ints(chunks.chunk_index),
            "n_chunks": ints(n_chunks),
            "token_start": ints(chunks.token_spans[:, 0]),
            "token_end": ints(chunks.token_spans[:, 1]),
            "char_start": ints(chunks.char_spans[:, 0]),
            "char_end": ints(chunks.char_spans[:, 1]),
            "text": np.array([texts[i][s:e] for i, (s, e) in zip(chunks.text_index, chunks.char_spans)]
                             + [""] * k, dtype=object),
            "vector": np.concatenate([chunks.vectors, np.zeros((k, dim), dtype=np.float32)]),  # (M + K, D)
        }


def model_dimension(cfg: EmbedderConfig) -> int:
    """The output size, read from config.json so the driver never loads the (possibly 7B) model."""
    from diffembed.models.loading import read_json, resolve_model_path

    raw = read_json(resolve_model_path(cfg.model) / "config.json")
    width = raw.get("hidden_size") or raw.get("d_model")
    return int(cfg.dimensions or width)


def embed_corpus(cfg: EmbedCorpusConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job on the current Ray cluster; returns (and optionally writes) the summary."""
    import ray
    import ray.data

    from diffembed.batch.reading import read_corpus
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.index.store import ChunkRecord, open_store

    started = time.perf_counter()
    dim = model_dimension(cfg.embedder)
    ds = read_corpus(cfg.input)  # validates inputs and columns before anything is written
    fingerprint = embedding_fingerprint(cfg.embedder, dim, cfg.store.distance, cfg.store.sparse)
    store = open_store(cfg.store)
    try:
        if cfg.recreate:
            store.drop()  # an explicit re-embed: the old vectors came from another embedding function
        # a size, distance or embedding-function mismatch fails here, before any write
        store.ensure_collection(dim, fingerprint)
        if not ray.is_initialized():
            ray.init()

        # Pass 1, only when the collection already has points (a rerun): which documents are complete.
        # Partly written ones (a crash mid-document) are deleted here and embedded again.
        done: set[str] = set()
        if cfg.skip_existing and store.count():
            for batch in ds.select_columns(["doc_id", "skip"]).iter_batches(batch_size=1024):
                ids = [str(d) for d, skip in zip(batch["doc_id"], batch["skip"]) if not skip]
                complete = store.complete_docs(ids)
                done |= complete
                store.delete_docs([i for i in ids if i not in complete])

        # Pass 2: encode on the actor pool, write through this process.
        encoded = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "embedder": cfg.embedder.model_dump(mode="json"),
                "threads": cfg.encode.torch_threads or max(1, (os.cpu_count() or 1) // cfg.encode.actors),
                "done": ray.put(done) if done else None,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.encode.actors),
            batch_size=cfg.encode.batch_size,
            **cfg.encode.ray_remote_args(),  # num_cpus, num_gpus, custom resources
            batch_format="numpy",
        )
        docs, chunks, tokens = set(), 0, 0
        skipped: Counter[str] = Counter()
        skip_examples: list[str] = []
        with store.bulk_load():
            for batch in encoded.iter_batches(batch_size=cfg.store.upsert_batch_size, batch_format="numpy"):
                records = []
                for i in range(len(batch["doc_id"])):
                    if batch["chunk_index"][i] < 0:
                        skipped[str(batch["skip"][i])] += 1
                        if len(skip_examples) < 10:
                            skip_examples.append(f"{batch['where'][i]}: {batch['skip'][i]}")
                        continue
                    records.append(ChunkRecord(
                        doc_id=str(batch["doc_id"][i]),
                        chunk_index=int(batch["chunk_index"][i]),
                        n_chunks=int(batch["n_chunks"][i]),
                        vector=np.asarray(batch["vector"][i], dtype=np.float32),
                        token_span=(int(batch["token_start"][i]), int(batch["token_end"][i])),
                        char_span=(int(batch["char_start"][i]), int(batch["char_end"][i])),
                        text=str(batch["text"][i]),
                        title=batch["title"][i] if isinstance(batch["title"][i], str) else None,
                        metadata=json.loads(batch["meta"][i]),
                    ))
                    tokens += int(batch["token_end"][i] - batch["token_start"][i])
                if records:
                    store.upsert(records)
                    docs.update(r.doc_id for r in records)
                    chunks += len(records)
                    if progress:
                        print(f"progress: {chunks} chunks of {len(docs)} documents written", flush=True)
        already = len(done)
        wall = time.perf_counter() - started
        summary = {
            "collection": cfg.store.collection,
            "documents_embedded": len(docs),
            "documents_already_present": already,
            "chunks_written": chunks,
            "tokens": tokens,
            "skipped_rows": sum(skipped.values()),
            "skipped_by_reason": dict(skipped),
            "skipped_examples": skip_examples,
            "points_in_collection": store.count(),
            "wall_s": round(wall, 2),
            "docs_per_s": round(len(docs) / wall, 2) if wall else 0.0,
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        }
    finally:
        store.close()
    if cfg.summary_path:
        Path(cfg.summary_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.summary_path).expanduser().write_text(json.dumps(summary, indent=2))
    return summary
