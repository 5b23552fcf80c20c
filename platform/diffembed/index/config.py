"""Where embeddings are stored: one Qdrant collection, on a server (`url`) or embedded with Qdrant Edge (`path`)."""

from __future__ import annotations

import os
from typing import Literal, Self

from pydantic import Field, model_validator

from diffembed.config import ConfigModel


class StoreConfig(ConfigModel):
    """A Qdrant collection and how points are written to it.

    The same config is read by the job that fills the collection and the service that queries it,
    so both agree on the vector name, distance and whether a BM25 sparse vector exists.
    """

    url: str | None = Field(
        None, description="Qdrant server, e.g. http://qdrant:6333 (the `server` backend). None: the embedded Qdrant "
        "Edge store under `path` (the `edge` backend)."
    )
    api_key: str | None = Field(None, repr=False, description="Server API key; read from QDRANT_API_KEY when unset.")
    path: str = Field(
        "qdrant_data", description="Edge: the folder holding one sub-folder per collection (one process at a time)."
    )
    lock_wait_s: float = Field(
        5.0, ge=0, description="Edge: how long to wait for another process (e.g. a killed job's store actor being "
        "cleaned up) to release the store before the one-line 'open in another process' error.",
    )
    prefer_grpc: bool = Field(False, description="Server: talk gRPC (port 6334) instead of REST, faster for bulk writes.")
    collection: str = "diffembed"
    vector_name: str = Field("dense", description="Name of the dense vector in each point.")
    distance: Literal["cosine", "dot", "euclid"] = "cosine"
    on_disk_vectors: bool = Field(False, description="Keep original dense vectors on disk (memmap) instead of RAM.")
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: scalar quantization of the dense vector (4x less RAM for the search copy)."
    )
    shards: int | None = Field(
        None, ge=1, description="Server only: shard_number of a collection the job creates (None: Qdrant's default, 1)."
    )
    replication_factor: int | None = Field(
        None, ge=1, description="Server only: copies of each shard in a distributed Qdrant (None: Qdrant's default, 1)."
    )
    write_consistency_factor: int | None = Field(
        None, ge=1, description="Server only: replicas that must confirm a write (<= replication_factor)."
    )
    sparse: bool = Field(False, description="Also store a BM25 sparse vector named 'bm25' (sparse/hybrid search).")
    store_text: bool = Field(True, description="Keep each chunk's text in its payload.")
    upsert_batch_size: int = Field(256, ge=1, description="Points per upsert request.")
    writers: int = Field(
        2, ge=1, description="Server: writer actors upserting in parallel (the embedded Edge store has one owner)."
    )
    max_retries: int = Field(5, ge=1, description="Attempts per request on connection errors, timeouts and 5xx.")
    pause_indexing_during_load: bool = Field(
        True, description="Server only: no HNSW indexing while the job writes; the index is built once at the end."
    )
    timeout_s: float = Field(60, gt=0, description="Per-request timeout against a server.")

    @model_validator(mode="after")
    def _replicas(self) -> Self:
        if self.write_consistency_factor and self.write_consistency_factor > (self.replication_factor or 1):
            raise ValueError(
                f"write_consistency_factor ({self.write_consistency_factor}) exceeds replication_factor "
                f"({self.replication_factor or 1}): no write could ever be confirmed"
            )
        return self

    @model_validator(mode="after")
    def _api_key_from_env(self) -> Self:
        # Keys belong in the environment, not in YAML files that get committed.
        if self.api_key is None and os.environ.get("QDRANT_API_KEY"):
            object.__setattr__(self, "api_key", os.environ["QDRANT_API_KEY"])
        return self
