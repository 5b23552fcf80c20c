"""The compare job: several tiny backbones fine-tuned with one recipe, evaluated on the same tasks, one table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffembed.config import ConfigError
from diffembed.eval.compare import CompareConfig, run_compare

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "compare_tiny.yaml"


def tiny_study(tmp_path: Path, *extra: str) -> CompareConfig:
    return CompareConfig.from_yaml(CONFIG, [
        f"output_dir={tmp_path / 'study'}", "train.optim.max_steps=4", "train.run.checkpoint_every=4",
        # one worker without DeepSpeed: the study's plumbing is under test here (the training job's distributed
        # paths have their own tests), at half the time
        "train.run.num_workers=1", "train.deepspeed.enabled=false",
        f"train.data.train_files=[{ROOT / 'jobs/configs/data/tiny_pairs.jsonl'}]", *extra,
    ])


def test_compare_job_end_to_end(ray_cluster, tmp_path):
    # the diffusion backbone and the AR baseline of the shipped study (its third only changes the settings, which
    # test_backbone_settings_reach_training_and_evaluation checks): two training runs and evaluations, not three
    study = tiny_study(tmp_path).model_dump()
    cfg = CompareConfig.model_validate({**study, "backbones": study["backbones"][:2]})
    assert [b.name for b in cfg.backbones] == ["dream-bidirectional", "qwen2-causal-last"]
    summary = run_compare(cfg)
    out = tmp_path / "study"
    names = [b.name for b in cfg.backbones]

    # One table: a row per task (each synthetic length, then the task's average), a column per backbone.
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["task", "metric", *names]
    tasks = [r["task"] for r in rows]
    assert tasks == ["passkey@128", "passkey@256", "passkey", "needle@128", "needle@256", "needle"]
    assert all(r["metric"] == "ndcg@1" for r in rows)
    assert all(0.0 <= float(r[n]) <= 1.0 for r in rows for n in names)
    for r in rows:  # a task's score is the mean over its lengths
        if "@" not in r["task"]:
            parts = [x for x in rows if x["task"].startswith(r["task"] + "@")]
            assert float(r[names[0]]) == pytest.approx(sum(float(x[names[0]]) for x in parts) / len(parts))
    md = (out / "compare.md").read_text()
    assert "| task | metric | " + " | ".join(names) + " |" in md and md.count("\n| passkey") == 3
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert summary["table"]["passkey"][names[0]] == pytest.approx(float(rows[2][names[0]]))

    # Each backbone really went through the training job with its own settings, and the evaluation used the export.
    for b in cfg.backbones:
        saved = json.loads((out / "runs" / b.name / "export" / "diffembed.json").read_text())
        assert saved["attention"] == b.embedder.get("attention", "bidirectional")
        assert saved["pooling"] == b.embedder.get("pooling", "mean")
        results = json.loads((out / b.name / "results.json").read_text())
        assert results["model"].endswith(str(Path("runs") / b.name / "export"))
        assert results["training"]["export_dir"].endswith("export")

    # A rerun finds every backbone finished: nothing is retrained, the table is rebuilt identically.
    before = {b.name: (out / b.name / "results.json").stat().st_mtime_ns for b in cfg.backbones}
    again = run_compare(cfg)
    assert {b.name: (out / b.name / "results.json").stat().st_mtime_ns for b in cfg.backbones} == before
    assert again["table"] == summary["table"]
    # A backbone whose evaluation never finished (no marker) is redone; the others are not.
    (out / names[1] / ".done").unlink()
    run_compare(cfg.model_copy(update={"fine_tune": False}))
    assert (out / names[1] / "results.json").stat().st_mtime_ns != before[names[1]]
    assert (out / names[0] / "results.json").stat().st_mtime_ns == before[names[0]]
    assert json.loads((out / names[1] / "results.json").read_text())["model"] == "tiny:qwen2"


def test_backbone_settings_reach_training_and_evaluation(tmp_path):
    cfg = tiny_study(tmp_path)
    causal = next(b for b in cfg.backbones if b.name == "qwen2-causal-last")
    train = cfg.train_config(causal)
    assert (train.embedder.model, train.embedder.attention, train.embedder.pooling) == ("tiny:qwen2", "causal", "last")
    assert train.embedder.max_length == 64 and train.optim.max_steps == 4  # the shared recipe, overridden
    assert train.run.name == causal.name and Path(train.run.storage_path) == tmp_path / "study" / "runs"
    bidir = cfg.train_config(cfg.backbones[2])
    assert bidir.optim.lr == pytest.approx(1e-3)
    # The evaluation of an export takes only what the evaluation template sets; the rest comes from the export.
    ev = cfg.eval_config(causal, "/x/export")
    assert ev.embedder.model == "/x/export" and ev.embedder.attention is None and ev.embedder.documents.windows == "best"
    # Without fine-tuning the base checkpoint is evaluated with the backbone's own settings.
    base = cfg.eval_config(causal, "tiny:qwen2")
    assert (base.embedder.attention, base.embedder.pooling, base.embedder.max_length) == ("causal", "last", 64)


@pytest.mark.parametrize("override, message", [
    (["backbones=[]"], "backbones"),
    (["backbones=[{name: a, embedder: {model: tiny:dream}}, {name: a, embedder: {model: tiny:qwen2}}]"], "repeated"),
    (["backbones=[{name: a, embedder: {attention: causal}}]"], "must name a model"),
    (["train=missing.yaml"], "config file not found"),
    (["evaluation.tasks=[]"], "evaluation.tasks"),
])
def test_bad_study_configs(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_study(tmp_path, *override)


def test_compare_cli_rejects_bad_backbone_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "compare.py"), "--config", str(CONFIG), f"output_dir={tmp_path}",
         "backbones=[{name: x, embedder: {model: tiny:dream, pooling: nope}}]"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pooling" in lines[0]
    assert not (tmp_path / "runs").exists()
