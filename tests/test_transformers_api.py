"""``enable_hotswap``: transformers' adapter methods served by the runtime.

The reference is PEFT's own multi-adapter model (``PeftModel``: ``load_adapter``,
``base_model.set_adapter``, ``disable_adapter``, ``delete_adapter``), i.e. the tuner layers that
transformers' ``PeftAdapterMixin`` drives. (transformers 5.24's mixin itself needs peft >= 0.22,
which the package registry here does not have, so it cannot be run as the reference.) The hotswap
cases are the behaviours PEFT's ``TestHotSwapping`` checks: A -> B -> A with and without compile,
ranks (7, 13) and (13, 7) with alphas equal to ranks and different target sets, a key missing from
B zeroes its layer, an extra key raises, a non-LoRA adapter raises.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo.testing
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file

from hotswap_rt import AdapterFormatError, HotswapError, IncompatibleAdapterError, enable_hotswap

from .conftest import VOCAB, BaseModel, assert_unchanged, logits, snapshot_state

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return BaseModel("llama", seed=5)


@pytest.fixture(scope="module")
def paths(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("tfapi")
    return {
        "r7": base.make_adapter(root / "r7", seed=1, r=7, lora_alpha=7, target_modules=ATTN),
        "r13": base.make_adapter(root / "r13", seed=2, r=13, lora_alpha=13,
                                 target_modules=["q_proj", "v_proj"]),
        "r13b": base.make_adapter(root / "r13b", seed=3, r=13, lora_alpha=13, target_modules=ATTN),
        "mlp": base.make_adapter(root / "mlp", seed=4, r=4, lora_alpha=8, target_modules=MLP),
    }


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def peft_logits(base: BaseModel, adapters: dict, active, ids: torch.Tensor) -> torch.Tensor:
    """PEFT with ``adapters`` (name -> dir) loaded and ``active`` (a name, a list, or None)."""
    reference = base.peft_reference(adapters)
    if active is None:
        with reference.disable_adapter():
            return logits(reference, ids)
    reference.base_model.set_adapter(active)
    return logits(reference, ids)


def test_flow_with_the_users_own_compile_equals_peft_without_recompiling(base, paths, ids) -> None:
    torch._dynamo.reset()
    model = base.clone()
    rt = enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r7"]), adapter_name="a")
    model.load_adapter(str(paths["r13"]), adapter_name="b")
    assert model.active_adapters() == ["a"]  # the first adapter loaded is active
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    loaded = {"a": paths["r7"], "b": paths["r13"]}
    for active in ("a", ["a", "b"], "b"):
        model.set_adapter(active)
        torch.testing.assert_close(logits(compiled, ids), peft_logits(base, loaded, active, ids), **TOL)
    model.disable_adapters()
    torch.testing.assert_close(logits(compiled, ids), logits(base.model, ids), **TOL)
    model.set_adapter("a")  # stays disabled, as in PEFT
    torch.testing.assert_close(logits(compiled, ids), logits(base.model, ids), **TOL)
    model.enable_adapters()
    torch.testing.assert_close(logits(compiled, ids), peft_logits(base, loaded, "a", ids), **TOL)
    # hotswap: rank 13 into the name of the rank-7 adapter, then back (A -> B -> A); the same
    # name again is a hotswap with enable_hotswap (hotswap="auto")
    for new in ("r13b", "r7"):
        model.load_adapter(str(paths[new]), adapter_name="a")
        torch.testing.assert_close(logits(compiled, ids), peft_logits(base, {"a": paths[new]}, "a", ids), **TOL)
    with pytest.warns(UserWarning, match="Setting active adapter to b"):  # PEFT's successor rule
        model.delete_adapter("a")
    assert model.active_adapters() == ["b"]
    torch.testing.assert_close(logits(compiled, ids), peft_logits(base, {"b": paths["r13"]}, "b", ids), **TOL)
    assert counter.frame_count == 1  # one graph, never recompiled
    assert rt.compiled and rt.guard.recompiles == 0


@pytest.mark.parametrize("ranks", [("r7", "r13"), ("r13", "r7")])
def test_hotswap_a_b_a_eager_with_different_ranks_and_targets(base, paths, ids, ranks) -> None:
    """B targets fewer layers than A (r13: q/v only): A's other layers give zero after the swap."""
    model = base.clone()
    enable_hotswap(model, max_rank=16, target_modules=ATTN)
    model.enable_peft_hotswap(target_rank=16)
    first, second = ranks
    for step in (first, second, first):
        model.load_adapter(str(paths[step]), adapter_name="default")  # "auto": hotswaps once loaded
        torch.testing.assert_close(logits(model, ids), peft_logits(base, {"x": paths[step]}, "x", ids), **TOL)
    assert model.active_adapters() == ["default"]


