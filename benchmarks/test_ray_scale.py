"""``benchmarks/ray_scale.py`` inside the benchmark run, so its table lands in the results file.
Printed, never asserted (beyond every request succeeding)."""

from __future__ import annotations

import os

import pytest

from .conftest import figure, table_row

GROUP = "ray serve: 1 vs 2 worker replicas, 8 adapters, 16 clients, loopback, tiny model"


def test_ray_scale() -> None:
    pytest.importorskip("ray")
    from .ray_scale import measure

    rows = measure(requests=int(os.environ.get("HOTSWAP_BENCH_RAY_REQUESTS", "128")))
    for row in rows:
        table_row(GROUP, list(row), list(row.values()))
    by_replicas = {row["replicas"]: row for row in rows}
    figure("ray_req_s/1", by_replicas[1]["req/s"])
    figure("ray_req_s/2", by_replicas[2]["req/s"])
    figure("ray_resident_share/2", float(by_replicas[2]["adapter already resident"].rstrip("%")) / 100)
