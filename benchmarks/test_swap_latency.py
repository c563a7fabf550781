"""Swap latency: hotswap_rt (host-staged -> device slot) vs one copy_ of the same bytes vs PEFT's
``hotswap_adapter_from_state_dict``, on a 4-layer hidden-512 Llama with all-linear r=16 adapters.

Run: ``scripts/bench.sh`` (pytest benchmarks/ --benchmark-enable -s). Timings are reported, never
asserted; the printed ratios are the result.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import record

GROUP = "swap latency, median (ratio to one copy_ of the same padded bytes)"

RANK = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    base = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("bench")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=RANK, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(str(root / str(seed)))
        paths.append(root / str(seed))
    return base, paths


def test_memcpy_of_same_bytes(benchmark, setup) -> None:
    base, paths = setup
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig("all-linear", max_rank=RANK, device_slots=1))
    nbytes = rt.arena.slot_nbytes
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    benchmark(dst.copy_, src)
    record(GROUP, "memcpy", benchmark, reference=True)


def test_hotswap_rt_slot_copy(benchmark, setup) -> None:
    base, paths = setup
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig("all-linear", max_rank=RANK, device_slots=1))
    staged = [rt.arena.stage(_parsed(p)) for p in paths]  # what a swap copies
    cycle = itertools.cycle(staged)
    benchmark(lambda: rt.arena.write_slot(0, next(cycle)))
    record(GROUP, "hotswap_rt slot copy (arena.write_slot)", benchmark)


def test_hotswap_rt_activate_from_host(benchmark, setup) -> None:
    base, paths = setup
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        "all-linear", max_rank=RANK, device_slots=1, host_slots=2))
    rt.load("a", paths[0])
    rt.load("b", paths[1])
    cycle = itertools.cycle(["a", "b"])
    benchmark(lambda: rt.activate(next(cycle)))  # every call evicts and copies from host
    assert rt.stats()["evictions"] > 0
    record(GROUP, "hotswap_rt activate (host->slot+select)", benchmark)


def test_peft_hotswap_from_state_dict(benchmark, setup) -> None:
    base, paths = setup
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0])).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=RANK)
    config = LoraConfig.from_pretrained(str(paths[1]))
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    # What peft's own hotswap_adapter() passes: keys with the adapter name inserted.
    states = [
        _insert_adapter_name_into_state_dict(
            load_file(str(p / "adapter_model.safetensors")), adapter_name="default",
            parameter_prefix="lora_")
        for p in paths
    ]
    cycle = itertools.cycle(states)
    benchmark(lambda: hotswap_adapter_from_state_dict(model, next(cycle), "default", config))
    record(GROUP, "peft hotswap_adapter_from_state_dict", benchmark)


def _parsed(path):
    from hotswap_rt.peft_format import parse_adapter, read_adapter_dir

    config, state = read_adapter_dir(path)
    return parse_adapter(config, state, str(path))
