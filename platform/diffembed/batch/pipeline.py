"""Corpus -> Qdrant: read (Ray Data, bounded blocks) -> resume check -> encode (actor pool) -> write (actors).

Idempotent and resumable: point ids are uuid5(collection, doc_id, chunk), a document counts as present only
when all its chunks are, and documents that are partly present (a crash mid-document) are deleted and
rewritten. The check runs per batch against the store, so no set of finished documents is ever built.

Nothing heavy passes through the driver: the encoder actors produce the vectors, the writer stage builds the
points (payloads, BM25 vectors) and upserts them, and only a small summary row per batch reaches the driver,
which orchestrates and reports progress. With the embedded Edge store (one process per path) one `StoreOwner`
actor, on the driver's node (the store is a folder there), holds the store and serves the resume check and the
writes; with a Qdrant server every writer actor talks to the server itself (`store.writers` of them). The
collection carries the embedding fingerprint: a rerun with another embedding function stops before writing
(or, with `recreate`, starts the collection over).

Before the pipeline, a pre-pass over the ids (`diffembed.batch.scan`) finds duplicate ids (the last occurrence
in input order wins; the earlier ones are skipped and counted) and bad rows (`input.bad_rows`: skip and report,
or fail before anything is written). When the collection already held points, the writer also deletes a
rewritten document's points beyond its new chunk count, so a document that got shorter leaves no orphans.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.batch.config import EmbedCorpusConfig
from diffembed.batch.stage import EncoderStage
from diffembed.config import EmbedderConfig
from diffembed.index.config import StoreConfig

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the store's side


class StoreOwner:
    """The one process that holds an embedded (Edge) store during a run: resume checks and writes go here."""

    def __init__(self, cfg: dict[str, Any]):
        from diffembed.index.store import open_store

        self.store = open_store(StoreConfig.model_validate(cfg))
        self._load = self.store.bulk_load()
        self._load.__enter__()

    def complete_and_clear(self, doc_ids: list[str]) -> list[str]:
        return sorted(resume_check(self.store, doc_ids))

    def upsert(self, records: list, stale: dict[str, int] | None = None) -> int:
        write_points(self.store, records, stale)
        return len(records)

    def finish(self) -> int:
        """End the bulk load (Edge: flush and build the index) and close the store; returns the point count."""
        self._load.__exit__(None, None, None)
        count = self.store.count()
        self.store.close()
        return count


def write_points(store, records: list, stale: dict[str, int] | None) -> None:
    """Upsert the points; first delete the chunks >= n of each document `stale` maps to its chunk count n."""
    if stale:
        store.delete_stale_chunks(stale)
    store.upsert(records)


def resume_check(store, doc_ids: list[str]) -> set[str]:
    """The documents among `doc_ids` that are complete; the partly written ones are deleted (to be rewritten)."""
    complete = store.complete_docs(doc_ids)
    store.delete_docs([d for d in doc_ids if d not in complete])
    return complete


class _StoreClient:
    """A stage's way to the store: the owner actor (Edge) or its own connection (server)."""

    def __init__(self, cfg: dict[str, Any], owner):
        self.owner = owner
        self.store = None
        if owner is None:
            from diffembed.index.store import open_store

            self.store = open_store(StoreConfig.model_validate(cfg))

    def complete_and_clear(self, doc_ids: list[str]) -> set[str]:
        if self.owner is not None:
            import ray

            return set(ray.get(self.owner.complete_and_clear.remote(doc_ids)))
        return resume_check(self.store, doc_ids)

    def upsert(self, records: list, stale: dict[str, int] | None = None) -> None:
        """`write_points`, through the owner actor or on this stage's own connection."""
        if self.owner is not None:
            import ray

            ray.get(self.owner.upsert.remote(records, stale))
        else:
            write_points(self.store, records, stale)


STREAM_BLOCK_BYTES = 1 << 20  # Ray Data's block size inside the job (see embed_corpus)
ALREADY = "__already_present__"  # the skip reason of a document the collection holds completely


class ResumeFilter:
    """Marks the documents the collection already holds completely (per batch, against the store) as skipped
    with reason ALREADY, text dropped: they are not embedded, only counted, like any other skipped row."""

    def __init__(self, store: dict[str, Any], owner=None):
        self.client = _StoreClient(store, owner)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(d) for d, s in zip(batch["doc_id"], batch["skip"]) if not s]
        complete = self.client.complete_and_clear(ids) if ids else set()
        done = np.array([not s and str(d) in complete for d, s in zip(batch["doc_id"], batch["skip"])], dtype=bool)
        batch["skip"] = np.where(done, ALREADY, batch["skip"]).astype(object)
        batch["text"] = np.where(done, "", batch["text"]).astype(object)
        return batch


