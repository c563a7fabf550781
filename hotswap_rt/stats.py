"""Swap and load counters reported by ``rt.stats()``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SwapStats:
    """Counters; ``latencies`` keeps the last 4096 slot-copy durations (seconds)."""

    loads: int = 0
    swaps: int = 0
    bytes_copied: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    latencies: deque = field(default_factory=lambda: deque(maxlen=4096))

    def record_swap(self, nbytes: int, seconds: float) -> None:
        self.swaps += 1
        self.bytes_copied += nbytes
        self.latencies.append(seconds)

    def as_dict(self, evictions: int) -> dict[str, Any]:
        if self.latencies:
            q = torch.quantile(torch.tensor(list(self.latencies), dtype=torch.float64),
                               torch.tensor([0.5, 0.99], dtype=torch.float64))
            p50, p99 = (float(v) * 1e3 for v in q)
        else:
            p50 = p99 = None
        return {
            "loads": self.loads,
            "swaps": self.swaps,
            "hits": dict(self.hits),
            "evictions": evictions,
            "bytes_copied": self.bytes_copied,
            "swap_latency_ms_p50": p50,
            "swap_latency_ms_p99": p99,
        }
