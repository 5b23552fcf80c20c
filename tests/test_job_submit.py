"""`ray job submit` of our jobs against a real `ray start --head` cluster (token auth left on)."""

from __future__ import annotations

import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    import ray

    # `ray stop` below stops every Ray process on this machine: drop this process's own session first.
    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=3",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head_node, tmp_path, *entrypoint: str) -> subprocess.CompletedProcess:
    env, address = head_node
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "DIFFEMBED_CACHE": str(tmp_path / "cache")}}
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", *entrypoint],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    return proc


def test_ray_job_submit_tiny_training(head_node, tmp_path):
    submit(head_node, tmp_path, "jobs/train.py", "--config", "jobs/configs/train_tiny.yaml",
           f"run.storage_path={tmp_path / 'runs'}", "optim.max_steps=4", "run.checkpoint_every=2")
    export = tmp_path / "runs" / "train-tiny" / "export"
    assert (export / "model.safetensors").is_file() and (export / "diffembed.json").is_file()


def test_ray_job_submit_embed_corpus(head_node, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"note {i} about the harbour", "title": "t"}) + "\n"
                              for i in range(20)))
    proc = submit(head_node, tmp_path, "jobs/embed_corpus.py", "--config", "jobs/configs/embed_cpu.yaml",
                  f"input.paths=[{corpus}]", f"store.path={tmp_path / 'q'}", "summary_path=null")
    assert '"documents_embedded": 20' in proc.stdout
