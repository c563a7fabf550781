"""The GPU benchmarks of ``scripts/gpu_check.sh``: each stage runs in one process, its figures are
ratios to a reference measured in the same run, and everything lands in one JSON file.

Stages (``--stages`` picks some):

- ``swap``: ring -> slot swap (``rt.activate`` of an adapter held in host memory, one device
  slot) against a ``copy_`` of the same bytes from pinned memory, and a resident switch; the
  swap's parts (``part_*``: the slot write with and without the host's wait on its event, a
  selection write, an event wait alone); and
  PEFT's ``hotswap_adapter_from_state_dict`` of the same adapters (state dicts in host memory,
  and on the device): ``swap_speedup_vs_peft_*``; and rank 4 / 16 / 64 adapters swapped into
  ``max_rank=64`` slots (``rank<r>_swap_us``, ``rank<r>_copy_us``, ``rank4_over_rank64``).
- ``overlap``: a compiled decode loop (batch 16, one token per row; default mode, and CUDA
  graphs on CUDA: ``graphs_*``) timed step by step, alone and while another thread keeps
  loading adapters: replacing a device-resident one the loop does not serve
  (``rt.load(..., replace=True)``: staging, a side-stream copy into a shadow slot; no
  selection to move), loading a new one into a free slot then unloading it, and activating
  adapters held in the host ring in turn (``activate_*``: each a copy into a slot, beside the
  running step when a slot the selection does not read can take it, then the selection
  moved to it; the loop then serves those adapters): the added p50 / p99 step latency of each.
- ``decode_k``: decode step (batch 16) of the compiled model with k = 1, 4, 8, 16 distinct
  adapters, one per row, over the uninjected compiled model (timed before and after the
  products; ratios over the faster): the default (``auto``: per row once compiled, and
  ``per_row_decode="auto"``: in place on CUDA, gathered elsewhere), the stacked product only
  (``max_adapters_per_row=16``: all 16 slots read in place), per row forced with the gathered
  step (``per_row``: ``max_adapters_per_row=1``, ``per_row_decode="bmm"``) and with one-token
  steps reading the slots in place (``per_row_reduce``: ``per_row_decode="reduce"``). The
  default-mode step is profiled too (uninjected, and each product at k = 8): kernels per
  step, their time (GPU time on CUDA), the five slowest.
- ``engine``: :class:`~hotswap_rt.engine.GenerationEngine` throughput, 32 requests over 8
  adapters against the same requests on the base model.
- ``kernels``: the per-row product's one-token forms alone (batch 16, rank 16, one slot a row,
  8 layers of each of the model's layer shapes; on CUDA the device time of a CUDA-graph
  replay): as ``per_row_decode="reduce"`` computes it (and its two sums alone), with the rank
  sum unrolled into one pointwise kernel, gathered with batched matmuls, as a segment matmul
  over the rows grouped by slot (``torch._grouped_mm``, bfloat16 only), every slot's ranks by
  one matmul with the other slots' masked (``dense``), and as two hand-written Triton kernels
  (``triton``, :mod:`benchmarks.lora_triton`, CUDA only), against the base linears of the
  same shape.

``--quick`` shrinks every shape so that the whole script runs on a CPU in seconds (tests keep the
code correct on machines without a GPU); ``--no-compile`` skips ``torch.compile``.

Usage: ``python -m benchmarks.gpu_check --out benchmarks/results/<date>-gpu.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

# Newest measurements first: a run cut short by its time limit still has them (the file is
# written after every stage).
STAGES = ("swap", "kernels", "decode_k", "engine", "overlap")


@dataclass(frozen=True)
class Setup:
    """Where and at what size the stages run."""

    device: torch.device
    dtype: torch.dtype
    hidden: int  # Llama-7B: 4096
    intermediate: int  # Llama-7B: 11008
    layers: int
    compile: bool
    rounds: int

    @classmethod
    def make(cls, device: str, quick: bool, compile: bool) -> "Setup":
        dev = torch.device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if quick:
            return cls(dev, dtype, 64, 128, 2, compile, rounds=5)
        return cls(dev, dtype, 4096, 11008, 2, compile, rounds=50)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama(setup: Setup, hidden: int | None = None, intermediate: int | None = None,
          layers: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with the setup's shapes (a small vocabulary: the head is not measured)."""
    hidden = hidden or setup.hidden
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden,
                         intermediate_size=intermediate or setup.intermediate,
                         num_hidden_layers=layers or setup.layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(setup.device, setup.dtype).eval()


