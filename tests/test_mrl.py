"""Matryoshka training (`loss.matryoshka_dims`): config checks; a short training of the packaged MiniLM through the
worker's own step in which MRL makes a truncated embedding retrieve better than plain InfoNCE does; and the job on
real local Ray Train (2 workers, gathered candidates, GradCache)."""

from __future__ import annotations

import json
import random
import runpy
from pathlib import Path

import numpy as np
import pytest

from diffembed import ConfigError, Embedder
from diffembed.train.config import LossConfig, TrainConfig
from diffembed.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
PREFIX = 16  # the truncated width the comparison serves (MiniLM is 384 wide)


def test_matryoshka_config_resolves_and_validates(tmp_path):
    loss = LossConfig(matryoshka_dims=[128, 32], matryoshka_weights=[2.0, 0.5])
    assert loss.matryoshka(384) == [(32, 0.5), (128, 2.0), (384, 1.0)]  # ascending, the full width added
    assert LossConfig(matryoshka_dims=[64, 384]).matryoshka(384) == [(64, 1.0), (384, 1.0)]  # listed once
    assert LossConfig().matryoshka(384) is None
    with pytest.raises(ConfigError, match=r"\[512\] exceed the embedding width 384"):
        LossConfig(matryoshka_dims=[64, 512]).matryoshka(384)
    for bad in ({"matryoshka_dims": [64, 64]}, {"matryoshka_dims": [0]}, {"matryoshka_dims": []},
                {"matryoshka_dims": [64], "matryoshka_weights": [1.0, 2.0]},
                {"matryoshka_dims": [64], "matryoshka_weights": [-1.0]}, {"matryoshka_weights": [1.0]}):
        with pytest.raises(ConfigError, match="matryoshka"):
            TrainConfig.from_dict({"data": {"train_files": ["x.jsonl"]}, "loss": bad})
    # Wider than the model: caught on the driver from config.json, before Ray starts ...
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    cfg = TrainConfig.from_dict({"data": {"train_files": [str(pairs)]}, "loss": {"matryoshka_dims": [64, 1024]}})
    with pytest.raises(ConfigError, match="1024"):
        cfg.check_files()
    # ... and against embedder.dimensions, the width the model is served (and trained) at.
    cfg = TrainConfig.from_dict({"data": {"train_files": [str(pairs)]}, "embedder": {"dimensions": 128},
                                 "loss": {"matryoshka_dims": [256]}})
    with pytest.raises(ConfigError, match="width 128"):
        cfg.check_files()


