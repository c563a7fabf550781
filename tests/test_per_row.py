"""Per-row LoRA (``RuntimeConfig.max_adapters_per_row`` < ``max_active_adapters``): each row is
computed with only its own adapters' factors. Same outputs as PEFT (and as the stacked path),
eager and compiled with no recompile, and a row that combines too many adapters is refused with
nothing changed."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig, SelectionError

from .conftest import ATTENTION_TARGETS, BaseModel, assert_unchanged, logits, max_diff, snapshot_state

TOL = 1e-4
SPECS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=16, lora_alpha=32, use_rslora=True),
         "c": dict(r=8, lora_alpha=8, rank_pattern={"v_proj": 2})}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=21)
    root = tmp_path_factory.mktemp("per-row")
    paths = {n: base.make_adapter(root / n, seed=200 + i, **s) for i, (n, s) in enumerate(SPECS.items())}
    return base, paths, base.peft_reference(paths)


def runtime(env, per_row: int) -> HotswapRuntime:
    base, paths, _ = env
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4, max_adapters_per_row=per_row))
    for name, path in paths.items():
        rt.load(name, path)
    return rt


@pytest.mark.parametrize("per_row", [1, 2])
def test_rows_match_peft(env, input_ids, per_row) -> None:
    _, _, reference = env
    rt = runtime(env, per_row)
    assert rt.internals.selection.per_row
    for name in SPECS:
        reference.base_model.set_adapter(name)
        rt.activate(name)
        assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) <= TOL
    rows = ["b", None, "a", "c"]
    rt.activate_rows(rows)
    expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
    assert max_diff(logits(rt.model, input_ids), expected) <= TOL


def test_weighted_pairs_per_row_match_the_stacked_path(env, input_ids) -> None:
    per_row, stacked = runtime(env, 2), runtime(env, 4)
    assert not stacked.internals.selection.per_row
    rows = [{"a": 1.0, "b": 0.5}, "c", None, {"c": -0.25, "a": 2.0}]
    for rt in (per_row, stacked):
        rt.activate_rows(rows)
    assert max_diff(logits(per_row.model, input_ids), logits(stacked.model, input_ids)) <= 1e-5
    per_row.activate({"a": 1.0, "c": 1.0})  # uniform weighted sum
    stacked.activate({"a": 1.0, "c": 1.0})
    assert max_diff(logits(per_row.model, input_ids), logits(stacked.model, input_ids)) <= 1e-5


def test_a_row_over_the_limit_is_refused_with_nothing_changed(env, input_ids) -> None:
    rt = runtime(env, 1)
    rt.activate_rows(["a", "b", None, "c"])
    before = snapshot_state(rt, input_ids)
    with pytest.raises(SelectionError, match="max_adapters_per_row=1"):
        rt.activate_rows(["a", {"a": 1.0, "b": 1.0}, None, None])
    with pytest.raises(SelectionError, match="max_adapters_per_row=1"):
        rt.activate({"a": 0.5, "c": 0.5})
    assert_unchanged(before, snapshot_state(rt, input_ids))


@pytest.mark.slow
def test_compiled_per_row_switches_without_recompiling(env, input_ids) -> None:
    _, _, reference = env
    torch._dynamo.reset()
    rt = runtime(env, 1)
    rt.activate_rows(["a", "a", "a", "a"])
    rt.compile(input_ids, guard="raise")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (["b", None, "a", "c"], ["c", "c", "b", None], [None] * 4):
            rt.activate_rows(rows)
            expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
            assert max_diff(logits(rt.model, input_ids), expected) <= TOL
    assert rt.guard.recompiles == 0


@pytest.mark.parametrize("slot_reads, in_place", [("gather", False), ("in_place", True), ("auto", True)])
def test_slot_reads_gather_and_in_place_equal_peft(env, input_ids, slot_reads, in_place) -> None:
    """The stacked product reading the selected slots gathered, or every slot in place
    (unselected ones at weight 0), gives PEFT's rows either way."""
    base, paths, reference = env
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4, slot_reads=slot_reads))
    for name, path in paths.items():
        rt.load(name, path)
    assert rt.internals.selection.in_place is in_place
    assert rt.internals.selection.row_weights.shape == (64, 4)
    rows = ["c", "a", None, "b"]
    rt.activate_rows(rows)
    expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
    assert max_diff(logits(rt.model, input_ids), expected) <= TOL
    reference.base_model.set_adapter("b")
    rt.activate("b")
    assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) <= TOL


def test_auto_gathers_when_fewer_positions_than_slots() -> None:
    assert not RuntimeConfig(device_slots=4, max_active_adapters=2).reads_slots_in_place
    assert RuntimeConfig(device_slots=4, max_active_adapters=2, slot_reads="in_place").reads_slots_in_place
    with pytest.raises(HotswapError, match="slot_reads"):
        RuntimeConfig(slot_reads="fast")


