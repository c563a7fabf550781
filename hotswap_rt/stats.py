"""Swap and load counters reported by ``rt.stats()``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

TIERS = ("device", "host", "disk")


def _percentiles(values: deque) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50": pick(0.5) * 1e3, "p99": pick(0.99) * 1e3}


@dataclass
class SwapStats:
    """Counters. A *swap* is a copy into a device slot; its latency is attributed to the tier
    the adapter came from ("host": the copy; "disk": read + validate + stage + copy). The last
    4096 latencies of each tier are kept (seconds)."""

    loads: int = 0
    swaps: int = 0
    bytes_copied: int = 0
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    latencies: dict[str, deque] = field(
        default_factory=lambda: {tier: deque(maxlen=4096) for tier in ("host", "disk")}
    )

    def record_swap(self, nbytes: int, seconds: float, tier: str = "host") -> None:
        self.swaps += 1
        self.bytes_copied += nbytes
        self.latencies[tier].append(seconds)

    def as_dict(self, evictions: int, host_evictions: int = 0) -> dict[str, Any]:
        """``hits`` per tier count activations (and leases/pins) served from that tier;
        ``evictions``: device slots reused; ``host_evictions``: host entries dropped to disk."""
        per_tier = {tier: _percentiles(values) for tier, values in self.latencies.items()}
        return {
            "loads": self.loads,
            "swaps": self.swaps,
            "hits": dict(self.hits),
            "evictions": evictions,
            "host_evictions": host_evictions,
            "bytes_copied": self.bytes_copied,
            "swap_latency_ms": per_tier,
            "swap_latency_ms_p50": per_tier["host"]["p50"],
            "swap_latency_ms_p99": per_tier["host"]["p99"],
        }
