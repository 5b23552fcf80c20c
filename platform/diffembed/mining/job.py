"""Training pairs in, the same rows with mined hard negatives out (`negatives`, as the train job's
`data.hard_negatives` reads them).

Before any encoding, Ray tasks read and check the pairs (`rowfiles.scan_rows`: every bad row named `file:row`; with
`input.bad_rows: fail` the first one stops the job), and with `candidates.source: store` the driver checks the
collection (it exists, holds text, was embedded by this embedder). The rows then stream through an encoder actor
pool (one model load per actor, as the batch job's) that embeds each row's query and positive, and a mining stage
that ranks candidates — the input's own positives by brute-force cosine (`exact`; the pool is built inside the
mining actor), or the collection through `store.search` (dense, BM25 or hybrid; one actor holds an embedded Edge
store) — and picks the negatives (`pick_negatives`: rank window, false-negative filter, seeded draw). The driver
writes the finished rows, every input field kept, in input order as they arrive, to the output's parts
(`mining.output`: a failed run keeps its complete parts and a rerun mines the rest): it holds one batch of rows at a
time, never the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffembed.batch.stage import EncoderStage
from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.mining.config import MineNegativesConfig, NegativesConfig
from diffembed.rowfiles import json_column, scan_rows

SCORE_DECIMALS = 5  # ranks are decided on rounded scores (ties by key): batching noise (~1e-7) cannot reorder them


# ------------------------------------------------------------------------------------------ picking negatives


@dataclass(frozen=True)
class Candidate:
    key: str  # one per document: the collection's doc_id, or the pool row of a positive text
    text: str
    score: float  # dense cosine with the query (the false-negative filter compares it with the positive's)


_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def same_document(candidate: str, positive: str) -> bool:
    """The candidate is the positive, a chunk of it, or holds it (whitespace and case aside)."""
    c, p = _norm(candidate), _norm(positive)
    return bool(c) and (c in p or p in c)


def rank_candidates(candidates: list[Candidate], positive: str, positive_key: str | None = None) -> list[Candidate]:
    """Best first; one per document and per text; never the positive's own document or its chunks."""
    ranked = sorted(candidates, key=lambda c: (-round(c.score, SCORE_DECIMALS), c.key))
    seen_keys, seen_texts, out = set(), set(), []
    for c in ranked:
        text = _norm(c.text)
        if c.key in seen_keys or text in seen_texts or c.key == positive_key or same_document(c.text, positive):
            continue
        seen_keys.add(c.key)
        seen_texts.add(text)
        out.append(c)
    return out


def score_ceiling(positive_score: float, ratio: float) -> float:
    """Scores at or above this are likely unlabelled positives: ratio × the positive's score (for a positive score
    below 0, the same distance below it: positive − (1 − ratio)·|positive|)."""
    return positive_score - (1.0 - ratio) * abs(positive_score)


def row_seed(seed: int, query: str, positive: str) -> int:
    """A generator seed from the row's content: the same row draws the same negatives in any batch or order."""
    digest = hashlib.sha256(f"{seed}\x1f{query}\x1f{positive}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def pick_negatives(ranked: list[Candidate], positive_score: float, cfg: NegativesConfig, seed: int
                   ) -> tuple[list[Candidate], int]:
    """(negatives hardest first, candidates dropped by the false-negative filter) from `rank_candidates`' list."""
    window = ranked[cfg.skip_top : cfg.skip_top + cfg.window]
    ceiling = score_ceiling(positive_score, cfg.max_positive_ratio)
    kept = [c for c in window if c.score < ceiling]
    chosen = sorted(random.Random(seed).sample(range(len(kept)), min(cfg.per_query, len(kept))))
    return [kept[i] for i in chosen], len(window) - len(kept)


# ------------------------------------------------------------------------------------------ reading the pairs


