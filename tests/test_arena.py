"""Device memory (:mod:`hotswap_rt.arena`) and staging into it (:mod:`hotswap_rt.staging`):
the layout of a slot row, zero padding, scaling folded into B, shape checks."""

from __future__ import annotations

import pytest
import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.arena import SlotArena, factor_views
from hotswap_rt.errors import HotswapError, IncompatibleAdapterError, RankTooLargeError
from hotswap_rt.peft_format import LoraModule, ParsedAdapter
from hotswap_rt.staging import Stager

from .conftest import BaseModel

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


def test_rank_major_rows_one_per_dtype() -> None:
    slots = arena()
    assert [(n, layout.offset) for n, layout in slots.layouts.items()] == [("q", 0), ("v", 12), ("h", 0)]
    assert slots.rank_widths == {torch.float32: 12 + 14, torch.bfloat16: 8}
    assert slots.row_sizes == {torch.float32: 3 * 26, torch.bfloat16: 3 * 8}
    assert slots.slot_nbytes == 3 * 26 * 4 + 3 * 8 * 2


def test_staged_rows_are_the_rank_prefix_scaled() -> None:
    """A host row holds the adapter's own ranks only (its largest per dtype), B scaled."""
    slots = arena()
    parsed = adapter(q=2, h=1)
    staged = Stager(slots).stage(parsed)
    assert staged.rows[torch.float32].numel() == 2 * 26 and staged.rows[torch.bfloat16].numel() == 8
    assert staged.nbytes == 2 * 26 * 4 + 8 * 2
    a, b = factor_views(staged.rows[torch.float32], slots.layouts["q"], 26)
    assert torch.equal(a, parsed.modules["q"].lora_A)
    assert torch.equal(b, parsed.modules["q"].lora_B * 2.0)
    a_v, b_v = factor_views(staged.rows[torch.float32], slots.layouts["v"], 26)
    assert a_v.abs().sum() == 0 and b_v.abs().sum() == 0  # a layer it does not target
    _, b_h = factor_views(staged.rows[torch.bfloat16], slots.layouts["h"], 8)
    assert torch.equal(b_h, (parsed.modules["h"].lora_B * 2.0).to(torch.bfloat16))
    unscaled = Stager(slots).stage(parsed, fold_scaling=False)
    _, b = factor_views(unscaled.rows[torch.float32], slots.layouts["q"], 26)
    assert torch.equal(b, parsed.modules["q"].lora_B)


WIDE = {"q": (8, 4, torch.float32), "v": (8, 6, torch.float32), "o": (6, 8, torch.float32),
        "k": (8, 5, torch.float32), "h": (4, 4, torch.bfloat16)}


