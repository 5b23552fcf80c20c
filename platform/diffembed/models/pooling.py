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
    if method == "mean":
        weights = pool_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if method == "cls":
        return hidden[:, 0]
    if method == "last":
        last = attention_mask.long().sum(dim=1) - 1  # (B,) index of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {method!r} (mean, last, cls)")


def finish(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation, then L2 normalisation (after truncation, so truncated vectors are unit length)."""
    if dimensions is not None:
        vectors = vectors[..., :dimensions]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
