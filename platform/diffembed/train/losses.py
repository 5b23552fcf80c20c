"""Contrastive loss math, kept free of model calls so it can be unit-tested on plain tensors.

* `similarity`: the one query-candidate score every loss path uses — the dot product of single vectors (B, D),
  or MaxSim of multivectors (B, K, D) (mask-token readout, `mask_vectors: multi`) divided by the query's K.
* `info_nce`: InfoNCE over in-batch negatives plus hard negatives, optionally across all data-parallel
  ranks (a bigger candidate pool is the main lever on embedding quality).
* `matryoshka_info_nce`: Matryoshka representation learning (Kusupati et al., 2022) — weighted InfoNCE summed
  over prefixes of the embedding (each prefix re-normalised), so a truncated vector (`dimensions`) is trained,
  not just cut; the candidates are gathered once at full width and sliced.
* `gather_with_grad`: the differentiable all-gather that makes the cross-rank candidates trainable.
* `grad_cache_step`: GradCache (Gao et al., 2021) — the same loss and gradients as one big batch, with
  activation memory bounded by one chunk, so the global batch is not limited by device memory. Chunks may
  hold any rows (e.g. length-sorted ones, see `diffembed.train.microbatch`): `in_input_order` puts their
  embeddings back in input order before the loss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "gather_with_grad", "grad_cache_step", "in_input_order", "info_nce", "matryoshka_info_nce", "maxsim",
    "similarity", "split_batch",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BackwardFn = Callable[[torch.Tensor, torch.Tensor], None]


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0, in rank order, keeping the autograd graph.

    The backward pass sums, over ranks, the gradients flowing into each rank's slot (a reduce-scatter),
    so a rank's local tensor receives the gradient of *every* rank's loss, not only its own. Together
    with DDP/DeepSpeed averaging parameter gradients over ranks, that yields exactly the gradient of
    the mean loss over the global batch. Every rank must call this with the same shape.
    Without an initialised process group (or with one rank) it returns `t` unchanged.
    """
    _, world = _world()
    if world == 1:
        return t
    return _GatherRows.apply(t)  # (world * n, ...)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with a backward: each rank's slice of the sum, over ranks, of the gradients of the
    gathered rows. (torch.distributed.nn.functional.all_gather does the same but is deprecated since torch 2.13,
    and its gloo backward sent strided gradients scrambled.) The backward is an all-reduce, not a reduce-scatter,
    which gloo lacks: these are embeddings (global batch x D), not parameter gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        t = t.contiguous()
        out = t.new_empty((world * t.shape[0], *t.shape[1:]))  # (world * n, ...)
        _all_gather_into(out, t)
        ctx.rows = slice(rank * t.shape[0], (rank + 1) * t.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()  # (world * n, ...), reduced in place
        dist.all_reduce(total)
        return total[ctx.rows]


# the non-deprecated name where this torch has it (2.13+), the older one before
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_equal_sizes(b: int, n: int, device: torch.device) -> None:
    """Raise on every rank (not only the odd one out, which would deadlock) if local sizes differ."""
    _, world = _world()
    sizes = torch.tensor([b, n], dtype=torch.long, device=device)  # (2,)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes)
    every_l = [tuple(int(x) for x in s.tolist()) for s in every]
    if len(set(every_l)) > 1:
        raise ValueError(
            "info_nce(gather=True) needs the same local batch on every rank; got (queries, negatives) per "
            f"rank = {every_l}. Drop the last incomplete batch or pad it."
        )


def maxsim(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, C) MaxSim of multivectors: Σ_k max_j <q_bk, c_cj>, queries (B, Kq, D), candidates (C, Kd, D) — how a
    multivector query scores a multivector document (serving and evaluation rank by it)."""
    dots = torch.einsum("bkd,cjd->bckj", queries, candidates)  # (B, C, Kq, Kd) every query-candidate vector pair
    return dots.amax(dim=-1).sum(dim=-1)  # (B, C): best candidate vector per query vector, summed over them


def similarity(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, C) scores of queries against candidates, the one similarity of every loss path (and of the dev
    evaluation): dot products of single vectors (B, D) x (C, D); for multivectors (B, Kq, D) x (C, Kd, D),
    MaxSim divided by Kq — the same ranking as MaxSim, on the scale of one dot product, so that `scale` (the
    temperature) means the same for single vectors and multivectors. With K = 1 both are the dot product."""
    if queries.dim() == 2 and candidates.dim() == 2:
        return queries @ candidates.T  # (B, C)
    if queries.dim() == 3 and candidates.dim() == 3:
        return maxsim(queries, candidates) / queries.shape[1]  # (B, C)
    raise ValueError(f"similarity takes (B, D) x (C, D) or (B, K, D) x (C, K, D); got {tuple(queries.shape)} x "
                     f"{tuple(candidates.shape)}")


def _flat_negatives(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None
                    ) -> torch.Tensor | None:
    """Check shapes; hard negatives as rows of candidates, or None when there are none.

    Single vectors: queries and positives (B, D), negatives (B, H, D) or (N, D) -> (N, D).
    Multivectors: queries (B, Kq, D), positives (B, K, D), negatives (B, H, K, D) or (N, K, D) -> (N, K, D).
    """
    multi = queries.dim() == 3
    if queries.dim() not in (2, 3) or positives.dim() != queries.dim():
        raise ValueError(f"queries and positives must be (B, D), or (B, K, D) multivectors; got "
                         f"{tuple(queries.shape)}, {tuple(positives.shape)}")
    if queries.shape[0] != positives.shape[0] or queries.shape[-1] != positives.shape[-1] or (
            not multi and queries.shape != positives.shape):
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must match")
    b, d = queries.shape[0], queries.shape[-1]
    if negatives is None:
        return None
    row = positives.shape[1:]  # one candidate: (D,), or (K, D)
    if negatives.dim() == len(row) + 2:
        if negatives.shape[0] != b:
            raise ValueError(f"negatives (B, H, ...) must have B={b}; got {tuple(negatives.shape)}")
        negatives = negatives.flatten(0, 1)  # (B, H, ...) -> (B*H, ...)
    elif negatives.dim() != len(row) + 1:
        what = "(B, H, K, D) or (N, K, D)" if multi else "(B, H, D) or (N, D)"
        raise ValueError(f"negatives must be {what}; got {tuple(negatives.shape)}")
    if negatives.shape[-1] != d:
        raise ValueError(f"negatives have dim {negatives.shape[-1]}, queries {d}")
    if negatives.shape[1:] != row:
        raise ValueError(f"negatives {tuple(negatives.shape)} and positives {tuple(positives.shape)} must hold "
                         "as many vectors each")
    return negatives if negatives.shape[0] else None


def _candidates(p: torch.Tensor, n: torch.Tensor | None, b: int, gather: bool) -> tuple[torch.Tensor, int]:
    """The candidate pool (positives, then hard negatives; from every rank with `gather`) and the label offset."""
    rank, world = _world()
    offset = 0
    if gather and world > 1:
        _check_equal_sizes(b, 0 if n is None else n.shape[0], p.device)
        p = gather_with_grad(p)  # (world * B, [K,] D)
        if n is not None:
            n = gather_with_grad(n)  # (world * N, [K,] D)
        offset = rank * b
    return (p if n is None else torch.cat([p, n], dim=0)), offset  # (P + N', [K,] D), P = B or world * B


def _nce(q: torch.Tensor, candidates: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """Cross-entropy of unit queries (B, [K,] D) against unit candidates (C, [K,] D) by `similarity`; query i's
    target is row offset + i."""
    logits = similarity(q, candidates) * scale  # (B, C)
    labels = torch.arange(q.shape[0], device=q.device) + offset  # (B,) index of each query's own positive
    return F.cross_entropy(logits, labels)


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    scale: float = 50.0,
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE on cosine similarity, with in-batch and hard negatives.

    queries (B, D) and positives (B, D) are row-aligned pairs; negatives (B, H, D) or (N, D) are hard
    negatives (any N; usually B*H). Each query is scored against *every* positive and *every* hard
    negative in the batch (in-batch negatives come for free); the target is its own positive. Logits
    are cosine similarities times `scale` (temperature τ = 1/scale; 50 ⇒ τ = 0.02).

    With `gather=True` under an initialised process group with more than one rank, the candidates
    (positives and negatives) are all-gathered from every rank with gradient, and the local queries are
    scored against that global pool (labels offset by rank * B). Queries are not gathered: each rank
    only scores its own, and the cross-rank gradient reaches them through the gathered candidates'
    backward. Returns the mean over local queries; averaged over ranks (as DDP does) it equals the
    single-process loss on the concatenated global batch. Requires equal B and N on every rank.

    Multivectors (mask-token readout with `mask_vectors: multi`): queries (B, Kq, D), positives (B, K, D),
    negatives (B, H, K, D) or (N, K, D); every vector is normalised and a query scores a candidate by
    `similarity` (MaxSim / Kq). Everything else, the gather included, is the same.

    Math is done in float32 whatever the input dtype, since bf16 logits at scale 50 lose the ranking.
    """
    negatives = _flat_negatives(queries, positives, negatives)
    q = F.normalize(queries.float(), dim=-1)  # (B, [K,] D), each vector unit
    p = F.normalize(positives.float(), dim=-1)  # (B, [K,] D)
    n = None if negatives is None else F.normalize(negatives.float(), dim=-1)  # (N, [K,] D)
    candidates, offset = _candidates(p, n, q.shape[0], gather)
    return _nce(q, candidates, offset, scale)


def matryoshka_info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    dims: Sequence[int] = (),
    weights: Sequence[float] | None = None,
    scale: float = 50.0,
    gather: bool = False,
) -> torch.Tensor:
    """Σ_d w_d · InfoNCE on the first d dimensions (each prefix re-normalised): Matryoshka training.

    Same inputs, candidates and cross-rank semantics as `info_nce`; `dims` are the prefix sizes (each in
    1..D; include D itself to train the full vector, as `LossConfig.matryoshka` does) and `weights` one per
    dim (default 1). The raw float32 embeddings are gathered once at full width and sliced per prefix, so
    a rank does one all-gather whatever the number of dims. With `dims=[D]` this is exactly `info_nce`.
    The loss is a function of the embeddings only, so GradCache (`grad_cache_step`) applies unchanged.
    Multivectors are cut to each prefix vector by vector (every vector re-normalised), then scored by MaxSim.
    """
    negatives = _flat_negatives(queries, positives, negatives)
    b, d = queries.shape[0], queries.shape[-1]
    dims = [int(x) for x in dims]
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if not dims or len(weights) != len(dims):
        raise ValueError(f"matryoshka needs one or more dims and one weight per dim; got dims={dims}, "
                         f"weights={weights}")
    if any(not 1 <= x <= d for x in dims):
        raise ValueError(f"matryoshka dims {dims} must lie in 1..{d} (the embedding width)")
    q = queries.float()  # (B, [K,] D)
    candidates, offset = _candidates(positives.float(), None if negatives is None else negatives.float(), b, gather)
    total = q.new_zeros(())
    for dim, weight in zip(dims, weights):
        qd = F.normalize(q[..., :dim], dim=-1)  # (B, [K,] d) prefix, re-normalised
        cd = F.normalize(candidates[..., :dim], dim=-1)  # (C, [K,] d)
        total = total + weight * _nce(qd, cd, offset, scale)
    return total


def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, or a dict of tensors sharing dim 0, into chunks of at most `chunk_size` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if isinstance(batch, torch.Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, dict):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rows = {v.shape[0] for v in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"dict tensors must share dim 0; got sizes {sorted(rows)}")
        total = rows.pop()
        return [
            {k: (v[i : i + chunk_size] if k in tensors else v) for k, v in batch.items()}
            for i in range(0, total, chunk_size)
        ]
    raise TypeError(f"split_batch takes a tensor or a dict of tensors; got {type(batch).__name__}")


def in_input_order(
    parts: Sequence[torch.Tensor], chunk_rows: Sequence[Sequence[int]], rows: int | None = None
) -> torch.Tensor:
    """Concatenate per-chunk embeddings and put every row back at its input position; differentiable.

    `parts[c]` (b_c, D) — or (b_c, K, D), multivectors — holds the embeddings of input rows `chunk_rows[c]`, in
    that order. The chunks must cover input rows 0..rows-1 exactly once (`rows` defaults to their total): a
    pairing of queries with the wrong positives would train on wrong labels without any error, so a bad cover
    raises ValueError.
    The backward of the permutation routes each row's gradient back to the chunk that embedded it.
    """
    order = [int(i) for c in chunk_rows for i in c]
    rows = len(order) if rows is None else rows
    if sorted(order) != list(range(rows)):
        raise ValueError(f"chunk rows must cover input rows 0..{rows - 1} exactly once; got {len(order)} indices "
                         f"({len(set(order))} distinct, range {min(order, default=None)}..{max(order, default=None)})")
    sizes = [int(p.shape[0]) for p in parts]
    if sizes != [len(c) for c in chunk_rows]:
        raise ValueError(f"chunk embeddings have {sizes} rows but the chunks hold {[len(c) for c in chunk_rows]}")
    stacked = torch.cat(list(parts), dim=0)  # (B, [K,] D); row k is input row order[k]
    inverse = torch.empty(rows, dtype=torch.long)  # (B,) inverse[i] = k such that order[k] == i
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(rows)
    return stacked[inverse.to(stacked.device)]  # (B, [K,] D); row i is input row i


class _RngState:
    """CPU (and current CUDA device) RNG state, so a chunk's second forward redraws the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device: int | None = None
        self.cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_device = torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


def _default_backward(t: torch.Tensor, grad: torch.Tensor) -> None:
    t.backward(grad)


def grad_cache_step(
    embed_fn: Callable[[Any], torch.Tensor],
    query_batches: Sequence[Any],
    positive_batches: Sequence[Any],
    negative_batches: Sequence[Any] | None = None,
    loss_fn: LossFn = info_nce,
    backward_fn: BackwardFn = _default_backward,
    chunk_rows: Sequence[Sequence[Sequence[int]] | None] | None = None,
) -> torch.Tensor:
    """One GradCache step: accumulate into parameter `.grad` exactly what `loss_fn` on the full batch would.

    The contrastive loss couples every example to every other, so it cannot be split into independent
    micro-batches. GradCache splits the *backward* instead:

    1. embed every chunk under `torch.no_grad()` (no activations kept), recording the RNG state first;
    2. compute `loss_fn(q, p, n)` on the concatenated embeddings (as autograd leaves) and take the
       gradient of the loss w.r.t. each chunk's embeddings — cheap, embeddings are only (b, D) or (b, K, D);
    3. re-embed each chunk with grad, RNG restored so dropout draws the same masks, and call
       `backward_fn(embeddings, cached_grad)`; parameter gradients accumulate chunk by chunk.

    `embed_fn(chunk) -> (b, D)` (or (b, K, D) multivectors) takes whatever each chunk is (e.g. a dict of
    tensors; see `split_batch`). Negative chunks are concatenated to (N, [K,] D) and passed to `loss_fn` as such
    (`info_nce` accepts flat negatives). `loss_fn` must have no trainable parameters of its own (only the embeddings get
    gradients) and may all-gather (`info_nce(..., gather=True)`): its backward then runs the collectives.

    Under DeepSpeed, parameter gradients must go through the engine (loss scaling, ZeRO partitioning):
    pass e.g. `backward_fn=lambda t, g: engine.backward((t.float() * g).sum())` — that surrogate scalar
    has exactly `g` as its gradient w.r.t. `t`. The caller owns the step boundaries: with plain DDP, wrap
    all but the last chunk's backward in `no_sync()`; with DeepSpeed, mind that `engine.backward` divides
    by gradient_accumulation_steps unless configured otherwise.

    `chunk_rows` (optional, one entry per group: queries, positives[, negatives]) gives the input rows
    each chunk holds, e.g. from `microbatch.plan_chunks` over length-sorted rows; a group's embeddings are
    then put back in input order (`in_input_order`) before `loss_fn` sees them, so q/p/n stay row-aligned.
    Without it (or with a `None` entry) chunks are taken to be consecutive rows in input order.

    Returns the loss, detached. The RNG ends where one pass of chunked forwards would have left it.
    """
    groups = [list(query_batches), list(positive_batches), list(negative_batches or [])]
    if not groups[0] or not groups[1]:
        raise ValueError("grad_cache_step needs at least one query and one positive chunk")
    rows = list(chunk_rows or [])[:3]
    rows += [None] * (3 - len(rows))
    for g, (chunks, given) in enumerate(zip(groups, rows)):
        if given is not None and len(given) != len(chunks):
            raise ValueError(f"chunk_rows[{g}] lists {len(given)} chunks for {len(chunks)} batches")

    # Pass 1: embeddings without activations; remember each chunk's RNG state.
    states: list[list[_RngState]] = [[], [], []]
    leaves: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for g, chunks in enumerate(groups):
            for chunk in chunks:
                states[g].append(_RngState())
                emb = embed_fn(chunk)  # (b, [K,] D)
                leaves[g].append(emb.detach().requires_grad_(True))  # (b, [K,] D) leaf
    rng_after = _RngState()

    def joined(g: int) -> torch.Tensor:
        if rows[g] is None:
            return torch.cat(leaves[g], dim=0)  # (b_0 + b_1 + ..., [K,] D), chunks hold consecutive rows
        return in_input_order(leaves[g], rows[g])  # (B, [K,] D), back in input order

    q = joined(0)  # (B, [K,] D)
    p = joined(1)  # (B, [K,] D)
    n = joined(2) if leaves[2] else None  # (N, [K,] D)
    loss = loss_fn(q, p, n)
    flat_leaves = [leaf for group in leaves for leaf in group]
    grads = torch.autograd.grad(loss, flat_leaves, allow_unused=True)
    cached = iter(grads)

    # Pass 2: re-embed chunk by chunk with grad and push the cached embedding gradients through.
    try:
        for g, chunks in enumerate(groups):
            for chunk, state in zip(chunks, states[g]):
                grad = next(cached)
                state.restore()
                emb = embed_fn(chunk)  # (b, [K,] D), with graph
                if grad is None:  # the loss ignores this chunk (e.g. a zero-row chunk)
                    grad = torch.zeros_like(emb)
                backward_fn(emb, grad.to(emb.dtype))
    finally:
        rng_after.restore()  # leave the RNG where pass 1 left it, as a single pass would
    return loss.detach()