def test_hotswap_of_a_layer_that_is_not_injected_raises_and_changes_nothing(base, paths, ids) -> None:
    model = base.clone()
    rt = enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r13"]), adapter_name="a")  # injects q/v only
    before = logits(model, ids)
    with pytest.raises(IncompatibleAdapterError, match="not injected"):
        model.load_adapter(str(paths["r7"]), adapter_name="a", hotswap=True)  # k/o are extra
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    assert rt.info("a").rank == 13 and len(rt.targets) == 4


def test_lazy_injection_grows_before_compile_and_refuses_new_layers_after(base, paths, ids) -> None:
    torch._dynamo.reset()
    model = base.clone()
    rt = enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r7"]), adapter_name="attn")
    assert len(rt.targets) == 8
    model.load_adapter(str(paths["mlp"]), adapter_name="mlp")  # grows the arena: earlier slot kept
    assert len(rt.targets) == 12
    loaded = {"attn": paths["r7"], "mlp": paths["mlp"]}
    for active in ("attn", "mlp", ["attn", "mlp"]):
        model.set_adapter(active)
        torch.testing.assert_close(logits(model, ids), peft_logits(base, loaded, active, ids), **TOL)
    model.forward = torch.compile(model.forward)  # the other way users compile
    logits(model, ids)
    with pytest.raises(IncompatibleAdapterError, match="compiled"):
        model.load_adapter(adapter_name="down", peft_config={"r": 2, "lora_alpha": 2},
                           adapter_state_dict=_down_proj_state(base))
    assert len(rt.targets) == 12 and "down" not in {i.name for i in rt.adapters()}
    model.load_adapter(str(paths["r13"]), adapter_name="qv")  # injected layers only: fine
    model.set_adapter("qv")
    torch.testing.assert_close(logits(model, ids), peft_logits(base, {"qv": paths["r13"]}, "qv", ids), **TOL)
    assert rt.guard.recompiles == 0


def _down_proj_state(base: BaseModel) -> dict[str, torch.Tensor]:
    return {"model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(2, 128),
            "model.layers.0.mlp.down_proj.lora_B.weight": torch.randn(64, 2)}


def test_add_adapter_trains_from_the_base_and_saves_what_peft_loads(base, ids, tmp_path) -> None:
    model = base.clone()
    rt = enable_hotswap(model, max_rank=8)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="new")
    assert model.active_adapters() == ["new"]
    torch.testing.assert_close(logits(model, ids), logits(base.model, ids), atol=0, rtol=0)  # B = 0
    params = rt.trainable_parameters()
    assert len(params) == 8  # A and B of 4 layers
    opt = torch.optim.SGD(params, lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(base.model, ids))
    (tmp_path / "keep.txt").write_text("mine")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"  # other files left alone
    reference = PeftModel.from_pretrained(base.clone(), str(tmp_path)).eval()
    torch.testing.assert_close(trained, logits(reference, ids), **TOL)
    state = model.get_adapter_state_dict("new")
    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(state) == sorted(k.removeprefix("base_model.model.") for k in on_disk)
    for key, value in on_disk.items():
        torch.testing.assert_close(state[key.removeprefix("base_model.model.")], value, atol=0, rtol=0)


def test_get_adapter_state_dict_equals_the_files(base, paths) -> None:
    model = base.clone()
    enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r13"]), adapter_name="b")
    state = model.get_adapter_state_dict()  # the active adapter
    on_disk = load_file(str(paths["r13"] / "adapter_model.safetensors"))
    assert set(state) == {k.removeprefix("base_model.model.") for k in on_disk}
    for key, value in on_disk.items():
        torch.testing.assert_close(state[key.removeprefix("base_model.model.")], value, atol=0, rtol=0)


def test_state_dict_and_config_arguments_load_like_a_directory(base, paths, ids) -> None:
    model = base.clone()
    enable_hotswap(model, max_rank=16)
    config = json.loads((paths["r7"] / "adapter_config.json").read_text())
    state = load_file(str(paths["r7"] / "adapter_model.safetensors"))
    model.load_adapter(adapter_name="s", peft_config=config, adapter_state_dict=state)
    torch.testing.assert_close(logits(model, ids), peft_logits(base, {"s": paths["r7"]}, "s", ids), **TOL)


