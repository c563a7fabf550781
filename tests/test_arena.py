"""Device memory (:mod:`hotswap_rt.arena`) and staging into it (:mod:`hotswap_rt.staging`):
the layout of a slot row, zero padding, scaling folded into B, shape checks."""

from __future__ import annotations

import pytest
import torch

from hotswap_rt.arena import SlotArena, factor_views
from hotswap_rt.errors import IncompatibleAdapterError, RankTooLargeError
from hotswap_rt.peft_format import LoraModule, ParsedAdapter
from hotswap_rt.staging import Stager

LAYERS = {"q": (8, 4, torch.float32), "v": (8, 6, torch.float32), "h": (4, 4, torch.bfloat16)}


def arena(slots: int = 2) -> SlotArena:
    return SlotArena(LAYERS, max_rank=3, num_slots=slots, device=torch.device("cpu"))


def adapter(**ranks: int) -> ParsedAdapter:
    torch.manual_seed(0)
    modules = {}
    for name, rank in ranks.items():
        d_in, d_out, _ = LAYERS[name]
        modules[name] = LoraModule(torch.randn(rank, d_in), torch.randn(d_out, rank), rank,
                                   alpha=2.0 * rank, scaling=2.0)
    return ParsedAdapter(rank=2, alpha=4.0, use_rslora=False, modules=modules)


def test_one_row_per_dtype_layers_back_to_back() -> None:
    slots = arena()
    assert [(n, layout.offset) for n, layout in slots.layouts.items()] == [("q", 0), ("v", 36), ("h", 0)]
    assert slots.row_sizes == {torch.float32: 36 + 42, torch.bfloat16: 24}
    assert slots.slot_nbytes == (36 + 42) * 4 + 24 * 2


def test_staged_rows_are_padded_scaled_slot_rows() -> None:
    slots = arena()
    parsed = adapter(q=2, h=1)
    staged = Stager(slots).stage(parsed)
    a, b = factor_views(staged.rows[torch.float32], slots.layouts["q"], 3)
    assert torch.equal(a[:2], parsed.modules["q"].lora_A) and a[2].abs().sum() == 0
    assert torch.equal(b[:, :2], parsed.modules["q"].lora_B * 2.0) and b[:, 2].abs().sum() == 0
    a_v, b_v = factor_views(staged.rows[torch.float32], slots.layouts["v"], 3)
    assert a_v.abs().sum() == 0 and b_v.abs().sum() == 0  # a layer it does not target
    _, b_h = factor_views(staged.rows[torch.bfloat16], slots.layouts["h"], 3)
    assert torch.equal(b_h[:, :1], (parsed.modules["h"].lora_B * 2.0).to(torch.bfloat16))
    unscaled = Stager(slots).stage(parsed, fold_scaling=False)
    _, b = factor_views(unscaled.rows[torch.float32], slots.layouts["q"], 3)
    assert torch.equal(b[:, :2], parsed.modules["q"].lora_B)


def test_write_slot_copies_exactly_one_row() -> None:
    slots = arena()
    staged = Stager(slots).stage(adapter(q=2, v=3))
    slots.write_slot(1, staged.rows)
    assert torch.equal(slots.arenas[torch.float32][1], staged.rows[torch.float32])
    assert slots.arenas[torch.float32][0].abs().sum() == 0
    a, b = slots.slot_factors(1, "v", 3)
    assert a.shape == (3, 8) and b.shape == (6, 3)


@pytest.mark.parametrize("module, error, match", [
    ("k", IncompatibleAdapterError, "not an injected layer"),
    ("rank", RankTooLargeError, "max_rank=3"),
    ("shape", IncompatibleAdapterError, "do not fit the layer"),
])
def test_staging_refuses_what_does_not_fit(module, error, match) -> None:
    if module == "k":
        bad = ParsedAdapter(2, 4.0, False, {"k": adapter(q=2).modules["q"]})
    elif module == "rank":
        bad = adapter(q=4)
    else:
        bad = ParsedAdapter(2, 4.0, False, {"v": adapter(q=2).modules["q"]})
    with pytest.raises(error, match=match):
        Stager(arena()).stage(bad)