@pytest.mark.parametrize("fold_scaling", [True, False])
def test_large_layers_are_staged_piece_by_piece_to_the_same_bits(monkeypatch, fold_scaling: bool) -> None:
    """Rank blocks of large layers are written piece by piece, B scaled by a matmul with a
    scaled identity (instead of one cat and a scaling pass): the rows are bit for bit those of
    the cat, with a layer the adapter leaves out (zeros), a module of a smaller rank (the
    per-module path), scalings that differ per module, subnormal values, and a bf16 layer
    (always the cat). When fp32 matmuls may run narrower
    (``set_float32_matmul_precision("medium")``) the cat is used."""
    slots = SlotArena(WIDE, max_rank=3, num_slots=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    modules = {}
    for name, rank, scaling in (("q", 3, 2.0), ("v", 3, 0.37), ("o", 2, 1.5), ("h", 3, 2.0)):
        d_in, d_out, _ = WIDE[name]
        modules[name] = LoraModule(torch.randn(rank, d_in), torch.randn(d_out, rank) * 1e3, rank,
                                   alpha=scaling * rank, scaling=scaling)
    modules["v"].lora_B[:2, 1] = torch.tensor([1e-40, -3e-39])  # subnormal: scaled exactly too
    parsed = ParsedAdapter(rank=3, alpha=6.0, use_rslora=False, modules=modules)  # "k": left out
    stager = Stager(slots)
    pieces = []
    write_pieces = stager._write_pieces
    monkeypatch.setattr(stager, "_write_pieces", lambda *args: pieces.append(1) or write_pieces(*args))

    def stage(min_bytes: int) -> dict[torch.dtype, torch.Tensor]:
        monkeypatch.setattr(Stager, "PIECEWISE_MIN_BYTES", min_bytes)
        return stager.stage(parsed, fold_scaling=fold_scaling).rows

    by_cat = stage(1 << 40)
    assert not pieces
    by_piece = stage(0)
    assert pieces == [1]  # the fp32 row only
    assert by_cat.keys() == by_piece.keys()
    for dtype in by_cat:
        assert torch.equal(by_cat[dtype], by_piece[dtype])
    _, b_v = factor_views(by_piece[torch.float32], slots.layouts["v"], slots.rank_widths[torch.float32])
    assert torch.equal(b_v, modules["v"].lora_B * (0.37 if fold_scaling else 1.0))
    assert torch.equal(factor_views(by_piece[torch.float32], slots.layouts["k"],
                                    slots.rank_widths[torch.float32])[0], torch.zeros(3, 8))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    narrow = stage(0)
    assert pieces == [1] and torch.equal(narrow[torch.float32], by_cat[torch.float32])


def test_write_slot_copies_the_prefix_and_clears_what_the_last_occupant_left() -> None:
    slots = arena()
    stager = Stager(slots)
    big = stager.stage(adapter(q=2, v=3))
    slots.write_slot(1, big.rows)
    fp32 = slots.arenas[torch.float32]
    assert torch.equal(fp32[1], big.rows[torch.float32])  # rank 3 = max_rank: the whole row
    assert fp32[0].abs().sum() == 0 and slots.filled[1] == {torch.float32: 3, torch.bfloat16: 0}
    a, b = slots.slot_factors(1, "v", 3)
    assert a.shape == (3, 8) and b.shape == (6, 3)
    small = stager.stage(adapter(q=1))
    slots.write_slot(1, small.rows)
    assert torch.equal(fp32[1, :26], small.rows[torch.float32]) and fp32[1, 26:].abs().sum() == 0
    assert slots.filled[1][torch.float32] == 1
    a, b = slots.slot_factors(1, "q", 1)
    assert torch.equal(a, adapter(q=1).modules["q"].lora_A)
    assert torch.equal(b, adapter(q=1).modules["q"].lora_B * 2.0)


def test_write_slot_refuses_a_row_that_is_not_a_whole_rank_prefix_every_time() -> None:
    """The size check runs before the write plan is kept: a bad size raises on every write and
    leaves the slot as it was; a good write of the same slot after it still lands."""
    slots = arena()
    good = Stager(slots).stage(adapter(q=2)).rows
    slots.write_slot(0, good)
    before = slots.arenas[torch.float32].clone()
    for size in (25, 27, 4 * 26):  # not whole rank blocks of W=26, more than max_rank=3 blocks
        for _ in range(2):
            with pytest.raises(ValueError, match="not a prefix"):
                slots.write_slot(0, {torch.float32: torch.ones(size)})
            assert torch.equal(slots.arenas[torch.float32], before)
    slots.write_slot(0, {torch.float32: torch.ones(26)})
    assert torch.equal(slots.arenas[torch.float32][0, :26], torch.ones(26))
    assert slots.arenas[torch.float32][0, 26:].abs().sum() == 0 and slots.filled[0][torch.float32] == 1


def test_extend_keeps_slots_and_relayouts_rows() -> None:
    """Lazy injection appends a layer to every rank block: slot contents and staged rows keep
    their values at the same (layer, rank) positions, the new layer reads zero."""
    slots = arena()
    stager = Stager(slots)
    parsed = adapter(q=2, v=3)
    staged = stager.stage(parsed)
    slots.write_slot(0, staged.rows)
    slots.extend({"new": (5, 5, torch.float32)})
    assert slots.rank_widths[torch.float32] == 36 and slots.layouts["new"].offset == 26
    a, b = slots.slot_factors(0, "v", 3)
    assert torch.equal(b, parsed.modules["v"].lora_B * 2.0)
    assert all(t.abs().sum() == 0 for t in slots.slot_factors(0, "new", 3))
    stager.fit_rows(staged)
    assert staged.rows[torch.float32].numel() == 3 * 36
    slots.write_slot(1, staged.rows)
    assert torch.equal(slots.arenas[torch.float32][1], slots.arenas[torch.float32][0])


def test_fit_rows_gives_a_new_dtype_a_zero_row_that_writes_zeros() -> None:
    """Layers of another dtype injected after an adapter was staged: its rows get a zero row of
    that dtype (pinned on an accelerator: tests/test_cuda.py), and a write of them clears what
    the slot held there."""
    slots = arena()
    stager = Stager(slots)
    staged = stager.stage(adapter(q=2))
    slots.extend({"half": (4, 4, torch.float16)})
    slots.enable_vectors()  # the new dtype's row then holds its scale vectors: not empty
    slots.write_slot(0, {torch.float16: torch.ones(slots.row_sizes[torch.float16], dtype=torch.float16)})
    stager.fit_rows(staged)
    row = staged.rows[torch.float16]
    assert row.dtype == torch.float16 and row.numel() == slots.vector_sizes[torch.float16] > 0
    assert not row.is_pinned()  # a CPU arena: nothing to pin for
    slots.write_slot(0, staged.rows)
    assert slots.arenas[torch.float16][0].abs().sum() == 0


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


def test_an_arena_too_large_to_allocate_is_a_clear_error() -> None:
    """A size past what can be allocated (here past int64, so nothing is attempted) names the
    arena's size and the knobs, instead of PyTorch's allocator error."""
    base = BaseModel("llama", seed=1)
    with pytest.raises(HotswapError, match=r"cannot allocate the torch.float32 slot arena .* lower max_rank"):
        HotswapRuntime(base.clone(), RuntimeConfig(["q_proj"], max_rank=2**60))