def test_what_transformers_refuses_and_what_the_runtime_cannot_do_raise(base, paths, ids, tmp_path) -> None:
    model = base.clone()
    rt = enable_hotswap(model, max_rank=16)
    for call in (lambda: model.set_adapter("a"), model.active_adapters, model.disable_adapters,
                 lambda: model.save_pretrained(tmp_path)):
        with pytest.raises(HotswapError, match="No adapter loaded|no adapter is loaded"):
            call()
    with pytest.raises(HotswapError, match="must already be an existing adapter"):
        model.load_adapter(str(paths["r7"]), adapter_name="a", hotswap=True)
    model.load_adapter(str(paths["r7"]), adapter_name="a")
    before = logits(model, ids)
    with pytest.raises(HotswapError, match="already exists"):
        model.load_adapter(str(paths["r13"]), adapter_name="a", hotswap=False)
    with pytest.raises(HotswapError, match="revision"):
        model.load_adapter(str(paths["r13"]), adapter_name="b", revision="main")
    with pytest.raises(HotswapError, match="not found"):
        model.set_adapter(["a", "zzz"])
    with pytest.raises(HotswapError, match="max_rank"):
        model.enable_peft_hotswap(target_rank=64, check_compiled="ignore")
    with pytest.raises(HotswapError, match="before loading the first adapter"):
        model.enable_peft_hotswap(target_rank=16)
    with pytest.raises(HotswapError, match="lora_dropout"):
        model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1), adapter_name="t")
    with pytest.raises(HotswapError, match="init_lora_weights"):
        model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "t")
    prefix_dir = tmp_path / "prefix"
    get_peft_model(base.clone(), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)) \
        .save_pretrained(str(prefix_dir))
    with pytest.raises(AdapterFormatError, match="PREFIX_TUNING"):
        model.load_adapter(str(prefix_dir), adapter_name="p")
    model.load_adapter(str(paths["r13"]), adapter_name="b")
    model.set_adapter(["a", "b"])
    with pytest.raises(HotswapError, match="one active adapter"):
        model.save_pretrained(tmp_path / "two")
    model.set_adapter("a")
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    assert sorted(i.name for i in rt.adapters()) == ["a", "b"]


def test_eject_restores_the_models_own_methods(base) -> None:
    model = base.clone()
    rt = enable_hotswap(model)
    assert "load_adapter" in model.__dict__
    rt.eject()
    assert not any(name in model.__dict__ for name in ("load_adapter", "set_adapter", "forward"))


