"""Contrastive loss math: InfoNCE and Matryoshka values, GradCache equivalence, and the cross-rank gather (2 gloo
processes)."""

from __future__ import annotations

import datetime
import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from diffembed.train.losses import (gather_with_grad, grad_cache_step, info_nce, matryoshka_info_nce, maxsim,
                                    similarity, split_batch)


def _np_info_nce(q, p, n, scale):
    """Reference in float64 numpy: explicit normalise, similarities, log-softmax."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, cand = unit(q), unit(np.concatenate([p, n]) if n is not None else p)
    logits = scale * q @ cand.T
    m = logits.max(axis=1, keepdims=True)
    log_softmax = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    return -np.mean([log_softmax[i, i] for i in range(len(q))])


def test_hand_computed_value():
    # 2 queries, their positives, one hard negative each, in 2-D so the cosines are readable.
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[1.0, 1.0], [0.0, 2.0]])  # cos(q0, p0) = 1/sqrt2, cos(q1, p1) = 1
    n = np.array([[1.0, 0.0], [-1.0, 1.0]])  # one per query
    scale = 5.0
    # Row 0: candidates p0, p1, n0, n1 -> cosines 1/sqrt2, 0, 1, -1/sqrt2; target p0.
    r = 1 / math.sqrt(2)
    row0 = -(scale * r) + math.log(sum(math.exp(scale * c) for c in (r, 0.0, 1.0, -r)))
    # Row 1: cosines with p0, p1, n0, n1 -> 1/sqrt2, 1, 0, 1/sqrt2; target p1.
    row1 = -(scale * 1.0) + math.log(sum(math.exp(scale * c) for c in (r, 1.0, 0.0, r)))
    expected = (row0 + row1) / 2
    assert _np_info_nce(q, p, n, scale) == pytest.approx(expected, rel=1e-12)

    t = lambda a: torch.tensor(a, dtype=torch.float32)
    loss = info_nce(t(q), t(p), t(n).reshape(2, 1, 2), scale=scale)  # (B, K, D) layout
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(t(q), t(p), t(n), scale=scale).item() == pytest.approx(expected, rel=1e-5)  # (B*K, D)


def test_default_scale_against_numpy():
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    expected = _np_info_nce(q.double().numpy(), p.double().numpy(), n.reshape(15, 8).double().numpy(), 50.0)
    assert info_nce(q, p, n).item() == pytest.approx(expected, rel=1e-4)


def test_in_batch_negatives_are_the_bxb_matrix():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    sim = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T  # (B, B)
    expected = F.cross_entropy(sim * 50.0, torch.arange(6))
    assert_close(info_nce(q, p), expected)
    # and the off-diagonal entries really count: with one pair the loss is 0 regardless of alignment
    assert info_nce(q[:1], p[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert info_nce(q, p).item() > 0.1


def test_shape_errors():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError):
        info_nce(q, torch.randn(2, 4))
    with pytest.raises(ValueError):
        info_nce(q, torch.randn(3, 4), torch.randn(2, 1, 4))
    with pytest.raises(ValueError):
        info_nce(q, torch.randn(3, 4), torch.randn(3, 5))


def test_gather_is_identity_without_process_group():
    t = torch.randn(3, 2)
    assert gather_with_grad(t) is t
    assert_close(info_nce(t, t + 1, gather=True), info_nce(t, t + 1))


def test_matryoshka_is_the_weighted_sum_over_renormalised_prefixes():
    g = torch.Generator().manual_seed(3)
    q, p, n = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    # Reference from the numpy InfoNCE on each prefix (it normalises the prefix itself).
    expected = sum(
        w * _np_info_nce(q[:, :d].double().numpy(), p[:, :d].double().numpy(),
                         n.reshape(10, 8)[:, :d].double().numpy(), 20.0)
        for d, w in ((2, 0.5), (4, 1.0), (8, 2.0))
    )
    loss = matryoshka_info_nce(q, p, n, dims=[2, 4, 8], weights=[0.5, 1.0, 2.0], scale=20.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # The full width alone is InfoNCE; a prefix is not the full vector (the test can see the slicing).
    assert_close(matryoshka_info_nce(q, p, n, dims=[8], scale=20.0), info_nce(q, p, n, scale=20.0))
    assert abs(matryoshka_info_nce(q, p, n, dims=[2], scale=20.0).item() - info_nce(q, p, n, scale=20.0).item()) > 1e-3
    with pytest.raises(ValueError, match="1..8"):
        matryoshka_info_nce(q, p, n, dims=[4, 16])
    with pytest.raises(ValueError, match="one weight per dim"):
        matryoshka_info_nce(q, p, n, dims=[4, 8], weights=[1.0])


def test_split_batch_dict():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "mask": torch.ones(5, 2), "task": "q"}
    chunks = split_batch(batch, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert all(c["task"] == "q" for c in chunks)
    assert_close(torch.cat([c["input_ids"] for c in chunks]), batch["input_ids"])


# ---------------------------------------------------------------------------------------------- multivectors


def _np_maxsim_info_nce(q, p, n, scale):
    """Reference in float64 numpy for multivectors q (B, Kq, D), p (B, K, D), n (N, K, D): every vector
    normalised, score = Σ_k max_j q_k·c_j / Kq, log-softmax, explicit loops."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, cand = unit(q), unit(np.concatenate([p, n]) if n is not None else p)
    logits = np.array([[sum(max(qk @ cj for cj in c) for qk in qb) / len(qb) for c in cand] for qb in q]) * scale
    m = logits.max(axis=1, keepdims=True)
    log_softmax = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    return -np.mean([log_softmax[i, i] for i in range(len(q))])


