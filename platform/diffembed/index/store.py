"""One Qdrant collection of document chunks: idempotent writes for the batch job, search for the service.

Every point is one chunk of one document, keyed by a UUID derived from (collection, doc_id, chunk_index):
a rerun or a retried request overwrites the same points instead of adding copies, and the job can ask
which documents are complete (`complete_docs`) to resume where it stopped. The same code runs against a
server (`StoreConfig.url`) and against qdrant-client's local mode (`StoreConfig.path`), which the tests use.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.sparse import SPARSE_VECTOR_NAME, document_vector, query_vector

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fixed forever: changing it would give every chunk a new id, so reruns would duplicate the collection.
POINT_NAMESPACE = uuid.UUID("9f011175-924a-4fe9-85ef-f6b9b87d1aa7")
ID_BATCH = 256  # doc ids per MatchAny filter: keeps request bodies small
SCROLL_PAGE = 1024
SERVER_DEFAULT_INDEXING_THRESHOLD = 10_000  # what the server uses when a collection sets none
PAYLOAD_KEYS = ["doc_id", "chunk_index", "n_chunks"]

_DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT, "euclid": models.Distance.EUCLID}

SearchMode = Literal["dense", "sparse", "hybrid"]


@dataclass
class ChunkRecord:
    """One chunk to write: its dense vector, where it sits in the document, and what to keep as payload."""

    doc_id: str
    chunk_index: int
    n_chunks: int
    vector: np.ndarray  # float32, (D,)
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
    def from_point(cls, point: models.ScoredPoint) -> Hit:
        p = point.payload or {}
        return cls(
            id=str(point.id),
            score=float(point.score),
            doc_id=p.get("doc_id", ""),
            chunk_index=int(p.get("chunk_index", 0)),
            token_span=(int(p.get("token_start", 0)), int(p.get("token_end", 0))),
            char_span=(int(p.get("char_start", 0)), int(p.get("char_end", 0))),
            payload=p,
        )


def point_id(collection: str, doc_id: str, chunk_index: int) -> str:
    """Deterministic point id: the same chunk always lands on the same point."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{collection}\x1f{doc_id}\x1f{chunk_index}"))


def payload_filter(spec: dict[str, Any] | None) -> models.Filter | None:
    """`{key: value}` -> must match exactly; `{key: [v1, v2]}` -> must match any of them; all keys must hold.

    Keys are payload paths: "doc_id", "title", or "meta.<field>" for record metadata. Values are str, int or bool.
    """
    if not spec:
        return None
    conditions: list[models.Condition] = []
    for key, value in spec.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            match: models.Match = models.MatchAny(any=list(value))
        else:
            match = models.MatchValue(value=value)
        conditions.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=conditions)


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts and 5xx are worth retrying; 4xx (bad request, wrong size) never are."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and exc.status_code >= 500
    if isinstance(exc, ResponseHandlingException):
        # wraps transport errors, but also a response body that fails to parse, which a retry won't fix
        return not isinstance(exc.source, ValidationError)
    return isinstance(exc, (ConnectionError, TimeoutError))


