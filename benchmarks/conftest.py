"""Benchmarks print each case's median next to its group's reference, as a ratio.

A module records its cases with :func:`record`; the first case recorded with ``reference=True``
in a group is the denominator of that group's ratios. Extra figures that are not timings (recompile
counts) go through :func:`note` and are printed as they are.
"""

from __future__ import annotations

import pytest

MEDIANS: dict[str, dict[str, float]] = {}  # group -> case -> median seconds
REFERENCES: dict[str, str] = {}  # group -> reference case
NOTES: dict[str, list[str]] = {}  # group -> free-form result lines


def record(group: str, name: str, benchmark, reference: bool = False) -> None:
    """Remember a finished benchmark's median (seconds) under ``group`` / ``name``."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    MEDIANS.setdefault(group, {})[name] = benchmark.stats.stats.median
    if reference:
        REFERENCES.setdefault(group, name)


def note(group: str, line: str) -> None:
    NOTES.setdefault(group, []).append(line)


@pytest.fixture(scope="session", autouse=True)
def _print_ratios():
    yield
    for group in sorted(set(MEDIANS) | set(NOTES)):
        print(f"\n\n{group}")
        cases = MEDIANS.get(group, {})
        floor = cases.get(REFERENCES.get(group, ""), None)
        for name, median in cases.items():
            ratio = f"{median / floor:8.2f}x" if floor else ""
            print(f"  {name:<48} {median * 1e3:10.4f} ms  {ratio}")
        for line in NOTES.get(group, []):
            print(f"  {line}")
