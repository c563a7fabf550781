"""Rank buckets (``RuntimeConfig.rank_buckets``): each forward multiplies only as many ranks as
the selected adapters hold (rounded up to a bucket); every bucket's graph is compiled at
``rt.compile`` and switching between them never recompiles. Outputs equal PEFT's in every bucket,
and a hotswap to a larger rank under a selected name moves the bucket up with it."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig

from .conftest import BaseModel, logits, max_diff

TARGETS = ["q_proj", "v_proj"]
TOL = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=3)
    root = tmp_path_factory.mktemp("buckets")
    paths = {
        "r4": base.make_adapter(root / "r4", seed=1, r=4, lora_alpha=8, target_modules=TARGETS),
        "r12": base.make_adapter(root / "r12", seed=2, r=12, lora_alpha=12, target_modules=TARGETS),
    }
    return base, paths, base.peft_reference(paths)


@pytest.mark.parametrize("config", [dict(max_adapters_per_row=2),
                                    dict(max_adapters_per_row=2, slot_reads="gather"),
                                    dict(max_adapters_per_row=1)],
                         ids=["in-place", "gather", "per-row"])
def test_every_bucket_compiled_up_front_and_equal_to_peft(env, input_ids, config) -> None:
    base, paths, reference = env
    torch._dynamo.reset()
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        TARGETS, max_rank=16, device_slots=2, rank_buckets=(8, 4), **config))
    assert rt.internals.selection.rank_buckets == (4, 8, 16)
    for name, path in paths.items():
        rt.load(name, path)
    rt.activate("r4")
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad():
        rt.compile(input_ids, guard="raise")
    assert rt.guard.compiles == 3  # one graph per bucket
    assert torch._dynamo.config.recompile_limit == limit  # raised for the warm-up only
    for name, bucket in (("r4", 4), ("r12", 16), ("r4", 4)):
        rt.activate(name)
        reference.base_model.set_adapter(name)
        assert rt.internals.selection.rank_bucket == bucket
        assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) <= TOL
    rows = ["r12", None, "r4", "r4"][: input_ids.shape[0]]
    rt.activate_rows(rows)
    assert rt.internals.selection.rank_bucket == 16
    expected = logits(reference, input_ids, adapter_names=[r or "__base__" for r in rows])
    assert max_diff(logits(rt.model, input_ids), expected) <= TOL
    rt.activate(None)
    assert rt.internals.selection.rank_bucket == 4
    assert rt.guard.recompiles == 0


def test_hotswap_to_a_larger_rank_moves_the_bucket(env, input_ids) -> None:
    """The selection is unchanged by name, but the slot now holds 12 ranks: a forward in the
    rank-4 bucket would drop 8 of them."""
    base, paths, reference = env
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=16, device_slots=1, rank_buckets=(4,)))
    rt.load("live", paths["r4"])
    rt.activate("live")
    assert rt.internals.selection.rank_bucket == 4
    rt.load("live", paths["r12"], replace=True)
    assert rt.internals.selection.rank_bucket == 16
    reference.base_model.set_adapter("r12")
    assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) <= TOL
    rt.load("live", paths["r4"], replace=True)
    assert rt.internals.selection.rank_bucket == 4


@pytest.mark.parametrize("buckets", [(), (0,), (32,), ("4",), (True,)])
def test_bad_rank_buckets_are_refused(buckets) -> None:
    with pytest.raises(HotswapError, match="rank_buckets"):
        RuntimeConfig(max_rank=16, rank_buckets=buckets)