def random_state(rt: HotswapRuntime, rank: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A random LoRA adapter (state dict, config) for every injected layer of ``rt``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layout in rt.internals.arena.layouts.items():
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, layout.d_in, generator=generator) * 0.02
        state[f"{prefix}.lora_B.weight"] = torch.randn(layout.d_out, rank, generator=generator) * 0.02
    return state, {"r": rank, "lora_alpha": rank, "target_modules": "all-linear"}


def median_us(fn: Callable[[], object], rounds: int, device: torch.device) -> float:
    """Median microseconds of ``fn`` (synchronized), after two warm-up calls."""
    for _ in range(2):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def device_us(fn: Callable[[], object], rounds: int, device: torch.device, replays: int = 20) -> float:
    """Device time of one call of ``fn``: on CUDA, ``fn`` captured once in a CUDA graph (after
    warm-up on a side stream) and replayed ``replays`` times between two events, the median of
    ``rounds`` such timings (no host work, no synchronize in the figure: what the kernels cost
    inside a step that runs as a graph); elsewhere :func:`median_us`."""
    if device.type != "cuda":
        return median_us(fn, rounds, device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(1, rounds // 5)):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------- stages
def stage_swap(setup: Setup) -> dict[str, Any]:
    """Ring -> slot swap and resident switch against a ``copy_`` of the same bytes; PEFT's swap
    of the same adapters (measured once the runtime's model is freed)."""
    rank = 16
    figures, states = _runtime_swap(setup, rank)
    peft = _peft_swap_us(setup, rank, states)
    speedups = {f"swap_speedup_vs_{key[:-3]}": value / figures["swap_us"] for key, value in peft.items()}
    return {**figures, **peft, **speedups, **_rank_swaps(setup)}


SWAP_RANKS = (4, 16, 64)


def _rank_swaps(setup: Setup) -> dict[str, float]:
    """Swaps of rank 4, 16 and 64 adapters into ``max_rank=64`` slots (one evictable slot, two
    adapters of each rank taking turns): ``rank<r>_swap_us``, a ``copy_`` of the same bytes from
    pinned memory ``rank<r>_copy_us``, and ``rank4_over_rank64`` (issue 19's goal: <= 0.15x)."""
    model = llama(setup)
    top = max(SWAP_RANKS)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=top, device_slots=1,
                                             host_slots=2 * len(SWAP_RANKS)))
    pinned = setup.device.type == "cuda"
    slot = rt.internals.arena.arenas[setup.dtype][0]
    figures: dict[str, float] = {}
    for rank in SWAP_RANKS:
        for turn in range(2):
            state, config = random_state(rt, rank, seed=10 * rank + turn)
            rt.load(f"r{rank}-{turn}", state_dict=state, config=config)
        names = iter((f"r{rank}-1", f"r{rank}-0") * (setup.rounds + 4))
        rt.activate(f"r{rank}-0")
        swaps_before = rt.stats()["swaps"]
        figures[f"rank{rank}_swap_us"] = median_us(lambda: rt.activate(next(names)), setup.rounds, setup.device)
        assert rt.stats()["swaps"] - swaps_before == setup.rounds + 2, "a timed activation did not copy"
        numel = rt.info(f"r{rank}-0").bytes // slot.element_size()
        host = torch.empty(numel, dtype=slot.dtype, pin_memory=pinned).normal_()
        target = slot[:numel]
        figures[f"rank{rank}_copy_us"] = median_us(lambda: target.copy_(host, non_blocking=pinned),
                                                   setup.rounds, setup.device)
        rt.activate(None)
        for turn in range(2):
            rt.unload(f"r{rank}-{turn}", force=True)
    figures["rank4_over_rank64"] = figures["rank4_swap_us"] / figures[f"rank{top}_swap_us"]
    return figures


