"""Length-planned micro-batches: padding goes down, and the loss and gradients stay those of one padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from diffembed.config import EmbedderConfig
from diffembed.models.embedder import Embedder, Segment
from diffembed.train.losses import grad_cache_step, in_input_order, info_nce
from diffembed.train.microbatch import (
    embed_in_order, grad_cache_in_order, max_over_ranks, padding_fraction, plan_chunks, plan_groups, select, split_to,
)


def lognormal_lengths(rows: int, median: float, cap: int, seed: int, sigma: float = 0.5) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(median), sigma, rows), 4, cap)]


def naive_chunks(n: int, rows: int) -> list[list[int]]:
    return [list(range(i, min(i + rows, n))) for i in range(0, n, rows)]


# ---------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planned_chunks_cut_padding(seed):
    lengths = lognormal_lengths(48, median=450, cap=2048, seed=seed)
    assert 350 < np.median(lengths) < 550 and max(lengths) <= 2048
    naive = naive_chunks(48, 8)
    assert padding_fraction(lengths, naive) > 0.3  # in input order, ~45 % of a chunk is padding
    for budget in ({"max_rows": 8}, {"max_tokens": 8192}):
        plan = plan_chunks(lengths, **budget)
        assert sorted(i for c in plan for i in c) == list(range(48))
        assert padding_fraction(lengths, plan) < 0.10, budget
        assert len(plan) <= 2 * len(naive)  # not bought with a forward pass per row
        assert all(len(c) <= budget.get("max_rows", 48) for c in plan)
        assert all(len(c) == 1 or max(lengths[i] for i in c) * len(c) <= budget.get("max_tokens", 10**9) for c in plan)
        widths = [max(lengths[i] for i in c) for c in plan]
        assert widths == sorted(widths, reverse=True)  # longest chunk first: an OOM shows on the first chunk


def test_plan_edge_cases():
    assert plan_chunks([]) == []
    assert plan_chunks([5]) == [[0]]
    assert plan_chunks([7, 7, 7, 7], max_rows=3) == [[0, 1, 2], [3]]  # equal lengths: only the row cap cuts
    # A row longer than the token budget still gets a chunk (alone); no overhead: never pad at all.
    assert plan_chunks([100, 3, 3], max_tokens=10) == [[0], [1, 2]]
    assert padding_fraction([4, 2, 9], plan_chunks([4, 2, 9], overhead_tokens=0)) == 0.0
    assert padding_fraction([4, 2], [[0, 1]]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        plan_chunks([1, 2], max_rows=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_to_reaches_any_count_with_less_padding_each_time(seed):
    lengths = lognormal_lengths(24, median=300, cap=2048, seed=seed, sigma=0.8)
    plan = plan_chunks(lengths, max_rows=8)
    padding = padding_fraction(lengths, plan)
    for count in range(len(plan), len(lengths) + 1):
        more = split_to(lengths, plan, count)
        assert len(more) == count and all(more)
        assert sorted(i for c in more for i in c) == list(range(24))
        assert all(len(c) <= 8 for c in more)
        assert padding_fraction(lengths, more) <= padding + 1e-12  # a cut only removes padding
        padding = padding_fraction(lengths, more)
        widths = [max(lengths[i] for i in c) for c in more]
        assert widths == sorted(widths, reverse=True)  # still longest first
    assert padding == 0.0  # one row per chunk
    with pytest.raises(ValueError, match="into"):
        split_to(lengths, plan, len(plan) - 1)
    with pytest.raises(ValueError, match="into"):
        split_to(lengths, plan, 25)


def test_split_to_cuts_where_the_padding_is():
    assert split_to([100, 90, 10, 9], [[0, 1, 2, 3]], 2) == [[0, 1], [2, 3]]
    assert split_to([8, 8, 8, 8, 8, 8], [[0, 1, 2, 3, 4, 5]], 2) == [[0, 1, 2], [3, 4, 5]]  # no padding: halves


def test_plan_groups_gives_every_group_the_agreed_number_of_chunks():
    groups = [[10, 12, 11, 9], [400, 20, 30, 300], []]
    alone = plan_groups(groups, max_rows=3)
    assert alone == [plan_chunks(g, max_rows=3) for g in groups]  # outside a distributed run: the own plans
    assert max_over_ranks([2, 1, 0]) == [2, 1, 0]

    other_rank = [4, 3, 0]  # what another rank planned: the agreed count is the larger

    def agree(counts):
        return [max(a, b) for a, b in zip(counts, other_rank)]

    plans = plan_groups(groups, max_rows=3, agree=agree)
    assert [len(p) for p in plans] == [4, max(3, len(alone[1])), 0]
    for lengths, plan in zip(groups, plans):
        assert sorted(i for c in plan for i in c) == list(range(len(lengths)))


def test_in_input_order_rejects_a_bad_cover():
    parts = [torch.ones(2, 3), torch.zeros(1, 3)]
    assert_close(in_input_order(parts, [[2, 0], [1]]), torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3]))
    with pytest.raises(ValueError, match="exactly once"):
        in_input_order(parts, [[0, 0], [1]])
    with pytest.raises(ValueError, match="rows"):
        in_input_order(parts, [[0], [1, 2]])


# ---------------------------------------------------------------------------------------------- equivalence


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(0)
    emb = Embedder(EmbedderConfig(model="tiny:dream", dtype="fp32", device="cpu"))
    emb.model.train()
    emb.model.requires_grad_(True)
    return emb


def segments(embedder: Embedder, lengths: list[int], seed: int) -> list[Segment]:
    """Synthetic segments of the given lengths (real vocabulary ids, no specials), source = row."""
    rng = np.random.default_rng(seed)
    vocab = min(len(embedder.tokenizer), 500)
    out = []
    for row, n in enumerate(lengths):
        ids = [int(x) for x in rng.integers(10, vocab, n)]
        out.append(Segment(ids, [1] * n, row, (0, n), (0, n)))
    return out


def step_groups(embedder: Embedder) -> list[list[Segment]]:
    q = segments(embedder, lognormal_lengths(8, 12, 32, seed=3), seed=4)
    p = segments(embedder, lognormal_lengths(8, 40, 128, seed=5), seed=6)
    n = segments(embedder, lognormal_lengths(8, 40, 128, seed=7), seed=8)
    return [q, p, n]


def embed(embedder: Embedder):
    return lambda segs: embedder.forward(embedder.collate(segs))  # (b, D)


def plain_step(embedder: Embedder, groups) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: every group in one padded batch, one backward."""
    embedder.model.zero_grad(set_to_none=True)
    loss = info_nce(*(embed(embedder)(g) if g else None for g in groups))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in embedder.model.parameters()]


