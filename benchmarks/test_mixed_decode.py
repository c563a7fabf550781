"""What a mixed decode batch costs: one decode step (batch 16, one token per row) on a 2-layer
stack with Llama-7B layer shapes in bf16 (fp32 where the CPU has no bf16 matmul), all-linear
adapters of rank 16 in ``max_rank=16`` slots, with k = 1, 4, 8, 16 distinct adapters over the
rows, each model compiled. The reference is the uninjected compiled model, timed interleaved
with these ways of reading the slots:

- ``gather``: each layer copies the 16 active positions' factors out of the arena, then two
  matmuls over all of them (``RuntimeConfig(slot_reads="gather")``, the layout before issue 19);
- ``in_place``: the two matmuls read all 16 device slots where they lie in the arena (strided
  views, no copy), unselected slots weighted 0 (``slot_reads="in_place"``, the default when
  ``max_active_adapters == device_slots``, stacked only: ``max_adapters_per_row=16``);
- ``per_row m=1`` / ``m=2``: each row gathers its own slots' factors (up to m) and multiplies
  them alone (batched matmul, ``max_adapters_per_row=m``; the server runs m=2);
- ``per_row m=1 reduce``: per row, the one-token step reading each row's slot in place (a
  broadcast product summed, ``per_row_decode="reduce"``: compiled, no gathered copy);
- ``default``: ``RuntimeConfig``'s defaults (``max_adapters_per_row=None``): after
  ``rt.compile``, per row with m=1 for these selections (no row mixes adapters), the stacked
  in-place graph compiled next to it for selections that do.

A decode step reads every weight once, so the floor for k adapters is the base weights plus k
adapters' factors; the gather reads them, writes a copy and reads it again.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import figure, interleaved, note, note_ratios
from .gpu_check import random_state

BATCH, RANK, SLOTS, KS = 16, 16, 16, (1, 4, 8, 16)
MODES = {"default": dict(),
         "gather": dict(max_adapters_per_row=SLOTS, slot_reads="gather"),
         "in_place": dict(max_adapters_per_row=SLOTS, slot_reads="in_place"),
         "per_row m=1": dict(max_adapters_per_row=1), "per_row m=2": dict(max_adapters_per_row=2),
         "per_row m=1 reduce": dict(max_adapters_per_row=1, per_row_decode="reduce")}
DTYPE = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
IDS = torch.randint(0, 1024, (BATCH, 1), generator=torch.Generator().manual_seed(0))


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32)
    return LlamaForCausalLM(config).to(DTYPE).eval()


def _runtime(mode: str) -> HotswapRuntime:
    rt = HotswapRuntime(_llama(), RuntimeConfig(
        target_modules="all-linear", max_rank=RANK, device_slots=SLOTS, host_slots=SLOTS,
        max_batch_size=BATCH, **MODES[mode]))
    for i in range(SLOTS):
        state, config = random_state(rt, RANK, seed=i)
        rt.load(f"a{i}", state_dict=state, config=config)
    rt.activate_rows([f"a{i}" for i in range(BATCH)])
    with torch.no_grad():
        rt.compile(IDS)
    return rt


@pytest.mark.slow
def test_mixed_decode_cost_per_k() -> None:
    group = (f"decode step, batch {BATCH}, Llama-7B layer shapes x2 {str(DTYPE).split('.')[-1]}, "
             f"all-linear r={RANK}, k distinct adapters (ratio to the uninjected compiled model)")
    torch._dynamo.reset()
    plain = torch.compile(_llama())
    runtimes = {mode: _runtime(mode) for mode in MODES}

    def step(rt: HotswapRuntime, k: int):
        def run():
            rt.activate_rows([f"a{i % k}" for i in range(BATCH)])
            return rt.model(input_ids=IDS)
        return run

    cases = {"uninjected compiled model": lambda: plain(input_ids=IDS)}
    for mode, rt in runtimes.items():
        for k in KS:
            cases[f"{mode} k={k}"] = step(rt, k)
    with torch.no_grad():
        for run in cases.values():  # warm up (the uninjected model compiles here)
            run()
        medians = interleaved(cases, rounds=15)
    note_ratios(group, medians, "uninjected compiled model", "")
    base = medians["uninjected compiled model"]
    for mode in MODES:
        note(group, f"{mode}: " + ", ".join(
            f"k={k} {medians[f'{mode} k={k}'] / base:.3f}x" for k in KS))
        for k in KS:
            figure(f"mixed_decode/{mode}/k{k}", medians[f"{mode} k={k}"] / base)
    for rt in runtimes.values():
        assert rt.guard.recompiles == 0