def _runtime_swap(setup: Setup, rank: int) -> tuple[dict[str, Any], list[tuple[dict[str, torch.Tensor], Any]]]:
    """:func:`stage_swap`'s runtime figures, and the state dicts of the two swapped adapters."""
    model = llama(setup)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=rank, device_slots=2,
                                             host_slots=4))
    states = {name: random_state(rt, rank, seed=i) for i, name in enumerate(("a", "b", "c"))}
    for name, (state, config) in states.items():
        rt.load(name, state_dict=state, config=config)
    slot = rt.internals.arena.arenas[setup.dtype][0]
    pinned = setup.device.type == "cuda"
    host = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=pinned).normal_()

    def copy() -> None:
        slot.copy_(host, non_blocking=pinned)

    names = iter(("c", "a") * (setup.rounds + 4))

    def swap() -> None:  # "a" and "c" take turns in one evictable slot; "b" stays resident
        rt.activate(next(names))

    rt.pin("b")
    flip = iter(("b", "a") * (setup.rounds + 4))
    rt.activate("a")
    copy_us = median_us(copy, setup.rounds, setup.device)
    swaps_before = rt.stats()["swaps"]
    swap_us = median_us(swap, setup.rounds, setup.device)
    swaps = rt.stats()["swaps"] - swaps_before
    rt.activate("a")

    def switch() -> None:  # both resident: no copy
        rt.activate(next(flip))

    switch_us = median_us(switch, setup.rounds, setup.device)
    switch_host_us = median_us(switch, setup.rounds, torch.device("cpu"))  # returns before the GPU is done
    synchronize_us = median_us(lambda: None, setup.rounds, setup.device)  # what every figure above includes
    parts = _swap_parts(setup, rt, [rt.internals.registry.records[name].staged.rows for name in ("a", "c")])
    return {"slot_bytes": rt.slot_nbytes, "swaps": swaps, "copy_us": copy_us, "swap_us": swap_us,
            "swap_over_copy": swap_us / copy_us, "resident_switch_us": switch_us,
            "resident_switch_host_us": switch_host_us, "synchronize_us": synchronize_us,
            "copy_GBps": rt.slot_nbytes / copy_us / 1e3, **parts}, [states["a"], states["c"]]


def _swap_parts(setup: Setup, rt: HotswapRuntime,
                rows: list[dict[torch.dtype, torch.Tensor]]) -> dict[str, float]:
    """Where a swap's time beyond the copy goes, each part on a second runtime of the same
    layout (its slots and selection are nobody's): ``part_write_slot_us`` (the slot copy as a
    swap makes it: queued on the compute stream, then the host waits on an event after it),
    ``part_copy_nowait_us`` (the same copy without that wait: the figure includes the device
    synchronize that ends every timing), ``part_selection_write_us`` (a cached selection's
    packed tensors written, a non-blocking copy from pinned memory on CUDA) and, on CUDA,
    ``part_event_wait_us`` (an event recorded and waited for on an idle device)."""
    spare = HotswapRuntime(llama(setup), RuntimeConfig(target_modules="all-linear", max_rank=rt.config.max_rank,
                                                       device_slots=2, host_slots=2))
    arena, selection = spare.internals.arena, spare.internals.selection
    pinned = setup.device.type == "cuda"
    turns = iter(rows * (setup.rounds + 4))
    parts = {"part_write_slot_us": median_us(lambda: arena.write_slot(0, next(turns)),
                                             setup.rounds, setup.device)}
    turns = iter(rows * (setup.rounds + 4))
    parts["part_copy_nowait_us"] = median_us(lambda: arena._write(0, next(turns), non_blocking=pinned),
                                             setup.rounds, setup.device)
    specs = iter(([{0: 1.0}], [{1: 1.0}]) * (setup.rounds + 4))
    parts["part_selection_write_us"] = median_us(lambda: selection.write(next(specs)),
                                                 setup.rounds, setup.device)
    if pinned:
        event = torch.cuda.Event()

        def event_wait() -> None:
            event.record()
            event.synchronize()

        parts["part_event_wait_us"] = median_us(event_wait, setup.rounds, setup.device)
    return parts


