"""Benchmarks print each case's median next to its group's reference, as a ratio.

A module records its cases with :func:`record`; the first case recorded with ``reference=True``
in a group is the denominator of that group's ratios. Extra figures that are not timings (recompile
counts) go through :func:`note` and are printed as they are.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

MEDIANS: dict[str, dict[str, float]] = {}  # group -> case -> median seconds
REFERENCES: dict[str, str] = {}  # group -> reference case
NOTES: dict[str, list[str]] = {}  # group -> free-form result lines
TABLES: dict[str, dict[str, list]] = {}  # group -> {"columns": [...], "rows": [[...], ...]}
FIGURES: dict[str, float] = {}  # key -> a number that is not a median (counts, microseconds)


def record(group: str, name: str, benchmark, reference: bool = False) -> None:
    """Remember a finished benchmark's median (seconds) under ``group`` / ``name``."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    MEDIANS.setdefault(group, {})[name] = benchmark.stats.stats.median
    if reference:
        REFERENCES.setdefault(group, name)


def note(group: str, line: str) -> None:
    NOTES.setdefault(group, []).append(line)


def figure(key: str, value: float) -> None:
    """Keep a number the README summary quotes (``scripts/bench_summary.py`` reads it back)."""
    FIGURES[key] = value


def table_row(group: str, columns: list[str], row: list[object]) -> None:
    """Add ``row`` to the matrix table ``group`` (for results with more than one axis, such as
    rank x targets); every row of a group has the same ``columns``."""
    table = TABLES.setdefault(group, {"columns": list(columns), "rows": []})
    if table["columns"] != list(columns):
        raise ValueError(f"table {group!r} has columns {table['columns']}, not {columns}")
    table["rows"].append(list(row))


def _table_lines(table: dict[str, list]) -> list[str]:
    return ["| " + " | ".join(table["columns"]) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table["columns"]))) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in table["rows"])]


def interleaved(cases: dict[str, Callable[[], object]], rounds: int,
                before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds of each case, timed call by call in rounds (each case once a round), so
    drift in CPU frequency and caches hits every case alike. The order within a round is
    shuffled (seeded): a fixed order puts each case always after the same one, whose caches and
    memory traffic it inherits (ad hoc, copies of 2.2 MB in a fixed order: the first case of
    every round 10-20% slower than the same copy later in it). ``before``: run (not timed)
    before every timed call."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order, shuffle = list(cases.items()), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, fn in order:
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def note_ratios(group: str, medians: dict[str, float], reference: str, label: str) -> None:
    """Record interleaved ``medians`` under ``group`` (prefixed with ``label``); the group's
    ratios are to its first reference (here ``reference`` unless one was recorded before)."""
    cases = MEDIANS.setdefault(group, {})
    for name, median in medians.items():
        cases[f"{label} {name}".strip()] = median
    REFERENCES.setdefault(group, f"{label} {reference}".strip())


@dataclass
class CompileCount:
    """Dynamo compiles seen by :func:`counting_compiles` and the seconds they took."""

    compiles: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def counting_compiles() -> Iterator[CompileCount]:
    """Count dynamo compiles (trigger DYNAMO) started inside the block and sum their durations."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    count, started = CompileCount(), []

    def on_start(args) -> None:
        if args.callback_trigger == CallbackTrigger.DYNAMO:
            count.compiles += 1
            started.append(time.perf_counter())

    def on_end(args) -> None:
        if args.callback_trigger == CallbackTrigger.DYNAMO and started:
            count.seconds += time.perf_counter() - started.pop()

    callback_handler.register_start_callback(on_start)
    callback_handler.register_end_callback(on_end)
    try:
        yield count
    finally:
        callback_handler.remove_start_callback(on_start)
        callback_handler.remove_end_callback(on_end)


def write_results(prefix: str) -> None:
    """``<prefix>.json`` (machine, medians, notes) and ``<prefix>.md`` (one table per group)."""
    import json
    import os
    import platform
    from pathlib import Path

    import torch

    path = Path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    payload = {"machine": machine, "medians_s": MEDIANS, "references": REFERENCES, "notes": NOTES,
               "tables": TABLES, "figures": FIGURES}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}"
             f"{', ' + machine['cuda'] if machine['cuda'] else ''}", ""]
    for group in sorted(set(MEDIANS) | set(NOTES) | set(TABLES)):
        lines += [f"### {group}", ""]
        if group in TABLES:
            lines += _table_lines(TABLES[group]) + [""]
        cases = MEDIANS.get(group, {})
        if cases:
            floor = cases.get(REFERENCES.get(group, ""))
            lines += ["| case | median ms | ratio |", "|---|---:|---:|"]
            lines += [f"| {name} | {m * 1e3:.4f} | {f'{m / floor:.2f}x' if floor else ''} |"
                      for name, m in cases.items()]
        lines += [f"    {line.strip()}" for line in NOTES.get(group, [])] + [""]
    path.with_suffix(".md").write_text("\n".join(lines))


@pytest.fixture(scope="session", autouse=True)
def _print_ratios():
    yield
    import os

    if os.environ.get("HOTSWAP_BENCH_RESULTS"):
        write_results(os.environ["HOTSWAP_BENCH_RESULTS"])
    for group in sorted(set(MEDIANS) | set(NOTES) | set(TABLES)):
        print(f"\n\n{group}")
        if group in TABLES:
            print("\n".join("  " + line for line in _table_lines(TABLES[group])))
        cases = MEDIANS.get(group, {})
        floor = cases.get(REFERENCES.get(group, ""), None)
        for name, median in cases.items():
            ratio = f"{median / floor:8.2f}x" if floor else ""
            print(f"  {name:<48} {median * 1e3:10.4f} ms  {ratio}")
        for line in NOTES.get(group, []):
            print(f"  {line}")
