"""The server backend of the store interface: a Qdrant server or cluster (`store.url`) through qdrant-client.

Requests are retried on connection errors, timeouts and 5xx (never on 4xx); the API key comes from
`QDRANT_API_KEY`; collections the job creates get the configured shards/replicas. The embedding fingerprint
and the tuned hybrid fusion (`diffembed_search`) live in the collection's metadata; a multivector collection's
dense vector has Qdrant's MaxSim multivector config. HNSW indexing is paused
during a bulk load (indexing threshold 0) and restored at its end; the threshold to restore is recorded in the collection's metadata first, so a run killed
mid-load is repaired by the next one at its start. Tests use qdrant-client's local mode as a stand-in for the
server's client API (`ServerStore(cfg, client=QdrantClient(path=...))`); the product never does.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.fusion import FusionSettings, resolve
from diffembed.index.sparse import SPARSE_VECTOR_NAME, document_vector, query_vector
from diffembed.index.store import (
    HYBRID_PREFETCH,
    PAYLOAD_KEYS,
    RRF_K,
    ChunkRecord,
    Hit,
    SearchMode,
    check_collection,
    StoredPoint,
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
T = TypeVar("T")

SERVER_DEFAULT_INDEXING_THRESHOLD = 10_000  # what the server uses when a collection sets none
ID_BATCH = 256  # doc ids per MatchAny filter: keeps request bodies small
SCROLL_PAGE = 1024
_DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT, "euclid": models.Distance.EUCLID}
FINGERPRINT_KEY = "diffembed_fingerprint"
SEARCH_KEY = "diffembed_search"  # the collection's tuned FusionSettings
SETTINGS_TTL_S = 30.0  # a service re-reads the tuned fusion this often (not one metadata request per query)
PAUSED_KEY = "diffembed_paused_indexing_threshold"  # set while a bulk load has indexing paused


def server_filter(spec: dict[str, Any] | None) -> models.Filter | None:
    """A `validate_filter` spec as qdrant-client's Filter (exact match, or match-any for a list)."""
    conditions = []
    for key, value in validate_filter(spec):
        match = models.MatchAny(any=list(value)) if isinstance(value, list) else models.MatchValue(value=value)
        conditions.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=conditions) if conditions else None


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts and 5xx are worth retrying; 4xx (bad request, wrong size) never are."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and exc.status_code >= 500
    if isinstance(exc, ResponseHandlingException):
        # wraps transport errors, but also a response body that fails to parse, which a retry won't fix
        return not isinstance(exc.source, ValidationError)
    return isinstance(exc, (ConnectionError, TimeoutError))