def _peft_swap_us(setup: Setup, rank: int,
                  states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> dict[str, float]:
    """PEFT's in-memory hotswap (``hotswap_adapter_from_state_dict``) of the same two adapters
    on a PeftModel of the same base, taking turns: the state dicts in host memory (what a
    ring -> slot swap copies from) and already on the device. Median microseconds."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(llama(setup), config).eval()
    host = [_insert_adapter_name_into_state_dict(dict(state), adapter_name="default", parameter_prefix="lora_")
            for state, _ in states]
    device = [{key: value.to(setup.device, setup.dtype) for key, value in state.items()} for state in host]
    figures = {}
    for label, pair in (("peft_state_dict_host_us", host), ("peft_state_dict_device_us", device)):
        turns = iter(pair * (setup.rounds + 4))

        def swap() -> None:
            hotswap_adapter_from_state_dict(model, next(turns), "default", config)

        figures[label] = median_us(swap, setup.rounds, setup.device)
    return figures


def stage_overlap(setup: Setup) -> dict[str, Any]:
    """Decode step latency alone and while another thread loads adapters: ``replace_*``
    replaces a device-resident adapter the loop does not serve (a shadow slot; the forward
    gate is not taken, as no selection reads it), ``new_*`` loads a new adapter into a free
    slot and unloads it again (the copy runs beside the forwards), ``activate_*`` activates
    adapters of the host ring in turn (copies into slots, beside the step when one the
    selection does not read can take them, and selection changes). Compiled in the default mode
    (a launch-bound step: the loader's Python competes with the step's) and, on CUDA, with
    CUDA graphs too (the engine's mode there; keys ``graphs_*``)."""
    result = _overlap(setup, mode=None)
    if setup.compile and setup.device.type == "cuda":
        torch._dynamo.reset()
        result.update({f"graphs_{key}": value for key, value in _overlap(setup, "reduce-overhead").items()})
    return result


def _overlap(setup: Setup, mode: str | None) -> dict[str, Any]:
    """:func:`stage_overlap` with the decode step compiled in ``mode``."""
    rank, batch = 16, 16
    model = llama(setup)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=rank, device_slots=4,
                                             host_slots=8, max_batch_size=batch))
    state, config = random_state(rt, rank, seed=0)
    rt.load("served", state_dict=state, config=config)
    rt.activate("served")
    ids = torch.randint(0, 1024, (batch, 1), device=setup.device)
    if setup.compile:
        rt.compile(ids, mode=mode)

    def steps(count: int) -> list[float]:
        times = []
        with torch.no_grad():
            for _ in range(count):
                start = time.perf_counter()
                rt.model(ids)
                synchronize(setup.device)
                times.append(time.perf_counter() - start)
        return times

    count = setup.rounds * 4
    steps(5)
    alone = steps(count)
    other, other_config = random_state(rt, rank, seed=1)
    rt.load("other", state_dict=other, config=other_config)

    def replace() -> None:
        rt.load("other", state_dict=other, config=other_config, replace=True)

    def load_new() -> None:
        rt.load("new", state_dict=other, config=other_config)
        rt.unload("new")

    # four slots: "served", "other" and two free: of five more adapters, three stay in the ring,
    # and activating the five in turn copies each time (the least recently used slot goes)
    ring = [f"ring{i}" for i in range(5)]
    turns = itertools.cycle(ring)

    def activate_from_ring() -> None:
        rt.activate(next(turns))

    def prepare_ring() -> None:
        for i, name in enumerate(ring):
            state_i, config_i = random_state(rt, rank, seed=10 + i)
            rt.load(name, state_dict=state_i, config=config_i)

    p50, p99 = statistics.median(alone), percentile(alone, 0.99)
    result: dict[str, Any] = {"steps": count, "step_p50_ms": p50 * 1e3, "step_p99_ms": p99 * 1e3}
    for label, load in (("replace", replace), ("new", load_new), ("activate", activate_from_ring)):
        if label == "activate":
            prepare_ring()
            swaps = rt.stats()["swaps"]
        loads = 0
        stop = threading.Event()

        def loader() -> None:
            nonlocal loads
            while not stop.is_set():
                load()
                loads += 1

        thread = threading.Thread(target=loader, daemon=True)
        thread.start()
        try:
            busy = steps(count)
        finally:
            stop.set()
            thread.join()
        busy_p50, busy_p99 = statistics.median(busy), percentile(busy, 0.99)
        if label == "activate":
            result["activate_copies_during"] = rt.stats()["swaps"] - swaps
        result.update({f"{label}_loads_during": loads, f"{label}_busy_p50_ms": busy_p50 * 1e3,
                       f"{label}_busy_p99_ms": busy_p99 * 1e3, f"{label}_added_p50_ms": (busy_p50 - p50) * 1e3,
                       f"{label}_added_p99_ms": (busy_p99 - p99) * 1e3})
    result["recompiles"] = rt.guard.recompiles
    result["rerecords"] = rt.guard.rerecords
    return result


