"""The one document policy: how a document becomes what is stored, scored and served.

A document is a text with an optional title. The policy says how the title joins the text, which prefix goes
before the content of *every* token window, and how a document longer than one window is represented:

- `first`: its first window only (the rest is cut off) — one vector per document;
- `mean`:  every window embedded, the windows averaged (weighted by pooled tokens) — one vector per document;
- `best`:  every window is its own vector (one index point each) and a document scores as its best window;
- `late_chunk`: late chunking — one forward pass per window of up to `max_length` tokens (macro-windows for
  longer documents), then each chunk of `chunk_tokens` content tokens is the mean of *its* tokens' final states:
  chunk vectors that saw the whole window's context (natural for bidirectional backbones). One point per chunk.

Where a document is several points (`best`, `late_chunk`), `aggregate` says how its windows' scores make the
document's score: `best` (the best window), `first_prior` (first_weight · first window + (1 - first_weight) ·
best: the top of a document usually says what it is about) or `softmax` (windows weighted by softmax(score /
temperature): a smooth maximum that credits several good windows).

Training, the batch job, evaluation, Serve and the MTEB adapter all read the policy from
`EmbedderConfig.documents` and go through the Embedder, so the same document gets the same vector(s) on every
path. The helpers below are the one implementation of "a document's score is its best window's score".
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Self, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Windows = Literal["first", "mean", "best", "late_chunk"]
Aggregate = Literal["best", "first_prior", "softmax"]


class DocumentPolicy(BaseModel):
    """Part of `EmbedderConfig` (`documents:`), so it is saved with the embedding function in diffembed.json."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    title: Literal["prepend", "ignore"] = Field(
        "prepend", description="prepend: the title goes before the text (as BEIR and MTEB encode it); ignore: text only."
    )
    title_separator: str = Field(" ", description="Between title and text when the title is prepended.")
    prefix: str = Field("", description="Put before the content of every window (e.g. 'passage: ').")
    windows: Windows = Field(
        "first",
        description="Documents longer than one window: first (truncate), mean (all windows averaged to one "
        "vector), best (one vector per window), late_chunk (one vector per chunk of chunk_tokens, pooled from "
        "a forward pass over the whole window). best / late_chunk score a document by `aggregate`.",
    )
    overlap: int = Field(64, ge=0, description="Tokens shared by consecutive windows (mean / best); late_chunk: "
                         "context tokens a macro-window sees before the chunks it owns. A window owns as many whole "
                         "chunks as fit after that context, so the cost in tokens depends on both: with 254 content "
                         "tokens and 64-token chunks, overlap 62 owns 3 chunks (~1.3x the tokens of truncation), "
                         "overlap 64 only 2 (~2x).")
    chunk_tokens: int = Field(128, ge=8, description="late_chunk: content tokens per chunk.")
    aggregate: Aggregate = Field(
        "best", description="Document score from its windows' (best / late_chunk): best, first_prior, softmax."
    )
    first_weight: float = Field(0.3, ge=0, le=1, description="aggregate first_prior: weight of the first window.")
    temperature: float = Field(0.05, gt=0, description="aggregate softmax: temperature over window scores.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.prefix and not self.prefix.strip():
            raise ValueError("documents.prefix is whitespace only")
        return self

    @property
    def multi_window(self) -> bool:
        return self.windows != "first"

    @property
    def one_vector(self) -> bool:
        """Every document is one vector (first / mean); `best` / `late_chunk` store one per window or chunk."""
        return self.windows in ("first", "mean")

    def _lead(self, title: str | None) -> str:
        """What goes before the text: the stripped title and the separator, or nothing."""
        if title and title.strip() and self.title == "prepend":
            return title.strip() + self.title_separator
        return ""

    def join(self, text: str, title: str | None = None) -> str:
        """The document text as embedded (title joined as configured)."""
        return self._lead(title) + text

    def title_offset(self, title: str | None) -> int:
        """Characters the joined title adds before the text (char spans are reported relative to the text)."""
        return len(self._lead(title))


def best_window_scores(scores: np.ndarray, text_index: np.ndarray) -> np.ndarray:
    """(Q, M) window scores -> (Q, N) document scores, each document's best window.

    `text_index` (M,) names each window's document; windows come grouped by document in document order (as
    `Embedder.encode_document_windows` returns them).
    """
    return window_scores(scores, text_index, "best")


def window_scores(scores: np.ndarray, text_index: np.ndarray, aggregate: Aggregate = "best",
                  first_weight: float = 0.3, temperature: float = 0.05) -> np.ndarray:
    """(Q, M) window scores -> (Q, N) document scores under `aggregate` (see the module docstring).

    `text_index` (M,) names each window's document; windows come grouped by document in document order (as
    `Embedder.encode_document_windows` returns them), each document's first window first.
    """
    if scores.shape[1] == 0:
        return scores
    starts = np.flatnonzero(np.r_[True, text_index[1:] != text_index[:-1]])  # (N,) first window of each doc
    if len(starts) == scores.shape[1]:
        return scores
    best = np.maximum.reduceat(scores, starts, axis=1)  # (Q, N)
    if aggregate == "best":
        return best
    if aggregate == "first_prior":
        return first_weight * scores[:, starts] + (1 - first_weight) * best
    if aggregate == "softmax":
        counts = np.diff(np.r_[starts, scores.shape[1]])  # (N,) windows per document
        weights = np.exp((scores - np.repeat(best, counts, axis=1)) / temperature)  # (Q, M), max 1 per doc
        return np.add.reduceat(weights * scores, starts, axis=1) / np.add.reduceat(weights, starts, axis=1)
    raise ValueError(f"unknown aggregate {aggregate!r} (best, first_prior, softmax)")


def policy_scores(scores: np.ndarray, text_index: np.ndarray, policy: "DocumentPolicy") -> np.ndarray:
    """`window_scores` under a document policy's aggregation."""
    return window_scores(scores, text_index, policy.aggregate, policy.first_weight, policy.temperature)


def best_hits(hits: Iterable[Any], top_k: int, doc_id=lambda h: h.doc_id) -> list[Any]:
    """Hits ordered best first (one per window/point) -> each document's best hit, at most `top_k` documents."""
    best: dict[str, Any] = {}
    for hit in hits:
        best.setdefault(doc_id(hit), hit)
        if len(best) >= top_k:
            break
    return list(best.values())


def aggregate_hits(hits: Iterable[Any], top_k: int, policy: "DocumentPolicy | None" = None,
                   fetch: Callable[[list[str], bool, int], Iterable[Any]] | None = None,
                   doc_id=lambda h: h.doc_id) -> list[tuple[Any, float]]:
    """Hits ordered best first (one per point, e.g. a store's search) -> at most `top_k` (the document's best
    hit, the document's score), best first: `window_scores` over each candidate document's points.

    Every document among the hits is a candidate (one below the first `top_k` may aggregate higher). Hits have
    `score` and `chunk_index` (and `payload["n_chunks"]`, the document's point count, for softmax). Under
    `policy.aggregate` (None or a one-vector policy: best):

    - best: each document's best hit and its score, exactly `best_hits`;
    - first_prior: first_weight * chunk 0's score + (1 - first_weight) * the best hit's score (the best point of
      a document among the hits is always retrieved: it outranks the document's others);
    - softmax: the softmax(score / temperature)-weighted mean of the scores of the document's points.

    The points a candidate needs and the search missed (first_prior: chunk 0; softmax: those beyond its hits, when
    its `n_chunks` says there are more) come from one call `fetch(doc_ids, first_only, limit)`, hits scored as the
    search scores them (`diffembed.index.store.document_points`). Without `fetch`, or for points it does not
    return: first_prior counts a missing chunk 0 as 0.0 (the score of a point no term matches, or outside a
    fused list) and softmax aggregates the hits it has.
    """
    if policy is None or policy.one_vector or policy.aggregate == "best":
        return [(hit, float(hit.score)) for hit in best_hits(hits, top_k, doc_id)]
    if policy.aggregate not in ("first_prior", "softmax"):
        raise ValueError(f"unknown aggregate {policy.aggregate!r} (best, first_prior, softmax)")
    by_doc: dict[str, dict[int, Any]] = {}  # first-seen order; each document's hits by chunk, best first
    for hit in hits:
        by_doc.setdefault(doc_id(hit), {}).setdefault(int(hit.chunk_index), hit)
    first_only = policy.aggregate == "first_prior"
    if first_only:
        wanted = {d: 1 for d, chunks in by_doc.items() if 0 not in chunks}
    else:
        sizes = {d: int((getattr(next(iter(c.values())), "payload", None) or {}).get("n_chunks") or 0)
                 for d, c in by_doc.items()}
        wanted = {d: sizes[d] for d, chunks in by_doc.items() if sizes[d] > len(chunks)}
    if wanted and fetch is not None:
        for hit in fetch(list(wanted), first_only, sum(wanted.values())):
            if doc_id(hit) in wanted:
                by_doc[doc_id(hit)].setdefault(int(hit.chunk_index), hit)
    scored: list[tuple[Any, float]] = []
    for chunks in by_doc.values():
        best = max(chunks.values(), key=lambda h: float(h.score))
        if first_only:
            first = float(chunks[0].score) if 0 in chunks else 0.0
            scored.append((best, policy.first_weight * first + (1 - policy.first_weight) * float(best.score)))
        else:
            values = np.array([float(h.score) for h in chunks.values()])  # (n,) the document's points
            weights = np.exp((values - values.max()) / policy.temperature)  # (n,) the best weighs 1
            scored.append((best, float((weights * values).sum() / weights.sum())))
    return sorted(scored, key=lambda item: -item[1])[:top_k]  # stable: first seen wins a tie


def titles_or_none(titles: Sequence[str | None] | None, n: int) -> list[str | None]:
    if titles is None:
        return [None] * n
    titles = list(titles)
    if len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} documents")
    for i, title in enumerate(titles):
        if title is not None and not isinstance(title, str):
            raise ValueError(f"titles[{i}] must be a string or null, got {type(title).__name__}")
    return titles


def document_fields(text: str, title: str | None) -> tuple[str, str | None]:
    """A document's (text, title) as every path that reads documents from files takes them (the batch job, BEIR
    evaluation, MTEB): both without surrounding whitespace (a byte-level BPE tokenizer would embed it), a title
    that is blank is none, and a document with a title but no text is its title, as BEIR and MTEB treat one.
    ("", None) is a document with nothing to embed."""
    text, title = text.strip(), (title or "").strip()
    if not text:
        return title, None
    return text, title or None
