"""Length-aware micro-batches for training: fewer padded tokens per step, same loss and gradients.

A training step embeds three groups (queries, positives, hard negatives). Padding a group to its longest
member wastes compute on skewed document lengths: with lognormal lengths (median ~450, cap 2048) about half
of a padded batch is padding. Here a group is cut into *chunks of row indices* over its length-sorted order,
each chunk is embedded padded only to its own longest row, and the embeddings are put back in input order
before the loss — so the loss sees exactly the rows it would see unchunked, and only the padding changes.

* `plan_chunks`: the cut itself (a small dynamic programme over the sorted lengths);
* `plan_groups`: `plan_chunks` for every group of a step, with the same number of chunks per group on every rank
  of a distributed step (`split_to`, `max_over_ranks`): ZeRO-3 gathers parameters in every forward and ZeRO-2
  reduces gradients in every backward, both collectives, so ranks that ran different numbers of chunks would
  wait on each other for ever;
* `padding_fraction`: how much of a plan's padded tokens are padding (benchmarks and tests report it);
* `embed_in_order`: the plain path — every chunk embedded with grad, concatenated back in order, one backward;
* `grad_cache_in_order`: the GradCache path (`losses.grad_cache_step` with `chunk_rows`), driving a training
  backend's gradient-accumulation boundaries the way `train_step` does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from diffembed.train.losses import LossFn, grad_cache_step, in_input_order

__all__ = [
    "OVERHEAD_TOKENS", "embed_in_order", "grad_cache_in_order", "max_over_ranks", "padding_fraction", "plan_chunks",
    "plan_groups", "select", "split_to",
]

# What one extra forward pass costs, in padded tokens: the planner only splits a chunk further when that saves
# more padding than this. Kernel launches and per-call Python are small next to a 7B-wide layer's per-token
# work, but every chunk is also a separate GEMM shape and (with GradCache) two forwards; 256 keeps the number
# of chunks within ~2x the fixed-size split while cutting padding from ~45 % to ~5 % on lognormal lengths.
OVERHEAD_TOKENS = 256


def plan_chunks(
    lengths: Sequence[int],
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    overhead_tokens: int = OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Cut rows of the given token `lengths` into chunks of indices, longest rows first.

    Rows are sorted by length (descending, stable) and cut into contiguous runs of that order; among all
    such cuts that respect the budgets — at most `max_rows` rows per chunk (the GradCache chunk size), at
    most `max_tokens` padded tokens per chunk (a row longer than the budget gets a chunk of its own) — it
    returns one minimising `padded tokens + overhead_tokens * chunks` (exact, by dynamic programming; a
    contiguous run is optimal for sorted lengths, since mixing short rows into a long chunk only pads them).
    With no budget at all the result is still split where padding would cost more than a forward pass.

    The longest chunk comes first, so a step that runs out of memory does so on its first chunk.
    Returns `[]` for no rows. Every index appears exactly once.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1; got {max_rows}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be >= 0; got {overhead_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    width = [int(lengths[i]) for i in order]  # descending: a run starting at i is padded to width[i]
    n = len(order)
    best = [0.0] * (n + 1)  # best[i]: least cost of rows order[i:]
    cut = [n] * (n + 1)  # cut[i]: end of the chunk starting at i in that best plan
    for i in range(n - 1, -1, -1):
        best[i] = float("inf")
        for j in range(i + 1, n + 1):
            rows = j - i
            if max_rows is not None and rows > max_rows:
                break
            if max_tokens is not None and rows > 1 and rows * width[i] > max_tokens:
                break
            cost = rows * width[i] + overhead_tokens + best[j]
            if cost <= best[i]:  # on a tie the longer first chunk: fill chunks front to back
                best[i], cut[i] = cost, j
    chunks, i = [], 0
    while i < n:
        chunks.append(order[i : cut[i]])
        i = cut[i]
    return chunks


def split_to(lengths: Sequence[int], chunks: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """`chunks` (a `plan_chunks` plan of rows of these `lengths`) cut further into exactly `count` chunks.

    Each cut splits one chunk of length-sorted rows in two where that removes the most padding (on a tie: the
    chunk with the most rows, near its middle), so no budget the plan kept is broken and padding only falls.
    The longest chunk stays first. ValueError when `count` is below the plan's chunks or above its rows.
    """
    out = [list(c) for c in chunks]
    rows = sum(len(c) for c in out)
    if not len(out) <= count <= rows:
        raise ValueError(f"cannot cut {len(out)} chunks of {rows} rows into {count}")
    while len(out) < count:
        best, where = None, (0, 0)
        for c, chunk in enumerate(out):
            n, top = len(chunk), lengths[chunk[0]]  # rows descend in length: the chunk is padded to its first
            for m in range(1, n):
                key = ((n - m) * (top - lengths[chunk[m]]), n, -abs(2 * m - n))  # padding saved, then balance
                if best is None or key > best:
                    best, where = key, (c, m)
        c, m = where
        out[c : c + 1] = [out[c][:m], out[c][m:]]
    return out


def max_over_ranks(counts: Sequence[int]) -> list[int]:
    """Element-wise maximum of `counts` over the ranks of the default process group; `counts` itself outside a
    distributed run. Every rank must call it (one small all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(c) for c in counts]
    # NCCL reduces device tensors only; gloo (CPU training) host tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    counted = torch.tensor(list(counts), dtype=torch.int64, device=device)
    dist.all_reduce(counted, op=dist.ReduceOp.MAX)
    return [int(c) for c in counted.tolist()]


