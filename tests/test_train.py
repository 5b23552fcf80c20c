"""The training job end to end on a real local Ray cluster: 2 workers, DeepSpeed ZeRO on gloo, CPU."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffembed import Embedder, EmbedderConfig
from diffembed.train.config import TrainConfig
from diffembed.train.loop import PROBE_FILE, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "train_tiny.yaml"


def tiny_config(tmp_path, tiny_checkpoints, *overrides) -> TrainConfig:
    return TrainConfig.from_yaml(
        TINY, [f"embedder.model={tiny_checkpoints['dream']}", f"run.storage_path={tmp_path}", *overrides]
    )


def history(cfg: TrainConfig) -> list[dict]:
    return json.loads((cfg.export_path / "train_history.json").read_text())


@pytest.mark.parametrize("stage, extra", [(2, []), (3, ["loss.grad_cache_chunk_size=3"])])
def test_zero_training_learns_checkpoints_and_exports(ray_cluster, tmp_path, tiny_checkpoints, stage, extra):
    cfg = tiny_config(tmp_path, tiny_checkpoints, f"deepspeed.zero_stage={stage}", *extra)
    metrics = train(cfg)
    assert metrics["step"] == cfg.optim.max_steps == 16
    losses = [h["loss"] for h in sorted(history(cfg), key=lambda h: h["step"])]
    assert len(losses) == 16
    # Two epochs over the same 8 batches: the second pass has a lower loss than the first.
    assert np.mean(losses[8:]) < np.mean(losses[:8]), losses
    assert len([p for p in cfg.run_dir.glob("checkpoint_*") if p.is_dir()]) >= 1
    export = Path(metrics["export_dir"])
    for name in ("model.safetensors", "config.json", "diffembed.json", "loss.png", "tokenizer_config.json"):
        assert (export / name).is_file(), name
    # The exported model, loaded by the Embedder, embeds like the model at the end of training.
    probe = json.loads((Path(metrics["checkpoint_dir"]) / PROBE_FILE).read_text())
    exported = Embedder(EmbedderConfig(model=str(export))).encode_documents(probe["texts"])
    trained = np.asarray(probe["embeddings"], dtype=np.float32)
    cos = (exported * trained).sum(1) / np.linalg.norm(exported, axis=1) / np.linalg.norm(trained, axis=1)
    assert cos.min() > 0.9999
    # ... and differs from the untrained backbone (LoRA was merged, not dropped).
    base = Embedder(EmbedderConfig(model=str(tiny_checkpoints["dream"]), max_length=64))
    assert float((base.encode_documents(probe["texts"]) * exported).sum(1).min()) < 0.999
    saved = json.loads((export / "diffembed.json").read_text())
    assert (saved["family"], saved["attention"], saved["pooling"]) == ("qwen2", "bidirectional", "mean")


def test_worker_failure_resumes_from_checkpoint(ray_cluster, tmp_path, tiny_checkpoints):
    cfg = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=8", "run.checkpoint_every=4", "run.fail_at_step=6")
    metrics = train(cfg)
    assert metrics["step"] == 8
    assert metrics["attempt"] == 1  # the second attempt finished the run, from the step-4 checkpoint
    steps = [h["step"] for h in history(cfg)]
    assert max(steps) == 8


def nonsense_task(seed: int = 0):
    """Queries in made-up words ("blorf quim") for documents in English ("a red zebra ..."): MiniLM cannot
    know the mapping, fine-tuning can learn it; held-out queries combine words seen in other pairs."""
    rng = random.Random(seed)
    animals = ["zebra", "otter", "falcon", "badger", "lizard", "walrus", "beetle", "heron"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]

    def word():
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))

    code = {w: word() for w in animals + colors}
    rows = []
    for a in animals:
        for c in colors:
            rows.append({"query": f"{code[a]} {code[c]}", "positive": f"A {c} {a} was seen near the river today."})
    rng.shuffle(rows)
    for i, row in enumerate(rows):  # a hard negative: same animal, another colour
        other = rows[(i + 1) % len(rows)]["positive"]
        row["negatives"] = [other]
    return rows[:48], rows[48:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetuning_minilm_raises_ndcg(ray_cluster, tmp_path):
    train_rows, dev_rows = nonsense_task()
    cfg = TrainConfig.from_dict(
        {
            "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 32},
            "data": {"train_files": [str(write_jsonl(tmp_path / "train.jsonl", train_rows))]},
            "eval": {"dev_files": [str(write_jsonl(tmp_path / "dev.jsonl", dev_rows))], "every": 18},
            "lora": {"enabled": False},
            "optim": {"lr": 2e-4, "warmup_steps": 3, "max_steps": 36, "global_batch_size": 16},
            "loss": {"scale": 20.0},
            "deepspeed": {"zero_stage": 2},
            "run": {"name": "minilm", "storage_path": str(tmp_path), "num_workers": 2, "checkpoint_every": 36},
        }
    )
    metrics = train(cfg)
    before, after = metrics["dev_ndcg@10_before"], metrics["dev_ndcg@10"]
    assert after > before + 0.1, (before, after)
    during = [h for h in history(cfg) if "dev_ndcg@10" in h]  # evaluated in the loop every 18 steps
    assert [h["step"] for h in during] == [18, 36]
    assert abs(during[-1]["dev_ndcg@10"] - after) < 0.02  # the exported model scores as the trained one did
    # The export is still a sentence-transformers model directory.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(metrics["export_dir"], device="cpu")
    ours = Embedder(EmbedderConfig(model=metrics["export_dir"])).encode_documents(["a red zebra"])
    assert float(st.encode(["a red zebra"], normalize_embeddings=True)[0] @ ours[0]) > 0.9999


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["deepspeed.zero_stage=5"], "zero_stage"),
        (["bogus_key=1"], "bogus_key"),
        (["data.train_files=[/nonexistent/pairs.jsonl]"], "/nonexistent/pairs.jsonl"),
        (["optim.global_batch_size=7"], "divisible"),
    ],
)
def test_bad_config_fails_before_ray(overrides, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(TINY), *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_resume_an_earlier_run(ray_cluster, tmp_path, tiny_checkpoints):
    first = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=4", "run.checkpoint_every=4")
    assert train(first)["step"] == 4
    longer = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=8", "run.checkpoint_every=4",
                         "run.name=train-tiny-more")
    metrics = train(longer, resume=str(first.run_dir))
    assert metrics["step"] == 8 and metrics["attempt"] == 1  # continued from step 4, did not start over
    assert [h["step"] for h in history(longer)] == list(range(1, 9))
