"""``benchmarks/serve_load.py`` inside the benchmark run, so its table lands in the results file.

Printed, never asserted (beyond every request succeeding)."""

from __future__ import annotations

import os

from .conftest import figure, table_row
from .serve_load import MODES, measure

GROUP = "serve load: K adapters, 16 clients, loopback, tiny model (adapters mixed vs one at a time)"


def test_serve_load() -> None:
    results = measure(clients=16, requests=int(os.environ.get("HOTSWAP_BENCH_SERVE_REQUESTS", "96")))
    for result in results:
        row = result.row()
        table_row(GROUP, list(row), list(row.values()))
        assert result.requests > 0
    for key, mode in MODES.items():
        by_count = {r.adapters: r.throughput for r in results if r.mode == mode}
        figure(f"serve_k16_over_k1/{key}", by_count[16] / by_count[1])