def stage_decode_k(setup: Setup) -> dict[str, Any]:
    """Decode step (batch 16) with k distinct adapters over the uninjected model, compiled in
    the default mode and (on CUDA) with CUDA graphs (``reduce-overhead``, the engine's mode
    there): keys ``<product>_k<k>_...`` and ``graphs_<product>_k<k>_...``."""
    batch, rank, ks = 16, 16, (1, 4, 8, 16)
    ids = torch.randint(0, 1024, (batch, 1), device=setup.device)

    def timed(forward: Callable[[], object]) -> float:
        with torch.no_grad():
            forward()  # CUDA graphs: the first calls warm up and record
            return median_us(forward, setup.rounds, setup.device)

    modes: list[str | None] = [None]
    if setup.compile and setup.device.type == "cuda":
        modes.append("reduce-overhead")
    result: dict[str, Any] = {}
    for mode in modes:
        prefix = "graphs_" if mode else ""
        torch._dynamo.reset()
        base = llama(setup)
        plain = torch.compile(base, mode=mode) if setup.compile else base
        first_us = timed(lambda: plain(input_ids=ids))
        if mode is None:
            result.update(kernel_profile("uninjected", lambda: plain(input_ids=ids), setup.device))
        # auto (the default: per row once compiled, one adapter per row here; one-token steps
        # read the slots in place on CUDA, per_row_decode="auto"), the stacked
        # product only (every row times all 16 slots, read in place), per row forced, and per
        # row with one-token steps reading the slots in place (per_row_decode="reduce")
        products = {"auto": (None, "auto"), "stacked": (16, "bmm"), "per_row": (1, "bmm"),
                    "per_row_reduce": (1, "reduce")}
        for product, (per_row, decode) in products.items():
            rt = HotswapRuntime(llama(setup), RuntimeConfig(
                target_modules="all-linear", max_rank=rank, device_slots=16, host_slots=16,
                max_batch_size=batch, max_adapters_per_row=per_row, per_row_decode=decode))
            for i in range(16):
                state, config = random_state(rt, rank, seed=i)
                rt.load(f"a{i}", state_dict=state, config=config)
            rt.activate_rows([f"a{i % 16}" for i in range(batch)])
            if setup.compile:
                rt.compile(ids, mode=mode)
            for k in ks:
                rt.activate_rows([f"a{i % k}" for i in range(batch)])
                result[f"{prefix}{product}_k{k}_us"] = timed(lambda: rt.model(input_ids=ids))
                if k == 8 and mode is None:
                    step = lambda: rt.model(input_ids=ids)  # noqa: E731
                    result.update(kernel_profile(f"{product}_k8", step, setup.device))
            result[f"{prefix}{product}_recompiles"] = rt.guard.recompiles
            result[f"{prefix}{product}_ran_per_row"] = rt.internals.selection.per_row
        # the uninjected step timed again after the products: a GPU's first timings can run
        # slower (a run once measured it 11% slower first); ratios are over the faster of the two
        last_us = timed(lambda: plain(input_ids=ids))
        base_us = min(first_us, last_us)
        result.update({f"{prefix}uninjected_first_us": first_us, f"{prefix}uninjected_last_us": last_us,
                       f"{prefix}uninjected_us": base_us})
        for product, k in itertools.product(products, ks):
            key = f"{prefix}{product}_k{k}"
            result[f"{key}_over_uninjected"] = result[f"{key}_us"] / base_us
    return result