def test_overflowing_rows_run_the_stacked_graph_without_recompiling(env, input_ids) -> None:
    """``per_row_overflow="stacked"``: selections whose rows use one adapter each run per row,
    one with a row mixing more runs the stacked product; both compiled (with every rank
    bucket) at ``rt.compile``, so switching between them never recompiles."""
    base, paths, reference = env
    torch._dynamo.reset()
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4, max_adapters_per_row=1,
        per_row_overflow="stacked", rank_buckets=(4,)))
    for name, path in paths.items():
        rt.load(name, path)
    rt.activate_rows(["a", "b", None, "c"])

    calls = itertools.count()

    def warm_up(model) -> None:  # writes a new selection each time, as the engine's warm-up
        # does: the graph variant rt.compile holds must still be the one traced
        rt.activate_rows([None] * 4 if next(calls) % 2 else ["a", None, None, None])
        model(input_ids)

    rt.compile(warmup=warm_up, guard="raise")
    stacked = runtime(env, 4)
    selections = [["b", None, "a", "c"], [{"a": 1.0, "b": 0.5}, "c", None, {"c": -0.25, "a": 2.0}],
                  ["a", "a", None, None], [{"a": 1.0, "c": 1.0}, None, None, None], [None] * 4]
    for rows in selections:
        rt.activate_rows(rows)
        stacked.activate_rows(rows)
        one_each = all(row is None or isinstance(row, str) for row in rows)
        assert rt.internals.selection.per_row is one_each
        assert max_diff(logits(rt.model, input_ids), logits(stacked.model, input_ids)) <= 1e-5
        if one_each:
            expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
            assert max_diff(logits(rt.model, input_ids), expected) <= TOL
    rt.activate({"a": 1.0, "c": 1.0})  # a uniform weighted sum: stacked
    stacked.activate({"a": 1.0, "c": 1.0})
    assert max_diff(logits(rt.model, input_ids), logits(stacked.model, input_ids)) <= 1e-5
    assert rt.guard.recompiles == 0


def test_per_row_overflow_is_validated() -> None:
    with pytest.raises(HotswapError, match="per_row_overflow"):
        RuntimeConfig(per_row_overflow="split")
    with pytest.raises(HotswapError, match="max_adapters_per_row"):  # per row = all 4: nothing overflows
        RuntimeConfig(device_slots=4, max_adapters_per_row=4, per_row_overflow="stacked")
    with pytest.raises(HotswapError, match="explicit max_adapters_per_row"):  # auto always overflows
        RuntimeConfig(device_slots=4, per_row_overflow="refuse")
    auto = RuntimeConfig(device_slots=4)
    assert auto.per_row_auto and auto.adapters_per_row == 1 and auto.mixes_overflow == "stacked"
    assert RuntimeConfig(device_slots=4, max_adapters_per_row=2).mixes_overflow == "refuse"
    assert not RuntimeConfig(device_slots=1).per_row_auto  # one active adapter: nothing to choose


def test_default_reads_per_row_once_compiled_and_stacked_for_mixes(env, input_ids) -> None:
    """``max_adapters_per_row=None`` (the default): eager (or under the user's own
    ``torch.compile``) every selection runs the stacked product, one graph; ``rt.compile``
    compiles the per-row graph (one adapter per row) next to it and selections without a mixed
    row run per row; outputs equal PEFT's, no recompile; a failed ``rt.compile`` leaves the
    stacked product."""
    base, paths, reference = env
    torch._dynamo.reset()
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4))
    for name, path in paths.items():
        rt.load(name, path)
    selection = rt.internals.selection
    rows = ["c", "a", None, "b"]
    rt.activate_rows(rows)
    assert not selection.per_row and selection.row_slots.shape == (64, 1)
    with pytest.raises(HotswapError, match="needs example_inputs"):
        rt.compile()
    assert not selection.per_row  # the failed compile put the stacked product back
    rt.compile(input_ids, guard="raise")
    assert selection.per_row  # the selection written before compiling now runs per row
    assert selection.row_slots[:4, 0].tolist() == [rt.info(n).slot if n else 0 for n in rows]
    expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
    assert max_diff(logits(rt.model, input_ids), expected) <= TOL
    stacked = runtime(env, 4)
    for spec in [{"a": 1.0, "b": 0.5}, "b", [{"a": 2.0, "c": -1.0}, "c", None, "a"], None]:
        select = rt.activate_rows if isinstance(spec, list) else rt.activate
        select(spec)
        (stacked.activate_rows if isinstance(spec, list) else stacked.activate)(spec)
        mixed = isinstance(spec, dict) or isinstance(spec, list)
        assert selection.per_row is not mixed
        assert max_diff(logits(rt.model, input_ids), logits(stacked.model, input_ids)) <= 1e-5
    assert rt.guard.recompiles == 0


@pytest.mark.parametrize("layout", [dict(slot_reads="in_place"), dict(max_active_adapters=2),
                                    dict(max_adapters_per_row=2)])