def grads(embedder: Embedder) -> list[torch.Tensor]:
    return [p.grad.clone() for p in embedder.model.parameters()]


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """fp32 sums taken in another order (other padding, other chunks) differ at ~1e-6 of a tensor's scale."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = float(w.abs().max())
        assert scale > 0  # every parameter gets a gradient, so a dropped chunk would show
        assert_close(g, w, rtol=1e-5, atol=1e-5 * scale)


def plans_for(groups, **budget):
    plans = [plan_chunks([len(s.ids) for s in g], **budget) for g in groups]
    # The test only means something if some chunk is out of input order (a plain concat would misalign rows).
    assert any(sum(plan, []) != sorted(sum(plan, [])) for plan in plans)
    assert all(len(plan) > 1 for plan in plans)
    return plans


def test_grad_cache_with_length_plan_equals_plain(embedder):
    groups = step_groups(embedder)
    ref_loss, ref_grads = plain_step(embedder, groups)
    plans = plans_for(groups, max_rows=3, overhead_tokens=8)

    embedder.model.zero_grad(set_to_none=True)
    loss = grad_cache_step(embed(embedder), *(select(g, p) for g, p in zip(groups, plans)), chunk_rows=plans)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(embedder), ref_grads)

    # Without the scatter back, the same chunks pair queries with other rows' positives: a different loss.
    embedder.model.zero_grad(set_to_none=True)
    wrong = grad_cache_step(embed(embedder), *(select(g, p) for g, p in zip(groups, plans)))
    assert abs(wrong.item() - ref_loss.item()) > 1e-3


def test_embed_in_order_equals_plain(embedder):
    groups = step_groups(embedder)
    ref_loss, ref_grads = plain_step(embedder, groups)
    plans = plans_for(groups, max_tokens=96, overhead_tokens=8)

    embedder.model.zero_grad(set_to_none=True)
    loss = info_nce(*(embed_in_order(embed(embedder), g, p) for g, p in zip(groups, plans)))
    loss.backward()
    assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(embedder), ref_grads)
    # and the padded tokens really went down
    for g, p in zip(groups, plans):
        lengths = [len(s.ids) for s in g]
        assert padding_fraction(lengths, p) < padding_fraction(lengths, [list(range(len(g)))])


def test_grad_cache_in_order_through_the_torch_backend(embedder):
    """The backend plumbing train_step uses (accumulate / backward(boundary=)) with the real TorchBackend."""
    from diffembed.train.config import TrainConfig
    from diffembed.train.backends import TorchBackend

    groups = step_groups(embedder)
    ref_loss, ref_grads = plain_step(embedder, groups)
    cfg = TrainConfig.from_dict({"data": {"train_files": ["unused.jsonl"]}, "deepspeed": {"enabled": False}})
    engine = TorchBackend(cfg, embedder.model, torch.device("cpu"), world=1)

    embedder.model.zero_grad(set_to_none=True)
    loss = grad_cache_in_order(embed(embedder), engine, groups, info_nce, max_rows=3, overhead_tokens=8)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(embedder), ref_grads)

    # No hard negatives: the empty third group is dropped, the loss is the two-group one.
    ref2, _ = plain_step(embedder, [groups[0], groups[1], []])
    embedder.model.zero_grad(set_to_none=True)
    loss2 = grad_cache_in_order(embed(embedder), engine, [groups[0], groups[1], []], info_nce, max_rows=3)
    assert_close(loss2, ref2, rtol=1e-5, atol=1e-6)