def kernel_profile(label: str, forward: Callable[[], object], device: torch.device,
                   steps: int = 10) -> dict[str, Any]:
    """The kernels of one step of ``forward`` (torch.profiler, no CUDA graphs): how many, their
    summed time, and the five that take the most (name, per step, us per step). On CUDA the
    GPU kernels and their device time (a step whose kernels take far longer than their bytes
    needs other kernels, not fewer launches); elsewhere the operators and their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with torch.no_grad():
        forward()
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                forward()
            synchronize(device)
    rows = sorted(((e.key, e.count / steps, (e.device_time_total if cuda else e.self_cpu_time_total) / steps)
                   for e in prof.key_averages()), key=lambda row: -row[2])
    rows = [row for row in rows if row[2] > 0]
    return {f"{label}_kernels_per_step": sum(row[1] for row in rows),
            f"{label}_us_per_step": sum(row[2] for row in rows),
            f"{label}_top_kernels": [(name[:80], count, round(us, 1)) for name, count, us in rows[:5]]}


class _Tokens:
    """The engine's tokenizer protocol for token-id prompts (text is the ids)."""

    eos_token_id = None

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def stage_engine(setup: Setup) -> dict[str, Any]:
    """Tokens per second of the engine: 32 requests over 8 adapters, and on the base model (each
    warmed once at full size, then timed twice alternating; the better of each)."""
    from hotswap_rt.engine import EngineConfig, GenerationEngine, SamplingParams

    hidden = 64 if setup.hidden < 512 else 1024
    model = llama(setup, hidden=hidden, intermediate=hidden * 2, layers=4 if hidden > 64 else 2)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=16, device_slots=8,
                                             host_slots=8, max_batch_size=32, max_adapters_per_row=2))
    for i in range(8):
        state, config = random_state(rt, 16, seed=i)
        rt.load(f"a{i}", state_dict=state, config=config)
    engine = GenerationEngine(rt, _Tokens(), EngineConfig(
        max_seqs=32, max_model_len=160, prefill_chunk=64, max_prefill_seqs=4,
        decode_buckets=(8, 32), compile=setup.compile))
    started = time.perf_counter()
    engine.start()
    startup = time.perf_counter() - started
    prompt_len, out_len, requests = (64, 64, 32) if hidden > 64 else (8, 8, 8)
    params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)

    def run(adapters: list[str | None]) -> float:
        begin = time.perf_counter()
        handles = [engine.submit([(7 * i + j) % 1000 for j in range(prompt_len)], adapter, params)
                   for i, adapter in enumerate(adapters)]
        tokens = sum(sum(1 for event in handle if hasattr(event, "token_id")) for handle in handles)
        return tokens / (time.perf_counter() - begin)

    rows = {"base": [None] * requests, "mixed": [f"a{i % 8}" for i in range(requests)]}
    rates: dict[str, list[float]] = {"base": [], "mixed": []}
    try:
        for kind in rows:  # warm at full size: each bucket's graph records on its first calls
            run(rows[kind])
        for _ in range(2):  # alternating, the better of two each (the 2026-11-30 run, warmed with
            for kind in rows:  # 4 requests, timed the base model first and slower: 0.79x mixed)
                rates[kind].append(run(rows[kind]))
        base, mixed = max(rates["base"]), max(rates["mixed"])
    finally:
        engine.stop()
    return {"startup_s": startup, "base_tok_s": base, "mixed8_tok_s": mixed, "mixed8_over_base": mixed / base,
            "recompiles": rt.guard.recompiles, "rerecords": rt.guard.rerecords}


KERNEL_LAYERS, KERNEL_SLOTS, KERNEL_DISTINCT = 8, 16, 8


