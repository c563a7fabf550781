"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Request-side metrics (:class:`RequestMetrics`) are updated by the HTTP routes; engine steps
(:class:`StepMetrics`: rows and distinct adapters per forward) by the engine thread; runtime
figures (swap latency per tier, recompiles, adapters per tier, vLLM's ``lora_requests_info``) are
read from the runtime at scrape time (:class:`RuntimeCollector`); :class:`ReplicaStatsCollector`
shows what Ray Serve replicas report.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine import GenerationEngine
    from ..engine.sequence import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def tier_counts(tiers: Iterable[str]) -> dict[str, int]:
    """How many adapters are in each tier (every tier listed, zeros included)."""
    counts = {"device": 0, "host": 0, "disk": 0}
    for tier in tiers:
        counts[tier] = counts.get(tier, 0) + 1
    return counts


class RequestMetrics:
    """Request-side metrics of one HTTP front end, plus any runtime collectors registered with
    it; ``render()`` gives the text exposition format."""

    def __init__(self, collectors: list = ()) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hotswap_requests", "Requests by model (adapter or base), endpoint and HTTP status",
            ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "hotswap_request_latency_seconds", "Request latency, arrival to last byte, by model",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram(
            "hotswap_time_to_first_token_seconds", "Arrival to first generated token, by model",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter(
            "hotswap_generated_tokens", "Generated tokens by model", ["model"], registry=self.registry)
        for collector in collectors:
            self.registry.register(collector)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class StepMetrics:
    """Rows and distinct adapters per engine forward, by kind (prefill / decode); ``observe`` is
    the engine's ``on_step``."""

    def __init__(self) -> None:
        self.rows = Histogram("hotswap_step_rows", "Sequences per forward, by kind", ["kind"],
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=None)
        self.adapters = Histogram("hotswap_step_adapters", "Distinct adapters per forward, by kind",
                                  ["kind"], buckets=(0, 1, 2, 4, 8, 16), registry=None)
        self.seconds = Histogram("hotswap_step_seconds", "Forward time (inputs, model, logits), by kind",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=None)

    def observe(self, kind: str, rows: list[Sequence], seconds: float) -> None:
        self.rows.labels(kind).observe(len(rows))
        self.adapters.labels(kind).observe(len({n for row in rows for n in row.adapter_names}))
        self.seconds.labels(kind).observe(seconds)

    def collectors(self) -> list:
        return [self.rows, self.adapters, self.seconds]


# the prefix cache's counters on /metrics (as vLLM's vllm:prefix_cache_queries / _hits, in
# tokens): metric suffix, PrefixCacheStats field, what it counts
PREFIX_CACHE_COUNTS = (("queries", "queried", "Prompt tokens looked up in the prefix cache"),
                       ("hits", "hit", "Prompt tokens whose KV came from the prefix cache"))


class RuntimeCollector(Collector):
    """Runtime and engine figures, read when Prometheus scrapes."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator:
        rt = self.engine.rt
        stats = rt.stats()
        swap = GaugeMetricFamily("hotswap_swap_latency_seconds",
                                 "Host/disk -> device slot copy latency by source tier",
                                 labels=["tier", "quantile"])
        for tier, quantiles in stats["swap_latency_ms"].items():
            for quantile, ms in quantiles.items():
                if ms is not None:  # no swap from this tier yet
                    swap.add_metric([tier, {"p50": "0.5", "p99": "0.99"}.get(quantile, quantile)],
                                    ms / 1e3)
        yield swap
        swaps = CounterMetricFamily("hotswap_swaps", "Adapter copies into device slots")
        swaps.add_metric([], stats["swaps"])
        yield swaps
        compile_state = GaugeMetricFamily(
            "hotswap_compile_state", "1 for the engine's compile state (off, compiling: steps run "
            "eagerly, compiled, failed: eager for good)", labels=["state"])
        for state in ("off", "compiling", "compiled", "failed"):
            compile_state.add_metric([state], float(self.engine.compile_state == state))
        yield compile_state
        prefix = self.engine.prefix_cache
        if prefix is not None:
            for name, field, what in PREFIX_CACHE_COUNTS:
                family = CounterMetricFamily(f"hotswap_prefix_cache_{name}", what)
                family.add_metric([], getattr(prefix.stats, field))
                yield family
        recompiles = CounterMetricFamily("hotswap_recompiles", "Recompiles after warm-up (guard)")
        recompiles.add_metric([], rt.guard.recompiles)
        yield recompiles
        tiers = GaugeMetricFamily("hotswap_adapters_resident", "Adapters by tier", labels=["tier"])
        for tier, count in tier_counts(info.tier for info in rt.adapters()).items():
            tiers.add_metric([tier], count)
        yield tiers
        load = self.engine.load()
        queue = GaugeMetricFamily("hotswap_requests_waiting", "Requests waiting to join")
        queue.add_metric([], load["waiting"])
        yield queue
        running = GaugeMetricFamily("hotswap_requests_running", "Requests generating")
        running.add_metric([], load["running"])
        yield running
        info = GaugeMetricFamily(
            "hotswap_rt:lora_requests_info", "Running/waiting adapters, as vLLM's lora_requests_info",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(load["running_adapters"]), ",".join(load["waiting_adapters"]),
                         str(rt.config.device_slots)], time.time())
        yield info


class ReplicaStatsCollector(Collector):
    """Per-replica runtime figures as the replicas last reported them (Ray Serve front end);
    ``backend.replica_stats`` is refreshed before each scrape."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator:
        recompiles = GaugeMetricFamily("hotswap_replica_recompiles",
                                       "Recompiles after warm-up, per replica", labels=["replica"])
        swaps = GaugeMetricFamily("hotswap_replica_swaps", "Slot copies, per replica",
                                  labels=["replica"])
        tiers = GaugeMetricFamily("hotswap_replica_adapters_resident", "Adapters by tier, per replica",
                                  labels=["replica", "tier"])
        prefix = {field: GaugeMetricFamily(f"hotswap_replica_prefix_cache_{name}", f"{what}, per replica",
                                           labels=["replica"])
                  for name, field, what in PREFIX_CACHE_COUNTS}
        info = GaugeMetricFamily(
            "hotswap_rt:lora_requests_info", "Running/waiting adapters per replica, as vLLM's "
            "lora_requests_info", labels=["replica", "running_lora_adapters",
                                          "waiting_lora_adapters", "max_lora"])
        for replica, stats in self.backend.replica_stats.items():
            info.add_metric([replica, ",".join(stats.get("running_adapters", [])),
                             ",".join(stats.get("waiting_adapters", [])), str(stats.get("max_lora", ""))],
                            stats.get("reported_at", 0.0))
            recompiles.add_metric([replica], stats.get("recompiles", 0))
            swaps.add_metric([replica], stats.get("swaps", 0))
            cache = stats.get("prefix_cache")
            if cache is not None:
                for field, family in prefix.items():
                    family.add_metric([replica], cache[field])
            adapters = stats.get("adapters", {}).values()
            for tier, count in tier_counts(a["tier"] for a in adapters).items():
                tiers.add_metric([replica, tier], count)
        yield from (recompiles, swaps, tiers, *prefix.values(), info)
