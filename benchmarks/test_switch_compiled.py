"""Switching adapters on a compiled model: hotswap_rt ``activate`` vs PEFT ``set_adapter``.

Model: 4-layer hidden-512 Llama, four attention adapters (q/k/v/o) of rank 16, all resident on
the device, batch 1 x 32, fp32, ``no_grad``. Each case is a switch followed by one forward:

- hotswap_rt: ``rt.activate(next)`` + the compiled forward (an index update; no recompile).
- PEFT: ``set_adapter(next)`` + ``torch.compile(peft_model)``. Dynamo guards on the active
  adapter's name, so the first switch to each adapter recompiles: that time is reported
  separately (first switch to each adapter, compile seconds counted with dynamo's callbacks);
  afterwards each adapter's graph is cached (up to dynamo's recompile limit of 8 per frame, past
  which PEFT's forward runs eagerly).
- The compiled forward alone (no switch), as the floor.

Steady-state cases are timed interleaved. Printed, never asserted.
"""

from __future__ import annotations

import copy
import itertools
import time

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import counting_compiles, figure, interleaved, note, note_ratios
from .test_swap_matrix import random_adapter_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NAMES = ["a0", "a1", "a2", "a3"]
IDS = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
GROUP = "switch + forward, compiled, 4 resident adapters (ratio to the forward alone)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8)).eval()
    root = tmp_path_factory.mktemp("switch")
    paths = {name: random_adapter_dir(base, TARGETS, 16, seed, root / name)
             for seed, name in enumerate(NAMES)}
    return base, paths


def test_switch_vs_peft_set_adapter(setup) -> None:
    base, paths = setup
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=16, device_slots=4, max_active_adapters=1))
    for name in NAMES:
        rt.load(name, paths[name])
    rt.activate(NAMES[0])
    rt.compile(IDS, guard="raise")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[NAMES[0]]),
                                           adapter_name=NAMES[0]).eval()
    for name in NAMES[1:]:
        peft_model.load_adapter(str(paths[name]), adapter_name=name)
    compiled_peft = torch.compile(peft_model)
    with torch.no_grad():
        compiled_peft(input_ids=IDS)  # the first adapter's graph, outside every timing
        first_switches = []
        with counting_compiles() as count:
            for name in NAMES[1:]:
                start = time.perf_counter()
                peft_model.set_adapter(name)
                compiled_peft(input_ids=IDS)
                first_switches.append(time.perf_counter() - start)
        ours, theirs = itertools.cycle(NAMES), itertools.cycle(NAMES)

        def hotswap_rt_switch():
            rt.activate(next(ours))
            return rt.model(input_ids=IDS)

        def peft_switch():
            peft_model.set_adapter(next(theirs))
            return compiled_peft(input_ids=IDS)

        with counting_compiles() as steady:
            medians = interleaved({
                "compiled forward alone (hotswap_rt, no switch)": lambda: rt.model(input_ids=IDS),
                "hotswap_rt activate + forward": hotswap_rt_switch,
                "peft set_adapter + forward (graphs cached)": peft_switch,
            }, rounds=60)
    note_ratios(GROUP, medians, "compiled forward alone (hotswap_rt, no switch)", "")
    figure("peft_first_switch_ms", sorted(first_switches)[len(first_switches) // 2] * 1e3)
    figure("peft_first_switch_recompiles", count.compiles)
    note(GROUP, f"peft first switch to each of {len(NAMES) - 1} adapters: median "
                f"{sorted(first_switches)[len(first_switches) // 2] * 1e3:.0f} ms "
                f"({count.compiles} recompiles, {count.seconds:.2f} s compiling in all); "
                f"hotswap_rt: 0 recompiles ever")
    note(GROUP, f"recompiles during the steady-state rounds: peft {steady.compiles}, "
                f"hotswap_rt {rt.guard.recompiles}")
    assert rt.guard.recompiles == 0