# ------------------------------------------------------------------------------------------ encode and write


class EncodeActor(EncoderStage):
    """A Ray Data actor: loads the Embedder once (`EncoderStage`), turns a batch of documents into one row per
    stored point (per document, or per window / chunk under the `best` / `late_chunk` document policies); a point's
    vector is (D,), or (K, D) for a multivector embedder (`mask_vectors: multi`).

    Rows that cannot be embedded come out as one marker row (`chunk_index` -1, `skip` set) so they are counted.
    """

    def __init__(self, embedder: dict[str, Any], threads: int, simulated_batch_s: float = 0.0):
        super().__init__(embedder, threads)
        self.simulated_batch_s = simulated_batch_s  # bench/embed_corpus_scaling.py's stand-in for a GPU's time

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.simulated_batch_s:
            time.sleep(self.simulated_batch_s)
        skip = np.array([bool(s) for s in batch["skip"]], dtype=bool)
        todo = ~skip
        texts = [str(t) for t in batch["text"][todo]]
        titles = [t if isinstance(t, str) else None for t in batch["title"][todo]]
        chunks = self.embedder.encode_document_windows(texts, titles)  # the document policy decides the points
        rows = np.flatnonzero(todo)[chunks.text_index]  # (M,) batch row of each point
        marks = np.flatnonzero(skip)  # (K,) batch rows reported as skipped
        n_chunks = np.bincount(chunks.text_index, minlength=len(texts))[chunks.text_index]  # (M,)
        k, dim = len(marks), self.embedder.dimension
        shape = (self.embedder.config.mask_tokens, dim) if self.embedder.multivector else (dim,)  # one point's
        take = np.concatenate([rows, marks]).astype(np.int64)  # (M + K,)

        def ints(values: np.ndarray) -> np.ndarray:
            return np.concatenate([values.astype(np.int64), np.full(k, -1, dtype=np.int64)])

        return {
            "doc_id": batch["doc_id"][take],
            "weight": np.where(ints(chunks.chunk_index) <= 0, batch["weight"][take], 0),  # once per document
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
            # (M + K, D), or (M + K, mask_tokens, D) for multivectors
            "vector": np.concatenate([chunks.vectors.reshape(-1, *shape), np.zeros((k, *shape), dtype=np.float32)]),
        }


class WriteActor:
    """Builds the points of a batch and upserts them; returns one summary row (what the driver sees)."""

    def __init__(self, store: dict[str, Any], owner=None, clean_stale: bool = False):
        self.client = _StoreClient(store, owner)
        self.clean_stale = clean_stale  # the collection held points before this run: old chunks may be left

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffembed.batch.reading import DUPLICATE
        from diffembed.index.store import ChunkRecord

        records, skipped, examples, tokens, docs, already, duplicates = [], Counter(), [], 0, 0, 0, 0
        for i in range(len(batch["doc_id"])):
            if batch["chunk_index"][i] < 0:
                reason = str(batch["skip"][i])
                if reason == ALREADY:
                    already += 1
                elif reason == DUPLICATE:
                    duplicates += 1
                else:
                    skipped[reason] += 1
                    examples.append(f"{batch['where'][i]}\t{reason}")
                continue
            doc_id = str(batch["doc_id"][i])
            records.append(ChunkRecord(
                doc_id=doc_id,
                chunk_index=int(batch["chunk_index"][i]),
                n_chunks=int(batch["n_chunks"][i]),
                vector=np.asarray(batch["vector"][i], dtype=np.float32),
                token_span=(int(batch["token_start"][i]), int(batch["token_end"][i])),
                char_span=(int(batch["char_start"][i]), int(batch["char_end"][i])),
                text=str(batch["text"][i]),
                title=batch["title"][i] if isinstance(batch["title"][i], str) else None,
                metadata=json.loads(batch["meta"][i]),
            ))
            docs += int(batch["chunk_index"][i] == 0)  # a document's points may span batches: count it once
            tokens += int(batch["token_end"][i] - batch["token_start"][i])
        if records:
            stale = {r.doc_id: r.n_chunks for r in records} if self.clean_stale else None
            self.client.upsert(records, stale)
        return {
            "documents": np.array([docs], dtype=np.int64),
            "duplicates": np.array([duplicates], dtype=np.int64),
            "weight": np.array([int(batch["weight"].sum())], dtype=np.int64),
            "chunks": np.array([len(records)], dtype=np.int64),
            "tokens": np.array([tokens], dtype=np.int64),
            "already": np.array([already], dtype=np.int64),
            "skipped": np.array([json.dumps(dict(skipped))], dtype=object),
            "examples": np.array([json.dumps(examples[:10])], dtype=object),
        }


# ------------------------------------------------------------------------------------------ the job


