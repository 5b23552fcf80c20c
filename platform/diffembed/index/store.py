"""The one store interface: a collection of document points, on Qdrant Edge (embedded) or a Qdrant server.

Every point is one stored vector of one document (the whole document, or one window or chunk under the `best` /
`late_chunk` document policies), keyed by a UUID derived from (collection, doc_id, chunk_index): a rerun or a
retried request overwrites the same points instead of adding copies, and the batch job asks which documents are
complete (`complete_docs`) to resume where it stopped.

Backends (`open_store(cfg)` picks one):
- `edge` (`store.path`, the default): Qdrant Edge, Qdrant's own engine in this process (`diffembed.index.edge`);
- `server` (`store.url`): a Qdrant server or cluster through qdrant-client (`diffembed.index.server`).

Both keep the collection's embedding fingerprint (`diffembed.index.fingerprint`), write our own BM25 sparse
vectors (`diffembed.index.sparse`) under Qdrant's IDF modifier and fuse hybrid queries the same way (RRF at the
same k, DBSF, or weighted; `diffembed.index.fusion`), so the same collection ranks the same on either backend.
A collection may store its tuned fusion (`set_search_settings`); a hybrid search naming none uses it.

Multivector collections (an embedder with `mask_vectors: multi`): each point's dense vector is the input's K
vectors, a Qdrant multivector compared by MaxSim (the sum over the query's vectors of the best dot product with
the point's vectors; the vectors are unit length, so cosine is dot). A search then takes a (K, D) query. A
collection is single- or multi-vector for good: opening it with the other kind of model is a one-line error.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from diffembed.config import ConfigError, gives_multivectors
from diffembed.documents import DocumentPolicy, aggregate_hits
from diffembed.index.config import StoreConfig
from diffembed.index.fusion import RRF_K, FusionSettings  # noqa: F401  (RRF_K: re-exported for the backends)

# Fixed forever: changing it would give every point a new id, so reruns would duplicate the collection.
POINT_NAMESPACE = uuid.UUID("9f011175-924a-4fe9-85ef-f6b9b87d1aa7")
PAYLOAD_KEYS = ["doc_id", "chunk_index", "n_chunks"]
HYBRID_PREFETCH = 4  # each of dense and BM25 contributes top_k * this candidates to the fusion

SearchMode = Literal["dense", "sparse", "hybrid"]


class StoreError(ConfigError):
    """A store that cannot be used as asked (missing, busy, damaged, written by a newer engine); one readable line.
    A ConfigError, so jobs exit 2 with it; the Serve retriever reports it as 503."""


class StoreBusy(StoreError):
    """An embedded (Edge) store is open in another process: one process per store path."""


@dataclass
class ChunkRecord:
    """One point to write: its dense vector, where it sits in the document, and what to keep as payload."""

    doc_id: str
    chunk_index: int
    n_chunks: int
    vector: np.ndarray  # float32, (D,); (K, D) in a multivector collection
    token_span: tuple[int, int]
    char_span: tuple[int, int]
    text: str | None = None  # needed for the BM25 vector even when store_text is off
    title: str | None = None
    metadata: dict = field(default_factory=dict)  # stored under the payload key "meta"


@dataclass
class Hit:
    id: str
    score: float
    doc_id: str
    chunk_index: int
    token_span: tuple[int, int]
    char_span: tuple[int, int]
    payload: dict

    @classmethod
    def from_scored(cls, point_id: Any, score: float, payload: dict | None) -> Hit:
        p = payload or {}
        return cls(
            id=str(point_id),
            score=float(score),
            doc_id=p.get("doc_id", ""),
            chunk_index=int(p.get("chunk_index", 0)),
            token_span=(int(p.get("token_start", 0)), int(p.get("token_end", 0))),
            char_span=(int(p.get("char_start", 0)), int(p.get("char_end", 0))),
            payload=p,
        )


@dataclass
class StoredPoint:
    """A point as read back (for copying a collection between backends)."""

    id: str
    vectors: dict[str, Any]  # name -> list[float] (dense), list[list[float]] (multivector) or (indices, values)
    payload: dict


def point_id(collection: str, doc_id: str, chunk_index: int) -> str:
    """Deterministic point id: the same chunk always lands on the same point."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{collection}\x1f{doc_id}\x1f{chunk_index}"))