def test_maxsim_sums_each_query_vector_s_best_match():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2): two query vectors
    c = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[-1.0, 0.0], [0.0, -1.0]]])  # (2, 2, 2): two candidates
    # candidate 0: q0 best 1.0 (c00), q1 best 0.8 (c01) -> 1.8; candidate 1: q0 best 0.0, q1 best 0.0 -> 0.0
    assert_close(maxsim(q, c), torch.tensor([[1.8, 0.0]]))
    assert_close(similarity(q, c), torch.tensor([[0.9, 0.0]]))  # / Kq: the scale of one dot product
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    assert_close(similarity(x, y), x @ y.T)
    assert_close(similarity(x[:, None], y[:, None]), x @ y.T)  # one vector each: MaxSim is the dot product
    with pytest.raises(ValueError, match="similarity"):
        similarity(x, y[:, None])


def test_one_vector_maxsim_loss_is_the_dot_product_loss():
    g = torch.Generator().manual_seed(5)
    q, p, n = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    one = lambda t: t.unsqueeze(-2)  # (..., D) -> (..., 1, D)
    expected = info_nce(q, p, n, scale=20.0)
    assert_close(info_nce(one(q), one(p), one(n), scale=20.0), expected)  # negatives (B, H, 1, D)
    assert_close(info_nce(one(q), one(p), one(n).flatten(0, 1), scale=20.0), expected)  # (N, 1, D)
    assert_close(info_nce(one(q), one(p), scale=20.0), info_nce(q, p, scale=20.0))
    assert_close(matryoshka_info_nce(one(q), one(p), one(n), dims=[2, 8], weights=[0.5, 1.0], scale=20.0),
                 matryoshka_info_nce(q, p, n, dims=[2, 8], weights=[0.5, 1.0], scale=20.0))


def test_multivector_info_nce_against_numpy_and_matryoshka_per_prefix():
    g = torch.Generator().manual_seed(6)
    q, p = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)  # (B, K, D)
    n = torch.randn(4, 2, 3, 6, generator=g)  # (B, H, K, D)
    flat = n.reshape(8, 3, 6).double().numpy()  # (N, K, D)
    expected = _np_maxsim_info_nce(q.double().numpy(), p.double().numpy(), flat, 20.0)
    assert info_nce(q, p, n, scale=20.0).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(q, p, n.reshape(8, 3, 6), scale=20.0).item() == pytest.approx(expected, rel=1e-5)
    # Not the loss of the mean vectors: the test can tell MaxSim from pooling the K vectors first.
    assert abs(info_nce(q.mean(1), p.mean(1), n.mean(2), scale=20.0).item() - expected) > 1e-2
    mrl = sum(w * _np_maxsim_info_nce(q[..., :d].double().numpy(), p[..., :d].double().numpy(), flat[..., :d], 20.0)
              for d, w in ((2, 0.5), (6, 1.0)))
    assert matryoshka_info_nce(q, p, n, dims=[2, 6], weights=[0.5, 1.0], scale=20.0).item() == pytest.approx(
        mrl, rel=1e-5)


