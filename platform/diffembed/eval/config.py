"""The evaluation job's one config model: which embedder, which retrieval tasks, how documents are retrieved."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from diffembed.batch.config import EncodeConfig
from diffembed.config import ConfigModel, CustomResources, EmbedderConfig, ray_bundle, ray_options, repeated
from diffembed.index.config import StoreConfig
from diffembed.index.fusion import FusionMethod

DEFAULT_FUSION_WEIGHTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

TaskKind = Literal["beir", "passkey", "needle"]
SYNTHETIC_KINDS = ("passkey", "needle")
# LongEmbed's eight context lengths for the synthetic tasks, in tokens.
LONGEMBED_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
MIN_SYNTHETIC_LENGTH = 32


class TaskConfig(ConfigModel):
    """One retrieval task: a BEIR-layout dataset on disk, or a LongEmbed-style synthetic task built offline."""

    name: str = Field(min_length=1, description="Unique within the job; synthetic lengths report as '<name>@<length>'.")
    kind: TaskKind
    path: str | None = Field(None, description="beir: the dataset folder (corpus.jsonl, queries.jsonl, qrels/).")
    split: str = Field("test", description="beir: which qrels/<split>.tsv to score.")
    max_queries: int | None = Field(
        None, ge=1, description="beir: score only the first N judged queries (file order), for quick runs."
    )
    lengths: list[int] = Field(
        default_factory=lambda: list(LONGEMBED_LENGTHS),
        description="passkey/needle: document lengths in tokens of the embedder's tokenizer (no special tokens).",
    )
    queries_per_length: int = Field(50, ge=1, description="passkey/needle: queries per length (LongEmbed: 50).")
    documents_per_length: int = Field(
        100, ge=1, description="passkey/needle: documents per length, one answer per query among them (LongEmbed: 100)."
    )
    seed: int = Field(0, description="passkey/needle: the generator's seed; same seed and tokenizer, same task.")
    instruction: str | None = Field(
        None, description="Query instruction for this task; None: the embedder's query_instruction."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if "@" in self.name or "/" in self.name:
            raise ValueError(f"task name {self.name!r} may not contain '@' or '/'")
        if self.kind == "beir":
            if not self.path:
                raise ValueError(f"task {self.name!r}: a beir task needs path (the dataset folder)")
        else:
            if self.path is not None:
                raise ValueError(f"task {self.name!r}: path is only for beir tasks ({self.kind} is generated)")
            if not self.lengths:
                raise ValueError(f"task {self.name!r}: lengths is empty")
            if len(set(self.lengths)) != len(self.lengths):
                raise ValueError(f"task {self.name!r}: lengths has repeats")
            if min(self.lengths) < MIN_SYNTHETIC_LENGTH:
                raise ValueError(f"task {self.name!r}: lengths must be at least {MIN_SYNTHETIC_LENGTH} tokens")
            if self.queries_per_length > self.documents_per_length:
                raise ValueError(
                    f"task {self.name!r}: queries_per_length ({self.queries_per_length}) exceeds "
                    f"documents_per_length ({self.documents_per_length}); each query needs its own document"
                )
        return self

    @property
    def synthetic(self) -> bool:
        return self.kind in SYNTHETIC_KINDS

    @property
    def primary_metric(self) -> str:
        """LongEmbed scores passkey and needle by nDCG@1, retrieval datasets by nDCG@10."""
        return "ndcg@1" if self.synthetic else "ndcg@10"


class RetrievalConfig(ConfigModel):
    """How documents are retrieved: exact in-memory search, or through Qdrant as the platform serves them."""

    backend: Literal["exact", "qdrant"] = Field(
        "exact",
        description="exact: every document encoded in this process, brute-force scores. qdrant: the corpus goes "
        "through the embed_corpus batch job into a collection, queries through the store's search.",
    )
    mode: Literal["dense", "sparse", "hybrid"] = Field(
        "dense", description="sparse (BM25) and hybrid (dense + BM25, RRF) need backend qdrant."
    )
    top_k: int = Field(100, ge=10, description="Documents retrieved per query (Recall@100 needs 100).")
    store: StoreConfig = Field(
        default_factory=lambda: StoreConfig(collection="eval"),
        description="backend qdrant: the server (url) or local path; one collection per task (and length) is "
        "named '<collection>-<job name>-<task>[-<length>]'. Without url and path: <output_dir>/qdrant.",
    )
    encode: EncodeConfig = Field(
        default_factory=EncodeConfig,
        description="backend qdrant: the batch job's actor settings. Long documents follow the embedder's "
        "document policy (embedder.documents), as in the batch job and the service.",
    )
    reuse_collections: bool = Field(
        False,
        description="backend qdrant: keep what a collection already holds (a collection holding every document "
        "is searched as is). Only sound when model, chunking and data are unchanged; default: rebuild.",
    )
    fusion: FusionMethod | None = Field(
        None, description="mode hybrid: rrf, dbsf or weighted (dense_weight); None: the collection's stored "
        "(tuned) setting, else rrf.",
    )
    dense_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="fusion weighted: the dense list's share (BM25 gets the rest).")
    tune_fusion: bool = Field(
        False, description="mode hybrid: before scoring, pick the fusion (rrf, dbsf, weighted x fusion_weights) "
        "with the best nDCG@10 on each BEIR task's `tune_split`, store it with the task's collection (a later "
        "hybrid search there uses it by default) and score the test split with it (`evaluate.py --tune-fusion`).",
    )
    tune_split: str = Field("dev", min_length=1, description="tune_fusion: the qrels split tuned on.")
    fusion_weights: list[float] = Field(
        default_factory=lambda: list(DEFAULT_FUSION_WEIGHTS), min_length=1,
        description="tune_fusion: the dense_weight values tried for weighted fusion.",
    )

    dimensions: list[int] = Field(
        default_factory=list, description="backend exact: also score at these Matryoshka prefix sizes (each prefix "
        "re-normalised, as Serve's `dimensions` serves it); reported per task under `by_dimension`.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.dimensions and self.backend != "exact":
            raise ValueError("retrieval.dimensions needs retrieval.backend=exact (a collection holds one size)")
        if any(d < 1 for d in self.dimensions) or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError("retrieval.dimensions must be distinct positive sizes")
        if self.mode != "dense" and self.backend != "qdrant":
            raise ValueError(
                f"retrieval.mode={self.mode} needs retrieval.backend=qdrant (the BM25 vectors live in Qdrant)"
            )
        fusing = self.fusion is not None or self.dense_weight is not None or self.tune_fusion
        if fusing and self.mode != "hybrid":
            raise ValueError("retrieval.fusion, dense_weight and tune_fusion apply to retrieval.mode=hybrid only")
        if self.tune_fusion and (self.fusion is not None or self.dense_weight is not None):
            raise ValueError("retrieval.tune_fusion picks fusion and dense_weight itself; leave them unset")
        if self.dense_weight is not None and self.fusion not in (None, "weighted"):
            raise ValueError(f"retrieval.dense_weight applies to fusion weighted only (fusion is {self.fusion})")
        if any(not 0.0 <= w <= 1.0 for w in self.fusion_weights):
            raise ValueError("retrieval.fusion_weights must lie in [0, 1]")
        return self


class ComputeConfig(ConfigModel):
    """Where the evaluation's own encoding runs. On a cluster the job's driver sits on the CPU head node, so
    asking for a GPU (or a custom resource such as cluster.yaml's `inference_node`) runs the whole evaluation
    as one Ray task on a node that has it; with neither it runs in the driver's process."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    resources: CustomResources = Field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return bool(self.num_gpus or self.resources)

    def ray_remote_args(self) -> dict[str, Any]:
        return ray_options(self.num_cpus, self.num_gpus, self.resources)

    def bundle(self) -> dict[str, float]:
        return ray_bundle(self.num_cpus, self.num_gpus, self.resources)


class EvalConfig(ConfigModel):
    """One evaluation job: an embedder scored on a list of retrieval tasks."""

    name: str = Field("eval", min_length=1, description="Names the run in the report (and its Qdrant collections).")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    output_dir: str = Field("runs/eval", description="results.json and results.md are written here.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @model_validator(mode="after")
    def _check(self) -> Self:
        dupes = repeated([t.name for t in self.tasks])
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")
        return self
