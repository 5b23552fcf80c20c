"""Closed-loop HTTP load on the serving app, side by side with Infinity on the same model and texts (loopback).

    .venv/bin/python bench/serve_load.py                      # ours only (+ the in-process baseline)
    INFINITY_BIN=/path/to/venv/bin/infinity_emb .venv/bin/python bench/serve_load.py --clients 4 16

Shape (as in the issue that set the target): C clients, each keeping one request in flight, for `--duration`
seconds; every request carries B texts of `--words` words (`--texts-per-request`). Reported per server and
client count: texts/s, p50 and p99 request latency, errors; `ratio` is ours over Infinity's texts/s at the same
client count. The servers run one after another on the same machine, never at once.

Ours is the Serve app built from `serve/config.yaml` (its embedder and encoder sections; no store, so only the
embedding routes), overridable with `--set encoder.num_replicas=1` style flags. Infinity (found through
`INFINITY_BIN` or `--infinity`, installed in its own venv) serves the same checkpoint directory with its torch
engine and its default settings unless `--infinity-args` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river mountain forest harbour castle library market garden bridge tower valley meadow island desert "
         "glacier canyon lagoon orchard vineyard monastery lantern quarry beacon archive").split()


def make_requests(n: int, texts_per_request: int, words: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(texts_per_request)] for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(latencies: list[float], texts: int, errors: int, elapsed: float) -> dict[str, float]:
    import numpy as np

    lat = np.array(latencies or [float("nan")]) * 1000
    return {"requests": len(latencies), "texts_per_s": texts / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


async def closed_loop(url: str, requests: list[list[str]], clients: int, duration: float,
                      model: str, warmup: float = 0.0) -> dict[str, float]:
    """`clients` concurrent workers for `duration` seconds, after `warmup` seconds of the same load (not
    counted: a server that compiles per batch shape has seen the shapes this load makes)."""
    import httpx

    latencies: list[float] = []
    texts = errors = 0
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for body in requests[:3]:  # a server that answers errors fails the bench here, not as a silent 0
            (await client.post(url, json={"input": body, "model": model})).raise_for_status()
        deadline = time.perf_counter() + warmup

        async def worker() -> None:
            nonlocal texts, errors
            while time.perf_counter() < deadline:
                body = requests[next(counter) % len(requests)]
                started = time.perf_counter()
                try:
                    r = await client.post(url, json={"input": body, "model": model})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                    texts += len(body)
                else:
                    errors += 1

        if warmup > 0:
            await asyncio.gather(*(worker() for _ in range(clients)))
            latencies.clear()
            texts = errors = 0
        before = cpu_seconds()
        deadline = time.perf_counter() + duration
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        after = cpu_seconds()
    result = summary(latencies, texts, errors, elapsed)
    # CPU time each process spent on the measured load, per request, in ms
    result["cpu_ms_per_request"] = {k: (after[k] - before[k]) * 1000 / max(result["requests"], 1)
                                    for k in after if after[k] > before[k]}
    return result


PROCESSES = {"proxy": "ray::ProxyActor", "ingress": "ServeReplica:bench:Ingress",
             "encoder": "ServeReplica:bench:Encoder", "infinity": "infinity_emb"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by each serving process, and by this client."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {name: 0.0 for name in PROCESSES}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name, marker in PROCESSES.items():
            if marker in cmd:
                out[name] += (int(fields[11]) + int(fields[12])) / tick
    usage = os.times()
    out["client"] = usage.user + usage.system
    return out


def wait_ready(url: str, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    try:
        tree[leaf] = json.loads(raw)  # numbers, true/false, null, lists, objects
    except ValueError:
        tree[leaf] = raw  # a plain string (fp32, a path, ...)


def ours_args(config: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    args.pop("store", None)
    for item in overrides:
        key, _, value = item.partition("=")
        set_path(args, key, value)
    return args


def run_ours(args: dict[str, Any], requests, clients: list[int], duration: float, warmup: float) -> dict[int, dict]:
    import ray
    from ray import serve

    from diffembed.serving.app import build_app

    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz")
        wait_ready(f"{url}/v1/models")
        return {c: asyncio.run(closed_loop(f"{url}/v1/embeddings", requests, c, duration, "bench",
                                           warmup))
                for c in clients}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_infinity(binary: str, extra: str, requests, clients: list[int], duration: float,
                 warmup: float) -> dict[int, dict]:
    from diffembed.models.loading import packaged_minilm_path

    port = free_port()
    cmd = [binary, "v2", "--model-id", str(packaged_minilm_path()), "--served-model-name", "bench",
           "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--no-vector-disk-cache", *shlex.split(extra)]
    log = tempfile.NamedTemporaryFile("w+", prefix="infinity-", suffix=".log", delete=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc=proc)
        return {c: asyncio.run(closed_loop(f"http://127.0.0.1:{port}/embeddings", requests, c, duration,
                                           "bench", warmup))
                for c in clients}
    except Exception:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def in_process(args: dict[str, Any], requests, duration: float) -> dict[str, float]:
    """The same Embedder called directly, one request after another: what the model costs without serving."""
    import torch

    from diffembed import Embedder, EmbedderConfig

    threads = args.get("encoder", {}).get("torch_threads")
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    embedder = Embedder(EmbedderConfig.model_validate(args.get("embedder", {})))
    embedder.encode_documents(requests[0])
    latencies, texts, i, start = [], 0, 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        embedder.encode_documents(requests[i % len(requests)])
        latencies.append(time.perf_counter() - t)
        texts += len(requests[i % len(requests)])
        i += 1
    return summary(latencies, texts, 0, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=10,
                        help="Seconds of the same load before each measured one (both servers compile per shape).")
    parser.add_argument("--config", type=Path, default=ROOT / "serve" / "config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override one of ours' app args, e.g. embedder.dtype=fp32 or encoder.num_replicas=2.")
    parser.add_argument("--infinity", default=os.environ.get("INFINITY_BIN"),
                        help="Infinity's `infinity_emb` executable (own venv). Default: $INFINITY_BIN.")
    parser.add_argument("--infinity-args", default="", help="Extra Infinity flags, e.g. '--dtype bfloat16'.")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ours", "infinity", "in_process"])
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()

    requests = make_requests(256, args.texts_per_request, args.words)
    app_args = ours_args(args.config, args.set)
    results: dict[str, Any] = {"app_args": app_args}
    if "in_process" not in args.skip:
        results["in_process"] = in_process(app_args, requests, min(args.duration, 15))
    if args.infinity and "infinity" not in args.skip:
        results["infinity"] = run_infinity(args.infinity, args.infinity_args, requests, args.clients, args.duration,
                                          args.warmup)
    if "ours" not in args.skip:
        results["ours"] = run_ours(app_args, requests, args.clients, args.duration, args.warmup)

    print(f"\n{args.texts_per_request} texts x {args.words} words per request, {args.duration:.0f} s closed loop "
          f"after {args.warmup:.0f} s warm-up, {os.cpu_count()} cores; ours: {args.config.name} {' '.join(args.set)}")
    if "in_process" in results:
        r = results["in_process"]
        print(f"in-process Embedder, one request at a time: {r['texts_per_s']:.1f} texts/s, p50 {r['p50_ms']:.0f} ms")
    print(f"{'server':<10}{'clients':>8}{'texts/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'ratio':>8}")
    for c in args.clients:
        for name in ("infinity", "ours"):
            if name not in results:
                continue
            r = results[name][c]
            ratio = ""
            if name == "ours" and "infinity" in results:
                ratio = f"{r['texts_per_s'] / results['infinity'][c]['texts_per_s']:.2f}"
            print(f"{name:<10}{c:>8}{r['texts_per_s']:>10.1f}{r['p50_ms']:>10.0f}{r['p99_ms']:>10.0f}"
                  f"{r['errors']:>8}{ratio:>8}")
    print("CPU ms per request by process (where the time goes):")
    for c in args.clients:
        for name in ("infinity", "ours"):
            if name in results:
                cells = ", ".join(f"{k} {v:.0f}" for k, v in results[name][c]["cpu_ms_per_request"].items())
                print(f"  {name:<9}{c:>3} clients: {cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