def test_multivector_shape_errors():
    q, p = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="multivectors"):
        info_nce(q, torch.randn(3, 4))  # a multivector query against single-vector positives
    with pytest.raises(ValueError, match="must match"):
        info_nce(q, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="as many vectors"):
        info_nce(q, p, torch.randn(6, 3, 4))  # negatives of another K than the positives
    with pytest.raises(ValueError, match="B=3"):
        info_nce(q, p, torch.randn(2, 1, 2, 4))
    with pytest.raises(ValueError, match="dim"):
        info_nce(q, p, torch.randn(6, 2, 5))


# ---------------------------------------------------------------------------------------------- GradCache


def _model():
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4)).train()


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(12, 8, generator=g)


def test_grad_cache_matches_plain_loss_with_dropout():
    xq, xp, xn = _data()
    chunk = 4  # smaller than the batch, and leaves a ragged last chunk
    groups = [split_batch(xq, chunk), split_batch(xp, chunk), split_batch(xn, chunk)]

    # Plain: the same chunked forwards (so dropout consumes the RNG identically), one backward through all.
    model = _model()
    torch.manual_seed(0)
    q, p, n = (torch.cat([model(c) for c in cs]) for cs in groups)  # (6, 4), (6, 4), (12, 4)
    plain_loss = info_nce(q, p, n)
    plain_loss.backward()
    plain_grads = [w.grad.clone() for w in model.parameters()]
    rng_plain = torch.get_rng_state()

    model = _model()
    torch.manual_seed(0)
    cached_loss = grad_cache_step(model, *groups)
    assert not cached_loss.requires_grad
    assert_close(cached_loss, plain_loss.detach())
    for w, g in zip(model.parameters(), plain_grads):
        assert_close(w.grad, g)
    assert torch.equal(torch.get_rng_state(), rng_plain)  # RNG left where a single pass leaves it

    # Sanity: the test can see RNG mistakes — a second pass without restoring RNG gives other gradients.
    model = _model()
    torch.manual_seed(0)
    with torch.no_grad():
        embs = [[model(c) for c in cs] for cs in groups]
    leaves = [[e.requires_grad_() for e in es] for es in embs]
    loss = info_nce(*(torch.cat(ls) for ls in leaves))
    grads = iter(torch.autograd.grad(loss, [x for ls in leaves for x in ls]))
    for cs in groups:
        for c in cs:
            model(c).backward(next(grads))
    assert not all(torch.allclose(w.grad, g) for w, g in zip(model.parameters(), plain_grads))


MRL = functools.partial(matryoshka_info_nce, dims=[1, 2, 4], weights=[0.5, 1.0, 1.0])


@pytest.mark.parametrize("loss_fn", [info_nce, MRL], ids=["info_nce", "matryoshka"])
def test_grad_cache_matches_plain_loss_per_loss(loss_fn):
    """GradCache with any embedding-only loss: the cached-representation path gives the plain path's loss and
    parameter gradients (dropout on, ragged chunks)."""
    xq, xp, xn = _data()
    groups = [split_batch(xq, 4), split_batch(xp, 4), split_batch(xn, 4)]
    model = _model()
    torch.manual_seed(0)
    plain = loss_fn(*(torch.cat([model(c) for c in cs]) for cs in groups))  # (6, 4), (6, 4), (12, 4)
    plain.backward()
    plain_grads = [w.grad.clone() for w in model.parameters()]

    model = _model()
    torch.manual_seed(0)
    cached = grad_cache_step(model, *groups, loss_fn=loss_fn)
    assert_close(cached, plain.detach())
    for w, g in zip(model.parameters(), plain_grads):
        assert_close(w.grad, g)


