"""Bounded load on ``hotswap-rt serve`` over loopback: K adapters, N concurrent clients.

Starts the server as a subprocess (the built-in tiny model plus 16 random rank-8 adapters,
compiled), twice: with mixed batches (rows of different adapters share a batch: hotswap_rt) and
with one adapter per batch (``--no-mixed-batches``: what a server that switches adapters per
batch, PEFT-style, can do). For K = 1, 4, 16 adapters it sends a fixed number of streaming
completions from N concurrent clients (adapters round-robin, fixed prompts, greedy) and reports
throughput, p50/p99 latency and time to first token. Goal: with mixed batches, K = 16 keeps at
least 80% of the K = 1 throughput.

Run: ``.venv/bin/python -m benchmarks.serve_load [--clients 16] [--requests 192]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ADAPTER_COUNTS = (1, 4, 16)
PROMPTS = ["Say hello", "Once upon a time", "The weather today", "Tell me a story about"]
MAX_TOKENS = 32


@dataclass
class LoadResult:
    mode: str
    adapters: int
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]
    ttfts: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def row(self) -> dict[str, float | str | int]:
        q = lambda values, p: statistics.quantiles(values, n=100)[p - 1] * 1e3  # noqa: E731
        return {"mode": self.mode, "adapters": self.adapters, "req/s": round(self.throughput, 1),
                "tok/s": round(self.tokens / self.seconds), "p50 ms": round(q(self.latencies, 50), 1),
                "p99 ms": round(q(self.latencies, 99), 1), "ttft p50 ms": round(q(self.ttfts, 50), 1),
                "ttft p99 ms": round(q(self.ttfts, 99), 1)}


def write_adapters(root: Path, count: int = 16) -> dict[str, Path]:
    from hotswap_rt.demo import write_random_adapter
    from hotswap_rt.serve.default_model import build_default_model

    model = build_default_model()
    return {f"lora{i}": write_random_adapter(model, root / f"lora{i}", rank=8, seed=1000 + i)
            for i in range(count)}


class ServerProcess:
    """``hotswap-rt serve`` in a subprocess on a free loopback port."""

    def __init__(self, adapters: dict[str, Path], mixed: bool, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "hotswap_rt.cli", "serve", "--port", str(port),
                   "--max-rank", "8", "--device-slots", "8", "--host-slots", "24",
                   "--max-batch-size", "8", "--max-prompt-tokens", "32",
                   "--max-new-tokens", str(MAX_TOKENS), "--batch-wait-ms", "5"]
        command += [f"--adapter={name}={path}" for name, path in adapters.items()]
        if not mixed:
            command.append("--no-mixed-batches")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def _one(client: httpx.AsyncClient, model: str, prompt: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


async def run_load(url: str, names: list[str], clients: int, requests: int) -> tuple[float, list]:
    jobs = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait((names[i % len(names)], PROMPTS[i % len(PROMPTS)]))
    results = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not jobs.empty():
            results.append(await _one(client, *jobs.get_nowait()))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await _one(client, names[0], PROMPTS[0])  # first request outside the timing
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results


def measure(clients: int, requests: int, port: int = 0) -> list[LoadResult]:
    import socket

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(Path(tmp))
        for mode, mixed in (("mixed batches (hotswap_rt)", True), ("one adapter per batch", False)):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))
                free = probe.getsockname()[1]
            with ServerProcess(adapters, mixed, free) as url:
                for count in ADAPTER_COUNTS:
                    seconds, results = asyncio.run(run_load(url, list(adapters)[:count], clients, requests))
                    out.append(LoadResult(mode, count, len(results), seconds,
                                          sum(r[2] for r in results), [r[0] for r in results],
                                          [r[1] for r in results]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192)
    args = parser.parse_args()
    results = measure(args.clients, args.requests)
    rows = [r.row() for r in results]
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    for mode in {r.mode for r in results}:
        by_count = {r.adapters: r.throughput for r in results if r.mode == mode}
        print(f"{mode}: K=16 keeps {by_count[16] / by_count[1]:.0%} of the K=1 throughput")
    print(f"machine: {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
