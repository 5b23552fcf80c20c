"""A hub model (an `org/name` id) as the jobs use it, against the loopback hub (`tests/hub.py`): a job's driver reads
the model's config and tokenizer and fingerprints it without downloading its weights (a 7B checkpoint is ~15 GB and
the driver sits on a small head node); the encoder actors download them where they run; the fingerprint equals the
downloaded snapshot's, so a collection embedded from the hub id matches a local copy of the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffembed import EmbedderConfig
from diffembed.batch.pipeline import model_dimension
from diffembed.index.fingerprint import embedding_fingerprint, model_digest
from diffembed.models.loading import check_model, packaged_minilm_path, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


def test_the_driver_fingerprints_a_hub_model_without_its_weights(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    hub.online(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    hub.add("org/minilm", packaged_minilm_path())
    cfg = EmbedderConfig(model="org/minilm")
    check_model(cfg)
    dim = model_dimension(cfg)
    fingerprint = embedding_fingerprint(cfg, dim, "cosine", False)
    assert dim == 384
    assert hub.downloads(WEIGHTS) == [] and not list((tmp_path / "cache").rglob("*.safetensors"))
    assert len([r for r in hub.requests if r.file == WEIGHTS and r.range]) == 2  # its two ends, 64 KiB each

    snapshot = resolve_model_path("org/minilm")  # what an encoder actor downloads
    assert len(hub.downloads(WEIGHTS)) == 1
    assert fingerprint["model"]["digest"] == model_digest(snapshot)
    packaged = embedding_fingerprint(EmbedderConfig(), dim, "cosine", False)
    assert fingerprint["function"] == packaged["function"]


def test_batch_job_with_a_hub_model(hub, tmp_path):
    """The job end to end with a hub id: the driver asks only for the weights' two ends, the encoder actor downloads
    them (once), and the collection is written."""
    hub.add("org/minilm", packaged_minilm_path())
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i} about harbours",
                                          "title": "t"}) + "\n" for i in range(5)))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs/configs/embed_cpu.yaml"),
         "embedder.model=org/minilm", f"input.paths=[{corpus}]", f"store.path={tmp_path / 'qdrant'}",
         "summary_path=null", "progress_every_s=0"],
        capture_output=True, text=True, env={**hub.env(), "HF_HUB_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["documents_embedded"] == 5
    weights = [r for r in hub.requests if r.file == WEIGHTS and r.method == "GET"]
    assert [r.range is None for r in weights] == [False, False, True], weights  # driver: two ends; actor: whole

    assert summary["points_in_collection"] >= 5