MULTI_MRL = functools.partial(matryoshka_info_nce, dims=[1, 2], weights=[0.5, 1.0])


@pytest.mark.parametrize("loss_fn", [info_nce, MULTI_MRL], ids=["info_nce", "matryoshka"])
def test_grad_cache_matches_plain_loss_for_multivectors(loss_fn):
    """Multivector embeddings (b, K=2, D=2) scored by MaxSim: GradCache over chunks that hold rows out of input
    order gives the plain path's loss and parameter gradients (dropout on, ragged chunks)."""
    from diffembed.train.losses import in_input_order

    xq, xp, xn = _data()
    rows = [[[5, 1, 3], [0, 4, 2]], [[2, 0], [5, 1, 4, 3]], [[11, 0, 7, 3, 9], [1, 2, 4, 5, 6, 8, 10]]]
    groups = [[x[c] for c in chunks] for x, chunks in zip((xq, xp, xn), rows)]

    def embed(model):
        return lambda x: model(x).view(x.shape[0], 2, 2)  # (b, 4) -> (b, K, D)

    model = _model()
    torch.manual_seed(0)
    q, p, n = (in_input_order([embed(model)(c) for c in cs], chunks) for cs, chunks in zip(groups, rows))
    assert q.shape == (6, 2, 2) and n.shape == (12, 2, 2)
    plain = loss_fn(q, p, n)
    plain.backward()
    plain_grads = [w.grad.clone() for w in model.parameters()]

    model = _model()
    torch.manual_seed(0)
    cached = grad_cache_step(embed(model), *groups, loss_fn=loss_fn, chunk_rows=rows)
    assert_close(cached, plain.detach())
    for w, g in zip(model.parameters(), plain_grads):
        assert g.abs().max() > 0
        assert_close(w.grad, g)


def test_grad_cache_routes_through_backward_fn_and_dict_inputs():
    xq, xp, _ = _data()
    model = _model().eval()
    embed = lambda batch: model(batch["x"])
    calls = []

    def backward_fn(t, g):  # the DeepSpeed-style surrogate scalar
        calls.append(t.shape[0])
        (t * g).sum().backward()

    loss = grad_cache_step(
        embed, split_batch({"x": xq}, 4), split_batch({"x": xp}, 4), None, backward_fn=backward_fn
    )
    assert calls == [4, 2, 4, 2]
    ref = _model().eval()
    ref_loss = info_nce(ref(xq), ref(xp))
    ref_loss.backward()
    assert_close(loss, ref_loss.detach())
    for w, r in zip(model.parameters(), ref.parameters()):
        assert_close(w.grad, r.grad)


# ---------------------------------------------------------------------------------------------- distributed

WORLD, B, K, D = 2, 3, 2, 5
KV = 3  # vectors per multivector


def _global_batch():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(WORLD * B, D, generator=g)
    p = torch.randn(WORLD * B, D, generator=g)
    n = torch.randn(WORLD * B, K, D, generator=g)
    return q, p, n


def _global_multivectors():
    """(WORLD*B, KV, D) queries and positives, (WORLD*B, K, KV, D) hard negatives."""
    g = torch.Generator().manual_seed(12)
    return (torch.randn(WORLD * B, KV, D, generator=g), torch.randn(WORLD * B, KV, D, generator=g),
            torch.randn(WORLD * B, K, KV, D, generator=g))


MULTI_DIST_MRL = functools.partial(matryoshka_info_nce, dims=[2, D], weights=[0.5, 1.0])


