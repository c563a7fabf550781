"""The staging ring's promises, measured side by side with their floors and with PEFT.

For a 4-layer hidden-512 Llama and for a 2-layer stack with Llama-7B layer shapes (hidden 4096,
MLP 11008), both with all-linear r=16 adapters:

1. Swap of a ring-resident adapter into a device slot (``rt.activate`` alternating between two
   host adapters, one device slot: every call copies) vs one ``copy_`` of the same bytes with the
   same access pattern (two sources alternating into one destination) vs PEFT
   ``hotswap_adapter_from_state_dict`` (state dicts already in memory) and PEFT
   ``hotswap_adapter`` (from disk). Goals: <= 1.5x the copy; >= 15x / >= 25x faster than PEFT.
2. Switching between two device-resident adapters: time, and that no copy happens (<= 50 us).
   Both again with the CPU caches flushed before every call (as a forward over a model leaves
   them), next to the same ``copy_`` and a one-op ``copy_`` of 4 floats.
3. Cold load from disk into the ring (``rt.load``: read, validate, pad, stage; by default
   staged from a private memory map of the file, ``RuntimeConfig.map_adapter_files``) vs
   ``safetensors.torch.load_file`` of the same file, and vs ``load_file`` + one pass over the
   data. Goal <= 1.5x the latter. Beside it: ``rt.load`` with the file read into memory first
   (``map_adapter_files=False``), and the two floors of rank-major staging (read, mapped).

All cases of a group are timed interleaved, call by call. Printed as ratios, never asserted.
"""

from __future__ import annotations

import copy
import itertools
import json
import mmap
from typing import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.host_memory import HostMemoryPool
from hotswap_rt.safetensors_read import forget_headers, read_safetensors
from hotswap_rt.staging import Stager

from .conftest import figure, interleaved, note, note_ratios

RANK = 16
SHAPES = {
    "llama h512 x4": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, rounds=300),
    "llama-7B layer shapes x2": dict(hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=2, num_attention_heads=32, rounds=40),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request, tmp_path_factory):
    shape = dict(SHAPES[request.param])
    rounds = shape.pop("rounds")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, num_key_value_heads=shape["num_attention_heads"], **shape)
    base = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("ring")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=RANK, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(str(root / str(seed)))
        paths.append(root / str(seed))
        del model
    return request.param, base, paths, rounds


def _runtime(base, adapters: dict, device_slots: int, **options) -> HotswapRuntime:
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        "all-linear", max_rank=RANK, device_slots=device_slots, host_slots=4, **options))
    for name, path in adapters.items():
        rt.load(name, path)
    return rt


def test_swap_from_ring_vs_copy_and_peft(setup) -> None:
    label, base, paths, rounds = setup
    group = f"ring -> device swap, {label} (ratio to copy_ with the same access pattern)"
    rt = _runtime(base, {"a": paths[0], "b": paths[1]}, device_slots=1)
    names = itertools.cycle(["b", "a"])  # "a" sits in the slot: every activation copies
    nbytes = rt.slot_nbytes
    sources = [torch.randn(nbytes // 4), torch.randn(nbytes // 4)]
    destination = torch.empty(nbytes // 4)
    source_cycle = itertools.cycle(sources)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0])).eval()
    peft_config = LoraConfig.from_pretrained(str(paths[1]))
    states = itertools.cycle([
        _insert_adapter_name_into_state_dict(
            load_file(str(p / "adapter_model.safetensors")), adapter_name="default",
            parameter_prefix="lora_")
        for p in paths
    ])
    peft_paths = itertools.cycle([str(p) for p in paths])
    swaps_before = rt.stats()["swaps"]
    # Two interleaved runs: the floor next to our swap only (PEFT's big Python walks between
    # them would leave every cache cold at a different point), then our swap next to PEFT's.
    ours = "hotswap_rt activate (ring -> slot + flip)"
    staged = itertools.cycle([rt.internals.registry.records[n].staged for n in ("a", "b")])
    spare = _runtime(base, {}, device_slots=1)  # a second arena, so rt's slot stays rt's
    spare_arena = spare.internals.arena  # rt.internals builds an object: not in the timed call
    floor = interleaved({
        "copy_ (2 sources -> 1 destination)": lambda: destination.copy_(next(source_cycle)),
        "hotswap_rt arena.write_slot (the copy alone)": lambda: spare_arena.write_slot(
            0, next(staged).rows),
        ours: lambda: rt.activate(next(names)),
    }, rounds=rounds)
    versus_peft = interleaved({
        ours: lambda: rt.activate(next(names)),
        "peft hotswap_adapter_from_state_dict": lambda: hotswap_adapter_from_state_dict(
            peft_model, next(states), "default", peft_config),
        "peft hotswap_adapter (from disk)": lambda: hotswap_adapter(
            peft_model, next(peft_paths), "default"),
    }, rounds=rounds)
    assert rt.stats()["swaps"] - swaps_before == 2 * rounds  # every activation copied
    note(group, f"{nbytes / 2**20:.2f} MiB per slot row, {rounds} rounds interleaved")
    note_ratios(group, floor, "copy_ (2 sources -> 1 destination)", "vs floor")
    note_ratios(group, versus_peft, ours, "vs PEFT ")
    for name in ("peft hotswap_adapter_from_state_dict", "peft hotswap_adapter (from disk)"):
        note(group, f"hotswap_rt is {versus_peft[name] / versus_peft[ours]:.1f}x faster than {name}")