def test_train_job_rejects_too_wide_matryoshka_in_one_line(capsys, monkeypatch):
    """jobs/train.py's main() in this process (the CLI in a process of its own: test_train.py's
    test_bad_config_fails_before_ray)."""
    monkeypatch.chdir(ROOT)
    main = runpy.run_path(str(ROOT / "jobs" / "train.py"))["main"]
    code = main(["--config", str(ROOT / "jobs" / "configs" / "train_tiny.yaml"), "embedder.model=all-MiniLM-L6-v2",
                 "loss.matryoshka_dims=[64,4096]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "matryoshka_dims [4096]" in lines[0], lines


def coded_pairs(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Queries in made-up words ("blorf quim") for English sentences ("a red zebra ..."): MiniLM cannot know the
    code, training teaches it. Held-out pairs combine words that training used in other combinations."""
    rng = random.Random(seed)
    animals = ["zebra", "otter", "falcon", "badger", "lizard", "walrus", "beetle", "heron"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    code = {w: "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for w in animals + colors}
    rows = [{"query": f"{code[a]} {code[c]}", "positive": f"A {c} {a} was seen near the river today."}
            for a in animals for c in colors]
    rng.shuffle(rows)
    return rows[:48], rows[48:]


def train_in_process(train_rows: list[dict], **loss) -> Embedder:
    """24 steps of the worker's own step (`make_loss`, `train_step`, the plain-PyTorch backend) on one process:
    full fine-tuning of the packaged MiniLM, the same seed, data order and schedule whatever the loss."""
    import torch

    from diffembed.train.backends import make_backend
    from diffembed.train.worker import build_trainable, make_loss, train_step

    cfg = TrainConfig.from_dict({
        "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 32, "device": "cpu"},
        "data": {"train_files": ["unused.jsonl"], "hard_negatives": 0},
        "lora": {"enabled": False},
        "optim": {"lr": 2e-4, "warmup_steps": 3, "max_steps": 24, "global_batch_size": 16},
        "loss": {"scale": 20.0, **loss},
        "deepspeed": {"enabled": False},
        "run": {"num_workers": 1},
    })
    torch.manual_seed(0)
    embedder = Embedder(cfg.embedder)
    engine = make_backend(cfg, build_trainable(embedder, cfg), torch.device("cpu"), 1)
    embedder.model = engine.model
    loss_fn = make_loss(cfg, embedder.dimension, gather=False)
    order = random.Random(0)
    for step in range(cfg.optim.max_steps):
        rows = order.sample(train_rows, cfg.optim.global_batch_size)
        q_segs = embedder.query_segments([r["query"] for r in rows])
        p_segs = embedder.document_segments([r["positive"] for r in rows], windows="first", spans=False)
        train_step(embedder, engine, q_segs, p_segs, [], loss_fn, cfg.loss.grad_cache_chunk_size)
    engine.eval()
    return embedder


def heldout_loss_and_accuracy(embedder: Embedder, rows: list[dict], dims: int) -> tuple[float, float]:
    """(InfoNCE loss at scale 20, accuracy) of each held-out query against every held-out positive, on vectors
    truncated to `dims` and re-normalised: what a collection served at `dimensions: dims` scores."""
    import torch

    with torch.no_grad():
        q = embedder.finish(embedder.embed_segments(embedder.query_segments([r["query"] for r in rows])), dims)
        p = embedder.finish(embedder.embed_segments(
            embedder.document_segments([r["positive"] for r in rows], windows="first")), dims)  # (N, dims), unit
    logits = 20.0 * q @ p.T  # (N, N)
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return float(-np.diag(log_softmax).mean()), float((logits.argmax(1) == np.arange(len(rows))).mean())


def test_matryoshka_training_beats_plain_infonce_at_a_prefix():
    """Same data, seed and steps. At a 16-dim prefix the MRL-trained model scores the held-out pairs better than
    the plain-InfoNCE-trained one (measured: loss 0.008 vs 0.21, accuracy 1.0 vs 0.94; at full width both are 1.0).
    """
    import torch

    train_rows, heldout = coded_pairs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy shared CI box makes OpenMP's barriers spin (10x slower seen)
    try:
        plain_loss, plain_acc = heldout_loss_and_accuracy(train_in_process(train_rows), heldout, PREFIX)
        mrl_loss, mrl_acc = heldout_loss_and_accuracy(train_in_process(train_rows, matryoshka_dims=[PREFIX, 64]),
                                                      heldout, PREFIX)
    finally:
        torch.set_num_threads(threads)
    assert mrl_loss < 0.5 * plain_loss and mrl_acc >= plain_acc, {"plain": (plain_loss, plain_acc),
                                                                   "mrl": (mrl_loss, mrl_acc)}


def test_matryoshka_trains_on_ray_with_gathered_candidates(ray_cluster, tmp_path, tiny_checkpoints):
    """The job path: 2 Ray Train workers (candidates gathered across them), GradCache, hard negatives, MRL."""
    cfg = TrainConfig.from_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml", [
        f"embedder.model={tiny_checkpoints['dream']}", f"run.storage_path={tmp_path}", "deepspeed.enabled=false",
        "optim.max_steps=4", "run.checkpoint_every=4", "loss.grad_cache_chunk_size=3", "loss.matryoshka_dims=[8,16]",
    ])
    metrics = train(cfg)
    history = json.loads((cfg.export_path / "train_history.json").read_text())
    assert metrics["step"] == 4 and len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
