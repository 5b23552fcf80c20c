"""Pooling of final hidden states into one vector per sequence (pure tensor math, right-padded inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(
    hidden: torch.Tensor,  # (B, T, H) final hidden states
    attention_mask: torch.Tensor,  # (B, T) 1 = real token; right padding
    pool_mask: torch.Tensor,  # (B, T) 1 = token counted by mean pooling (subset of attention_mask)
    method: str,
) -> torch.Tensor:  # (B, H) float32
    hidden = hidden.float()
    if method in ("mean", "mask"):  # mask: the pool mask covers the appended mask tokens only
        weights = pool_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if method == "cls":
        return hidden[:, 0]
    if method == "last":
        last = attention_mask.long().sum(dim=1) - 1  # (B,) index of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {method!r} (mean, last, cls, mask)")


def pool_groups(
    hidden: torch.Tensor,  # (B, T, H) final hidden states
    group_index: torch.Tensor,  # (B, T) which of its row's groups a token belongs to; -1 = none
    group_counts: torch.Tensor,  # (B,) groups per row, on the host
) -> torch.Tensor:  # (R, H) float32, R = group_counts.sum(): row 0's groups, then row 1's, ...
    """The mean of each group's final states: late-chunking chunks, or single mask tokens of a multivector."""
    total = int(group_counts.sum())
    offsets = (torch.cumsum(group_counts, 0) - group_counts).to(hidden.device, non_blocking=True)  # (B,) first row
    valid = group_index >= 0  # (B, T)
    rows = (offsets[:, None] + group_index)[valid]  # (N,) output row of each grouped token
    states = hidden[valid].float()  # (N, H)
    sums = torch.zeros((total, hidden.shape[-1]), dtype=torch.float32, device=hidden.device).index_add_(0, rows, states)
    sizes = torch.zeros(total, dtype=torch.float32, device=hidden.device).index_add_(
        0, rows, torch.ones_like(rows, dtype=torch.float32))  # (R,)
    return sums / sizes.clamp(min=1.0)[:, None]


def finish(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation, then L2 normalisation (after truncation, so truncated vectors are unit length)."""
    if dimensions is not None:
        vectors = vectors[..., :dimensions]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
