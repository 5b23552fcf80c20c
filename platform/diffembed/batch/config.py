"""The batch-embedding job's one config model: which corpus, which embedder, which Qdrant collection."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from diffembed.config import ConfigModel, CustomResources, EmbedderConfig, ray_options
from diffembed.index.config import StoreConfig


class InputConfig(ConfigModel):
    paths: list[str] = Field(description="JSONL/Parquet files or globs (local or s3://, gs://), or a folder of .txt/.md")
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    id_column: str | None = Field("id", description="Missing or empty ids become a stable hash of the content.")
    text_column: str = "text"
    title_column: str | None = None
    metadata_columns: list[str] = Field(default_factory=list)
    bad_rows: Literal["skip", "fail"] = Field(
        "skip", description="A row that cannot be embedded (malformed JSON, non-text or empty text): `skip` counts "
        "it and names the first ones (file:line) in a warning and the summary; `fail` stops with `file:line: reason` "
        "before anything is written.",
    )
    block_bytes: int = Field(
        8 << 20, ge=1024, description="JSONL files are read as byte ranges of this size (bounded blocks whatever "
        "the file size; the first points are written while the rest is still read).",
    )


class EncodeConfig(ConfigModel):
    """How the encoder actors run. *What* a document's vectors are (title, prefix, windows) is the embedder's
    document policy (`embedder.documents`), shared with evaluation and serving."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "long_documents" in data:
            raise ValueError("encode.long_documents moved to the embedder's document policy: "
                             "embedder.documents.windows (first | mean | best; chunk = best, truncate = first)")
        return data

    actors: int = Field(1, ge=1, description="Encoder actors (one model load each); one per GPU on a cluster.")
    num_gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, gt=0)
    resources_per_actor: CustomResources = Field(
        default_factory=dict,
        description="Extra Ray resources per actor, e.g. {inference_node: 1} for cluster.yaml's inference pool.",
    )
    batch_size: int = Field(32, ge=1, description="Documents per actor call (the Embedder then batches by tokens).")
    max_restarts: int = Field(
        0, ge=-1, description="Restarts of an encoder actor that died (a lost node, out of memory). 0: the job "
        "stops and a rerun resumes where it stopped. Raise it on preemptible nodes (-1: unlimited); Ray then logs "
        "that the actor's constructor arguments live in the object store (harmless: the pipeline holds them).",
    )
    simulated_batch_s: float = Field(
        0, ge=0, description="Benchmarks only: every actor call also waits this long, a fixed per-batch cost "
        "like a GPU's, so actor scaling can be measured on a machine with fewer cores than actors.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per actor on CPU. Default: the node's cores / actors."
    )

    def ray_remote_args(self) -> dict[str, Any]:
        """The resource options every encoder actor is started with (Ray Data's `map_batches` remote args)."""
        return ray_options(self.cpus_per_actor, self.num_gpus_per_actor, self.resources_per_actor)


class EmbedCorpusConfig(ConfigModel):
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    input: InputConfig
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    skip_existing: bool = Field(True, description="Documents already fully in the collection are not re-embedded.")
    recreate: bool = Field(
        False, description="Delete the collection first and embed everything again (e.g. after changing the model "
        "or the document policy; without it such a change is an error naming what differs).",
    )
    progress_every_s: float = Field(5.0, ge=0, description="Seconds between progress lines (0: after every batch).")
    summary_path: str | None = Field(None, description="Where the JSON summary goes (default: printed only).")