def test_an_unselected_adapter_whose_product_overflows_changes_no_row(env, input_ids, layout) -> None:
    """Finite factors whose product with x overflows float32 (inf) give inf * 0 = NaN if a weight
    of 0 multiplies them: read in place while unselected, as a padding position (gathered or per
    row: slot 0, which it holds), or as a freed slot's stale bytes. A weight of 0 adds exactly
    nothing, so the other adapters' rows stay as they were, bit for bit."""
    from safetensors.torch import load_file

    base, paths, _ = env
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4,
                                                    **layout))
    state = load_file(str(paths["a"] / "adapter_model.safetensors"))
    huge = {key: torch.full_like(t, 3e38) if ".lora_A." in key else t for key, t in state.items()}
    config = {"r": 4, "lora_alpha": 8, "target_modules": ATTENTION_TARGETS["llama"]}
    rt.load("huge", state_dict=huge, config=config)
    assert rt.info("huge").slot == 0
    rt.activate("huge")
    assert not torch.isfinite(logits(rt.model, input_ids)).all()  # it does overflow when selected
    rt.activate(None)
    rt.unload("huge")
    rt.load("a", paths["a"])
    rt.load("c", paths["c"])
    rows = ["a", None, "c", "a"]
    rt.activate_rows(rows)
    clean = logits(rt.model, input_ids)  # slot 0 now holds "a": nothing huge is left anywhere
    assert torch.isfinite(clean).all()
    rt.activate(None)
    rt.unload("a")
    rt.load("huge", state_dict=huge, config=config)
    rt.load("a", paths["a"])
    assert rt.info("huge").slot == 0
    rt.activate_rows(rows)
    assert torch.equal(logits(rt.model, input_ids), clean)  # resident, unselected
    rt.unload("huge")
    rt.activate_rows(rows)
    assert torch.equal(logits(rt.model, input_ids), clean)  # its stale bytes in a freed slot


@pytest.mark.parametrize("per_row", [1, 2])
def test_per_row_decode_reduce_equals_peft_eager_and_compiled(env, input_ids, per_row) -> None:
    """``per_row_decode="reduce"``: one-token steps read each row's slots in place (a broadcast
    product summed); PEFT's rows, eager and compiled without a recompile; longer inputs still
    run the batched matmuls (PEFT's rows too)."""
    base, paths, reference = env
    torch._dynamo.reset()
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=4, max_adapters_per_row=per_row,
        per_row_decode="reduce"))
    for name, path in paths.items():
        rt.load(name, path)
    assert rt.internals.selection.per_row and rt.internals.selection.per_row_decode_reduce
    one_token = input_ids[:, :1]
    rows = ["b", None, "a", "c"]
    calls = []
    layer = rt.internals.layers["model.layers.0.self_attn.q_proj"]
    original = layer._per_row_reduce
    layer._per_row_reduce = lambda x: calls.append(x.shape) or original(x)
    for ids in (one_token, input_ids):
        rt.activate_rows(rows)
        expected = logits(reference, ids, adapter_names=[r or "__base__" for r in rows])
        assert max_diff(logits(rt.model, ids), expected) <= TOL
    assert calls == [torch.Size([4, 1, 64])]  # the one-token step only
    layer._per_row_reduce = original
    if per_row == 2:  # weighted pairs in a row: the stacked runtime gives the reference
        stacked = runtime(env, 4)
        pairs = [{"a": 1.0, "b": 0.5}, "c", None, {"c": -0.25, "a": 2.0}]
        rt.activate_rows(pairs)
        stacked.activate_rows(pairs)
        assert max_diff(logits(rt.model, one_token), logits(stacked.model, one_token)) <= 1e-5
    rt.activate_rows(rows)
    rt.compile(one_token, guard="raise")
    for selection in (["a", "a", None, "b"], rows):
        rt.activate_rows(selection)
        expected = logits(reference, one_token, adapter_names=[r or "__base__" for r in selection])
        assert max_diff(logits(rt.model, one_token), expected) <= TOL
    assert rt.guard.recompiles == 0


def test_per_row_decode_is_validated() -> None:
    with pytest.raises(HotswapError, match="per_row_decode"):
        RuntimeConfig(per_row_decode="fused")


def test_per_row_decode_auto_reads_in_place_on_cuda_only(env) -> None:
    """The default ``per_row_decode="auto"`` resolves by the model's device: in place
    ("reduce") on CUDA, where gpu_check measured it faster, gathered ("bmm") elsewhere; an
    explicit choice holds on every device."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert RuntimeConfig().per_row_decode == "auto"
    assert RuntimeConfig().reduces_per_row_decode(cuda) and not RuntimeConfig().reduces_per_row_decode(cpu)
    for device in (cuda, cpu):
        assert RuntimeConfig(per_row_decode="reduce").reduces_per_row_decode(device)
        assert not RuntimeConfig(per_row_decode="bmm").reduces_per_row_decode(device)
    rt = runtime(env, 1)
    assert rt.internals.selection.per_row and rt.internals.selection.per_row_decode_reduce is False  # CPU