def point_payload(record: ChunkRecord, store_text: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "doc_id": record.doc_id,
        "chunk_index": int(record.chunk_index),
        "n_chunks": int(record.n_chunks),
        "token_start": int(record.token_span[0]),
        "token_end": int(record.token_span[1]),
        "char_start": int(record.char_span[0]),
        "char_end": int(record.char_span[1]),
        "title": record.title,
        "meta": record.metadata,
    }
    if store_text:
        payload["text"] = record.text
    return payload


def dense_list(record: ChunkRecord) -> list[float] | list[list[float]]:
    """The record's dense vector as JSON-ready lists: (D,) -> list, a multivector (K, D) -> K lists."""
    vector = np.asarray(record.vector, dtype=np.float32)
    if vector.ndim not in (1, 2) or vector.size == 0:
        raise ValueError(f"doc {record.doc_id!r} chunk {record.chunk_index}: vector has shape {vector.shape}")
    return vector.tolist()


def query_list(dense: Any) -> list[float] | list[list[float]] | None:
    """A dense query as the engines take it: (D,) -> list; a multivector (K, D) -> K lists (MaxSim)."""
    if dense is None:
        return None
    vector = np.asarray(dense, dtype=np.float32)
    if vector.ndim == 2:
        return vector.tolist()
    return vector.reshape(-1).tolist()


def multivector_of(fingerprint: dict[str, Any] | None) -> bool:
    """Whether the embedding function a fingerprint records gives multivectors (mask readout, `mask_vectors:
    multi`); no fingerprint: no."""
    return gives_multivectors((fingerprint or {}).get("function") or {})


