"""How hybrid search fuses its dense and BM25 result lists, one definition for both stores and evaluation.

- `rrf`: reciprocal rank fusion, `sum 1 / (k + rank)` with 0-based ranks (Qdrant's formula, k=RRF_K).
- `dbsf`: distribution-based score fusion (Qdrant's): each list's scores mapped through its mean +- 3 sample
  standard deviations onto [0, 1] (a one-point or constant list scores 0.5), then summed.
- `weighted`: the same normalised scores combined as `dense_weight * dense + (1 - dense_weight) * sparse`,
  so the tuned balance of the two retrievers is explicit (weight 0.5 ranks as dbsf).

`rrf` and `dbsf` run inside Qdrant (Edge's `Fusion.Rrf`/`Fusion.Dbsf`, the server's query API); `weighted` has
no engine form, so the stores fetch both lists and fuse them here with `fuse`. Evaluation (fusion tuning) uses
`fuse` on the same two lists; tests check that it agrees with the engines.

A collection may carry its tuned setting (`FusionSettings`, written by `jobs/evaluate.py --tune-fusion`): a
hybrid search that names no fusion uses it, so the service picks it up without any change of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, Self, TypeVar

import numpy as np
from pydantic import Field, model_validator

from diffembed.config import ConfigModel

FusionMethod = Literal["rrf", "dbsf", "weighted"]
FUSION_METHODS: tuple[str, ...] = ("rrf", "dbsf", "weighted")
RRF_K = 60  # reciprocal rank fusion constant, the same on both backends
SEARCH_SETTINGS_KEY = "search"  # where a collection keeps its FusionSettings (collection.json / server metadata)

K = TypeVar("K", bound=Hashable)


class FusionSettings(ConfigModel):
    """How a hybrid search fuses dense and BM25: the default `rrf`, or a setting tuned on a dev split."""

    fusion: FusionMethod = "rrf"
    dense_weight: float = Field(0.5, ge=0.0, le=1.0,
                                description="weighted: the dense list's share; BM25 gets the rest.")
    tuned_on: str | None = Field(None, description="Where the setting was tuned (task and split), for the record.")
    ndcg_at_10: float | None = Field(None, description="Its dev nDCG@10 when tuned.")

    @model_validator(mode="after")
    def _weight_only_when_weighted(self) -> Self:
        if self.fusion != "weighted" and self.dense_weight != 0.5:
            raise ValueError(f"dense_weight applies to fusion 'weighted' only (fusion is {self.fusion!r})")
        return self


def resolve(stored: FusionSettings | None, fusion: str | None, dense_weight: float | None) -> FusionSettings:
    """The setting a hybrid search uses: the call's own, else the collection's stored one, else RRF.

    A `dense_weight` alone means weighted fusion; a `fusion` alone takes the stored weight when the stored
    setting is weighted too (else 0.5)."""
    if fusion is None and dense_weight is None:
        return stored or FusionSettings()
    method = fusion or "weighted"
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion {method!r}; use rrf, dbsf or weighted")
    if method != "weighted":
        if dense_weight is not None:
            raise ValueError(f"dense_weight applies to fusion 'weighted' only (fusion is {method!r})")
        return FusionSettings(fusion=method)
    if dense_weight is None:
        dense_weight = stored.dense_weight if stored is not None and stored.fusion == "weighted" else 0.5
    if not 0.0 <= float(dense_weight) <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    return FusionSettings(fusion="weighted", dense_weight=float(dense_weight))


def dbsf_normalise(scores: Sequence[float]) -> np.ndarray:
    """Scores mapped through mean +- 3 sample std onto [0, 1] (Qdrant's `distr_norm`): 0.5 for one point or
    a constant list."""
    x = np.asarray(scores, dtype=np.float64)
    if len(x) < 2:
        return np.full(len(x), 0.5)
    mean, std = x.mean(), x.std(ddof=1)
    low, high = mean - 3 * std, mean + 3 * std
    if high == low:
        return np.full(len(x), 0.5)
    return (x - low) / (high - low)


def fuse(lists: Sequence[Sequence[tuple[K, float]]], settings: FusionSettings, k: int = RRF_K
         ) -> list[tuple[K, float]]:
    """Fuse ranked lists of (id, score), best first each: [dense, sparse] for `weighted`. Best first out;
    ties go to the id seen first (dense before sparse), as a stable order."""
    if settings.fusion == "weighted" and len(lists) != 2:
        raise ValueError("weighted fusion takes exactly two lists: dense, sparse")
    weighted = settings.fusion == "weighted"
    weights = [settings.dense_weight, 1.0 - settings.dense_weight] if weighted else [1.0] * len(lists)
    total: dict[K, float] = {}
    for ranked, weight in zip(lists, weights):
        if not ranked:
            continue
        if settings.fusion == "rrf":
            contributions = [1.0 / (k + rank) for rank in range(len(ranked))]
        else:
            contributions = (weight * dbsf_normalise([score for _, score in ranked])).tolist()
        for (key, _), value in zip(ranked, contributions):
            total[key] = total.get(key, 0.0) + value
    return sorted(total.items(), key=lambda item: -item[1])  # stable: insertion order breaks ties