def model_dimension(cfg: EmbedderConfig) -> int:
    """The output size, read from config.json so the driver never loads the (possibly 7B) model."""
    from diffembed.models.loading import read_json, resolve_model_path

    raw = read_json(resolve_model_path(cfg.model, weights=False) / "config.json")
    width = raw.get("hidden_size") or raw.get("d_model")
    return int(cfg.dimensions or width)


class Progress:
    """One line every few seconds: documents, points, tokens/s, the share of the input done and an ETA (the
    input's size is known up front: JSONL bytes, Parquet rows, text files)."""

    def __init__(self, enabled: bool, every_s: float = 5.0, total: int = 0):
        self.enabled, self.every_s, self.total = enabled, every_s, total
        self.started = self.last = time.perf_counter()
        self.shown = False
        self.state: tuple = ()  # the counts last printed: the final line is not a repeat of the last one

    def update(self, docs: int, chunks: int, tokens: int, already: int, force: bool = False, *,
               duplicates: int = 0, skipped: int = 0, done: int = 0) -> None:
        """Printed at the first written points, then every `every_s` seconds, and at the end (`force`)."""
        now = time.perf_counter()
        state = (docs, chunks, already, duplicates, skipped, done)
        if not self.enabled or (not force and self.shown and now - self.last < self.every_s) or state == self.state:
            return
        self.shown, self.state = True, state
        self.last = now
        wall = max(now - self.started, 1e-9)
        share = min(done / self.total, 1.0) if self.total else 0.0
        eta = f"ETA {wall * (1 - share) / share:.0f} s" if share > 0 else "ETA ?"
        print(f"progress: {docs} documents embedded ({chunks} points), {already} already present, "
              f"{duplicates} duplicates, {skipped} skipped, {tokens / wall:.0f} tokens/s, "
              f"{100 * share:.0f}% of input, {wall:.0f} s, {eta}", flush=True)