def _problem(row: Any) -> str | None:
    """Why a row cannot be mined for, or None."""
    if isinstance(row, Exception):
        return str(row)
    if not isinstance(row, dict):
        return "row is not an object"
    for key in ("query", "positive"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"missing or empty {key!r}"
    if row.get("instruction") is not None and not isinstance(row["instruction"], str):
        return "'instruction' must be a string"
    return None


def mining_columns(row: Any) -> dict[str, Any]:
    """The row check of `rowfiles.scan_rows`: the fields mining reads and the whole row as JSON (written back with
    its negatives), or ValueError with why the row cannot be mined for."""
    problem = _problem(row)
    if problem is not None:
        raise ValueError(problem)
    return {"query": row["query"], "positive": row["positive"], "instruction": row.get("instruction") or "",
            "row": json_column(row)}


# ------------------------------------------------------------------------------------------ the Ray Data stages


class EncodePairs(EncoderStage):
    """A Ray Data actor: loads the Embedder once (`EncoderStage`); each row's query vector (with its instruction)
    and positive vector (one `first` window, as training embeds it), unit length."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.embedder
        queries, positives = list(batch["query"]), list(batch["positive"])
        instructions = [i if isinstance(i, str) and i else None for i in batch["instruction"]]
        q = emb.finish(emb.embed_segments(emb.query_segments(queries, instructions)))  # (b, D)
        p = emb.finish(emb.embed_segments(emb.document_segments(positives, windows="first", spans=False)))  # (b, D)
        q, p = _unit(q), _unit(p)
        return {**batch, "q": q, "p": p, "positive_score": (q * p).sum(1)}  # positive_score: (b,)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _Miner:
    """What both mining stages share: candidates per row -> negatives and counts (one output row per input row)."""

    def __init__(self, negatives: dict[str, Any]):
        self.cfg = NegativesConfig.model_validate(negatives)

    def candidates(self, batch: dict[str, np.ndarray], i: int) -> tuple[list[Candidate], str | None]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines, counts, dropped, score_sums = [], [], [], []
        for i in range(len(batch["query"])):
            query, positive = str(batch["query"][i]), str(batch["positive"][i])
            found, positive_key = self.candidates(batch, i)
            ranked = rank_candidates(found, positive, positive_key)
            negatives, n_dropped = pick_negatives(ranked, float(batch["positive_score"][i]), self.cfg,
                                                  row_seed(self.cfg.seed, query, positive))
            # the input row, every field kept, with its mined negatives: the output file's line
            lines.append(json_column({**json.loads(str(batch["row"][i])), "negatives": [c.text for c in negatives]}))
            counts.append(len(negatives))
            score_sums.append(sum(c.score for c in negatives))
            dropped.append(n_dropped)
        return {"position": batch["_pos"], "line": np.array(lines, dtype=object),
                "negatives": np.array(counts, dtype=np.int64),
                "negative_score_sum": np.array(score_sums, dtype=np.float64),
                "dropped": np.array(dropped, dtype=np.int64), "positive_score": batch["positive_score"]}


class ExactMiner(_Miner):
    """Candidates: the input's distinct positives, every one scored against the query (brute force, (b, N)).

    The pool is one object in Ray's object store (`build_pool`, a task: the driver never holds the (N, D) vectors
    or the texts), which every miner on a node maps without a copy: `candidates.searchers` miners score in parallel
    (one core each) for the memory of one pool per node."""

    def __init__(self, negatives: dict[str, Any], pool: list, fetch: int):
        import ray

        super().__init__(negatives)
        self.pool, self.texts = ray.get(pool[0])  # (N, D) read-only, shared; N texts (Arrow)
        self.fetch = min(fetch, len(self.texts))
        self.scores: np.ndarray | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.scores = np.asarray(batch["q"], dtype=np.float32) @ self.pool.T  # (b, N)
        return super().__call__(batch)

    def candidates(self, batch: dict[str, np.ndarray], i: int) -> tuple[list[Candidate], str | None]:
        row = self.scores[i]  # (N,)
        top = np.argpartition(-row, self.fetch - 1)[: self.fetch] if self.fetch < len(row) else np.arange(len(row))
        return [Candidate(str(j), self.texts[int(j)].as_py(), float(row[j])) for j in top], None


class StoreMiner(_Miner):
    """Candidates: the collection's top hits for the query (dense, BM25 or hybrid), each with its dense score."""

    def __init__(self, negatives: dict[str, Any], store: dict[str, Any], mode: str, fetch: int,
                 positive_id_field: str | None):
        from diffembed.index.store import open_store

        super().__init__(negatives)
        self.store = open_store(StoreConfig.model_validate(store))
        self.mode, self.fetch, self.id_field = mode, fetch, positive_id_field

    def candidates(self, batch: dict[str, np.ndarray], i: int) -> tuple[list[Candidate], str | None]:
        q = np.asarray(batch["q"][i], dtype=np.float32)  # (D,)
        hits = self.store.search(q, str(batch["query"][i]), top_k=self.fetch, mode=self.mode)
        dense = {(h.doc_id, h.chunk_index): h.score for h in hits} if self.mode == "dense" else self._dense(q, hits)
        found = [Candidate(h.doc_id, str(h.payload.get("text") or ""), dense.get((h.doc_id, h.chunk_index), np.inf))
                 for h in hits]  # a point without a dense score is never picked (inf is above any ceiling)
        positive_key = None
        if self.id_field:
            positive_key = json.loads(str(batch["row"][i])).get(self.id_field)
        return found, None if positive_key is None else str(positive_key)

    def _dense(self, q: np.ndarray, hits: list) -> dict[tuple[str, int], float]:
        """Dense scores of BM25 / hybrid hits: one dense search restricted to the hits' documents."""
        chunks: dict[str, int] = {}
        for h in hits:
            chunks[h.doc_id] = max(chunks.get(h.doc_id, 1), int(h.payload.get("n_chunks", 1)))
        if not chunks:
            return {}
        scored = self.store.search(q, None, top_k=sum(chunks.values()), mode="dense",
                                   filter={"doc_id": sorted(chunks)})
        return {(h.doc_id, h.chunk_index): h.score for h in scored}