def _dist_worker(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=180),  # a loaded 2-core CI box must not trip gloo's timeout
    )
    try:
        q, p, n = _global_batch()
        rows = slice(rank * B, (rank + 1) * B)
        lq, lp, ln = (t[rows].clone().requires_grad_() for t in (q, p, n))  # this rank's (B, ...) slices
        gathered = gather_with_grad(lq.detach())  # (WORLD * B, D)
        loss = info_nce(lq, lp, ln, gather=True)
        loss.backward()
        mq, mp, mn = (t[rows].clone().requires_grad_() for t in (q, p, n))
        mrl = MRL(mq, mp, mn, gather=True)  # one gather at full width, sliced per prefix
        mrl.backward()
        vq, vp, vn = (t[rows].clone().requires_grad_() for t in _global_multivectors())  # (B, KV, D), ...
        multi = info_nce(vq, vp, vn, gather=True)  # MaxSim against every rank's multivectors
        multi.backward()
        wq, wp, wn = (t[rows].clone().requires_grad_() for t in _global_multivectors())
        multi_mrl = MULTI_DIST_MRL(wq, wp, wn, gather=True)
        multi_mrl.backward()
        try:  # unequal local batches must fail loudly on every rank, not hang
            info_nce(torch.randn(B + rank, D), torch.randn(B + rank, D), gather=True)
            unequal = "no error"
        except ValueError as e:
            unequal = str(e)
        torch.save(
            {"gathered": gathered, "loss": loss.detach(), "gq": lq.grad, "gp": lp.grad, "gn": ln.grad,
             "unequal": unequal, "mrl": mrl.detach(), "mq": mq.grad, "mp": mp.grad, "mn": mn.grad,
             "multi": multi.detach(), "vq": vq.grad, "vp": vp.grad, "vn": vn.grad,
             "multi_mrl": multi_mrl.detach(), "wq": wq.grad, "wp": wp.grad, "wn": wn.grad},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # no rank tears gloo down while the other is still in a collective (a teardown abort)
    finally:
        dist.destroy_process_group()


def assert_rank_grads(res: list, names: tuple[str, ...], tensors: tuple) -> None:
    """Rank r's gradient for its own rows, `res[r][name]`, is WORLD x the single-process gradient there."""
    for r in range(WORLD):
        rows = slice(r * B, (r + 1) * B)
        for name, t in zip(names, tensors):
            assert_close(res[r][name], WORLD * t.grad[rows])


def test_distributed_gather_loss_and_grads(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    q, p, n = (t.clone().requires_grad_() for t in _global_batch())
    ref = info_nce(q, p, n)  # single process, global batch
    ref.backward()

    for r in range(WORLD):
        # (a) every rank sees the global batch in rank order
        assert_close(res[r]["gathered"], q.detach())
        assert "same local batch on every rank" in res[r]["unequal"]
    # (b) per-rank losses (local queries vs global candidates) average to the global loss
    assert_close(torch.stack([x["loss"] for x in res]).mean(), ref.detach())
    # (c) rank r's local loss L_r is 1/WORLD of the global mean, and the gather's backward sums every
    # rank's contribution into rank r's slot, so rank r's local embedding gradient is WORLD × the global
    # loss gradient for its rows. DDP's 1/WORLD averaging of parameter gradients turns that into exactly
    # the single-process gradient.
    assert_rank_grads(res, ("gq", "gp", "gn"), (q, p, n))

    # The same holds for the Matryoshka loss (gathered once, sliced per prefix).
    gq, gp, gn = (t.clone().requires_grad_() for t in _global_batch())
    mrl = MRL(gq, gp, gn)
    mrl.backward()
    assert_close(torch.stack([x["mrl"] for x in res]).mean(), mrl.detach())
    assert_rank_grads(res, ("mq", "mp", "mn"), (gq, gp, gn))

    # And for multivectors scored by MaxSim (plain and Matryoshka): (B, KV, D) rows gathered whole.
    for key, names, loss_fn in (("multi", ("vq", "vp", "vn"), info_nce),
                                ("multi_mrl", ("wq", "wp", "wn"), MULTI_DIST_MRL)):
        vq, vp, vn = (t.clone().requires_grad_() for t in _global_multivectors())
        ref = loss_fn(vq, vp, vn)
        ref.backward()
        assert_close(torch.stack([x[key] for x in res]).mean(), ref.detach())
        assert_rank_grads(res, names, (vq, vp, vn))
