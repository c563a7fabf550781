"""Adapters saved against the unfused per-expert layout, converted to fused expert parameters.

transformers 4 kept a MoE layer's experts as a list of MLPs, so LoRA adapters trained on it name
each expert's projections: ``<block>.experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``
(Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek, ...) or ``<block>.experts.<e>.w1`` / ``w3`` / ``w2``
(Mixtral, whose ``block_sparse_moe`` is ``mlp`` in transformers 5). transformers 5 fuses them into
``experts.gate_up_proj`` ``[E, 2*I, H]`` (each expert's gate rows, then its up rows) and
``experts.down_proj`` ``[E, H, I]`` (its conversion mapping), which is what the slots hold.

The conversion is exact: for expert ``e``, the gate and up deltas stack into one delta of rank
``r_gate + r_up`` with ``A_e = [A_gate; A_up]`` and ``B_e = [[B_gate, 0], [0, B_up]]`` (PEFT's
own conversion does the same). Experts or projections the adapter leaves out get zero factors
(no delta); experts of different ranks are zero-padded to the largest; a projection whose
scaling differs from the first one's has the ratio folded into its B. The fused module is then
an ordinary expert-parameter LoRA (``target_parameters``), and ``save`` writes it in the fused
layout that PEFT on transformers 5 reads.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from .errors import AdapterFormatError
from .experts import is_experts_module
from .peft_format import EXPERTS, LINEAR, LoraModule, ParsedAdapter

# per-expert projection -> (fused parameter, its block in the fused rows)
_FUSED_BLOCKS = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0),
}
_BLOCKS_OF = {"gate_up_proj": 2, "down_proj": 1}
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
_RENAMED_BLOCKS = (("block_sparse_moe", "mlp"),)  # Mixtral's MoE block in transformers 5


def fuse_per_expert_modules(adapter: ParsedAdapter, model: nn.Module) -> ParsedAdapter:
    """``adapter`` with every per-expert module that ``model`` holds fused replaced by one
    expert-parameter module ``<experts module>.<param>`` (unchanged when it has none).

    Raises:
        AdapterFormatError: a per-expert module that cannot be converted (an unknown projection,
            DoRA / bias / IA3 on it, an expert index or shape the fused parameter does not have).
    """
    where = adapter.source or "state_dict"
    pieces: dict[str, dict[tuple[int, int], tuple[str, LoraModule]]] = {}  # fused name -> (expert, block)
    for name, module in adapter.modules.items():
        match = _PER_EXPERT.match(name)
        if match is None or _has_submodule(model, name):
            continue
        experts_name = _fused_experts_name(model, match["block"])
        if experts_name is None:
            continue  # not a fused model: left to the usual "not a module" error
        if match["proj"] not in _FUSED_BLOCKS:
            raise AdapterFormatError(
                f"{where}: module {name!r}: {match['proj']!r} is not an expert projection this runtime can "
                f"map onto {experts_name!r} (known: {sorted(_FUSED_BLOCKS)})")
        if module.kind != LINEAR or module.has_vectors:
            raise AdapterFormatError(f"{where}: module {name!r}: only plain LoRA on per-expert projections is "
                                     f"converted to fused experts (no DoRA, lora_bias or IA3)")
        param, block = _FUSED_BLOCKS[match["proj"]]
        slot = pieces.setdefault(f"{experts_name}.{param}", {})
        if (int(match["expert"]), block) in slot:
            raise AdapterFormatError(f"{where}: modules {slot[int(match['expert']), block][0]!r} and {name!r} "
                                     f"both map onto expert {match['expert']} of {experts_name}.{param}")
        slot[int(match["expert"]), block] = (name, module)
    if not pieces:
        return adapter
    modules = dict(adapter.modules)
    rank_pattern, alpha_pattern = {}, {}
    for fused_name, held in pieces.items():
        experts_name, _, param = fused_name.rpartition(".")
        fused = _fuse(model.get_submodule(experts_name), param, held, adapter.use_rslora,
                      f"{where}: {fused_name}")
        for name, _ in held.values():
            del modules[name]
        modules[fused_name] = fused
        if fused.rank != adapter.rank:
            rank_pattern[fused_name] = fused.rank
        if not math.isclose(fused.alpha, adapter.alpha, rel_tol=1e-9):
            alpha_pattern[fused_name] = fused.alpha
    # the fused names first (the first matching key wins); keys only per-expert modules used go
    kept = [name for name in modules if name not in pieces]
    return dataclasses.replace(
        adapter, modules=dict(sorted(modules.items())),
        rank_pattern={**rank_pattern, **_patterns_matching(adapter.rank_pattern, kept)},
        alpha_pattern={**alpha_pattern, **_patterns_matching(adapter.alpha_pattern, kept)},
        target_parameters=tuple(sorted({*adapter.target_parameters, *pieces})),
    )


def _patterns_matching(pattern: dict, names: list[str]) -> dict:
    """The keys of a rank / alpha pattern that match one of ``names`` (PEFT's suffix rule)."""
    return {key: value for key, value in pattern.items()
            if any(re.match(rf"(.*\.)?({key})$", name) for name in names)}


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fused_experts_name(model: nn.Module, block: str) -> str | None:
    """The fused experts module ``<block>.experts`` (or its transformers 5 name) in ``model``."""
    candidates = [block]
    for old, new in _RENAMED_BLOCKS:
        if block == old or block.endswith("." + old):
            candidates.append(block[: len(block) - len(old)] + new)
    for candidate in candidates:
        name = f"{candidate}.experts"
        if _has_submodule(model, name) and is_experts_module(model.get_submodule(name)):
            return name
    return None


def _fuse(experts: nn.Module, param: str, held: dict[tuple[int, int], tuple[str, LoraModule]],
          use_rslora: bool, where: str) -> LoraModule:
    """One expert-parameter module (slot matrices A ``[R, E*in]``, B ``[E*out, R]``) from the
    per-expert pieces ``(expert, block) -> (name, module)``; ``R`` = the sum over blocks of the
    largest rank in that block."""
    base = getattr(experts, "base", experts)
    weight = getattr(base, param, None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or base.is_transposed:
        raise AdapterFormatError(f"{where}: the model's {param} is not an [E, out, in] expert parameter; "
                                 f"per-expert adapters convert only onto that layout")
    n_experts, d_out, d_in = weight.shape
    blocks = _BLOCKS_OF[param]
    if d_out % blocks:
        raise AdapterFormatError(f"{where}: {d_out} fused rows do not split into {blocks} projections")
    block_out = d_out // blocks
    for (expert, _), (name, module) in held.items():
        if expert >= n_experts:
            raise AdapterFormatError(f"{where}: module {name!r}: the model has {n_experts} experts")
        if module.lora_A.shape[1] != d_in or module.lora_B.shape[0] != block_out:
            raise AdapterFormatError(
                f"{where}: module {name!r}: lora_A {tuple(module.lora_A.shape)} / lora_B "
                f"{tuple(module.lora_B.shape)} do not fit an expert projection [{block_out}, {d_in}]")
    block_ranks = [max((m.rank for (_, b), (_, m) in held.items() if b == block), default=0)
                   for block in range(blocks)]
    offsets = [sum(block_ranks[:block]) for block in range(blocks)]
    rank = sum(block_ranks)
    first = next(iter(held.values()))[1]
    scaling, dtype = first.scaling, first.lora_A.dtype
    lora_a = torch.zeros(n_experts, rank, d_in, dtype=dtype)
    lora_b = torch.zeros(n_experts, d_out, rank, dtype=dtype)
    for (expert, block), (_, module) in held.items():
        ranks = slice(offsets[block], offsets[block] + module.rank)
        rows = slice(block * block_out, (block + 1) * block_out)
        lora_a[expert, ranks] = module.lora_A.to(dtype)
        lora_b[expert, rows, ranks] = module.lora_B.to(dtype) * (module.scaling / scaling)
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)  # so that alpha / r is the kept scaling
    return LoraModule(lora_a.transpose(0, 1).reshape(rank, n_experts * d_in),
                      lora_b.reshape(n_experts * d_out, rank), rank, alpha, scaling,
                      kind=EXPERTS, kernel=(int(n_experts),))