def test_switch_between_resident_adapters(setup) -> None:
    label, base, paths, _ = setup
    group = f"switch between device-resident adapters, {label}"
    rt = _runtime(base, {"a": paths[0], "b": paths[1]}, device_slots=2)
    names = itertools.cycle(["a", "b"])
    before = rt.stats()
    medians = interleaved({"rt.activate (resident)": lambda: rt.activate(next(names))}, 2000)
    after = rt.stats()
    figure(f"resident_switch_us/{label}", medians["rt.activate (resident)"] * 1e6)
    note(group, f"rt.activate between resident adapters: {medians['rt.activate (resident)'] * 1e6:.1f}"
                f" us median, copies during 2000 switches: {after['swaps'] - before['swaps']}")
    assert after["swaps"] == before["swaps"]


FLUSH_BYTES = 32 << 20  # 8x this VM's 4 MiB of L2: what a forward over a model leaves of them


def test_swap_and_switch_after_the_caches_are_flushed(setup) -> None:
    """The same swap and switch as above, with the CPU caches flushed (a pass over 32 MB, not
    timed) before every timed call, as a forward over a model's weights leaves them between
    two changes in a server: a swap's Python and the tensors' dispatch then run cold. Next to
    the ``copy_`` of the same bytes and a ``copy_`` of 4 floats (one dispatched op: the least
    any change does), under the same flush."""
    label, base, paths, _ = setup
    group = f"swap and switch after a cache flush, {label} (ratio to copy_ of the same bytes)"
    rt = _runtime(base, {"a": paths[0], "b": paths[1]}, device_slots=1)
    resident = _runtime(base, {"a": paths[0], "b": paths[1]}, device_slots=2)
    swaps, switches = itertools.cycle(["b", "a"]), itertools.cycle(["b", "a"])
    nbytes = rt.slot_nbytes
    sources = itertools.cycle([torch.randn(nbytes // 4), torch.randn(nbytes // 4)])
    destination = torch.empty(nbytes // 4)
    tiny, tiny_source = torch.empty(4), torch.randn(4)
    flush = torch.zeros(FLUSH_BYTES // 4)
    swaps_before, switch_copies = rt.stats()["swaps"], resident.stats()["swaps"]
    medians = interleaved({
        "copy_ (2 sources -> 1 destination)": lambda: destination.copy_(next(sources)),
        "copy_ of 4 floats (one op)": lambda: tiny.copy_(tiny_source),
        "hotswap_rt activate (ring -> slot + flip)": lambda: rt.activate(next(swaps)),
        "hotswap_rt activate (resident switch)": lambda: resident.activate(next(switches)),
    }, rounds=200, before=lambda: flush.add_(1.0))
    assert rt.stats()["swaps"] - swaps_before == 200  # every swap copied, every switch did not
    assert resident.stats()["swaps"] == switch_copies
    note(group, f"{nbytes / 2**20:.2f} MiB per slot row, 200 rounds interleaved, "
                f"{FLUSH_BYTES >> 20} MB pass before each call")
    note_ratios(group, medians, "copy_ (2 sources -> 1 destination)", "")
    figure(f"flushed_switch_us/{label}", medians["hotswap_rt activate (resident switch)"] * 1e6)
    figure(f"flushed_one_op_us/{label}", medians["copy_ of 4 floats (one op)"] * 1e6)
    figure(f"flushed_swap_over_copy/{label}", medians["hotswap_rt activate (ring -> slot + flip)"]
           / medians["copy_ (2 sources -> 1 destination)"])


def test_cold_load_vs_load_file(setup) -> None:
    label, base, paths, rounds = setup
    group = f"cold load disk -> ring, {label} (ratio to safetensors load_file)"
    rt, reading = (_runtime(base, {"resident": paths[0]}, device_slots=1, map_adapter_files=maps)
                   for maps in (True, False))
    for runtime in (rt, reading):
        runtime.pin("resident")  # the slot stays taken: loads below stop in the ring
        runtime.load("x", paths[1])
    file = str(paths[1] / "adapter_model.safetensors")

    pool = HostMemoryPool()  # the floor's file buffers, reused as rt.load's are

    def first_of_its_structure() -> None:  # nothing kept from earlier adapters of this shape
        forget_headers()
        rt.internals.stager.parse_cache.clear()
        rt.load("x", paths[1], replace=True)

    medians = interleaved({
        "safetensors load_file": lambda: load_file(file),
        "load_file + one pass over the data": lambda: [t.clone() for t in load_file(file).values()],
        "hotswap_rt load (read+validate+stage)": lambda: rt.load("x", paths[1], replace=True),
        "hotswap_rt load, first of its structure": first_of_its_structure,
        READ_INTO_MEMORY: lambda: reading.load("x", paths[1], replace=True),
        FLOOR: _rank_major_floor(file, lambda: read_safetensors(file, empty=pool.empty)),
        MAPPED_FLOOR: _rank_major_floor(file, lambda: _mapped_fp32_tensors(file)),
    }, rounds=max(rounds // 2, 20))
    assert rt.adapters()[-1].tier == reading.adapters()[-1].tier == "host"
    note(group, "load_file maps the file lazily: its pages are read by whoever touches them first; "
                "so does rt.load (map_adapter_files=True)")
    note_ratios(group, medians, "safetensors load_file", "")
    one_pass = medians["load_file + one pass over the data"]
    note(group, f"vs load_file + one pass: {medians['hotswap_rt load (read+validate+stage)'] / one_pass:.2f}x; "
                f"first of its structure (header and parse not kept): "
                f"{medians['hotswap_rt load, first of its structure'] / one_pass:.2f}x; "
                f"file read into memory first: {medians[READ_INTO_MEMORY] / one_pass:.2f}x; "
                f"the floor of rank-major staging (a read + B transposed into the row, nothing else): "
                f"{medians[FLOOR] / one_pass:.2f}x, from the mapped file (nothing kept): "
                f"{medians[MAPPED_FLOOR] / one_pass:.2f}x")


READ_INTO_MEMORY = "hotswap_rt load, file read into memory (map_adapter_files=False)"
FLOOR = "floor: file read into reused memory + rank-major row (no check, no scale)"
MAPPED_FLOOR = "floor, mapped: file mapped + rank-major row (file bytes not kept)"


def _mapped_fp32_tensors(file: str) -> dict[str, torch.Tensor]:
    """The fp32 tensors of a safetensors file as views of its memory map (no copy, no checks:
    a floor, not a reader): the row's writes read the page cache directly."""
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header_size = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8 : 8 + header_size])
    header.pop("__metadata__", None)
    data = torch.frombuffer(mapped, dtype=torch.float32, offset=8 + header_size)
    return {name: data[info["data_offsets"][0] // 4 : info["data_offsets"][1] // 4].view(info["shape"])
            for name, info in header.items()}


def _rank_major_floor(file: str, read: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], None]:
    """The least a load into rank-major rows must do, timed as one case: ``read()`` the file
    (into reused memory, as ``rt.load`` does with ``map_adapter_files=False``; or mapped, the
    row's writes then reading the page cache, as ``rt.load`` does by default) and write every factor into a
    ``[r, W]`` row, each module's A row ``j`` then B column ``j`` in rank block ``j`` (B is
    ``[d_out, r]`` on disk: a transposing copy): by one ``torch.cat``, or for layers as large
    as ``rt.load`` writes piece by piece (:attr:`Stager.PIECEWISE_MIN_BYTES`), A by a
    ``copy_`` and B by a matmul with the identity (the fastest transposing write measured). No
    validation, scaling or NaN check."""
    tensors = read_safetensors(file)
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    width = sum(tensors[f"{module}.lora_A.weight"].shape[1] + tensors[f"{module}.lora_B.weight"].shape[0]
                for module in modules)
    blocks = torch.empty(RANK, width)
    piecewise = blocks.numel() * 4 >= Stager.PIECEWISE_MIN_BYTES * len(modules)
    identity = torch.eye(RANK)

    def read_and_write_row() -> None:
        factors = read()
        pieces = []
        for module in modules:
            pieces += [factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"].t()]
        if not piecewise:
            torch.cat(pieces, dim=1, out=blocks)
            return
        offset = 0
        for a, b in zip(pieces[::2], pieces[1::2]):
            blocks[:, offset : offset + a.shape[1]].copy_(a)
            offset += a.shape[1]
            torch.mm(identity, b, out=blocks[:, offset : offset + b.shape[1]])
            offset += b.shape[1]

    return read_and_write_row