def test_lazy_runtime_checks_before_injecting_and_check_injects_nothing(base, paths, ids) -> None:
    from hotswap_rt import HotswapRuntime, RuntimeConfig

    model = base.clone()
    rt = HotswapRuntime(model, RuntimeConfig(target_modules=None, max_rank=8))
    assert rt.lazy and rt.targets == []
    torch.testing.assert_close(logits(model, ids), logits(base.model, ids), atol=0, rtol=0)
    info = rt.check(paths["mlp"])  # would inject 4 layers: sized as if, injects nothing
    assert rt.targets == [] and info.tier == "disk" and info.bytes > 0
    bad = {"model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(2, 99),  # d_in is 64
           "model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(128, 2)}
    with pytest.raises(IncompatibleAdapterError, match="do not fit"):
        rt.load("bad", state_dict=bad, config={"r": 2, "lora_alpha": 2})
    with pytest.raises(IncompatibleAdapterError, match="not a module"):
        rt.load("bad", state_dict={"nope.lora_A.weight": torch.randn(2, 4),
                                   "nope.lora_B.weight": torch.randn(4, 2)}, config={"r": 2})
    with pytest.raises(HotswapError, match="max_rank"):
        rt.load("big", paths["r13"])  # rank 13 > 8
    assert rt.targets == [] and rt.adapters() == []
    rt.load("mlp", paths["mlp"])
    rt.activate("mlp")
    torch.testing.assert_close(logits(model, ids), peft_logits(base, {"m": paths["mlp"]}, "m", ids), **TOL)


def test_a_lazy_load_that_cannot_commit_injects_nothing(base, paths, ids) -> None:
    """A load, prefetch or add_adapter that needs new layers but would then fail to commit (no
    host entry, no device slot for a trainable adapter, bad hyper-parameters) is refused before
    any layer is injected: layers, slots, selection and outputs stay as they were."""
    from hotswap_rt import HotswapRuntime, RuntimeConfig, SlotsBusyError

    rt = HotswapRuntime(base.clone(), RuntimeConfig(target_modules=None, max_rank=16, host_slots=1,
                                                    device_slots=1))
    rt.load("qv", paths["r13"])  # injects q/v; takes the one device slot and the one host entry
    rt.activate("qv")
    rt.pin("qv")
    targets = list(rt.targets)
    before = snapshot_state(rt, ids)
    with pytest.raises(SlotsBusyError, match="host_slots=1"):
        rt.load("mlp", paths["mlp"])
    with pytest.raises(SlotsBusyError, match="host_slots=1"):
        rt.prefetch("mlp", paths["mlp"]).result()
    with pytest.raises(SlotsBusyError):
        rt.load("mlp", paths["mlp"], trainable=True)
    with pytest.raises(SlotsBusyError):
        rt.add_adapter("new", rank=4, alpha=8, targets=["up_proj"])
    with pytest.raises(HotswapError, match="rank must be"):
        rt.add_adapter("new", rank=99, alpha=8, targets=["up_proj"])
    assert rt.targets == targets and [info.name for info in rt.adapters()] == ["qv"]
    assert_unchanged(before, snapshot_state(rt, ids))
    rt.unpin("qv")
    rt.unload("qv", force=True)
    rt.load("mlp", paths["mlp"])  # room now: injected and served
    rt.activate("mlp")
    torch.testing.assert_close(logits(rt.model, ids), peft_logits(base, {"m": paths["mlp"]}, "m", ids), **TOL)


def test_a_lazy_load_injects_stages_and_commits_as_one_change(base, paths, ids) -> None:
    """A load that injects layers holds the runtime from its injection to its commit: another
    thread's load that would take the last host entry meanwhile waits until it has committed
    (before, it could take it first, and the injecting load then failed with its layers left
    injected). Both end served, each equal to PEFT."""
    import threading

    from hotswap_rt import HotswapRuntime, RuntimeConfig

    rt = HotswapRuntime(base.clone(), RuntimeConfig(target_modules=None, max_rank=16, host_slots=2,
                                                    device_slots=1))
    rt.load("qkvo", paths["r7"])  # injects the attention layers: the device slot, one host entry
    rt.pin("qkvo")
    with open(paths["r13b"] / "adapter_config.json", encoding="utf-8") as file:
        attn_config = json.load(file)
    attn_state = load_file(str(paths["r13b"] / "adapter_model.safetensors"))
    stage, during = rt.internals.stager.stage, {}
    other = threading.Thread(target=lambda: during.setdefault(
        "info", rt.load("attn", state_dict=attn_state, config=attn_config)))  # no file: never dropped

    def stage_while_another_loads(*args, **kwargs):
        if not other.is_alive() and "started" not in during:  # the MLP load's staging, once
            during["started"] = True
            other.start()
            other.join(timeout=1.0)
            during["finished_first"] = not other.is_alive()
        return stage(*args, **kwargs)

    rt.internals.stager.stage = stage_while_another_loads
    try:
        rt.load("mlp", paths["mlp"])  # injects gate/up; its staging lets "attn" try meanwhile
    finally:
        other.join()
        rt.internals.stager.stage = stage
    assert during["started"] and not during["finished_first"]  # the other load waited for the commit
    assert {"qkvo", "mlp", "attn"} <= {info.name for info in rt.adapters()}
    assert any(name.endswith("up_proj") for name in rt.targets)
    rt.unpin("qkvo")
    for name, key in (("attn", "r13b"), ("mlp", "mlp")):  # "mlp" was dropped to the disk tier for "attn"
        rt.activate(name)
        torch.testing.assert_close(logits(rt.model, ids), peft_logits(base, {"x": paths[key]}, "x", ids), **TOL)
        rt.activate(None)
        rt.unload(name)  # room in the ring for the next


def test_users_own_compile_with_the_registry_guard_filter(base, paths, ids) -> None:
    """``hotswap_rt.drop_process_registry_guards`` as the user's ``guard_filter_fn``: a model
    class instantiated after compiling recompiles nothing."""
    import hotswap_rt

    torch._dynamo.reset()
    model = base.clone()
    enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r7"]), adapter_name="a")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter,
                             options={"guard_filter_fn": hotswap_rt.drop_process_registry_guards})
    before = logits(compiled, ids)

    class LlamaDefinedAfterCompile(type(base.model)):  # a class transformers has not seen yet
        pass

    LlamaDefinedAfterCompile(base.model.config)
    torch.testing.assert_close(logits(compiled, ids), before)
    assert counter.frame_count == 1


