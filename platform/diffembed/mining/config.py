"""The hard-negative mining job's one config model: which pairs, which embedder, where candidates come from, how
negatives are picked, where the mined rows go."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from diffembed.batch.config import EncodeConfig
from diffembed.config import ConfigModel, EmbedderConfig
from diffembed.index.config import StoreConfig


class PairsInput(ConfigModel):
    files: list[str] = Field(description="JSONL or Parquet files/globs of {query, positive, ...} (as training reads)")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    bad_rows: Literal["skip", "fail"] = Field(
        "fail", description="A row without a non-empty query and positive: `fail` stops with `file:row: reason` "
        "before Ray starts; `skip` leaves it out of the output and counts it in the summary.",
    )


class CandidatesConfig(ConfigModel):
    """Where negatives come from: `exact` scores every query against the positives of the input itself (brute-force
    cosine); `store` searches a collection the batch job filled (`jobs/embed_corpus.py`, with `store_text: true`)."""

    source: Literal["exact", "store"] = "exact"
    store: StoreConfig | None = Field(None, description="The collection (source: store).")
    mode: Literal["dense", "sparse", "hybrid"] = Field(
        "dense", description="Store search: dense, BM25 (sparse) or hybrid (needs a collection with BM25 vectors)."
    )
    positive_id_field: str | None = Field(
        None, description="Store: a row field holding the positive's doc_id in the collection; that document's points "
        "are never negatives. Either way a candidate whose text contains, or is contained in, the positive (the "
        "positive's own document or one of its chunks) is never a negative.",
    )
    overfetch: int = Field(
        20, ge=0, description="Candidates fetched beyond skip_top + window, to make up for the positive's own "
        "document and duplicate chunks removed before ranks are counted.",
    )
    searchers: int = Field(
        2, ge=1, description="Mining actors, each on one core: exact (sharing one copy of the pool per node), or a store "
        "on a Qdrant server (the Edge store has one). The output is the same for any number.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.source == "store" and self.store is None:
            raise ValueError("candidates.source=store needs candidates.store (the batch job's collection)")
        if self.source == "exact" and self.mode != "dense":
            raise ValueError(f"candidates.mode={self.mode} needs candidates.source=store (exact scoring is dense)")
        if self.store is not None and self.store.distance == "euclid":
            raise ValueError("candidates.store.distance=euclid: mining compares cosine scores (use cosine or dot)")
        return self


class NegativesConfig(ConfigModel):
    """How negatives are picked from a query's ranked candidates (the positive's own document and duplicate
    documents removed first; ranks count from 0).

    1. the rank window: ranks [skip_top, skip_top + window);
    2. the false-negative filter: a candidate whose dense cosine with the query is >= max_positive_ratio × the
       positive's (when the positive scores below 0: >= positive − (1 − ratio)·|positive|) is dropped as a likely
       unlabelled positive (NV-Retriever's "TopK-PercPos", 0.95 there);
    3. `per_query` of the rest, drawn without replacement by a generator seeded from `seed`, the query and the
       positive (the same input gives the same negatives on every run, whatever the batching), written hardest
       first. A row with fewer survivors gets fewer negatives (counted in the summary as `short_rows`).
    """

    per_query: int = Field(1, ge=1, description="Negatives per query.")
    skip_top: int = Field(0, ge=0, description="Ranks skipped at the top (the likeliest false negatives).")
    window: int = Field(30, ge=1, description="Ranks after skip_top that negatives are drawn from.")
    max_positive_ratio: float = Field(
        0.95, gt=0, le=1, description="False-negative filter: drop candidates scoring >= this × the positive's score."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.per_query > self.window:
            raise ValueError(f"negatives.per_query={self.per_query} exceeds negatives.window={self.window}")
        return self


class MineNegativesConfig(ConfigModel):
    embedder: EmbedderConfig = Field(
        default_factory=EmbedderConfig, description="The base model that scores candidates (source: store: the "
        "collection's own embedding function; a mismatch is an error naming what differs).",
    )
    input: PairsInput
    output: str = Field(description="JSONL file (local or a URI) of the input rows, each with `negatives` set.")
    part_rows: int = Field(
        10_000, ge=1, description="Rows per output part: the mined rows are written to `<output>.parts/` in parts "
        "of this many rows, each kept once whole; a rerun of a failed run with the same settings and input mines "
        "only the rows after its complete parts. The parts become `output` when every row is written.",
    )
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    summary_path: str | None = Field(None, description="Where the JSON summary goes (default: printed only).")

    @property
    def fetch(self) -> int:
        """Candidates fetched per query."""
        return self.negatives.skip_top + self.negatives.window + self.candidates.overfetch
