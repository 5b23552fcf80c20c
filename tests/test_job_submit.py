"""`ray job submit` of our jobs and `serve deploy` of our Serve config against a real `ray start --head` cluster.

Token auth is on (its own token file); the head runs in its own process group and is stopped alone, so other
Ray sessions on the machine (this test run's own, parallel runs) are never touched.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ray_head import BIN, free_port, ray_head

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    # `inference_node` stands in for cluster.yaml's inference pool (the evaluation job asks for it).
    with ray_head(tmp_path_factory.mktemp("head"), num_cpus=3, extra_args=['--resources={"inference_node": 1}']) as head:
        yield head.env, head.dashboard


def submit(head_node, tmp_path, *entrypoint: str, env_vars: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python <entrypoint...>`; asserts the job succeeded."""
    env, address = head_node
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "DIFFEMBED_CACHE": str(tmp_path / "cache"), **(env_vars or {})}}
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps(runtime_env), "--", "python", *entrypoint],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        # A head that has just started may not have registered its job agent yet: Ray answers 500 and says
        # to try again (nothing was submitted), as a user's retry would.
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    return proc


def test_ray_job_submit_tiny_training(head_node, tmp_path):
    proc = submit(head_node, tmp_path, "jobs/train.py", "--config", "jobs/configs/train_tiny.yaml",
                  f"run.storage_path={tmp_path / 'runs'}", "optim.max_steps=5", "run.checkpoint_every=2",
                  "run.log_every=2")
    export = tmp_path / "runs" / "train-tiny" / "export"
    assert (export / "model.safetensors").is_file() and (export / "diffembed.json").is_file()
    # The job's console (what `ray job logs` shows) gets rank 0's progress line every run.log_every steps and at
    # the last one: step of max_steps, loss, rates, elapsed and time left.
    progress = re.findall(r"step (\d+)/5  loss \d+\.\d{4}  lr \S+  [\d.]+ samples/s  \d+ tokens/s  "
                          r"elapsed \d+m\d\ds  left ~\d+m\d\ds", proc.stdout)
    assert progress == ["2", "4", "5"], proc.stdout[-3000:]


def test_ray_job_submit_evaluation(head_node, tmp_path):
    out = tmp_path / "eval"
    proc = submit(head_node, tmp_path, "jobs/evaluate.py", "--config", "jobs/configs/eval_cpu.yaml",
                  f"output_dir={out}", "tasks=[{name: beir_sample, kind: beir, path: jobs/configs/data/beir_sample}]",
                  "compute.resources={inference_node: 1}", "retrieval.backend=qdrant")
    results = json.loads((out / "results.json").read_text())
    assert results["compute"] == {"ray_task": True, "CPU": 1.0, "inference_node": 1.0}  # ran in the pool's task
    assert results["tasks"]["beir_sample"]["ndcg@10"] > 0.8
    # through the batch job inside the task: the local folder's texts came with the task and were written for it
    assert results["indexing"]["beir_sample"]["documents_embedded"] == 36  # of 37: d37 has no text
    assert "| beir_sample |" in proc.stdout


@pytest.fixture(scope="module")
def embedded(head_node, tmp_path_factory):
    """The embed job, submitted once: (its output, the local Qdrant path it filled, the documents)."""
    tmp = tmp_path_factory.mktemp("embed")
    docs = [{"id": f"d{i}", "text": f"note {i} about the harbour", "title": "t"} for i in range(20)]
    docs.append({"id": "lighthouse", "text": "The lighthouse keeper trims the lamp wick every evening.", "title": "t"})
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    store = tmp / "q"
    proc = submit(head_node, tmp, "jobs/embed_corpus.py", "--config", "jobs/configs/embed_cpu.yaml",
                  f"input.paths=[{corpus}]", f"store.path={store}", "summary_path=null")
    return proc, store, docs


def test_ray_job_submit_embed_corpus(embedded):
    proc, store, docs = embedded
    assert f'"documents_embedded": {len(docs)}' in proc.stdout
    assert store.is_dir()


def serve_cli(head_node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env, address = head_node
    return subprocess.run([str(BIN / "serve"), *args, "--address", address], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_serve_deploy_config_on_the_cluster(head_node, embedded, minilm, tmp_path):
    """`serve deploy` of serve/config.yaml (store and port pointed into this test) answers over HTTP."""
    import httpx
    import numpy as np

    _, store, docs = embedded
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"]["store"]["path"] = str(store)
    app["args"]["store"]["collection"] = "docs"  # what embed_cpu.yaml writes
    deploy_file = tmp_path / "serve_config.yaml"
    deploy_file.write_text(yaml.safe_dump(config))

    deployed = serve_cli(head_node, "deploy", str(deploy_file))
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    try:
        base = f"http://127.0.0.1:{port}"
        # /readyz (the replicas are up, the encoder answers, Qdrant is open) is cheap to poll; `serve status` is a
        # Python process (~2 s of CPU, which the replicas' compile warm-up needs on 2 cores): asked every 20 s for
        # a failed deployment, and every 5 s once /readyz answers, until the application is RUNNING
        deadline, checked, status, health = time.monotonic() + 300, time.monotonic() - 5, None, None
        while True:
            try:
                health = httpx.get(f"{base}/readyz", timeout=10)
            except httpx.TransportError:  # the HTTP proxy is not listening yet
                health = None
            ready = health is not None and health.status_code == 200
            if time.monotonic() - checked > (5 if ready else 20):
                checked = time.monotonic()
                out = serve_cli(head_node, "status")
                status = yaml.safe_load(out.stdout) if out.returncode == 0 and out.stdout.strip() else None
                app_status = ((status or {}).get("applications") or {}).get(app["name"], {}).get("status")
                assert app_status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
                if ready and app_status == "RUNNING":
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"application not RUNNING and ready after 300 s: {status}; /readyz: "
                            f"{health.text if health is not None else 'no answer'}")
            time.sleep(1)
        assert health.json()["store"]["points"] == len(docs)

        texts = ["hello harbour", "a lighthouse"]
        resp = httpx.post(f"{base}/v1/embeddings", json={"input": texts, "model": "x"}, timeout=30)
        assert resp.status_code == 200, resp.text
        vectors = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
        # the shipped config serves `dtype: auto` (bf16 on a CPU with native bf16): the same vectors up to bf16
        # under the shipped document policy (late chunks: a short text is one chunk, its content tokens' mean)
        from diffembed import Embedder, EmbedderConfig

        served = EmbedderConfig(documents=app["args"]["embedder"]["documents"])
        want = Embedder(served, backbone=minilm.backbone).encode_documents(texts)
        assert np.all(np.sum(vectors * want, axis=1) > 0.999)

        hits = httpx.post(f"{base}/search", json={"query": "who trims the lamp wick?", "top_k": 3},
                          timeout=30).json()
        assert hits["data"][0]["doc_id"] == "lighthouse", hits
    finally:
        serve_cli(head_node, "shutdown", "-y")
