"""Mask-token readout in training and in the compare job: the worker's own step on tiny Dream / LLaDA checkpoints
(mean of the mask states, and multivectors scored by MaxSim), GradCache equivalence for multivectors, the dev
evaluation's MaxSim, and the readout study's compare config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from diffembed import Embedder
from diffembed.eval.compare import CompareConfig
from diffembed.eval.metrics import evaluate, top_k_run
from diffembed.train.backends import make_backend
from diffembed.train.config import TrainConfig
from diffembed.train.data import Pair
from diffembed.train.dev_eval import dev_ndcg, dev_scores
from diffembed.train.worker import build_trainable, make_loss, train_step

ROOT = Path(__file__).resolve().parents[1]
READOUT = ROOT / "jobs" / "configs" / "compare_readout.yaml"
K = 4  # mask tokens in these tests
QUERIES = ["red zebra", "blue otter", "green heron", "black walrus"]
INSTRUCTIONS = ["Find the animal", None, "Find the animal", None]
DOCS = ["A red zebra by the river.", "A blue otter swims.", "A green heron waits.", "A black walrus sleeps."]
NEGATIVES = ["A grey mouse hides.", "A brown bear fishes.", "A white swan glides.", "A yellow snake basks."]


def trainer(model: Path, mask_vectors: str, **loss):
    """The worker's setup in one process: Embedder, LoRA, the plain-PyTorch backend, the config's loss."""
    cfg = TrainConfig.from_dict({
        "data": {"train_files": ["unused.jsonl"]},
        "embedder": {"model": str(model), "max_length": 32, "pooling": "mask", "mask_tokens": K,
                     "mask_vectors": mask_vectors, "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"scale": 20.0, **loss},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "global_batch_size": 4},
        "deepspeed": {"enabled": False},
        "run": {"num_workers": 1},
    })
    torch.manual_seed(0)
    embedder = Embedder(cfg.embedder)
    module = build_trainable(embedder, cfg)
    engine = make_backend(cfg, module, torch.device("cpu"), 1)
    embedder.model = engine.model
    return cfg, embedder, engine, module


def step_segments(embedder: Embedder):
    return (embedder.query_segments(QUERIES, INSTRUCTIONS),
            embedder.document_segments(DOCS, windows="first", spans=False),
            embedder.document_segments(NEGATIVES, windows="first", spans=False))


@pytest.mark.parametrize("mask_vectors", ["mean", "multi"])
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_mask_readout_trains_and_the_trained_vectors_are_the_inference_vectors(tiny_checkpoints, family,
                                                                               mask_vectors):
    cfg, embedder, engine, module = trainer(tiny_checkpoints[family], mask_vectors)
    q_segs, p_segs, n_segs = segs = step_segments(embedder)
    mask_id = embedder.tokenizer.mask_token_id  # Dream <|mask|>, LLaDA <|mdm_mask|>
    for seg in (*q_segs, *p_segs):  # K mask tokens after the content, and only they are read
        assert seg.ids.count(mask_id) == K and sum(seg.pool_mask) == K
    loss_fn = make_loss(cfg, embedder.dimension, gather=False)

    grads: list[dict[str, float]] = []
    real_step = engine.step

    def step():  # what reached the trainable weights, before the optimizer consumes it
        grads.append({n: float(p.grad.abs().max()) for n, p in module.named_parameters()
                      if p.requires_grad and p.grad is not None})
        real_step()

    engine.step = step
    losses = [float(train_step(embedder, engine, *segs, loss_fn, None).detach()) for _ in range(6)]
    lora_b = [n for n, p in module.named_parameters() if p.requires_grad and "lora_B" in n]
    assert lora_b and all(grads[0].get(n, 0.0) > 0 for n in lora_b), grads[0]  # every adapter, every layer
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses

    engine.eval()
    with torch.no_grad():  # the training path's vectors of the same texts
        trained_q = embedder.forward(embedder.collate(q_segs)).numpy()
        trained_d = embedder.forward(embedder.collate(p_segs)).numpy()
    shape = (4, K, embedder.dimension) if mask_vectors == "multi" else (4, embedder.dimension)
    assert trained_q.shape == shape and trained_d.shape == shape
    np.testing.assert_allclose(embedder.encode_queries(QUERIES, INSTRUCTIONS), trained_q, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(embedder.encode_documents(DOCS), trained_d, atol=1e-5, rtol=1e-4)
    base = Embedder(cfg.embedder).encode_queries(QUERIES, INSTRUCTIONS)
    assert np.abs(base - trained_q).max() > 1e-3  # inference sees the trained weights, not the base model
    if mask_vectors == "multi":  # K distinct vectors per input (positions tell the mask tokens apart)
        assert np.abs(trained_q[:, 0] - trained_q[:, 1]).max() > 1e-4


@pytest.mark.slow
def test_multivector_training_on_ray_gathers_evaluates_and_exports(ray_cluster, tmp_path, tiny_checkpoints):
    """The real training job on 2 DDP workers: multivectors gathered across workers, GradCache, the dev evaluation
    every step (MaxSim), and an export whose (K, D) vectors are the trained model's (the probe it saved)."""
    from diffembed.config import EmbedderConfig
    from diffembed.train.checkpoints import PROBE_FILE
    from diffembed.train.loop import train

    pairs = str(ROOT / "jobs" / "configs" / "data" / "tiny_pairs.jsonl")
    cfg = TrainConfig.from_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml", [
        f"embedder.model={tiny_checkpoints['dream']}", "embedder.pooling=mask", f"embedder.mask_tokens={K}",
        "embedder.mask_vectors=multi", f"data.train_files=[{pairs}]", f"eval.dev_files=[{pairs}]", "eval.every=1",
        "deepspeed.enabled=false", "loss.grad_cache_chunk_size=2", "optim.max_steps=2", "run.checkpoint_every=2",
        f"run.storage_path={tmp_path}",
    ])
    assert cfg.run.num_workers == 2 and cfg.loss.gather_across_workers
    metrics = train(cfg)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    steps = json.loads((cfg.export_path / "train_history.json").read_text())
    assert all(0.0 <= h["dev_ndcg@10"] <= 1.0 for h in steps) and len(steps) == 2  # in-training dev eval
    assert 0.0 <= metrics["dev_ndcg@10"] <= 1.0 and 0.0 <= metrics["dev_ndcg@10_before"] <= 1.0
    export = Path(metrics["export_dir"])
    saved = json.loads((export / "diffembed.json").read_text())
    assert (saved["pooling"], saved["mask_tokens"], saved["mask_vectors"]) == ("mask", K, "multi")
    probe = json.loads((Path(metrics["checkpoint_dir"]) / PROBE_FILE).read_text())
    trained = np.asarray(probe["embeddings"], dtype=np.float32)  # (3, K, D) from the worker's forward
    exported = Embedder(EmbedderConfig(model=str(export))).encode_documents(probe["texts"])
    assert trained.shape == exported.shape == (3, K, 64)
    np.testing.assert_allclose(exported, trained, atol=1e-4)


