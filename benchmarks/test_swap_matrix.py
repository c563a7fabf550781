"""Swap latency across adapter ranks and target sets, next to a ``copy_`` and to PEFT.

For a 4-layer hidden-512 Llama and a 2-layer stack with Llama-7B layer shapes (fp32), adapters
of rank 4, 16 and 64 on the attention projections (q/k/v/o) and on every linear layer, in a
runtime with ``max_rank=64`` and one device slot (every activation copies ring -> slot):

- ``copy_`` of the adapter's true bytes (two sources alternating into one destination): the
  floor for what hotswap_rt copies. Slots are laid out rank-major, so a rank-``r`` adapter is one
  contiguous prefix of ``r`` rank blocks: one copy of its own bytes, not of max_rank's.
- hotswap_rt ``rt.activate`` (ring -> slot copy + selection flip).
- PEFT ``hotswap_adapter_from_state_dict`` (state dict in memory; PEFT copies the true-rank
  tensors layer by layer) and PEFT ``hotswap_adapter`` (from disk), on a PeftModel loaded with an
  adapter of the same rank and targets.

All four are timed interleaved, call by call. One table row per (targets, rank). Printed,
never asserted.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.peft_format import LoraModule, ParsedAdapter, write_adapter_dir

from .conftest import figure, interleaved, table_row

MAX_RANK = 64
RANKS = [4, 16, 64]
TARGET_SETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}
SHAPES = {
    "llama h512 x4": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, rounds=100),
    "llama-7B layer shapes x2": dict(hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=2, num_attention_heads=32, rounds=15),
}
COLUMNS = ["targets", "rank", "slot row MiB", "adapter MiB", "copy_ adapter bytes ms",
           "hotswap_rt activate ms", "vs copy_", "PEFT from_state_dict ms", "PEFT from disk ms",
           "hotswap_rt speed-up vs PEFT (state dict / disk)"]


def random_adapter_dir(model: torch.nn.Module, targets, rank: int, seed: int, path: Path) -> Path:
    """Write a random PEFT-format LoRA adapter (alpha = 2 * rank) for ``model``'s linear layers
    named in ``targets`` (a list of suffixes, or ``"all-linear"``: every linear but lm_head)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets:
            continue
        modules[name] = LoraModule(
            lora_A=torch.randn(rank, module.in_features, generator=generator) / module.in_features,
            lora_B=torch.randn(module.out_features, rank, generator=generator) / rank,
            rank=rank, alpha=2.0 * rank, scaling=2.0)
    return write_adapter_dir(ParsedAdapter(rank=rank, alpha=2.0 * rank, use_rslora=False,
                                           modules=modules, task_type="CAUSAL_LM"), path)


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request):
    settings = dict(SHAPES[request.param])
    rounds = settings.pop("rounds")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, num_key_value_heads=settings["num_attention_heads"],
                         **settings)
    return request.param, LlamaForCausalLM(config).eval(), rounds


@pytest.mark.parametrize("targets", list(TARGET_SETS))
def test_swap_matrix(shape, targets, tmp_path) -> None:
    label, base, rounds = shape
    group = f"swap matrix, {label}, max_rank {MAX_RANK} (ring -> slot vs copy_ vs PEFT)"
    target_modules = TARGET_SETS[targets]
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        target_modules, max_rank=MAX_RANK, device_slots=1, host_slots=2 * len(RANKS)))
    peft_base = copy.deepcopy(base)
    ours_by_rank: dict[int, float] = {}
    for rank in RANKS:
        paths = [random_adapter_dir(base, target_modules, rank, seed, tmp_path / f"r{rank}-{seed}")
                 for seed in (1, 2)]
        for i, path in enumerate(paths):
            rt.load(f"r{rank}-{i}", path)
        names = itertools.cycle([f"r{rank}-1", f"r{rank}-0"])
        rt.activate(f"r{rank}-0")
        nbytes = rt.info(f"r{rank}-0").bytes  # its host row: the rank prefix, fp32
        sources = itertools.cycle([torch.randn(nbytes // 4), torch.randn(nbytes // 4)])
        destination = torch.empty(rt.slot_nbytes // 4)[: nbytes // 4]
        peft_model = PeftModel.from_pretrained(peft_base, str(paths[0])).eval()
        peft_config = LoraConfig.from_pretrained(str(paths[1]))
        files = [load_file(str(p / "adapter_model.safetensors")) for p in paths]
        states = itertools.cycle([_insert_adapter_name_into_state_dict(
            f, adapter_name="default", parameter_prefix="lora_") for f in files])
        peft_paths = itertools.cycle([str(p) for p in paths])
        swaps_before = rt.stats()["swaps"]
        medians = interleaved({
            "copy_": lambda: destination.copy_(next(sources)),
            "ours": lambda: rt.activate(next(names)),
            "peft state dict": lambda: hotswap_adapter_from_state_dict(
                peft_model, next(states), "default", peft_config),
            "peft disk": lambda: hotswap_adapter(peft_model, next(peft_paths), "default"),
        }, rounds=rounds)
        assert rt.stats()["swaps"] - swaps_before == rounds  # every activation copied
        adapter_bytes = sum(t.numel() * t.element_size() for t in files[0].values())
        ms = {name: f"{value * 1e3:.3f}" for name, value in medians.items()}
        ours_by_rank[rank] = medians["ours"]
        table_row(group, COLUMNS, [
            targets, rank, f"{rt.slot_nbytes / 2**20:.2f}", f"{adapter_bytes / 2**20:.2f}", ms["copy_"],
            ms["ours"], f"{medians['ours'] / medians['copy_']:.2f}x", ms["peft state dict"],
            ms["peft disk"], f"{medians['peft state dict'] / medians['ours']:.1f}x / "
                             f"{medians['peft disk'] / medians['ours']:.1f}x"])
        key = f"{label}/{targets}/r{rank}"
        figure(f"swap_vs_copy/{key}", medians["ours"] / medians["copy_"])
        figure(f"swap_speedup_vs_peft_state_dict/{key}", medians["peft state dict"] / medians["ours"])
        figure(f"swap_speedup_vs_peft_disk/{key}", medians["peft disk"] / medians["ours"])
        peft_base = peft_model.unload()  # the same base weights, without PEFT's layers
        for i in range(2):
            rt.unload(f"r{rank}-{i}", force=True)
    top = max(RANKS)
    for rank in RANKS:
        figure(f"swap_vs_rank{top}_swap/{label}/{targets}/r{rank}", ours_by_rank[rank] / ours_by_rank[top])
    print(f"    {label} {targets}: swap time / rank-{top} swap: " + ", ".join(
        f"r{rank} {ours_by_rank[rank] / ours_by_rank[top]:.3f}x" for rank in RANKS))
