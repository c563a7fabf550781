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
import os
import socket
import tempfile
import time
from pathlib import Path

from .serve_load import print_table, quantile_ms, run_load, write_adapters


def measure(replica_counts=(1, 2), clients: int = 16, requests: int = 128) -> list[dict]:
    import ray
    from ray import serve

    from hotswap_rt.serve import ServeConfig
    from hotswap_rt.serve.ray.app import build_ray_app

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {n: str(p) for n, p in list(write_adapters(Path(tmp)).items())[:8]}
        config = ServeConfig(adapters=adapters, max_rank=8, device_slots=4, host_slots=16,
                             max_num_seqs=16, max_prefill_seqs=2)
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
                    run_load(f"http://127.0.0.1:{port}", list(adapters), clients, requests))
                serve.delete(f"scale{replicas}")
                resident = sum(r["resident"] for r in results) / len(results)
                rows.append({
                    "replicas": replicas, "CPUs per replica": cpus,
                    "req/s": round(len(results) / seconds, 1),
                    "p50 ms": quantile_ms(results, "latency", 50),
                    "p99 ms": quantile_ms(results, "latency", 99),
                    "ttft p50 ms": quantile_ms(results, "ttft", 50),
                    "ttft p99 ms": quantile_ms(results, "ttft", 99),
                    "adapter already resident": f"{resident:.0%}"})
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    args = parser.parse_args()
    print_table(measure(clients=args.clients, requests=args.requests))


if __name__ == "__main__":
    main()