@contextmanager
def actor_restarts_option():
    """Lets the stages pass `max_restarts` to Ray Data's actor pools without a deprecation warning.

    Ray Data's default (-1: restart forever) makes Ray's core worker log an error line at every pool start
    (the pool's constructor arguments live in the object store). Ray 2.60 has no named parameter for it yet:
    its own docs say to pass it as an extra `map_batches` kwarg, which is what is deprecated (for 2.64)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_scan(cfg: EmbedCorpusConfig, scan, units: list[dict[str, Any]]) -> None:
    """Bad rows: fail (one `error: file:line: reason` line) or warn; duplicates: warn, naming the first few."""
    from diffembed.batch.reading import CorpusError, position, unit_files

    if not scan.bad_rows and not scan.duplicate_ids:
        return
    fmt, files = units[0]["format"], unit_files(units)  # the files positions index into
    if scan.bad_rows:
        first = "; ".join(f"{position(fmt, files, o)}: {r}" for o, r in scan.bad_examples[:3])
        if cfg.input.bad_rows == "fail":
            order, reason = scan.bad_examples[0]
            more = f" (and {scan.bad_rows - 1} more bad rows)" if scan.bad_rows > 1 else ""
            raise CorpusError(f"{position(fmt, files, order)}: {reason}{more}; input.bad_rows=skip skips them")
        warn(f"{scan.bad_rows} bad rows skipped (first: {first})")
    if scan.duplicate_ids:
        first = ", ".join(f"{d!r} at " + " and ".join(position(fmt, files, o) for o in orders[:3])
                          for d, orders in scan.duplicate_examples[:3])
        warn(f"{scan.duplicate_ids} duplicate document ids (first: {first}); the last occurrence of each is "
             f"embedded, {scan.duplicate_rows} earlier rows skipped")


def embed_corpus(cfg: EmbedCorpusConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job on the current Ray cluster; returns (and optionally writes) the summary."""
    import ray
    import ray.data

    from diffembed.batch.reading import plan_units, read_corpus, where_to_line
    from diffembed.batch.scan import assign_drops, scan_corpus
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.index.store import open_store
    from diffembed.models.loading import check_model
    from diffembed.placement import on_this_node

    started = time.perf_counter()
    units = plan_units(cfg.input)  # validates inputs and columns before anything is written (or torch imported)
    check_model(cfg.embedder)  # a damaged checkpoint or adapter: one line now, not actor tracebacks
    dim = model_dimension(cfg.embedder)
    fingerprint = embedding_fingerprint(cfg.embedder, dim, cfg.store.distance, cfg.store.sparse)
    if not ray.is_initialized():
        ray.init()
    scan = scan_corpus(units, cfg.input)  # duplicate ids and bad rows, before anything is written
    check_scan(cfg, scan, units)
    ds = read_corpus(cfg.input, assign_drops(units, scan.drop))
    with open_store(cfg.store) as store:  # checked (and created) here, then released for the actors
        if cfg.recreate:
            store.drop()  # an explicit re-embed: the old vectors came from another embedding function
        # a size, distance or embedding-function mismatch fails here, before any write
        store.ensure_collection(dim, fingerprint)
        empty = store.count() == 0

    store_args = cfg.store.model_dump(mode="json")
    owner = None
    if not cfg.store.url:  # Edge: one process holds the store for the whole run
        owner = ray.remote(num_cpus=0, max_restarts=0, **on_this_node())(StoreOwner).remote(store_args)  # its disk
    writers = 1 if owner is not None else cfg.store.writers
    server = open_store(cfg.store) if cfg.store.url else None
    bulk = server.bulk_load() if server is not None else None  # server: indexing paused by the driver
    try:
        if bulk is not None:
            bulk.__enter__()
        with actor_restarts_option():  # max_restarts for every actor stage (see there)
            if cfg.skip_existing and not empty:  # a rerun: per batch, drop what is complete, clear what is partial
                ds = ds.map_batches(ResumeFilter, fn_constructor_kwargs={"store": store_args, "owner": owner},
                                    compute=ray.data.ActorPoolStrategy(size=writers), batch_size=1024,
                                    batch_format="numpy", num_cpus=0, max_restarts=0)
            encoded = ds.map_batches(
                EncodeActor,
                fn_constructor_kwargs={
                    "embedder": cfg.embedder.model_dump(mode="json"),
                    "threads": cfg.encode.torch_threads or max(1, (os.cpu_count() or 1) // cfg.encode.actors),
                    "simulated_batch_s": cfg.encode.simulated_batch_s,
                },
                compute=ray.data.ActorPoolStrategy(size=cfg.encode.actors),
                batch_size=cfg.encode.batch_size,
                **cfg.encode.ray_remote_args(),  # num_cpus, num_gpus, custom resources
                max_restarts=cfg.encode.max_restarts,
                batch_format="numpy",
            )
            written = encoded.map_batches(
                WriteActor, fn_constructor_kwargs={"store": store_args, "owner": owner, "clean_stale": not empty},
                compute=ray.data.ActorPoolStrategy(size=writers), batch_size=cfg.store.upsert_batch_size,
                batch_format="numpy", num_cpus=0,  # light: never take a CPU the readers and encoders need
                max_restarts=0,  # a writer is cheap to lose: the job stops, a rerun resumes
            )
        # Ray Data buffers a task's output up to its target block size (128 MiB) before passing it on: a whole
        # read range would be encoded before the writer saw any of it (no streaming, no progress, no overlap of
        # encoding with writing). Blocks of ~1 MiB keep every stage busy at once.
        written.context.target_max_block_size = STREAM_BLOCK_BYTES
        docs = chunks = tokens = already = duplicates = done = 0
        skipped: Counter[str] = Counter()
        examples: list[str] = []
        meter = Progress(progress, cfg.progress_every_s, total=sum(u["weight"] for u in units))
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            docs += int(batch["documents"].sum())
            duplicates += int(batch["duplicates"].sum())
            done += int(batch["weight"].sum())
            chunks += int(batch["chunks"].sum())
            tokens += int(batch["tokens"].sum())
            already += int(batch["already"].sum())
            for counts, found in zip(batch["skipped"], batch["examples"]):
                skipped.update(json.loads(counts))
                examples.extend(json.loads(found)[: 10 - len(examples)])
            if chunks:
                meter.update(docs, chunks, tokens, already, duplicates=duplicates, skipped=sum(skipped.values()),
                             done=done)
        meter.update(docs, chunks, tokens, already, force=True, duplicates=duplicates,
                     skipped=sum(skipped.values()), done=done)
    finally:
        if bulk is not None:
            bulk.__exit__(*sys.exc_info())
            server.close()
        points = ray.get(owner.finish.remote()) if owner is not None else None
    if points is None:
        with open_store(cfg.store) as store:
            points = store.count()
    wall = time.perf_counter() - started
    summary = {
        "collection": cfg.store.collection,
        "documents_embedded": docs,
        "documents_already_present": already,
        "duplicates": duplicates,  # rows not embedded because a later row has the same id
        "duplicate_ids": scan.duplicate_ids,
        "chunks_written": chunks,
        "tokens": tokens,
        "skipped_rows": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
        "skipped_examples": [f"{where_to_line(w)}: {r}" for w, _, r in (e.partition("\t") for e in examples)],
        "points_in_collection": points,
        "wall_s": round(wall, 2),
        "docs_per_s": round(docs / wall, 2) if wall else 0.0,
        "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
    }
    if cfg.summary_path:
        Path(cfg.summary_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.summary_path).expanduser().write_text(json.dumps(summary, indent=2))
    return summary