def _captured_grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", [{}, {"matryoshka_dims": [16]}], ids=["info_nce", "matryoshka"])
def test_multivector_grad_cache_step_equals_the_plain_step(tiny_checkpoints, loss):
    """The worker's GradCache path (1-text chunks) and its plain path give the same MaxSim loss and gradients."""
    cfg, embedder, engine, module = trainer(tiny_checkpoints["dream"], "multi", **loss)
    with torch.no_grad():  # LoRA's B starts at zero (A would get no gradient): give every adapter weight one
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    engine.step = lambda: None  # keep the step's gradients to compare
    loss_fn = make_loss(cfg, embedder.dimension, gather=False)
    segs = step_segments(embedder)
    plain = train_step(embedder, engine, *segs, loss_fn, None)
    want = _captured_grads(module)
    module.zero_grad(set_to_none=True)
    cached = train_step(embedder, engine, *segs, loss_fn, 1)
    got = _captured_grads(module)
    assert_close(cached, plain.detach())
    assert want and got.keys() == want.keys()
    for name, g in want.items():
        assert float(g.abs().max()) > 0, name
        assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dev_evaluation_ranks_multivectors_by_maxsim(tiny_checkpoints):
    embedder = Embedder(trainer(tiny_checkpoints["dream"], "multi")[0].embedder)
    pairs = [Pair(q, d, [n], instruction=i) for q, d, n, i in zip(QUERIES, DOCS, NEGATIVES, INSTRUCTIONS)]
    got = dev_ndcg(embedder, pairs)
    # Reference: MaxSim (Σ over query vectors of the best document vector) in numpy, over the same corpus.
    texts = [t for pair in pairs for t in (pair.positive, *pair.negatives)]  # all distinct: ids d0, d1, ...
    docs = embedder.encode_documents(texts)  # (N, K, D)
    queries = embedder.encode_queries(QUERIES, INSTRUCTIONS)  # (Q, K, D)
    scores = np.einsum("qkd,njd->qnkj", queries, docs).max(-1).sum(-1)  # (Q, N)
    qids, dids = [f"q{i}" for i in range(4)], [f"d{i}" for i in range(len(texts))]
    want = evaluate({q: {f"d{2 * i}": 1} for i, q in enumerate(qids)}, top_k_run(scores, qids, dids, 100))
    assert got == pytest.approx(want)
    # The scores themselves: MaxSim / K (the loss's `similarity`), not the mean vectors' or the first vectors' dot.
    np.testing.assert_allclose(dev_scores(queries, docs) * K, scores, rtol=1e-5, atol=1e-5)
    assert not np.allclose(scores / K, queries.mean(1) @ docs.mean(1).T, atol=1e-3)
    assert not np.allclose(scores / K, queries[:, 0] @ docs[:, 0].T, atol=1e-3)
    single = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)  # (2, D) x (3, D): dot
    np.testing.assert_allclose(dev_scores(single[0, :2], single[1, :3]), single[0, :2] @ single[1, :3].T, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- compare job


def test_readout_study_config_puts_the_readouts_side_by_side():
    cfg = CompareConfig.from_yaml(READOUT)
    arms = {b.name: cfg.train_config(b).embedder for b in cfg.backbones}
    assert len({e.model for e in arms.values()}) == 1  # one diffusion backbone ...
    assert {e.family for e in arms.values()} == {"dream"} and {e.attention for e in arms.values()} == {"bidirectional"}
    readouts = {name: (e.pooling, e.mask_vectors if e.pooling == "mask" else None) for name, e in arms.items()}
    assert sorted(readouts.values(), key=str) == sorted(
        [("mean", None), ("last", None), ("mask", "mean"), ("mask", "multi")], key=str)  # ... read out four ways
    assert [name for name, e in arms.items() if e.multivector] == ["dream7b-mask-multi"]
    assert {e.mask_tokens for e in arms.values() if e.pooling == "mask"} == {8}
    for b in cfg.backbones:
        train = cfg.train_config(b)
        assert train.lora.r == 16 and train.loss.scale == 50.0 and train.run.name == b.name  # one recipe
        base = cfg.eval_config(b, b.embedder["model"])  # a base checkpoint is scored with the arm's readout
        assert (base.embedder.pooling, base.embedder.mask_vectors) == (arms[b.name].pooling, arms[b.name].mask_vectors)
        export = cfg.eval_config(b, "/x/export")  # an export's readout comes from its saved diffembed.json
        assert export.embedder.pooling is None and export.embedder.documents.windows == "first"
