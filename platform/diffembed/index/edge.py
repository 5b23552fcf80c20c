"""The embedded store: one Qdrant Edge shard per collection, in this process.

Layout under `store.path`: `<collection>/shard/` is the Edge shard (segments, write-ahead log, its own config)
and `<collection>/collection.json` records what the collection holds (vector name/size/distance, single or
multivector, BM25, the embedding fingerprint, the Edge version that wrote it) and its tuned hybrid fusion
(`search`, when set). `collection.json` is written last when a collection is created, so a crash mid-creation
leaves a shard without it, which the next `ensure_collection` replaces.

Edge allows one process per shard directory: a second process gets a one-line `StoreBusy` error, never a
hang. Updates go through Edge's write-ahead log, so a process killed mid-load reopens with every acknowledged
point; the batch job's rerun completes the rest. HNSW is built by `optimize()` at the end of a bulk load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.fusion import SEARCH_SETTINGS_KEY, FusionSettings, resolve
from diffembed.index.sparse import SPARSE_VECTOR_NAME, document_vector, query_vector
from diffembed.index.store import (
    HYBRID_PREFETCH,
    PAYLOAD_KEYS,
    RRF_K,
    ChunkRecord,
    Hit,
    SearchMode,
    StoredPoint,
    StoreBusy,
    StoreError,
    check_collection,
    check_search,
    complete_from_payloads,
    dense_list,
    fuse_hits,
    multivector_of,
    point_id,
    point_payload,
    query_list,
    validate_filter,
)

log = logging.getLogger(__name__)

ID_BATCH = 1024
SCROLL_PAGE = 1024
META = "collection.json"
LAYOUT_VERSION = 1


def edge_version() -> str:
    return version("qdrant-edge-py")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


class EdgeStore:
    backend = "edge"

    def __init__(self, cfg: StoreConfig):
        import qdrant_edge  # noqa: F401  (fail here, clearly, if the wheel is missing)

        self.cfg = cfg
        root = Path(cfg.path).expanduser()
        if root.exists() and not root.is_dir():
            raise StoreError(f"store.path {root} is a file, not a folder")
        self.root = root
        self.dir = root / cfg.collection
        self.shard_dir = self.dir / "shard"
        self.meta_path = self.dir / META
        self._shard = None
        self._settings: tuple[FusionSettings | None] | None = None  # cached `search` of collection.json

    # -- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._shard is not None:
            shard, self._shard = self._shard, None
            shard.close()

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict[str, Any]:
        """collection.json: layout, fingerprint and the Edge version that wrote it (checked not to be newer)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.meta_path} is unreadable ({type(exc).__name__}); the collection is damaged") from None
        written = meta.get("edge_version", "0")
        if _version_tuple(written) > _version_tuple(edge_version()):
            raise StoreError(f"collection {self.cfg.collection!r} at {self.dir} was written by qdrant-edge {written}, "
                             f"newer than the installed {edge_version()}; upgrade qdrant-edge-py")
        return meta

    def _missing(self) -> StoreError:
        self._check_not_legacy()  # an old qdrant-client store here: say so rather than "does not exist"
        return StoreError(f"collection {self.cfg.collection!r} does not exist under {self.root}; "
                          "fill it with the embed_corpus job first")

    def _shard_handle(self):
        """The open shard (opened on first use; the collection must exist)."""
        if self._shard is None:
            if not self.exists():
                raise self._missing()
            self.meta()  # version check before Edge reads the files
            self._shard = self._load()
        return self._shard

    def _load(self):
        import qdrant_edge as e

        deadline = time.monotonic() + self.cfg.lock_wait_s
        delay = 0.1
        while True:
            try:
                return e.EdgeShard.load(str(self.shard_dir))
            except Exception as exc:
                error = self._open_error(exc)
            if not isinstance(error, StoreBusy) or time.monotonic() + delay > deadline:
                raise error
            time.sleep(delay)  # the holder may be going away (a killed job's store actor): wait a little
            delay = min(delay * 2, 1.0)

    def _open_error(self, exc: Exception) -> StoreError:
        text = " ".join(str(exc).split())
        if "WouldBlock" in text or "Resource temporarily unavailable" in text:
            return StoreBusy(f"the embedded store {self.dir} is open in another process (Qdrant Edge allows one "
                             "process per store path); stop that process, or use a Qdrant server (store.url)")
        return StoreError(f"cannot open collection {self.cfg.collection!r} at {self.dir}: {text[:300]}")

    # -- collection ---------------------------------------------------------------------------------------

    def _edge_config(self, dim: int, multivector: bool = False):
        import qdrant_edge as e

        distance = {"cosine": e.Distance.Cosine, "dot": e.Distance.Dot, "euclid": e.Distance.Euclid}[self.cfg.distance]
        quantization = None
        if self.cfg.quantization == "int8":
            quantization = e.ScalarQuantizationConfig(type=e.ScalarType.Int8, quantile=0.99, always_ram=True)
        # a multivector point holds several `dim`-dim vectors, compared with a multivector query by MaxSim
        multi = e.MultiVectorConfig(comparator=e.MultiVectorComparator.MaxSim) if multivector else None
        vectors = {self.cfg.vector_name: e.EdgeVectorParams(
            size=dim, distance=distance, on_disk=self.cfg.on_disk_vectors or None, multivector_config=multi,
            quantization_config=quantization)}
        sparse = {SPARSE_VECTOR_NAME: e.EdgeSparseVectorParams(modifier=e.Modifier.Idf)} if self.cfg.sparse else None
        return e.EdgeConfig(vectors=vectors, sparse_vectors=sparse)

    def ensure_collection(self, dim: int, fingerprint: dict[str, Any] | None = None,
                          multivector: bool | None = None) -> None:
        multivector = multivector_of(fingerprint) if multivector is None else multivector
        if self.exists():
            self._check_existing(dim, fingerprint, multivector)
            self._shard_handle()
            return
        self._check_not_legacy()
        import qdrant_edge as e

        if self.shard_dir.exists():  # created but never finished (no collection.json): nothing was acknowledged
            log.warning("replacing the unfinished collection %s", self.dir)
            shutil.rmtree(self.shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            shard = e.EdgeShard.create(str(self.shard_dir), self._edge_config(dim, multivector))
        except Exception as exc:
            raise self._open_error(exc) from None
        shard.update(e.UpdateOperation.create_field_index("doc_id", e.PayloadSchemaType.Keyword))
        shard.flush()
        self._shard = shard
        meta = {
            "layout": LAYOUT_VERSION, "edge_version": edge_version(), "collection": self.cfg.collection,
            "vector_name": self.cfg.vector_name, "size": int(dim), "distance": self.cfg.distance,
            "multivector": bool(multivector), "sparse": self.cfg.sparse, "fingerprint": fingerprint,
        }
        self._write_meta(meta)  # last: the collection exists from here on

    def _write_meta(self, meta: dict[str, Any]) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.meta_path)
        self._settings = None

    def search_settings(self) -> FusionSettings | None:
        """The tuned fusion in collection.json (read once per store object; this process is the only writer)."""
        if self._settings is None:
            stored = self.meta().get(SEARCH_SETTINGS_KEY) if self.exists() else None
            try:
                self._settings = (FusionSettings.model_validate(stored) if stored else None,)
            except ValueError as exc:
                raise StoreError(f"{self.meta_path}: unreadable search settings ({' '.join(str(exc).split())[:200]})"
                                 ) from None
        return self._settings[0]

    def set_search_settings(self, settings: FusionSettings | None) -> None:
        if not self.exists():
            raise self._missing()
        meta = self.meta()
        if settings is None:
            meta.pop(SEARCH_SETTINGS_KEY, None)
        else:
            meta[SEARCH_SETTINGS_KEY] = settings.model_dump(mode="json")
        self._write_meta(meta)

    def _check_not_legacy(self) -> None:
        if (self.root / "collection" / self.cfg.collection).is_dir() or (self.root / ".lock").is_file():
            raise StoreError(f"{self.root} holds a qdrant-client local-mode store, which diffembed no longer "
                             "writes; use another store.path (and re-embed), or keep it for qdrant-client")

    def _check_existing(self, dim: int, fingerprint: dict[str, Any] | None, multivector: bool = False) -> None:
        meta = self.meta()
        check_collection(self.cfg, dim, {meta.get("vector_name"): (meta.get("size"), meta.get("distance"))},
                         bool(meta.get("sparse")), meta.get("fingerprint"), fingerprint,
                         stored_multivector=bool(meta.get("multivector")), multivector=multivector)

    def fingerprint(self) -> dict[str, Any] | None:
        return self.meta().get("fingerprint") if self.exists() else None

    def drop(self) -> None:
        self.close()
        self._settings = None
        if self.dir.exists():
            self._shard_handle_check_free()
            shutil.rmtree(self.dir)

    def _shard_handle_check_free(self) -> None:
        if (self.shard_dir / "edge_config.json").is_file():
            try:
                self._load().close()  # StoreBusy when another process holds it: never delete under a reader
            except StoreBusy:
                raise
            except StoreError:
                pass  # a damaged shard: dropping it is what recreate=true is for

    # -- writes -------------------------------------------------------------------------------------------

    def _edge_point(self, pid: str, vectors: dict[str, Any], payload: dict):
        import qdrant_edge as e

        edge_vectors: dict[str, Any] = {}
        for name, value in vectors.items():
            if isinstance(value, tuple):  # sparse (indices, values)
                edge_vectors[name] = e.SparseVector(indices=list(value[0]), values=list(value[1]))
            else:
                edge_vectors[name] = value
        return e.Point(id=pid, vector=edge_vectors, payload=payload)

    def _record_vectors(self, record: ChunkRecord, dense: Any = None) -> dict[str, Any]:
        vectors: dict[str, Any] = {self.cfg.vector_name: dense if dense is not None else dense_list(record)}
        if self.cfg.sparse:
            bm25 = document_vector(record.text or "")
            if bm25.indices:  # a text without terms has no sparse vector at all rather than an empty one
                vectors[SPARSE_VECTOR_NAME] = (bm25.indices, bm25.values)
        return vectors

    def _write(self, points: list) -> None:
        import qdrant_edge as e

        shard = self._shard_handle()
        size = self.cfg.upsert_batch_size
        for start in range(0, len(points), size):
            try:
                shard.update(e.UpdateOperation.upsert_points(points[start : start + size]))
            except Exception as exc:
                raise ValueError(f"Qdrant Edge rejected the write: {' '.join(str(exc).split())[:300]}") from None

    def upsert(self, records: Sequence[ChunkRecord]) -> None:
        if not records:
            return
        # (N, D), or (N, K, D) for multivectors; Edge converts numpy rows faster than Python lists
        dense = np.stack([np.asarray(r.vector, dtype=np.float32) for r in records])
        if dense.ndim not in (2, 3):
            raise ValueError(f"dense vectors of shape {dense.shape[1:]}: one (D,) vector or a (K, D) multivector "
                             "per point")
        self._write([
            self._edge_point(point_id(self.cfg.collection, r.doc_id, r.chunk_index), self._record_vectors(r, d),
                             point_payload(r, self.cfg.store_text))
            for r, d in zip(records, dense)
        ])

    def upsert_points(self, points: Sequence[StoredPoint]) -> None:
        self._write([self._edge_point(p.id, p.vectors, p.payload) for p in points])

    def _doc_filter(self, doc_ids: list[str]):
        import qdrant_edge as e

        return e.Filter(must=[e.FieldCondition(key="doc_id", match=e.MatchAny(doc_ids))])

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        import qdrant_edge as e

        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        shard = self._shard_handle()
        for start in range(0, len(ids), ID_BATCH):
            shard.update(e.UpdateOperation.delete_points_by_filter(self._doc_filter(ids[start : start + ID_BATCH])))

    def delete_stale_chunks(self, n_chunks: Mapping[str, int]) -> None:
        """Delete the points of chunk_index >= n of each document `{doc_id: n}` (left by a longer earlier
        version of it); documents with the same n share one filter."""
        import qdrant_edge as e

        shard = self._shard_handle()
        for n, ids in _by_count(n_chunks).items():
            for start in range(0, len(ids), ID_BATCH):
                flt = e.Filter(must=[e.FieldCondition(key="doc_id", match=e.MatchAny(ids[start : start + ID_BATCH])),
                                     e.FieldCondition(key="chunk_index", range=e.RangeFloat(gte=float(n)))])
                shard.update(e.UpdateOperation.delete_points_by_filter(flt))

    def complete_docs(self, doc_ids: Sequence[str]) -> set[str]:
        import qdrant_edge as e

        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        shard = self._shard_handle()

        def payloads() -> Iterator[dict]:
            for start in range(0, len(ids), ID_BATCH):
                flt, offset = self._doc_filter(ids[start : start + ID_BATCH]), None
                while True:
                    records, offset = shard.scroll(e.ScrollRequest(
                        offset=offset, limit=SCROLL_PAGE, filter=flt, with_payload=PAYLOAD_KEYS, with_vector=False))
                    for record in records:
                        yield record.payload
                    if offset is None:
                        break

        return complete_from_payloads(payloads())

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Write freely, then flush and build the HNSW index once (`optimize()`, blocking)."""
        yield
        shard = self._shard_handle()
        shard.flush()
        shard.optimize()

    # -- reads --------------------------------------------------------------------------------------------

    def count(self, exact: bool = True) -> int:
        import qdrant_edge as e

        return int(self._shard_handle().count(e.CountRequest(exact=exact)))

    def _filter(self, spec: dict[str, Any] | None):
        import qdrant_edge as e

        conditions = [
            e.FieldCondition(key=key, match=e.MatchAny(value) if isinstance(value, list) else e.MatchValue(value))
            for key, value in validate_filter(spec)
        ]
        return e.Filter(must=conditions) if conditions else None

    def search(self, dense: np.ndarray | None, text: str | None, top_k: int = 10, mode: SearchMode = "dense",
               filter: dict[str, Any] | None = None, fusion: str | None = None,
               dense_weight: float | None = None, payload: bool | list[str] = True) -> list[Hit]:
        """Top points by the dense vector ((D,), or (K, D) on a multivector collection), by BM25 on the text, or
        both fused: `fusion`/`dense_weight` when given, else the collection's tuned setting, else RRF
        (`diffembed.index.fusion`). `payload`: the payload keys each hit carries (True: all)."""
        import qdrant_edge as e

        check_search(self.cfg, dense, text, mode)
        settings = resolve(self.search_settings(), fusion, dense_weight) if mode == "hybrid" else None
        flt = self._filter(filter)
        dense_q = query_list(dense)  # (D,) or a multivector query (K, D)
        sparse_q = query_vector(text) if mode != "dense" and text is not None else None

        def nearest(kind: str):
            if kind == "dense":
                return e.Query.Nearest(dense_q, using=self.cfg.vector_name)
            return e.Query.Nearest(e.SparseVector(indices=sparse_q.indices, values=sparse_q.values),
                                   using=SPARSE_VECTOR_NAME)

        if mode == "sparse" and not sparse_q.indices:
            return []  # a text of stopwords only matches nothing
        if settings is not None and settings.fusion == "weighted":
            limit = HYBRID_PREFETCH * top_k
            dense_hits = self._query(e.QueryRequest(limit=limit, query=nearest("dense"), filter=flt,
                                                    with_payload=payload))
            sparse_hits = self._query(e.QueryRequest(limit=limit, query=nearest("sparse"), filter=flt,
                                                     with_payload=payload)) if sparse_q.indices else []
            return fuse_hits(dense_hits, sparse_hits, settings, top_k)
        if settings is not None:
            limit = HYBRID_PREFETCH * top_k
            prefetches = [e.Prefetch(limit=limit, query=nearest("dense"), filter=flt)]
            if sparse_q.indices:
                prefetches.append(e.Prefetch(limit=limit, query=nearest("sparse"), filter=flt))
            engine_fusion = e.Fusion.Rrf(k=RRF_K) if settings.fusion == "rrf" else e.Fusion.Dbsf()
            request = e.QueryRequest(limit=top_k, prefetches=prefetches, query=engine_fusion, filter=flt,
                                     with_payload=payload)
        else:
            request = e.QueryRequest(limit=top_k, query=nearest(mode), filter=flt, with_payload=payload)
        return self._query(request)

    def _query(self, request) -> list[Hit]:
        shard = self._shard_handle()
        try:
            points = shard.query(request)
        except Exception as exc:  # in-process: a failing query is a bad request (filter path, value)
            raise ValueError(f"Qdrant Edge rejected the query: {' '.join(str(exc).split())[:300]}") from None
        return [Hit.from_scored(p.id, p.score, p.payload) for p in points]

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` that the collection holds."""
        ids = list(ids)
        if not ids:
            return set()
        return {str(r.id) for r in self._shard_handle().retrieve(ids, with_payload=False, with_vector=False)}

    def iter_points(self, batch_size: int = 256) -> Iterator[list[StoredPoint]]:
        import qdrant_edge as e

        shard, offset = self._shard_handle(), None
        while True:
            records, offset = shard.scroll(e.ScrollRequest(offset=offset, limit=batch_size, with_payload=True,
                                                           with_vector=True))
            out = []
            for record in records:
                vectors = {}
                for name, value in (record.vector or {}).items():
                    vectors[name] = (list(value.indices), list(value.values)) if hasattr(value, "indices") else list(value)
                out.append(StoredPoint(str(record.id), vectors, record.payload or {}))
            if out:
                yield out
            if offset is None:
                return


def _by_count(n_chunks: Mapping[str, int]) -> dict[int, list[str]]:
    """{doc_id: n} -> {n: [doc_id, ...]}: one delete filter per distinct chunk count."""
    groups: dict[int, list[str]] = {}
    for doc, n in n_chunks.items():
        groups.setdefault(int(n), []).append(str(doc))
    return groups
