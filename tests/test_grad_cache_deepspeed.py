"""Length-planned training steps under DeepSpeed ZeRO-2 / ZeRO-3 on two ranks == the plain padded step.

Two processes, a real gloo process group and real DeepSpeed engines (CPU accelerator) around a tiny Dream-layout
model with LoRA, each rank with its own rows. `train_step` (length-planned sub-batches, with or without GradCache)
must give the gradients and parameters of the plain step (one padded batch per group, one backward).

The ranks' rows differ in length on purpose: on its own, rank 0 would plan fewer chunks than rank 1. ZeRO-3
gathers parameters in every forward and ZeRO-2 reduces gradients in every backward, both collectives, so ranks
running different numbers of chunks used to wait on each other until gloo's timeout. ZeRO-3 runs with a parameter
persistence threshold of 0 so that even this tiny model's parameters are partitioned and gathered, as a 7B's are.

Two optimizer steps each way, because Adam's first update is ~lr * sign(grad) and would hide a gradient that is
right in sign but wrong in size; the second update depends on both steps' magnitudes.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ray_head import free_port
from torch.testing import assert_close

STEPS = 2
WORLD = 2
MAX_ROWS = 3  # GradCache chunk size: every group of 6 rows becomes several length-sorted chunks
# (stage, GradCache chunk size or None): the plain step of each stage is the reference. ZeRO-2 without GradCache
# has one backward whatever the plan, so it is left out.
MODES = [(2, MAX_ROWS), (3, None), (3, MAX_ROWS)]


def _segments(lengths: list[int], seed: int, vocab: int):
    from diffembed.models.embedder import Segment

    rng = np.random.default_rng(seed)
    return [Segment([int(x) for x in rng.integers(10, vocab, n)], [1] * n, row, (0, n), (0, n))
            for row, n in enumerate(lengths)]


def _batch(step: int, rank: int, vocab: int):
    """This rank's (queries, positives, negatives). Rank 0: short rows of similar length, few chunks. Rank 1:
    lognormal lengths up to 640, which length planning cuts into more chunks and reorders."""
    rng = np.random.default_rng(100 + 10 * step + rank)
    if rank == 0:
        sizes = [rng.integers(8, 24, 6).tolist() for _ in range(3)]
    else:
        sizes = [np.clip(rng.lognormal(np.log(m), 1.0, 6), 3, 640).astype(int).tolist() for m in (20, 150, 150)]
    return [_segments(s, seed=100 * step + 10 * rank + g, vocab=vocab) for g, s in enumerate(sizes)]


class Recorded:
    """The training backend, with every rank's full gradients taken just before each optimizer step (DeepSpeed
    clears them in it). Gathering a ZeRO-3 gradient is a collective: both ranks do it."""

    def __init__(self, backend, named) -> None:
        self.backend, self.named, self.grads = backend, named, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        self.grads.append({name: safe_get_full_grad(w).clone() for name, w in self.named})
        self.backend.step()


def _run(rank: int, stage: int, chunk: int | None, plain: bool) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from diffembed.models.embedder import Embedder
    from diffembed.train.config import TrainConfig
    from diffembed.train.deepspeed import DeepSpeedBackend
    from diffembed.train.losses import info_nce
    from diffembed.train.microbatch import plan_chunks
    from diffembed.train.worker import build_trainable, train_step

    cfg = TrainConfig.from_dict({
        "embedder": {"model": "tiny:dream", "device": "cpu"},
        "data": {"train_files": ["unused.jsonl"]},
        "lora": {"r": 4, "dropout": 0.0},
        "loss": {"grad_cache_chunk_size": chunk},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "max_steps": STEPS, "global_batch_size": 6 * WORLD,
                  "schedule": "constant"},
        "deepspeed": {"enabled": True, "zero_stage": stage,
                      "zero_options": {"stage3_param_persistence_threshold": 0} if stage == 3 else {}},
        "run": {"num_workers": WORLD},
    })
    embedder = Embedder(cfg.embedder)  # the first load builds tiny:dream, which reseeds the RNG
    torch.manual_seed(0)  # the same LoRA init on every rank, every way
    model = build_trainable(embedder, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    engine = Recorded(DeepSpeedBackend(cfg, model), named)
    embedder.model = engine.model
    vocab = min(len(embedder.tokenizer), 500)

    def embed(segs):
        with engine.autocast():
            return embedder.forward(embedder.collate(segs))  # (b, D)

    out = {"losses": [], "counts": [], "reordered": False,
           "before": {name: safe_get_full_fp32_param(w).clone() for name, w in named}}
    for step in range(STEPS):
        q, p, n = _batch(step, rank, vocab)
        plans = [plan_chunks([len(s.ids) for s in g], max_rows=chunk) for g in (q, p, n)]
        out["counts"].append([len(plan) for plan in plans])  # what this rank would plan on its own
        out["reordered"] |= any(sum(plan, []) != sorted(sum(plan, [])) for plan in plans)
        if plain:  # one padded batch per group, one backward
            loss = info_nce(embed(q), embed(p), embed(n))
            engine.backward(loss)
            engine.step()
        else:
            loss = train_step(embedder, engine, q, p, n, info_nce, chunk)
        out["losses"].append(float(loss.detach()))
    out["grads"] = engine.grads
    out["params"] = {name: safe_get_full_fp32_param(w).clone() for name, w in named}
    return out


def _worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    # A rank left waiting on a collective the other never runs fails the test after this long, not never.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # Every mode in one process: one import of DeepSpeed.
        results = {stage: {"plain": _run(rank, stage, None, plain=True)} for stage in (2, 3)}
        for stage, chunk in MODES:
            results[stage][chunk] = _run(rank, stage, chunk, plain=False)
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gc_ds") / "result.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(WORLD)]


@pytest.mark.parametrize(("stage", "chunk"), MODES)
def test_length_planned_step_matches_the_plain_step_on_ranks_that_plan_differently(stage, chunk, results):
    planned = [r[stage][chunk] for r in results]
    # On their own the two ranks would run different numbers of chunks: the case that hung.
    assert any(planned[0]["counts"][s] != planned[1]["counts"][s] for s in range(STEPS))
    assert planned[1]["reordered"]  # the chunks really were out of input order

    for rank, r in enumerate(results):
        plain, got = r[stage]["plain"], r[stage][chunk]
        for step in range(STEPS):
            assert got["losses"][step] == pytest.approx(plain["losses"][step], rel=1e-5), (rank, step)
            grads_p, grads_c = plain["grads"][step], got["grads"][step]
            assert grads_p.keys() == grads_c.keys() and grads_p
            assert any(float(g.abs().max()) > 0 for g in grads_p.values())
            for name, g in grads_p.items():
                assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5 * max(float(g.abs().max()), 1e-12), msg=name)
        # Parameters after both Adam steps: compared update by update (a tensor's whole change), since Adam
        # divides by |grad| and so amplifies fp32 noise in the odd near-zero gradient element; the gradients
        # above are compared element by element.
        for name, w in plain["params"].items():
            start = plain["before"][name]
            want, have = w - start, got["params"][name] - start
            assert float((have - want).norm()) <= 1e-3 * float(want.norm()) + 1e-7, name
        # the steps really moved the adapter (the same start both ways: same seed)
        assert all(torch.equal(plain["before"][k], got["before"][k]) for k in plain["before"])
        assert any(not torch.equal(plain["before"][k], w) for k, w in plain["params"].items())
    # Gradients are averaged over the ranks: both hold the same (ZeRO gathers them whole for the check).
    for name, g in results[0][stage][chunk]["grads"][-1].items():
        assert_close(results[1][stage][chunk]["grads"][-1][name], g, msg=name)