# ------------------------------------------------------------------------------------------ the job


def check_collection(cfg: MineNegativesConfig, dim: int) -> tuple[StoreConfig, dict[str, Any]]:
    """The collection as mining opens it (BM25 vectors on when it has them), checked on the driver: it exists, holds
    points with their text, and was embedded by `cfg.embedder` (size, distance, embedding function); with the
    embedding fingerprint it was checked against."""
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.index.store import open_store

    store_cfg, mode = cfg.candidates.store, cfg.candidates.mode
    with open_store(store_cfg) as store:
        if not store.exists():
            raise ConfigError(f"collection {store_cfg.collection!r} does not exist in the store; fill it with the "
                              "batch job (jobs/embed_corpus.py) first")
        stored = store.fingerprint()
    sparse = bool(stored.get("sparse")) if stored else store_cfg.sparse or mode != "dense"
    if mode != "dense" and not sparse:
        raise ConfigError(f"candidates.mode={mode} needs a collection with BM25 vectors (batch job: store.sparse: "
                          f"true); {store_cfg.collection!r} has none")
    store_cfg = store_cfg.model_copy(update={"sparse": sparse})
    fingerprint = embedding_fingerprint(cfg.embedder, dim, store_cfg.distance, sparse)
    with open_store(store_cfg) as store:
        store.ensure_collection(dim, fingerprint)
        first = next(iter(store.iter_points(batch_size=1)), [])
        if not first:
            raise ConfigError(f"collection {store_cfg.collection!r} is empty")
        if not isinstance(first[0].payload.get("text"), str):
            raise ConfigError(f"collection {store_cfg.collection!r} keeps no document text (it was embedded with "
                              "store.store_text: false); mining needs it: re-embed with store_text: true")
    return store_cfg, fingerprint


def build_pool(blocks: list):
    """The exact candidate pool from encoded blocks (Arrow, in input order): each distinct positive text once (first
    occurrence), with its unit vector: ((N, D) float32, N texts as Arrow). A Ray task: its result stays in the
    object store, where the miners read it."""
    import pyarrow as pa
    import ray

    vectors, texts, seen = [], [], set()
    for ref in blocks:
        table = ray.get(ref)
        p = np.concatenate([chunk.to_numpy() for chunk in table.column("p").chunks])  # (b, D)
        for j, text in enumerate(table.column("positive").to_pylist()):
            if text not in seen:
                seen.add(text)
                texts.append(text)
                vectors.append(np.asarray(p[j], dtype=np.float32))
    return np.stack(vectors), pa.array(texts, type=pa.large_string())


