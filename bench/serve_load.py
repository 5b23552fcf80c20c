"""Closed-loop HTTP load on the serving app (loopback) vs the same Embedder called in-process.

    .venv/bin/python bench/serve_load.py --concurrency 16 --duration 15 --replicas 1 2

For each encoder replica count, starts the app (embeddings only, no store) on a local Ray, keeps
`--concurrency` requests in flight for `--duration` seconds against POST /v1/embeddings, and reports
req/s, p50 and p99 latency. The baseline runs `Embedder.encode_documents` on the same requests, one after
another, in this process; `ratio` is served req/s over in-process req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("river mountain forest harbour castle library market garden bridge tower valley meadow island desert "
         "glacier canyon lagoon orchard vineyard monastery").split()


def make_requests(n: int, texts_per_request: int, words: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
             for _ in range(texts_per_request)] for _ in range(n)]


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    import numpy as np

    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "req_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def in_process(embedder_cfg: dict, requests: list[list[str]], duration: float, threads: int) -> dict[str, float]:
    import torch

    from diffembed import Embedder, EmbedderConfig

    torch.set_num_threads(threads)
    embedder = Embedder(EmbedderConfig.model_validate(embedder_cfg))
    embedder.encode_documents(requests[0])  # warm-up
    latencies, i, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        embedder.encode_documents(requests[i % len(requests)])
        latencies.append(time.perf_counter() - t)
        i += 1
    return summary(latencies, time.perf_counter() - start)


async def closed_loop(url: str, requests: list[list[str]], concurrency: int, duration: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            body = {"input": requests[next(counter) % len(requests)], "model": "bench"}
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/embeddings", json=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    limits = __import__("httpx").Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for _ in range(3):  # warm-up
            await client.post(f"{url}/v1/embeddings", json={"input": requests[0]})
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    out = summary(latencies, elapsed)
    out["errors"] = errors
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(embedder_cfg: dict, replicas: int, args, requests) -> dict[str, float]:
    import httpx
    from ray import serve

    from diffembed.serving.app import app_builder
    from diffembed.serving.config import ServeArgs

    serve_args = ServeArgs.model_validate({
        "embedder": embedder_cfg,
        "encoder": {"num_replicas": replicas, "num_cpus": args.cpus_per_replica,
                    "torch_threads": args.threads_per_replica, "max_batch_tokens": args.max_batch_tokens,
                    "batch_wait_timeout_s": args.batch_wait_timeout_s, "max_ongoing_requests": 64},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(serve_args), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while httpx.get(f"{url}/healthz", timeout=10).status_code != 200:
        if time.time() > deadline:
            raise RuntimeError("app not healthy")
        time.sleep(0.5)
    try:
        return asyncio.run(closed_loop(url, requests, args.concurrency, args.duration))
    finally:
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--words", type=int, default=24, help="Words per text (uniform in [words/2, words]).")
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--threads-per-replica", type=int, default=1)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()

    import ray

    embedder_cfg = {"model": args.model}
    requests = make_requests(512, args.texts_per_request, args.words)
    results: dict[str, dict] = {}
    results["in_process"] = in_process(embedder_cfg, requests, args.duration, args.threads_per_replica)
    ray.init(num_cpus=args.ray_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        for n in args.replicas:
            results[f"serve_{n}_replica"] = served(embedder_cfg, n, args, requests)
    finally:
        ray.shutdown()
    base = results["in_process"]["req_per_s"]
    print(f"\nconcurrency={args.concurrency} duration={args.duration}s texts/request={args.texts_per_request} "
          f"threads/replica={args.threads_per_replica} cores={os.cpu_count()}")
    print(f"{'setup':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'ratio':>8}")
    for name, r in results.items():
        r["ratio_vs_in_process"] = r["req_per_s"] / base
        print(f"{name:<18}{r['req_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}"
              f"{r['ratio_vs_in_process']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
