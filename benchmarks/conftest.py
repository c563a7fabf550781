"""Benchmarks print each case's median next to its reference's, as a ratio."""

from __future__ import annotations

import pytest

MEDIANS: dict[str, float] = {}


def record(name: str, benchmark) -> None:
    """Remember a finished benchmark's median (seconds) under ``name``."""
    if benchmark.stats is not None:
        MEDIANS[name] = benchmark.stats.stats.median


@pytest.fixture(scope="session", autouse=True)
def _print_ratios():
    yield
    if "memcpy" not in MEDIANS:
        return
    floor = MEDIANS["memcpy"]
    print("\n\nswap latency, median (ratio to one copy_ of the same padded bytes)")
    for name, median in MEDIANS.items():
        print(f"  {name:<40} {median * 1e3:9.4f} ms  {median / floor:8.1f}x")