class ServerStore:
    """A Qdrant server collection of document points; see the module docstring. Use as a context manager."""

    backend = "server"

    def __init__(self, cfg: StoreConfig, client: QdrantClient | None = None):
        self.cfg = cfg
        if client is not None:  # tests: qdrant-client local mode standing in for a server
            self.client = client
        elif cfg.url:
            self.client = QdrantClient(url=cfg.url, api_key=cfg.api_key, timeout=math.ceil(cfg.timeout_s),
                                       prefer_grpc=cfg.prefer_grpc)
        else:
            raise ConfigError("the server backend needs store.url")
        self._settings: tuple[float, FusionSettings | None] | None = None  # (read at, value) of search_settings
        self._retrying = Retrying(
            stop=stop_after_attempt(cfg.max_retries),
            wait=wait_exponential_jitter(initial=0.5, max=30),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    @property
    def local(self) -> bool:
        """qdrant-client local mode (the test stand-in): no payload indexes, no HNSW to pause."""
        return not self.cfg.url

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._retrying.copy()(fn, *args, **kwargs)  # a copy per call: Retrying keeps per-call state

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ServerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection -----------------------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self._call(self.client.collection_exists, self.cfg.collection))

    def _metadata(self) -> dict[str, Any]:
        info = self._call(self.client.get_collection, self.cfg.collection)
        return dict(getattr(info.config, "metadata", None) or {})

    def fingerprint(self) -> dict[str, Any] | None:
        return self._metadata().get(FINGERPRINT_KEY) if self.exists() else None

    def search_settings(self) -> FusionSettings | None:
        """The tuned fusion in the collection's metadata, re-read at most every SETTINGS_TTL_S (another process,
        e.g. a tuning job, may change it while a service runs)."""
        now = time.monotonic()
        if self._settings is not None and now - self._settings[0] < SETTINGS_TTL_S:
            return self._settings[1]
        stored = self._metadata().get(SEARCH_KEY) if self.exists() else None
        try:
            settings = FusionSettings.model_validate(stored) if stored else None
        except ValueError as exc:
            raise ConfigError(f"collection {self.cfg.collection!r}: unreadable search settings "
                              f"({' '.join(str(exc).split())[:200]})") from None
        self._settings = (now, settings)
        return settings

    def set_search_settings(self, settings: FusionSettings | None) -> None:
        value = None if settings is None else settings.model_dump(mode="json")
        self._call(self.client.update_collection, self.cfg.collection, metadata={SEARCH_KEY: value})
        self._settings = None

    def drop(self) -> None:
        self._settings = None
        if self.exists():
            self._call(self.client.delete_collection, self.cfg.collection)

    def ensure_collection(self, dim: int, fingerprint: dict[str, Any] | None = None,
                          multivector: bool | None = None) -> None:
        """Create the collection for `dim`-dim vectors (multivectors of them, MaxSim, when `multivector`; None: as
        the fingerprint says), or check that the existing one fits (ConfigError if not)."""
        name = self.cfg.collection
        multivector = multivector_of(fingerprint) if multivector is None else multivector
        if self._call(self.client.collection_exists, name):
            self._check_existing(dim, fingerprint, multivector)
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
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
                if multivector else None,
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
                metadata={FINGERPRINT_KEY: fingerprint} if fingerprint is not None else None,
            )
        except Exception:
            # another process may have created it between our check and our create
            if not self._call(self.client.collection_exists, name):
                raise
            self._check_existing(dim, fingerprint, multivector)
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

    def _check_existing(self, dim: int, fingerprint: dict[str, Any] | None = None, multivector: bool = False) -> None:
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
        sparse = (params.sparse_vectors or {}).get(SPARSE_VECTOR_NAME)
        check_collection(cfg, dim, {n: (v.size, v.distance.value.lower()) for n, v in vectors.items()},
                         sparse is not None, (getattr(info.config, "metadata", None) or {}).get(FINGERPRINT_KEY),
                         fingerprint, stored_multivector=vectors[cfg.vector_name].multivector_config is not None,
                         multivector=multivector)
        if cfg.sparse and sparse.modifier != models.Modifier.IDF:
            raise ConfigError(
                f"collection {name!r} has sparse vector {SPARSE_VECTOR_NAME!r} without the IDF modifier; "
                f"its BM25 scores would be wrong (use another store.collection)"
            )
        if not self.local and "doc_id" not in (info.payload_schema or {}):
            self._index_doc_id()

    # -- writes ---------------------------------------------------------------------------------------

    def _point(self, record: ChunkRecord) -> models.PointStruct:
        vectors: dict[str, Any] = {self.cfg.vector_name: dense_list(record)}
        if self.cfg.sparse:
            bm25 = document_vector(record.text or "")
            if bm25.indices:  # a text without terms has no sparse vector at all rather than an empty one
                vectors[SPARSE_VECTOR_NAME] = bm25
        return models.PointStruct(id=point_id(self.cfg.collection, record.doc_id, record.chunk_index),
                                  vector=vectors, payload=point_payload(record, self.cfg.store_text))

    def upsert(self, records: Sequence[ChunkRecord]) -> None:
        """Write (or overwrite) these points, in batches of upsert_batch_size, each acknowledged before the next."""
        self._write([self._point(r) for r in records])

    def upsert_points(self, points: Sequence[StoredPoint]) -> None:
        self._write([
            models.PointStruct(id=p.id, payload=p.payload, vector={
                name: models.SparseVector(indices=list(v[0]), values=list(v[1])) if isinstance(v, tuple) else v
                for name, v in p.vectors.items()
            })
            for p in points
        ])

    def _write(self, points: list[models.PointStruct]) -> None:
        size = self.cfg.upsert_batch_size
        for start in range(0, len(points), size):
            self._call(
                self.client.upsert, collection_name=self.cfg.collection, points=points[start : start + size], wait=True
            )

    def _doc_filter(self, doc_ids: list[str]) -> models.Filter:
        return models.Filter(must=[models.FieldCondition(key="doc_id", match=models.MatchAny(any=doc_ids))])

    def complete_docs(self, doc_ids: Sequence[str]) -> set[str]:
        """The documents among `doc_ids` whose every point (0..n_chunks-1 of one chunking) is stored."""
        ids = list(dict.fromkeys(str(d) for d in doc_ids))

        def payloads() -> Iterator[dict]:
            for start in range(0, len(ids), ID_BATCH):
                flt, offset = self._doc_filter(ids[start : start + ID_BATCH]), None
                while True:
                    points, offset = self._call(
                        self.client.scroll, collection_name=self.cfg.collection, scroll_filter=flt,
                        limit=SCROLL_PAGE, offset=offset, with_payload=PAYLOAD_KEYS, with_vectors=False,
                    )
                    for p in points:
                        yield p.payload
                    if offset is None:
                        break

        return complete_from_payloads(payloads())

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

    def delete_stale_chunks(self, n_chunks: Mapping[str, int]) -> None:
        """Delete the points of chunk_index >= n of each document `{doc_id: n}` (left by a longer earlier
        version of it); documents with the same n share one filter."""
        groups: dict[int, list[str]] = {}
        for doc, n in n_chunks.items():
            groups.setdefault(int(n), []).append(str(doc))
        for n, ids in groups.items():
            for start in range(0, len(ids), ID_BATCH):
                flt = models.Filter(must=[
                    models.FieldCondition(key="doc_id", match=models.MatchAny(any=ids[start : start + ID_BATCH])),
                    models.FieldCondition(key="chunk_index", range=models.Range(gte=n)),
                ])
                self._call(self.client.delete, collection_name=self.cfg.collection,
                           points_selector=models.FilterSelector(filter=flt), wait=True)

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Pause HNSW indexing while loading, so the index is built once at the end.

        The threshold to restore is written to the collection's metadata before pausing; a load that was killed
        (threshold left at 0) is repaired at the start of the next one. Enter it once per load (the job's
        driver), not per writer.
        """
        if self.local or not self.cfg.pause_indexing_during_load:
            yield  # the local-mode stand-in builds no index: nothing to pause
            return
        name = self.cfg.collection
        info = self._call(self.client.get_collection, name)
        metadata = dict(getattr(info.config, "metadata", None) or {})
        current = info.config.optimizer_config.indexing_threshold
        if PAUSED_KEY in metadata:  # an earlier load died while paused: its recorded threshold is the real one
            restore = metadata[PAUSED_KEY]
            log.warning("collection %s: indexing was left paused by an interrupted load; restoring %s", name, restore)
        elif current == 0:
            yield  # paused by someone else, on purpose: leave it to them
            return
        else:
            restore = SERVER_DEFAULT_INDEXING_THRESHOLD if current is None else current
            self._call(self.client.update_collection, name, metadata={PAUSED_KEY: restore})
        self._call(self.client.update_collection, name,
                   optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0))
        try:
            yield
        finally:
            self._call(self.client.update_collection, name,
                       optimizers_config=models.OptimizersConfigDiff(indexing_threshold=restore))
            self._call(self.client.update_collection, name, metadata={PAUSED_KEY: None})

    # -- reads ----------------------------------------------------------------------------------------

    def count(self, exact: bool = True) -> int:
        return self._call(self.client.count, self.cfg.collection, exact=exact).count

    def search(
        self,
        dense: np.ndarray | None,
        text: str | None,
        top_k: int = 10,
        mode: SearchMode = "dense",
        filter: dict[str, Any] | None = None,
        fusion: str | None = None,
        dense_weight: float | None = None,
        payload: bool | list[str] = True,
    ) -> list[Hit]:
        """Top points for a query: by its dense vector, by BM25 on its text, or both fused (`fusion`/
        `dense_weight` when given, else the collection's tuned setting, else RRF at k=RRF_K).

        `dense` is (D,), or (K, D) on a multivector collection (MaxSim). `filter` is a `validate_filter` spec,
        e.g. {"doc_id": ["a", "b"], "meta.lang": "en"}. `payload`: the payload keys each hit carries (True: all).
        """
        check_search(self.cfg, dense, text, mode)
        settings = None
        if mode == "hybrid":
            stored = self.search_settings() if fusion is None and dense_weight is None else None
            settings = resolve(stored, fusion, dense_weight)
        flt = server_filter(filter)
        dense_q = query_list(dense)  # (D,) or a multivector query (K, D)
        sparse_q = query_vector(text) if mode != "dense" and text is not None else None
        kwargs: dict[str, Any] = {}
        if mode == "dense":
            kwargs = {"query": dense_q, "using": self.cfg.vector_name}
        elif mode == "sparse":
            if not sparse_q.indices:
                return []  # a text of stopwords only matches nothing
            kwargs = {"query": sparse_q, "using": SPARSE_VECTOR_NAME}
        elif settings.fusion == "weighted":
            return self._weighted(dense_q, sparse_q, flt, settings, top_k, payload)
        else:
            limit = HYBRID_PREFETCH * top_k
            prefetch = [models.Prefetch(query=dense_q, using=self.cfg.vector_name, limit=limit, filter=flt)]
            if sparse_q.indices:
                prefetch.append(models.Prefetch(query=sparse_q, using=SPARSE_VECTOR_NAME, limit=limit, filter=flt))
            query = (models.RrfQuery(rrf=models.Rrf(k=RRF_K)) if settings.fusion == "rrf"
                     else models.FusionQuery(fusion=models.Fusion.DBSF))
            kwargs = {"prefetch": prefetch, "query": query}
        response = self._call(
            self.client.query_points,
            collection_name=self.cfg.collection,
            query_filter=flt,
            limit=top_k,
            with_payload=payload,
            **kwargs,
        )
        return [Hit.from_scored(p.id, p.score, p.payload) for p in response.points]

    def _weighted(self, dense_q: list, sparse_q: models.SparseVector, flt: models.Filter | None,
                  settings: FusionSettings, top_k: int, payload: bool | list[str] = True) -> list[Hit]:
        """Weighted fusion has no server form: both lists in one batch request, fused here."""
        limit = HYBRID_PREFETCH * top_k
        requests = [models.QueryRequest(query=dense_q, using=self.cfg.vector_name, filter=flt, limit=limit,
                                        with_payload=payload)]
        if sparse_q.indices:
            requests.append(models.QueryRequest(query=sparse_q, using=SPARSE_VECTOR_NAME, filter=flt, limit=limit,
                                                with_payload=payload))
        responses = self._call(self.client.query_batch_points, collection_name=self.cfg.collection, requests=requests)
        lists = [[Hit.from_scored(p.id, p.score, p.payload) for p in r.points] for r in responses] + [[]]
        return fuse_hits(lists[0], lists[1], settings, top_k)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` that the collection holds."""
        ids = list(ids)
        if not ids:
            return set()
        records = self._call(self.client.retrieve, self.cfg.collection, ids, with_payload=False, with_vectors=False)
        return {str(r.id) for r in records}

    def iter_points(self, batch_size: int = 256) -> Iterator[list[StoredPoint]]:
        offset = None
        while True:
            points, offset = self._call(self.client.scroll, collection_name=self.cfg.collection, limit=batch_size,
                                        offset=offset, with_payload=True, with_vectors=True)
            out = []
            for p in points:
                vectors = {}
                for name, value in (p.vector or {}).items():
                    vectors[name] = (list(value.indices), list(value.values)) if hasattr(value, "indices") else value
                out.append(StoredPoint(str(p.id), vectors, p.payload or {}))
            if out:
                yield out
            if offset is None:
                return
