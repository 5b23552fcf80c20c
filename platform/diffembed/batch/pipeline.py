"""Corpus -> Qdrant: read (Ray Data) -> skip what is already indexed -> encode on an actor pool -> upsert.

Idempotent and resumable: point ids are uuid5(collection, doc_id, chunk), a document counts as present only
when all its chunks are, and documents that are partly present (a crash mid-document) are deleted and
rewritten. Writes go through the driver, the one process allowed to open a local-mode Qdrant path; against a
Qdrant server the same code runs unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.batch.config import EmbedCorpusConfig
from diffembed.config import EmbedderConfig

log = logging.getLogger(__name__)


class EncodeActor:
    """A Ray Data actor: loads the Embedder once, turns a batch of documents into one row per chunk."""

    def __init__(self, embedder: dict[str, Any], long_documents: str, store_text: bool):
        from diffembed.models.embedder import Embedder

        self.embedder = Embedder(EmbedderConfig.model_validate(embedder))
        self.chunk = long_documents == "chunk"
        self.store_text = store_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        texts = [str(t) for t in batch["text"]]
        chunks = self.embedder.encode_document_chunks(texts, chunk=self.chunk)
        src = chunks.text_index  # (M,) which document each chunk belongs to
        n_chunks = np.bincount(src, minlength=len(texts))  # (N,)
        token_counts = chunks.token_spans[:, 1] - chunks.token_spans[:, 0]
        return {
            "doc_id": batch["doc_id"][src],
            "title": batch["title"][src],
            "meta": batch["meta"][src],
            "chunk_index": chunks.chunk_index,
            "n_chunks": n_chunks[src],
            "token_start": chunks.token_spans[:, 0],
            "token_end": chunks.token_spans[:, 1],
            "char_start": chunks.char_spans[:, 0],
            "char_end": chunks.char_spans[:, 1],
            "tokens": token_counts,
            "text": np.array(
                [texts[i][s:e] for i, (s, e) in zip(src, chunks.char_spans)], dtype=object
            ),
            "vector": chunks.vectors,  # (M, D) float32
        }


_PENDING: dict[str, set[str]] = {}


def _keep_pending(batch: dict[str, np.ndarray], pending_ref) -> dict[str, np.ndarray]:
    """Rows still to embed; the pending-id set is fetched once per worker process, not once per row."""
    import ray

    key = pending_ref.hex()
    if key not in _PENDING:
        _PENDING.clear()
        _PENDING[key] = ray.get(pending_ref)
    pending = _PENDING[key]
    keep = np.array([not s and str(d) in pending for d, s in zip(batch["doc_id"], batch["skip"])], dtype=bool)
    return {k: v[keep] for k, v in batch.items() if k != "skip"}


def model_dimension(cfg: EmbedderConfig) -> int:
    """The output size, read from config.json so the driver never loads the (possibly 7B) model."""
    from diffembed.models.loading import read_json, resolve_model_path

    raw = read_json(resolve_model_path(cfg.model) / "config.json")
    width = raw.get("hidden_size") or raw.get("d_model")
    return int(cfg.dimensions or width)


def embed_corpus(cfg: EmbedCorpusConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster; returns (and optionally writes) the summary."""
    import ray
    import ray.data

    from diffembed.batch.reading import read_corpus
    from diffembed.index.store import ChunkRecord, QdrantStore

    started = time.perf_counter()
    dim = model_dimension(cfg.embedder)
    ds = read_corpus(cfg.input)  # validates inputs and columns before anything is written
    store = QdrantStore(cfg.store)
    try:
        store.ensure_collection(dim)  # a dimension mismatch fails here, before any write
        if not ray.is_initialized():
            ray.init()

        # Pass 1 (cheap: no model): which documents still need embedding.
        skipped: Counter[str] = Counter()
        skip_examples: list[str] = []
        pending: set[str] = set()
        already = 0
        for batch in ds.select_columns(["doc_id", "skip", "where"]).iter_batches(batch_size=1024):
            ids = []
            for doc_id, skip, where in zip(batch["doc_id"], batch["skip"], batch["where"]):
                if skip:
                    skipped[skip] += 1
                    if len(skip_examples) < 10:
                        skip_examples.append(f"{where}: {skip}")
                else:
                    ids.append(str(doc_id))
            done = store.complete_docs(ids) if cfg.skip_existing else set()
            already += len(done)
            todo = [i for i in ids if i not in done]
            store.delete_docs(todo)  # leftovers of a document cut off by a crash
            pending.update(todo)

        # Pass 2: encode what is pending on the actor pool, write through this process.
        pending_ref = ray.put(pending)
        todo_ds = ds.select_columns(["doc_id", "text", "title", "meta", "skip"]).map_batches(
            lambda batch: _keep_pending(batch, pending_ref), batch_format="numpy"
        )
        encoded = todo_ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "embedder": cfg.embedder.model_dump(mode="json"),
                "long_documents": cfg.encode.long_documents,
                "store_text": cfg.store.store_text,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.encode.actors),
            batch_size=cfg.encode.batch_size,
            num_gpus=cfg.encode.num_gpus_per_actor or None,
            num_cpus=cfg.encode.cpus_per_actor,
            batch_format="numpy",
        )
        docs, chunks, tokens = set(), 0, 0
        with store.bulk_load():
            for batch in encoded.iter_batches(batch_size=cfg.store.upsert_batch_size, batch_format="numpy"):
                records = [
                    ChunkRecord(
                        doc_id=str(batch["doc_id"][i]),
                        chunk_index=int(batch["chunk_index"][i]),
                        n_chunks=int(batch["n_chunks"][i]),
                        vector=np.asarray(batch["vector"][i], dtype=np.float32),
                        token_span=(int(batch["token_start"][i]), int(batch["token_end"][i])),
                        char_span=(int(batch["char_start"][i]), int(batch["char_end"][i])),
                        text=str(batch["text"][i]),
                        title=batch["title"][i] if isinstance(batch["title"][i], str) else None,
                        metadata=json.loads(batch["meta"][i]),
                    )
                    for i in range(len(batch["doc_id"]))
                ]
                store.upsert(records)
                docs.update(r.doc_id for r in records)
                chunks += len(records)
                tokens += int(batch["tokens"].sum())
                print(f"progress: {chunks} chunks of {len(docs)} documents written", flush=True)
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
