"""Bounded load on ``hotswap-rt serve`` over loopback: K adapters, N concurrent clients.

Starts the server as a subprocess (the built-in tiny model plus 16 random rank-8 adapters,
compiled), twice: with adapters mixed in every engine step (rows of different adapters share
each forward: hotswap_rt) and with one adapter at a time (``--no-mixed-batches``: what a
server that switches adapters between batches, PEFT-style, can do). For K = 1, 4, 16 adapters
it sends a fixed number of streaming completions from N concurrent clients (adapters
round-robin, fixed prompts, greedy) and reports throughput, p50/p99 latency and time to first
token. Goal: with adapters mixed, K = 16 keeps at
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
MODES = {"mixed": "adapters mixed (hotswap_rt)", "baseline": "one adapter at a time"}


@dataclass
class LoadResult:
    mode: str
    adapters: int
    seconds: float
    results: list[dict]

    @property
    def requests(self) -> int:
        return len(self.results)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def row(self) -> dict[str, float | str | int]:
        tokens = sum(r["tokens"] for r in self.results)
        return {"mode": self.mode, "adapters": self.adapters, "req/s": round(self.throughput, 1),
                "tok/s": round(tokens / self.seconds), "p50 ms": quantile_ms(self.results, "latency", 50),
                "p99 ms": quantile_ms(self.results, "latency", 99),
                "ttft p50 ms": quantile_ms(self.results, "ttft", 50),
                "ttft p99 ms": quantile_ms(self.results, "ttft", 99)}


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
                   "--max-num-seqs", "16", "--max-prefill-seqs", "4"]
        command += [f"--adapter={name}={path}" for name, path in adapters.items()]
        if not mixed:
            command.append("--no-mixed-batches")
        self.log = tempfile.TemporaryFile()  # a pipe could fill up and block the server
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


async def one_request(client: httpx.AsyncClient, model: str, prompt: str) -> dict:
    """One streaming completion: ``latency``, ``ttft`` (seconds), ``tokens`` and ``resident``
    (``x-hotswap-adapter-resident``, set by the Ray Serve front end)."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()}")
        resident = response.headers.get("x-hotswap-adapter-resident") == "true"
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "resident": resident}


async def run_load(url: str, names: list[str], clients: int, requests: int) -> tuple[float, list[dict]]:
    """``requests`` completions from ``clients`` concurrent clients, adapters round-robin, after
    one untimed request per adapter. Returns (seconds, per-request dicts of ``one_request``)."""
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)][::-1]
    results: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while jobs:
            results.append(await one_request(client, *jobs.pop()))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        for name in names:  # outside the timing
            await one_request(client, name, PROMPTS[0])
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results


def quantile_ms(results: list[dict], key: str, percent: int) -> float:
    return round(statistics.quantiles([r[key] for r in results], n=100)[percent - 1] * 1e3, 1)


def print_table(rows: list[dict]) -> None:
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    print(f"machine: {os.cpu_count()} CPUs")


def measure(clients: int, requests: int, port: int = 0) -> list[LoadResult]:
    import socket

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(Path(tmp))
        for mode, mixed in ((MODES["mixed"], True), (MODES["baseline"], False)):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))
                free = probe.getsockname()[1]
            with ServerProcess(adapters, mixed, free) as url:
                for count in ADAPTER_COUNTS:
                    seconds, results = asyncio.run(run_load(url, list(adapters)[:count], clients, requests))
                    out.append(LoadResult(mode, count, seconds, results))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192)
    args = parser.parse_args()
    results = measure(args.clients, args.requests)
    print_table([r.row() for r in results])
    for mode in {r.mode for r in results}:
        by_count = {r.adapters: r.throughput for r in results if r.mode == mode}
        print(f"{mode}: K=16 keeps {by_count[16] / by_count[1]:.0%} of the K=1 throughput")


if __name__ == "__main__":
    main()