class QdrantStore:
    """A Qdrant collection of chunk points; see the module docstring. Use as a context manager."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        if cfg.url:
            self.client = QdrantClient(url=cfg.url, api_key=cfg.api_key, timeout=math.ceil(cfg.timeout_s))
        else:
            self.client = QdrantClient(path=cfg.path)
        self._retrying = Retrying(
            stop=stop_after_attempt(cfg.max_retries),
            wait=wait_exponential_jitter(initial=0.5, max=30),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    @property
    def local(self) -> bool:
        return not self.cfg.url

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._retrying.copy()(fn, *args, **kwargs)  # a copy per call: Retrying keeps per-call state

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> QdrantStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection -----------------------------------------------------------------------------------

    def ensure_collection(self, dim: int) -> None:
        """Create the collection for `dim`-dim vectors, or check that the existing one fits (ConfigError if not)."""
        name = self.cfg.collection
        if self._call(self.client.collection_exists, name):
            self._check_existing(dim)
            return
        quantization = None
        if self.cfg.quantization == "int8":
            quantization = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
            )
        vectors = {
            self.cfg.vector_name: models.VectorParams(
                size=dim,
                distance=_DISTANCES[self.cfg.distance],
                on_disk=self.cfg.on_disk_vectors,
                quantization_config=quantization,  # per vector: only the dense one is quantized
            )
        }
        sparse = (
            {SPARSE_VECTOR_NAME: models.SparseVectorParams(modifier=models.Modifier.IDF)} if self.cfg.sparse else None
        )
        try:
            self._call(
                self.client.create_collection, name, vectors_config=vectors, sparse_vectors_config=sparse,
                # the cluster layout; local mode has one shard and ignores these
                shard_number=self.cfg.shards, replication_factor=self.cfg.replication_factor,
                write_consistency_factor=self.cfg.write_consistency_factor,
            )
        except Exception:
            # another process may have created it between our check and our create
            if not self._call(self.client.collection_exists, name):
                raise
            self._check_existing(dim)
            return
        self._index_doc_id()

    def _index_doc_id(self) -> None:
        # complete_docs/delete_docs filter on doc_id; without an index the server scans every payload
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            self._call(
                self.client.create_payload_index,
                self.cfg.collection,
                "doc_id",
                field_schema=models.PayloadSchemaType.KEYWORD,
                wait=True,
            )

    def _check_existing(self, dim: int) -> None:
        cfg, name = self.cfg, self.cfg.collection
        info = self._call(self.client.get_collection, name)
        params = info.config.params
        vectors = params.vectors
        if not isinstance(vectors, dict) or cfg.vector_name not in vectors:
            have = sorted(vectors) if isinstance(vectors, dict) else ("an unnamed vector" if vectors else "none")
            raise ConfigError(
                f"collection {name!r} has no dense vector named {cfg.vector_name!r} (it has: {have}); "
                f"set store.vector_name or store.collection"
            )
        existing = vectors[cfg.vector_name]
        distance = _DISTANCES[cfg.distance]
        if existing.size != dim or existing.distance != distance:
            stored = f"{existing.size}-dim {existing.distance.value.lower()} vectors under {cfg.vector_name!r}"
            if existing.size != dim:
                wanted = f"this model gives {dim}"
                if existing.distance != distance:
                    wanted += f" and the config asks for {cfg.distance}"
            else:
                wanted = f"the config asks for {cfg.distance}"
            raise ConfigError(f"collection {name!r} stores {stored}; {wanted}")
        if cfg.sparse:
            sparse = (params.sparse_vectors or {}).get(SPARSE_VECTOR_NAME)
            if sparse is None:
                raise ConfigError(
                    f"collection {name!r} has no sparse vector {SPARSE_VECTOR_NAME!r}; store.sparse=true needs a "
                    f"collection created with it (use another store.collection)"
                )
            if sparse.modifier != models.Modifier.IDF:
                raise ConfigError(
                    f"collection {name!r} has sparse vector {SPARSE_VECTOR_NAME!r} without the IDF modifier; "
                    f"its BM25 scores would be wrong (use another store.collection)"
                )
        if not self.local and "doc_id" not in (info.payload_schema or {}):
            self._index_doc_id()

    # -- writes ---------------------------------------------------------------------------------------

    def _point(self, record: ChunkRecord) -> models.PointStruct:
        vector = np.asarray(record.vector, dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"doc {record.doc_id!r} chunk {record.chunk_index}: vector has shape {vector.shape}")
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
        if self.cfg.store_text:
            payload["text"] = record.text
        vectors: dict[str, Any] = {self.cfg.vector_name: vector.tolist()}
        if self.cfg.sparse:
            bm25 = document_vector(record.text or "")
            if bm25.indices:  # a text without terms has no sparse vector at all rather than an empty one
                vectors[SPARSE_VECTOR_NAME] = bm25
        return models.PointStruct(
            id=point_id(self.cfg.collection, record.doc_id, record.chunk_index), vector=vectors, payload=payload
        )

    def upsert(self, records: Sequence[ChunkRecord]) -> None:
        """Write (or overwrite) these chunks, in batches of upsert_batch_size, each acknowledged before the next."""
        points = [self._point(r) for r in records]
        size = self.cfg.upsert_batch_size
        for start in range(0, len(points), size):
            self._call(
                self.client.upsert, collection_name=self.cfg.collection, points=points[start : start + size], wait=True
            )

    def _doc_filter(self, doc_ids: list[str]) -> models.Filter:
        return models.Filter(must=[models.FieldCondition(key="doc_id", match=models.MatchAny(any=doc_ids))])

    def complete_docs(self, doc_ids: Sequence[str]) -> set[str]:
        """The documents among `doc_ids` whose every chunk (0..n_chunks-1 of one chunking) is stored."""
        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        chunks: dict[str, set[int]] = {}
        sizes: dict[str, set[int]] = {}
        for start in range(0, len(ids), ID_BATCH):
            flt = self._doc_filter(ids[start : start + ID_BATCH])
            offset = None
            while True:
                points, offset = self._call(
                    self.client.scroll,
                    collection_name=self.cfg.collection,
                    scroll_filter=flt,
                    limit=SCROLL_PAGE,
                    offset=offset,
                    with_payload=PAYLOAD_KEYS,
                    with_vectors=False,
                )
                for p in points:
                    doc = p.payload["doc_id"]
                    chunks.setdefault(doc, set()).add(int(p.payload["chunk_index"]))
                    sizes.setdefault(doc, set()).add(int(p.payload["n_chunks"]))
                if offset is None:
                    break
        # one n_chunks across the doc's points and exactly chunks 0..n-1: a doc re-chunked differently
        # (another max_length) leaves stale points, which makes it incomplete, so the job rewrites it
        return {d for d, got in chunks.items() if len(sizes[d]) == 1 and got == set(range(next(iter(sizes[d]))))}

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        """Delete every point of these documents."""
        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        for start in range(0, len(ids), ID_BATCH):
            self._call(
                self.client.delete,
                collection_name=self.cfg.collection,
                points_selector=models.FilterSelector(filter=self._doc_filter(ids[start : start + ID_BATCH])),
                wait=True,
            )

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Pause HNSW indexing while loading (server only), so the index is built once at the end.

        Enter it once per load (the job's driver), not per writer. If indexing is already paused
        (threshold 0, by another loader or on purpose) this leaves it to whoever paused it.
        """
        # Local mode searches by brute force and builds no index: there is nothing to pause.
        if self.local or not self.cfg.pause_indexing_during_load:
            yield
            return
        name = self.cfg.collection
        previous = self._call(self.client.get_collection, name).config.optimizer_config.indexing_threshold
        if previous == 0:
            yield
            return
        self._call(
            self.client.update_collection, name, optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0)
        )
        try:
            yield
        finally:
            restore = SERVER_DEFAULT_INDEXING_THRESHOLD if previous is None else previous
            self._call(
                self.client.update_collection,
                name,
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=restore),
            )

    # -- reads ----------------------------------------------------------------------------------------

    def count(self) -> int:
        return self._call(self.client.count, self.cfg.collection, exact=True).count

    def search(
        self,
        dense: np.ndarray | None,
        text: str | None,
        top_k: int = 10,
        mode: SearchMode = "dense",
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """Top chunks for a query: by its dense vector, by BM25 on its text, or both fused with RRF.

        `filter` is a `payload_filter` spec, e.g. {"doc_id": ["a", "b"], "meta.lang": "en"}.
        """
        if mode not in ("dense", "sparse", "hybrid"):
            raise ValueError(f"unknown search mode {mode!r}; use dense, sparse or hybrid")
        if mode != "sparse" and dense is None:
            raise ValueError(f"{mode} search needs a dense query vector")
        if mode != "dense":
            if not self.cfg.sparse:
                raise ConfigError(f"{mode} search needs store.sparse=true (a collection with BM25 vectors)")
            if text is None:
                raise ValueError(f"{mode} search needs the query text")
        flt = payload_filter(filter)
        dense_q = None if dense is None else np.asarray(dense, dtype=np.float32).reshape(-1).tolist()
        sparse_q = query_vector(text) if mode != "dense" and text is not None else None
        kwargs: dict[str, Any] = {}
        if mode == "dense":
            kwargs = {"query": dense_q, "using": self.cfg.vector_name}
        elif mode == "sparse":
            if not sparse_q.indices:
                return []  # a text of stopwords only matches nothing
            kwargs = {"query": sparse_q, "using": SPARSE_VECTOR_NAME}
        else:
            limit = 4 * top_k
            prefetch = [models.Prefetch(query=dense_q, using=self.cfg.vector_name, limit=limit, filter=flt)]
            if sparse_q.indices:
                prefetch.append(models.Prefetch(query=sparse_q, using=SPARSE_VECTOR_NAME, limit=limit, filter=flt))
            kwargs = {"prefetch": prefetch, "query": models.FusionQuery(fusion=models.Fusion.RRF)}
        response = self._call(
            self.client.query_points,
            collection_name=self.cfg.collection,
            query_filter=flt,
            limit=top_k,
            with_payload=True,
            **kwargs,
        )
        return [Hit.from_point(p) for p in response.points]
