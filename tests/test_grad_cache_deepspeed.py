"""GradCache over length-planned chunks under DeepSpeed ZeRO-2 / ZeRO-3 == the unchunked step.

One process, world size 1, a real gloo process group and real DeepSpeed engines (CPU accelerator) around a tiny
Dream-layout model with LoRA. Two optimizer steps each way: the gradients before every step and the parameters
after both must agree. Two steps, because Adam's first update is ~lr * sign(grad) and would hide a gradient that
is right in sign but wrong in size; the second update depends on both steps' magnitudes.
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

STEPS = 2
MAX_ROWS = 3  # GradCache chunk size: every group of 6 rows becomes several length-sorted chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _segments(lengths: list[int], seed: int, vocab: int):
    from diffembed.models.embedder import Segment

    rng = np.random.default_rng(seed)
    return [Segment([int(x) for x in rng.integers(10, vocab, n)], [1] * n, row, (0, n), (0, n))
            for row, n in enumerate(lengths)]


def _batch(step: int, vocab: int):
    """(queries, positives, negatives) with lognormal lengths, so length planning reorders rows."""
    rng = np.random.default_rng(100 + step)
    sizes = [np.clip(rng.lognormal(np.log(m), 0.6, 6), 3, 96).astype(int).tolist() for m in (10, 40, 40)]
    return [_segments(s, seed=10 * step + g, vocab=vocab) for g, s in enumerate(sizes)]


def _run(stage: int, chunked: bool) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from diffembed.models.embedder import Embedder
    from diffembed.train.config import TrainConfig
    from diffembed.train.deepspeed import DeepSpeedBackend
    from diffembed.train.losses import info_nce
    from diffembed.train.microbatch import grad_cache_in_order, plan_chunks
    from diffembed.train.worker import build_trainable

    cfg = TrainConfig.from_dict({
        "embedder": {"model": "tiny:dream", "device": "cpu"},
        "data": {"train_files": ["unused.jsonl"]},
        "lora": {"r": 4, "dropout": 0.0},
        "loss": {"grad_cache_chunk_size": MAX_ROWS if chunked else None},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "max_steps": STEPS, "global_batch_size": 6, "schedule": "constant"},
        "deepspeed": {"enabled": True, "zero_stage": stage},
        "run": {"num_workers": 1},
    })
    embedder = Embedder(cfg.embedder)  # the first load builds tiny:dream, which reseeds the RNG
    torch.manual_seed(0)  # the same LoRA init both ways
    model = build_trainable(embedder, cfg)
    engine = DeepSpeedBackend(cfg, model)
    embedder.model = engine.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vocab = min(len(embedder.tokenizer), 500)

    def embed(segs):
        with engine.autocast():
            return embedder.forward(embedder.collate(segs))  # (b, D)

    out = {"grads": [], "losses": [], "reordered": False,
           "before": {name: safe_get_full_fp32_param(w).clone() for name, w in named}}
    for step in range(STEPS):
        q, p, n = _batch(step, vocab)
        if chunked:
            plans = [plan_chunks([len(s.ids) for s in g], max_rows=MAX_ROWS, overhead_tokens=4) for g in (q, p, n)]
            out["reordered"] |= any(sum(pl, []) != sorted(sum(pl, [])) for pl in plans)
            loss = grad_cache_in_order(embed, engine, [q, p, n], info_nce, max_rows=MAX_ROWS, overhead_tokens=4)
        else:  # train_step's unchunked branch: one padded batch per group, one backward
            loss = info_nce(embed(q), embed(p), embed(n))
            engine.backward(loss)
        out["grads"].append({name: safe_get_full_grad(w).clone() for name, w in named})
        out["losses"].append(float(loss.detach()))
        engine.step()
    out["params"] = {name: safe_get_full_fp32_param(w).clone() for name, w in named}
    return out


def _worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # Both stages in one process: one import of DeepSpeed.
        torch.save({stage: {"plain": _run(stage, chunked=False), "chunked": _run(stage, chunked=True)}
                    for stage in (2, 3)}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gc_ds") / "result.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_length_planned_grad_cache_matches_unchunked_step(stage, results):
    plain, chunked = results[stage]["plain"], results[stage]["chunked"]
    assert chunked["reordered"]  # the chunks really were out of input order

    for step in range(STEPS):
        assert chunked["losses"][step] == pytest.approx(plain["losses"][step], rel=1e-5)
        grads_p, grads_c = plain["grads"][step], chunked["grads"][step]
        assert grads_p.keys() == grads_c.keys() and grads_p
        assert any(float(g.abs().max()) > 0 for g in grads_p.values())
        for name, g in grads_p.items():
            assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5 * max(float(g.abs().max()), 1e-12), msg=name)
    # Parameters after both Adam steps: compared update by update (a tensor's whole change), since Adam divides
    # by |grad| and so amplifies fp32 noise in the odd near-zero gradient element; the gradients above are
    # compared element by element.
    for name, w in plain["params"].items():
        start = plain["before"][name]
        want, got = w - start, chunked["params"][name] - start
        assert float((got - want).norm()) <= 1e-3 * float(want.norm()) + 1e-7, name
    # the steps really moved the adapter (the same start both ways: same seed)
    assert all(torch.equal(plain["before"][k], chunked["before"][k]) for k in plain["before"])
    assert any(not torch.equal(plain["before"][k], w) for k, w in plain["params"].items())