def _rank_sum_forms() -> dict[str, Callable[..., torch.Tensor]]:
    """One-token LoRA deltas of ``KERNEL_LAYERS`` layers (``layers``: ``(A [S, R, d_in],
    Bt [S, R, d_out])`` per layer, as the arena lays them), each row ``b`` times its own slot
    ``slots[b]`` (``[B, 1]``), summed over the layers; ``x``: ``[B, d_in]``, returns
    ``[B, d_out]``. ``reduce``: as ``per_row_decode="reduce"`` computes it (a broadcast product
    summed over ``d_in``, then one summed over the ranks); ``rank_unrolled``: the same ``d_in``
    sum, and the rank sum written as ``R`` broadcast products added (compiled: one pointwise
    kernel with a load per rank, each along ``d_out``); ``bmm``: the factors gathered, two
    batched matmuls (``per_row_decode="bmm"``); ``grouped``: a segment matmul, the rows sorted
    by slot and each slot's factors read once for its rows where they lie
    (``torch._grouped_mm`` with the groups' ends as a tensor, so any mix runs one graph;
    compiled only in bfloat16)."""

    def reduce(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            out = out + _reduce_expand(_reduce_shrink(x, a, slots), bt, slots)
        return out

    def rank_unrolled(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            h = _reduce_shrink(x, a, slots).flatten(1)  # [B, R]
            rows = bt[slots].flatten(1, 2)  # [B, R, d_out]
            for j in range(h.shape[1]):
                out = out + h[:, j : j + 1] * rows[:, j]
        return out

    def bmm(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            h = torch.bmm(x.unsqueeze(1), a[slots].flatten(1, 2).transpose(1, 2))  # [B, 1, R]
            out = out + torch.bmm(h, bt[slots].flatten(1, 2)).squeeze(1)
        return out

    def grouped(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        flat = slots[:, 0]
        order = torch.argsort(flat, stable=True)  # rows grouped by slot
        every_slot = torch.arange(layers[0][0].shape[0], device=x.device)
        ends = torch.cumsum((flat[:, None] == every_slot).sum(0), 0).to(torch.int32)  # [S]
        rows = x[order]
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            h = torch._grouped_mm(rows, a.transpose(1, 2), offs=ends)  # [B, R]
            out = out + torch._grouped_mm(h, bt, offs=ends)  # [B, d_out]
        return torch.empty_like(out).index_copy_(0, order, out)  # back in row order

    def dense(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        rank = layers[0][0].shape[1]
        every_slot = torch.arange(layers[0][0].shape[0], device=x.device)
        mask = (slots == every_slot).to(x.dtype).repeat_interleave(rank, dim=1)  # [B, S*R]: own slot
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            h = torch.nn.functional.linear(x, a.flatten(0, 1)) * mask  # every slot's ranks, others zeroed
            out = out + h @ bt.flatten(0, 1)
        return out

    return {"reduce": reduce, "rank_unrolled": rank_unrolled, "bmm": bmm, "grouped": grouped, "dense": dense}


def _reduce_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``reduce``'s sum over ``d_in``: ``x [B, d_in]``, ``a [S, R, d_in]``, ``slots [B, 1]`` ->
    ``[B, 1, R]``."""
    return (x.view(x.shape[0], 1, 1, -1) * a[slots]).sum(-1)


def _reduce_expand(h: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``reduce``'s sum over the ranks: ``h [B, 1, R]``, ``bt [S, R, d_out]`` -> ``[B, d_out]``."""
    return (h.unsqueeze(-1) * bt[slots]).sum((1, 2))


def _after_fused(yh: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``y`` plus each row's delta from ``yh = x @ [W; A_0; ...]^T`` (``[B, d_out + S*R]``: the
    base output and every slot's ranks), ``bt [S, R, d_out]``, ``slots [B, 1]``: ``[B, d_out]``."""
    batch, (count, rank, d_out) = yh.shape[0], bt.shape
    every = yh[:, d_out:].view(batch, count, rank)
    h = torch.gather(every, 1, slots.view(batch, 1, 1).expand(batch, 1, rank))  # [B, 1, R]: own slot
    return yh[:, :d_out] + _reduce_expand(h, bt, slots)


def _triton_form() -> Callable[..., torch.Tensor] | str:
    """The two hand-written Triton kernels of :mod:`benchmarks.lora_triton` as a
    :func:`_rank_sum_forms` form (run as they are, not compiled), or why they cannot run."""
    try:
        from benchmarks.lora_triton import lora_delta
    except ImportError as exc:
        return f"Triton is not importable ({exc})"

    def triton_form(x: torch.Tensor, layers: list, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for a, bt in layers:
            out = out + lora_delta(x, a, bt, slots[:, 0])
        return out

    return triton_form


def stage_kernels(setup: Setup) -> dict[str, Any]:
    """The per-row product's one-token forms alone (:func:`_rank_sum_forms`, and
    :mod:`benchmarks.lora_triton`'s kernels on CUDA: ``triton``), batch 16, rank 16, 8 distinct
    slots of 16, over 8 layers of each of the model's layer shapes (``d_in -> d_out``),
    compiled, against the 8 base linears of that shape; on CUDA each timed as the device time of
    a CUDA-graph replay (:func:`device_us`: what the kernels cost inside a graphed step; the
    first run timed each call's wall clock with a synchronize, mostly host time). Keys
    ``<d_in>x<d_out>_<form>_us`` and ``_over_base``, each form's largest difference from ``bmm``
    computed in float32 (``_max_diff``), ``reduce``'s two sums alone (``_reduce_shrink_us``:
    over ``d_in``; ``_reduce_expand_us``: over the ranks), and base and delta together with the
    ``d_in`` sum folded into the base matmul (every slot's A rows appended to each weight; a probe
    found that nearly free on an H200), the rank sum then compiled (``fused``) or as a Triton
    kernel on CUDA (``fused_triton``), their ``_over_base`` the whole layer's time over the base
    alone and ``_max_diff`` against base and delta in float32; a form that fails records
    ``_error`` and the others still run."""
    batch, rank = 16, 16
    generator = torch.Generator().manual_seed(0)
    slots = (torch.arange(batch) % KERNEL_DISTINCT).view(batch, 1).to(setup.device)
    result: dict[str, Any] = {}
    hidden, intermediate = setup.hidden, setup.intermediate
    shapes = {(hidden, hidden), (hidden, intermediate), (intermediate, hidden)}
    triton_form = _triton_form() if setup.device.type == "cuda" else "Triton kernels run on CUDA only"

    def make(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(setup.device, setup.dtype)

    for d_in, d_out in sorted(shapes):
        layers = [(make(KERNEL_SLOTS, rank, d_in), make(KERNEL_SLOTS, rank, d_out))
                  for _ in range(KERNEL_LAYERS)]
        weights = [make(d_out, d_in) for _ in range(KERNEL_LAYERS)]
        x = make(batch, d_in)
        exact = _rank_sum_forms()["bmm"](x.float(), [(a.float(), bt.float()) for a, bt in layers], slots)
        ranks = [_reduce_shrink(x, a, slots) for a, _ in layers]

        def base(x: torch.Tensor) -> torch.Tensor:
            return sum(torch.nn.functional.linear(x, weight) for weight in weights)

        label = f"{d_in}x{d_out}"
        timed: dict[str, Callable[[], torch.Tensor]] = {"base": lambda fn=base: fn(x)}
        forms = dict(_rank_sum_forms())
        if isinstance(triton_form, str):
            result[f"{label}_triton_skipped"] = triton_form
        else:
            forms["triton"] = triton_form
        for form, fn in forms.items():
            if form == "grouped" and setup.dtype != torch.bfloat16:  # torch._grouped_mm's meta
                result[f"{label}_{form}_skipped"] = "torch._grouped_mm compiles in bfloat16 only"
                continue
            timed[form] = lambda fn=fn: fn(x, layers, slots)
        timed["reduce_shrink"] = lambda: [_reduce_shrink(x, a, slots) for a, _ in layers]
        timed["reduce_expand"] = lambda: [_reduce_expand(h, bt, slots) for h, (_, bt) in zip(ranks, layers)]
        # base and delta together: the d_in sum folded into the base matmul (every slot's A rows
        # appended to each weight), then the rank sum compiled, or as a Triton kernel on CUDA
        fused = [torch.cat([weight, a.flatten(0, 1)]) for weight, (a, _) in zip(weights, layers)]
        timed["fused"] = lambda: sum(_after_fused(torch.nn.functional.linear(x, w), bt, slots)
                                     for w, (_, bt) in zip(fused, layers))
        if not isinstance(triton_form, str):
            from benchmarks.lora_triton import expand_after_fused

            row_slots = slots[:, 0].contiguous()
            linear = torch.nn.functional.linear
            timed["fused_triton"] = lambda: sum(expand_after_fused(linear(x, w), bt, row_slots)
                                                for w, (_, bt) in zip(fused, layers))
        with_base = sum(torch.nn.functional.linear(x.float(), w.float()) for w in weights) + exact
        for form, call in timed.items():
            torch._dynamo.reset()
            try:
                compiled = torch.compile(call) if setup.compile and "triton" not in form else call
                with torch.no_grad():
                    out = compiled()
                    if form in forms:
                        result[f"{label}_{form}_max_diff"] = (out.float() - exact).abs().max().item()
                    elif form.startswith("fused"):  # base and delta: against both in float32
                        result[f"{label}_{form}_max_diff"] = (out.float() - with_base).abs().max().item()
                    result[f"{label}_{form}_us"] = device_us(compiled, setup.rounds, setup.device)
            except Exception as exc:  # a candidate that fails here must not hide the others' figures
                if form == "base":
                    raise
                traceback.print_exc()
                result[f"{label}_{form}_error"] = f"{type(exc).__name__}: {exc}"
                continue
            if form != "base":
                result[f"{label}_{form}_over_base"] = result[f"{label}_{form}_us"] / result[f"{label}_base_us"]
    return result


STAGE_FUNCTIONS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "swap": stage_swap, "overlap": stage_overlap, "decode_k": stage_decode_k, "engine": stage_engine,
    "kernels": stage_kernels,
}


def environment(setup: Setup) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": str(setup.device), "dtype": str(setup.dtype), "hidden": setup.hidden,
                            "intermediate": setup.intermediate, "layers": setup.layers,
                            "compile": setup.compile}
    if setup.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(setup.device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    setup = Setup.make(args.device, args.quick, not args.no_compile)
    results: dict[str, Any] = {"environment": environment(setup), "stages": {}, "failed": []}
    for stage in stages:
        print(f"[gpu_check] {stage} ...", flush=True)
        started = time.perf_counter()
        try:
            figures = STAGE_FUNCTIONS[stage](setup)
        except Exception as exc:  # one failing stage must not hide the others' figures
            traceback.print_exc()
            figures = {"error": f"{type(exc).__name__}: {exc}"}
            results["failed"].append(stage)
        figures["seconds"] = round(time.perf_counter() - started, 1)
        results["stages"][stage] = figures
        print(f"[gpu_check] {stage}: {json.dumps(figures, default=str)}", flush=True)
        torch._dynamo.reset()
        # written after every stage: a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"[gpu_check] wrote {args.out}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