def test_scale_vectors_let_a_dora_adapter_load_after_the_users_compile(base, paths, ids, tmp_path) -> None:
    torch._dynamo.reset()
    dora = base.make_adapter(tmp_path / "dora", seed=9, r=4, lora_alpha=8, target_modules=ATTN, use_dora=True)
    model = base.clone()
    rt = enable_hotswap(model, max_rank=16, scale_vectors=True)
    model.load_adapter(str(paths["r7"]), adapter_name="a")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    logits(compiled, ids)
    model.load_adapter(str(dora), adapter_name="d")  # after compiling: the vectors were reserved
    model.set_adapter("d")
    torch.testing.assert_close(logits(compiled, ids), peft_logits(base, {"d": dora}, "d", ids), **TOL)
    assert counter.frame_count == 1 and rt.guard.recompiles == 0
    plain = enable_hotswap(base.clone(), max_rank=16)  # without: refused, naming the setting
    plain.model.load_adapter(str(paths["r7"]), adapter_name="a")
    torch.compile(plain.model, backend="eager")(ids)
    with pytest.raises(HotswapError, match="scale_vectors=True"):
        plain.model.load_adapter(str(dora), adapter_name="d")


def test_names_that_are_not_names_and_a_second_runtime_are_refused(base, paths, ids) -> None:
    """Non-string names (a list, an int, None) are HotswapErrors (were TypeErrors), and a model
    already served by a runtime refuses a second one (lazy or not) until the first is ejected."""
    from hotswap_rt import HotswapRuntime, RuntimeConfig

    model = base.clone()
    rt = enable_hotswap(model, max_rank=16)
    model.load_adapter(str(paths["r13"]), adapter_name="a")
    before = logits(model, ids)
    with pytest.raises(HotswapError, match="adapter_name must be a non-empty string"):
        model.load_adapter(str(paths["r7"]), adapter_name=["b"])
    for bad in (3, None, [1]):
        with pytest.raises(HotswapError, match="expected an adapter name or a list of names"):
            model.set_adapter(bad)
        with pytest.raises(HotswapError, match="expected an adapter name or a list of names"):
            model.delete_adapter(bad)
    for second in (lambda: enable_hotswap(model, max_rank=16),
                   lambda: HotswapRuntime(model, RuntimeConfig(target_modules=None)),
                   lambda: HotswapRuntime(model, RuntimeConfig(["k_proj"]))):  # even on other layers
        with pytest.raises(HotswapError, match="already served by a HotswapRuntime"):
            second()
    assert model.active_adapters() == ["a"] and [info.name for info in rt.adapters()] == ["a"]
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    rt.eject()
    again = HotswapRuntime(model, RuntimeConfig(["q_proj", "v_proj"], max_rank=16))  # ejected: fine
    again.load("a", paths["r13"])
    again.activate("a")
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


def test_a_lazy_trainable_load_with_mixed_scalings_injects_nothing(base, paths, ids, tmp_path) -> None:
    """A trainable adapter needs one scaling for all modules: refused before its new layers are
    injected (the check ran after injecting, and the layers stayed)."""
    from hotswap_rt import HotswapRuntime, IncompatibleAdapterError, RuntimeConfig

    mixed = base.make_adapter(tmp_path / "mixed", seed=5, r=4, lora_alpha=8,
                              target_modules=["up_proj", "down_proj"],
                              rank_pattern={"up_proj": 8})
    rt = HotswapRuntime(base.clone(), RuntimeConfig(target_modules=None, max_rank=16))
    rt.load("qv", paths["r13"])
    rt.activate("qv")
    targets = list(rt.targets)
    before = snapshot_state(rt, ids)
    with pytest.raises(IncompatibleAdapterError, match="one scaling for all modules"):
        rt.load("mixed", mixed, trainable=True)
    assert rt.targets == targets and [info.name for info in rt.adapters()] == ["qv"]
    assert_unchanged(before, snapshot_state(rt, ids))
