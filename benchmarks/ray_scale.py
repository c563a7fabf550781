"""Bounded loopback load on the Ray Serve deployment: 1 vs 2 worker replicas, 8 adapters.

Real Ray on this machine (``ray.init``), the built-in tiny model with 8 random rank-8 adapters,
4 device slots per replica (8 adapters do not fit one replica; they fit two). 16 concurrent
streaming clients send a fixed number of completions (adapters round-robin, fixed prompts,
greedy). Reports throughput, p50/p99 latency, time to first token, and the share of requests
served by a replica that already held their adapter in a device slot
(``x-hotswap-adapter-resident``).

Run: ``.venv/bin/python -m benchmarks.ray_scale [--requests 128] [--clients 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from .serve_load import PROMPTS, write_adapters

MAX_TOKENS = 32


async def _one(client: httpx.AsyncClient, model: str, prompt: str) -> dict:
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()}")
        resident = response.headers.get("x-hotswap-adapter-resident") == "true"
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "resident": resident}


async def _load(url: str, names: list[str], clients: int, requests: int) -> tuple[float, list[dict]]:
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    results: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while jobs:
            results.append(await _one(client, *jobs.pop()))

    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        for name in names:  # each adapter once, outside the timing
            await _one(client, name, PROMPTS[0])
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results


def measure(replica_counts=(1, 2), clients: int = 16, requests: int = 128) -> list[dict]:
    import ray
    from ray import serve

    from hotswap_rt.serve import ServeConfig
    from hotswap_rt.serve.ray_app import build_ray_app

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {n: str(p) for n, p in list(write_adapters(Path(tmp)).items())[:8]}
        config = ServeConfig(adapters=adapters, max_rank=8, device_slots=4, host_slots=16,
                             max_batch_size=8, max_prompt_tokens=32, max_new_tokens=MAX_TOKENS)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in replica_counts:
                cpus = (os.cpu_count() or 2) / max(replica_counts)
                serve.run(build_ray_app(config, replicas=replicas, worker_cpus=cpus),
                          name=f"scale{replicas}", route_prefix="/")
                time.sleep(3)  # replicas report their adapters to the router
                seconds, results = asyncio.run(
                    _load(f"http://127.0.0.1:{port}", list(adapters), clients, requests))
                serve.delete(f"scale{replicas}")
                q = lambda key, p: statistics.quantiles([r[key] for r in results], n=100)[p - 1] * 1e3  # noqa: E731
                rows.append({
                    "replicas": replicas, "CPUs per replica": cpus, "req/s": round(len(results) / seconds, 1),
                    "p50 ms": round(q("latency", 50), 1), "p99 ms": round(q("latency", 99), 1),
                    "ttft p50 ms": round(q("ttft", 50), 1), "ttft p99 ms": round(q("ttft", 99), 1),
                    "adapter already resident": f"{sum(r['resident'] for r in results) / len(results):.0%}"})
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    args = parser.parse_args()
    rows = measure(clients=args.clients, requests=args.requests)
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    print(f"machine: {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