@contextlib.contextmanager
def _ordered():
    """Ray Data keeps the rows' input order in the datasets built inside (the output file's order)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def mine_negatives(cfg: MineNegativesConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster (started locally when none is); returns (and optionally writes) the
    summary.

    Ray tasks read and check the input (`rowfiles.scan_rows`; a bad row with `input.bad_rows: fail` stops the job
    before any encoding); the rows then stream through encoding and mining and come back to the driver only to be
    written, in input order, to the output's parts (`mining.output`): the driver holds one batch of rows at a time,
    whatever the input's size, and a rerun after a failure mines only the rows no complete part holds.
    """
    import ray
    import ray.data

    from diffembed.batch.pipeline import STREAM_BLOCK_BYTES, actor_restarts_option, model_dimension
    from diffembed.files import expand_files
    from diffembed.index.fingerprint import embedding_fingerprint
    from diffembed.mining.output import PartsOutput
    from diffembed.models.loading import check_model
    from diffembed.placement import on_this_node

    started = time.perf_counter()
    files = expand_files(cfg.input.files, "input.files", folders=False)
    check_model(cfg.embedder)  # a damaged checkpoint or adapter: one line now, not actor tracebacks
    dim = model_dimension(cfg.embedder)
    store_cfg = None
    if cfg.candidates.source == "store":
        store_cfg, fingerprint = check_collection(cfg, dim)
    else:
        fingerprint = embedding_fingerprint(cfg.embedder, dim, "cosine", False)
    if not ray.is_initialized():
        ray.init()
    scanned = scan_rows(files, cfg.input.format, mining_columns, cfg.input.bad_rows,
                        what="bad training row", hint=" (input.bad_rows=skip skips it)")
    out = PartsOutput(cfg.output, job_digest(cfg, fingerprint, files, scanned), cfg.part_rows, total=len(scanned))
    resumed = out.resume()
    threads = cfg.encode.torch_threads or max(1, (os.cpu_count() or 1) // cfg.encode.actors)
    try:
        with actor_restarts_option(), _ordered():
            mined = None
            if resumed < len(scanned):
                # exact: every row is encoded (the pool is every positive), the rows written before are not mined
                rows = numbered_rows(scanned, skip=resumed if store_cfg is not None else 0)
                encoded = rows.map_batches(
                    EncodePairs, fn_constructor_kwargs={"embedder": cfg.embedder.model_dump(mode="json"),
                                                        "threads": threads},
                    compute=ray.data.ActorPoolStrategy(size=cfg.encode.actors), batch_size=cfg.encode.batch_size,
                    **cfg.encode.ray_remote_args(), max_restarts=cfg.encode.max_restarts, batch_format="numpy",
                )
                # Ray Data gathers a stage's output into blocks of up to 128 MiB before passing it on, and a block
                # goes to one actor: the miners would see the encoded rows as a block or two (one busy miner), and
                # the driver would hold that much mined text at a time. ~1 MiB blocks spread and stream. The
                # datasets built from `encoded` (materialized too) share this context: the miners' output included.
                encoded.context.target_max_block_size = STREAM_BLOCK_BYTES
                negatives = cfg.negatives.model_dump(mode="json")
                if store_cfg is None:
                    encoded = encoded.materialize()  # the pool is every positive: all rows encoded before any is mined
                    todo = encoded if not resumed else encoded.map_batches(
                        _from_position, fn_kwargs={"skip": resumed}, batch_format="numpy", batch_size=None,
                        num_cpus=0)
                    pool = ray.remote(build_pool).options(num_cpus=0).remote(encoded.to_arrow_refs())
                    mined = todo.map_batches(
                        ExactMiner, fn_constructor_kwargs={"negatives": negatives, "fetch": cfg.fetch,
                                                           "pool": [pool]},  # in a list: the miners get the ref
                        compute=ray.data.ActorPoolStrategy(size=cfg.candidates.searchers),
                        batch_size=cfg.encode.batch_size, num_cpus=0, batch_format="numpy", max_restarts=0,
                    )
                else:
                    mined = encoded.map_batches(
                        StoreMiner, fn_constructor_kwargs={
                            "negatives": negatives, "store": store_cfg.model_dump(mode="json"),
                            "mode": cfg.candidates.mode, "fetch": cfg.fetch,
                            "positive_id_field": cfg.candidates.positive_id_field},
                        compute=ray.data.ActorPoolStrategy(size=cfg.candidates.searchers if store_cfg.url else 1),
                        batch_size=cfg.encode.batch_size, num_cpus=0, batch_format="numpy", max_restarts=0,
                        **({} if store_cfg.url else on_this_node()),  # an embedded store is a folder on this node
                    )
            for batch in mined.iter_batches(batch_size=None, batch_format="numpy") if mined is not None else ():
                short = (batch["negatives"] < cfg.negatives.per_query).astype(np.int64)
                out.write(batch["position"].tolist(), [str(line) for line in batch["line"]], {
                    "rows": np.ones(len(short), np.int64), "negatives": batch["negatives"], "short_rows": short,
                    "dropped": batch["dropped"], "negative_score": batch["negative_score_sum"],
                    "positive_score": batch["positive_score"].astype(np.float64)})
        out.join()
    except BaseException:
        out.abort()  # the complete parts stay: a rerun mines the rest
        raise

    totals = out.totals()
    summary = {
        "output": cfg.output,
        "rows": totals.get("rows", 0),
        "resumed_rows": resumed,  # written by an earlier, failed run of the same job; not mined again
        "negatives": totals.get("negatives", 0),
        "short_rows": totals.get("short_rows", 0),  # fewer than per_query survived
        "dropped_as_false_negatives": totals.get("dropped", 0),
        "mean_positive_score": round(totals.get("positive_score", 0.0) / max(totals.get("rows", 0), 1), 4),
        "mean_negative_score": (round(totals["negative_score"] / totals["negatives"], 4)
                                if totals.get("negatives") else None),
        "skipped_rows": scanned.bad.count,
        "skipped_examples": scanned.bad.examples[:10],
        "candidates": cfg.candidates.source if store_cfg is None else f"store:{cfg.candidates.mode}",
        "wall_s": round(time.perf_counter() - started, 2),
    }
    if cfg.summary_path:
        os.makedirs(os.path.dirname(os.path.abspath(os.path.expanduser(cfg.summary_path))), exist_ok=True)
        with open(os.path.expanduser(cfg.summary_path), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def job_digest(cfg: MineNegativesConfig, fingerprint: dict[str, Any], files: list[str], scanned) -> str:
    """What decides the output's rows: the embedding function and model (`fingerprint`, the driver's one
    computation of it), candidates, negatives, and the input (its files and their checked rows). Parts of another
    digest are never resumed."""
    job = {
        "embedding": fingerprint,
        "candidates": cfg.candidates.model_dump(mode="json", exclude={"searchers"}),
        "negatives": cfg.negatives.model_dump(mode="json"),
        "input": {"files": files, "format": cfg.input.format, "bad_rows": cfg.input.bad_rows,
                  "rows": len(scanned), "bad": scanned.bad.count, "examples": scanned.bad.examples},
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:24]


def numbered_rows(scanned, skip: int):
    """The good rows of the scanned blocks as a dataset in input order, each with its position `_pos` (0 .. N-1),
    from position `skip` on: a task per block reads it from the object store (nothing passes the driver)."""
    import ray.data

    firsts = np.flatnonzero(np.r_[True, np.diff(scanned.block) != 0])  # (B,) position of each block's first row
    ends = np.r_[firsts[1:], len(scanned.block)]  # (B,)
    plan = [{"block": int(scanned.block[f]), "start": int(f)} for f, e in zip(firsts, ends) if e > skip]
    return ray.data.from_items(plan).map_batches(
        _good_rows, fn_kwargs={"blocks": scanned.blocks, "skip": skip}, batch_size=1, batch_format="pyarrow")


def _good_rows(plan, blocks: list, skip: int):
    """The rows `scan_rows` found good in the planned blocks, with the columns the stages read and `_pos`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    out = []
    for index, start in zip(plan["block"].to_pylist(), plan["start"].to_pylist()):
        table = ray.get(blocks[index])
        good = table.filter(pc.is_null(table["_reason"])).select(["query", "positive", "instruction", "row"])
        good = good.append_column("_pos", pa.array(np.arange(start, start + good.num_rows, dtype=np.int64)))
        out.append(good.slice(max(0, skip - start)))
    return pa.concat_tables(out)


def _from_position(batch: dict[str, np.ndarray], skip: int) -> dict[str, np.ndarray]:
    keep = batch["_pos"] >= skip
    return {key: value[keep] for key, value in batch.items()}