def validate_filter(spec: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """A filter spec `{key: value}` (must match exactly) / `{key: [v1, v2]}` (must match any), all keys must
    hold, as (key, value-or-list) pairs. Keys are payload paths: "doc_id", "title", "meta.<field>"; values are
    str, int or bool, a list holds only strings or only integers. ValueError naming the bad entry otherwise."""
    if not spec:
        return []
    if not isinstance(spec, dict):
        raise ValueError("a filter is an object of payload key -> value or list of values")
    out: list[tuple[str, Any]] = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError("a filter key is empty")
        if isinstance(value, (list, tuple, set, frozenset)):
            values = list(value)
            kinds = {bool if isinstance(v, bool) else type(v) for v in values}
            if not (kinds <= {str} or kinds <= {int}):  # an empty list matches nothing
                raise ValueError(f"filter {key!r}: a list must hold only strings or only integers")
            out.append((key, values))
        elif isinstance(value, (str, bool, int)):
            out.append((key, value))
        else:
            raise ValueError(f"filter {key!r}: a value must be a string, integer, boolean or list of them")
    return out


class VectorStore(Protocol):
    """What the batch job, the Serve retriever, evaluation and the demo need from a collection."""

    cfg: StoreConfig

    @property
    def backend(self) -> str: ...  # "edge" or "server"

    def exists(self) -> bool: ...

    def ensure_collection(self, dim: int, fingerprint: dict[str, Any] | None = None,
                          multivector: bool | None = None) -> None:
        """Create the collection for `dim`-dim vectors (multivectors of `dim`-dim vectors, MaxSim, when
        `multivector`; None: as the fingerprint's embedding function says) with this embedding fingerprint, or
        check that the existing one fits (StoreError / ConfigError naming what differs)."""

    def fingerprint(self) -> dict[str, Any] | None: ...

    def drop(self) -> None:
        """Delete the collection and everything in it (no error when it does not exist)."""

    def upsert(self, records: Sequence[ChunkRecord]) -> None:
        """Write (or overwrite) these points; acknowledged (durable) when it returns."""

    def delete_docs(self, doc_ids: Sequence[str]) -> None: ...

    def delete_stale_chunks(self, n_chunks: Mapping[str, int]) -> None:
        """Delete each document's points of chunk_index >= n (`{doc_id: n}`): what a longer earlier version left."""

    def complete_docs(self, doc_ids: Sequence[str]) -> set[str]:
        """The documents among `doc_ids` whose every point (0..n_chunks-1 of one chunking) is stored."""

    def bulk_load(self) -> AbstractContextManager[None]:
        """A bulk write: index building is deferred to its end (Edge: optimize; server: indexing threshold)."""

    def count(self, exact: bool = True) -> int: ...  # exact=False: an estimate, cheap on any size

    def search(self, dense: np.ndarray | None, text: str | None, top_k: int = 10, mode: SearchMode = "dense",
               filter: dict[str, Any] | None = None, fusion: str | None = None,
               dense_weight: float | None = None, payload: bool | list[str] = True) -> list[Hit]:
        """Top points; hybrid fuses dense and BM25 by `fusion`/`dense_weight`, else by the collection's stored
        setting (`search_settings`), else RRF. `dense` is (D,), or (K, D) on a multivector collection. `payload`:
        the payload keys each hit carries (True: all)."""

    def search_settings(self) -> FusionSettings | None:
        """The fusion setting stored with the collection (None: never tuned, hybrid uses RRF)."""

    def set_search_settings(self, settings: FusionSettings | None) -> None:
        """Store (None: clear) the collection's default fusion for hybrid search."""

    def iter_points(self, batch_size: int = 256) -> Iterator[list[StoredPoint]]: ...

    def existing_ids(self, ids: Sequence[str]) -> set[str]: ...

    def upsert_points(self, points: Sequence[StoredPoint]) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> VectorStore: ...

    def __exit__(self, *exc: object) -> None: ...


def open_store(cfg: StoreConfig) -> VectorStore:
    """The store `cfg` names: a Qdrant server when `url` is set, else the embedded Qdrant Edge under `path`."""
    if cfg.url:
        from diffembed.index.server import ServerStore

        return ServerStore(cfg)
    from diffembed.index.edge import EdgeStore

    return EdgeStore(cfg)


def check_search(cfg: StoreConfig, dense: Any, text: str | None, mode: str) -> None:
    """The argument checks both backends apply before a query."""
    if mode not in ("dense", "sparse", "hybrid"):
        raise ValueError(f"unknown search mode {mode!r}; use dense, sparse or hybrid")
    if mode != "sparse" and dense is None:
        raise ValueError(f"{mode} search needs a dense query vector")
    if mode != "dense":
        if not cfg.sparse:
            raise ConfigError(f"{mode} search needs store.sparse=true (a collection with BM25 vectors)")
        if text is None:
            raise ValueError(f"{mode} search needs the query text")


def check_collection(cfg: StoreConfig, dim: int, dense: dict[str, tuple[int, str]], has_sparse: bool,
                     stored_fingerprint: dict[str, Any] | None, fingerprint: dict[str, Any] | None,
                     stored_multivector: bool = False, multivector: bool = False) -> None:
    """Whether an existing collection fits this config and model (both backends): its dense vectors
    (name -> (size, distance)), single or multi (`stored_multivector`, the model's: `multivector`), its BM25
    vector, its embedding fingerprint. ConfigError naming what differs."""
    from diffembed.index.fingerprint import mismatch_message
    from diffembed.index.sparse import SPARSE_VECTOR_NAME

    name = cfg.collection
    if cfg.vector_name not in dense:
        raise ConfigError(f"collection {name!r} has no dense vector named {cfg.vector_name!r} (it has: "
                          f"{sorted(dense) or 'none'}); set store.vector_name or store.collection")
    if stored_multivector and not multivector:
        raise ConfigError(f"collection {name!r} stores multivectors (several vectors per point, scored by MaxSim) "
                          "and this model gives one vector per input; use another store.collection, or the "
                          "multivector model (mask_vectors: multi) that filled it")
    if multivector and not stored_multivector:
        raise ConfigError(f"collection {name!r} stores one vector per point and this model is a multivector model "
                          "(mask_vectors: multi: several vectors per input, scored by MaxSim); use another "
                          "store.collection, or re-embed it (embed job: recreate=true)")
    size, distance = dense[cfg.vector_name]
    if size != dim or distance != cfg.distance:
        stored = f"{size}-dim {distance} vectors under {cfg.vector_name!r}"
        wanted = [f"this model gives {dim}"] if size != dim else []
        wanted += [f"the config asks for {cfg.distance}"] if distance != cfg.distance else []
        raise ConfigError(f"collection {name!r} stores {stored}; {' and '.join(wanted)}")
    if cfg.sparse and not has_sparse:
        raise ConfigError(f"collection {name!r} has no sparse vector {SPARSE_VECTOR_NAME!r}; store.sparse=true "
                          "needs a collection created with it (use another store.collection)")
    if fingerprint is not None and stored_fingerprint is not None:
        message = mismatch_message(name, stored_fingerprint, fingerprint)
        if message:
            raise ConfigError(message)


def complete_from_payloads(payloads: Iterator[dict]) -> set[str]:
    """Documents whose points are exactly chunks 0..n-1 of one chunking (a doc re-chunked differently, e.g. at
    another max_length, leaves stale points: incomplete, so the job rewrites it)."""
    chunks: dict[str, set[int]] = {}
    sizes: dict[str, set[int]] = {}
    for p in payloads:
        doc = p["doc_id"]
        chunks.setdefault(doc, set()).add(int(p["chunk_index"]))
        sizes.setdefault(doc, set()).add(int(p["n_chunks"]))
    return {d for d, got in chunks.items() if len(sizes[d]) == 1 and got == set(range(next(iter(sizes[d]))))}


def fuse_hits(dense_hits: Sequence[Hit], sparse_hits: Sequence[Hit], settings: FusionSettings, top_k: int
              ) -> list[Hit]:
    """Client-side fusion of the two prefetch lists (what `weighted` needs: no engine has it), top_k best first;
    each hit keeps its payload, its score becomes the fused one."""
    from diffembed.index.fusion import fuse

    by_id = {h.id: h for h in sparse_hits} | {h.id: h for h in dense_hits}
    fused = fuse([[(h.id, h.score) for h in dense_hits], [(h.id, h.score) for h in sparse_hits]], settings)
    out = []
    for pid, score in fused[:top_k]:
        hit = by_id[pid]
        out.append(Hit(hit.id, float(score), hit.doc_id, hit.chunk_index, hit.token_span, hit.char_span, hit.payload))
    return out


CHUNK_OVERFETCH = 4  # points a document search asks for per wanted document, before aggregating each one's points
MAX_SEARCH_POINTS = 16384  # the deepest point list a document search widens to


def search_documents(store: VectorStore, dense: Any, text: str | None, top_k: int, mode: SearchMode = "dense",
                     policy: DocumentPolicy | None = None, filter: dict[str, Any] | None = None, fusion: str | None = None,
                     dense_weight: float | None = None) -> list[tuple[Hit, float]]:
    """At most `top_k` documents, best first, each as (its best hit, its score under `policy.aggregate`; None:
    the best point's score): what the evaluation's store path and the Serve retriever both rank.

    Points are searched `top_k * CHUNK_OVERFETCH` deep, doubling (up to MAX_SEARCH_POINTS) while fewer than `top_k`
    documents are among them and the store has more; each document's points then aggregate
    (`diffembed.documents.aggregate_hits`), the points that needs and the search missed scored exactly by one
    more search filtered to them (`document_points`)."""
    limit = top_k * CHUNK_OVERFETCH
    while True:
        hits = store.search(dense, text, top_k=limit, mode=mode, filter=filter, fusion=fusion,
                            dense_weight=dense_weight)  # best first
        if len({h.doc_id for h in hits}) >= top_k or len(hits) < limit or limit >= MAX_SEARCH_POINTS:
            break
        limit = min(limit * 2, MAX_SEARCH_POINTS)
    return aggregate_hits(hits, top_k, policy, lambda ids, first_only, n: document_points(
        store, dense, text, mode, ids, first_only, n, filter))


def document_points(store: VectorStore, dense: Any, text: str | None, mode: SearchMode, doc_ids: Sequence[str],
                    first_only: bool, limit: int, filter: dict[str, Any] | None = None) -> list[Hit]:
    """The points of these documents (`first_only`: their chunk 0), at most `limit`, scored for a query exactly as
    a search scores them: one search in the same mode, filtered to those points (the caller's filter with
    `doc_id`, and `chunk_index` for `first_only`, set), hits carrying the PAYLOAD_KEYS only. A dense or BM25 score
    is the point's own; a point no query term matches is left out, and so is every point of a hybrid search,
    whose fused scores are rank-based (no point has one of its own outside the fused list): `[]`."""
    ids = list(dict.fromkeys(str(d) for d in doc_ids))
    if not ids or limit < 1 or mode == "hybrid":
        return []
    spec = {**(filter or {}), "doc_id": ids}
    if first_only:
        spec["chunk_index"] = 0
    return store.search(dense, text, top_k=limit, mode=mode, filter=spec, payload=list(PAYLOAD_KEYS))