def plan_groups(
    lengths: Sequence[Sequence[int]],
    *,
    max_rows: int | None = None,
    overhead_tokens: int = OVERHEAD_TOKENS,
    agree: Callable[[list[int]], list[int]] = max_over_ranks,
) -> list[list[list[int]]]:
    """One `plan_chunks` plan per group of a training step (queries, positives[, negatives]), each with as many
    chunks as the most any rank planned for that group (`agree`), so every rank runs the same sequence of
    forwards and backwards: DeepSpeed's collectives inside them (ZeRO-3 parameter gathers, ZeRO-2 gradient
    reduction) pair up. Every rank's groups have the same row counts (`hard_negatives` per query), so the
    agreed count never exceeds a group's rows. A group without rows keeps an empty plan."""
    plans = [plan_chunks(g, max_rows=max_rows, overhead_tokens=overhead_tokens) for g in lengths]
    counts = agree([len(p) for p in plans])
    return [split_to(g, p, k) if p else p for g, p, k in zip(lengths, plans, counts)]


def padding_fraction(lengths: Sequence[int], chunks: Sequence[Sequence[int]]) -> float:
    """Share of the padded tokens that are padding when each chunk is padded to its longest row."""
    padded = sum(max(lengths[i] for i in c) * len(c) for c in chunks if c)
    real = sum(lengths[i] for c in chunks for i in c)
    return 0.0 if padded == 0 else 1.0 - real / padded


def select(items: Sequence[Any], chunks: Sequence[Sequence[int]]) -> list[list[Any]]:
    """The items each chunk holds, e.g. the segments to collate for it."""
    return [[items[i] for i in c] for c in chunks]


def embed_in_order(
    embed_fn: Callable[[list[Any]], torch.Tensor], items: Sequence[Any], chunks: Sequence[Sequence[int]]
) -> torch.Tensor:
    """(B, D) embeddings of `items` in input order ((B, K, D) multivectors), computed chunk by chunk, with the
    autograd graph.

    The no-GradCache path: activations of every chunk stay alive until the one backward (as with a single
    padded batch), but each chunk is padded only to its own longest row.
    """
    if not items:
        raise ValueError("embed_in_order needs at least one item")
    parts = [embed_fn(rows) for rows in select(items, chunks)]  # each (b_c, [K,] D)
    return in_input_order(parts, chunks, len(items))  # (B, [K,] D)


def grad_cache_in_order(
    embed_fn: Callable[[list[Any]], torch.Tensor],
    engine: Any,
    groups: Sequence[Sequence[Any]],
    loss_fn: LossFn,
    max_rows: int,
    overhead_tokens: int = OVERHEAD_TOKENS,
    length: Callable[[Any], int] = lambda seg: len(seg.ids),
) -> torch.Tensor:
    """One GradCache backward over length-planned chunks of (queries, positives[, negatives]); returns the loss.

    `groups` are the step's segment lists (an empty negatives list means none). They are planned with
    `plan_groups(max_rows=max_rows)`, so a chunk never exceeds the GradCache chunk size (the memory bound) and
    every rank of a distributed step runs as many chunks per group as the others.
    `engine` is a training backend (`TorchBackend` / `DeepSpeedBackend`): each chunk's second forward and
    backward run under `engine.accumulate(last=...)` (DDP's no_sync, entered in the forward, left after the
    backward) and `engine.backward(..., boundary=...)` marks the step's last chunk, after which gradients are
    reduced. The caller calls `engine.step()`.
    """
    groups = [list(g) for g in groups]
    if len(groups) == 3 and not groups[2]:
        groups = groups[:2]
    plans = plan_groups([[length(s) for s in g] for g in groups], max_rows=max_rows, overhead_tokens=overhead_tokens)
    total = sum(len(p) for p in plans)
    done = [0]
    pending = contextlib.ExitStack()  # a chunk's no_sync spans its forward and its backward

    def embed_chunk(rows: list[Any]) -> torch.Tensor:
        if torch.is_grad_enabled():  # GradCache's second pass: this chunk's backward comes next
            pending.enter_context(engine.accumulate(last=done[0] + 1 == total))
        return embed_fn(rows)

    def backward(t: torch.Tensor, g: torch.Tensor) -> None:
        done[0] += 1
        with pending:
            engine.backward((t.float() * g).sum(), boundary=done[0] == total)

    batches = [select(g, p) for g, p in zip(groups, plans)]
    return grad_cache_step(
        embed_chunk,
        batches[0],
        batches[1],
        batches[2] if len(batches) > 2 else None,
        loss_fn=loss_fn,
        backward_fn=backward,
        chunk_rows=plans,
    )
