"""Training inside the slots: new adapters, trainable parameters, freeze, save, PEFT round trips.

The reference for training is PEFT itself: the same adapter trained with the same AdamW (weight
decay on) on the same batch must give the same logits. What training must not touch (base
weights, other adapters in device slots and on the host, padding beyond the rank) is compared
bit for bit.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from hotswap_rt import (
    AdapterFormatError,
    HotswapError,
    HotswapRuntime,
    IncompatibleAdapterError,
    RuntimeConfig,
    SlotsBusyError,
)

from .conftest import VOCAB, BaseModel, assert_unchanged, logits, max_diff, snapshot_state

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
# The toy task: three fixed prompts, each answered by two fixed tokens (loss on the answers only).
PROMPTS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
ANSWERS = torch.tensor([[40, 41], [50, 51], [60, 61]])
TOY_IDS = torch.cat([PROMPTS, ANSWERS], dim=1)
TOY_LABELS = torch.cat([torch.full_like(PROMPTS, -100), ANSWERS], dim=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=21)
    root = tmp_path_factory.mktemp("train")
    peft_a = base.make_adapter(root / "a", seed=1, r=4, lora_alpha=8)
    other = base.make_adapter(root / "other", seed=2, r=8, lora_alpha=16, use_rslora=True)
    patterned = base.make_adapter(root / "patterned", seed=3, r=4, lora_alpha=8,
                                  rank_pattern={"v_proj": 2})
    return base, {"a": peft_a, "other": other, "patterned": patterned}


@pytest.fixture(scope="module")
def toy_base() -> BaseModel:
    """A random tiny model's output head (std 0.02 after a norm) caps its logits near 1, so no
    adapter on the layers below could reach a low loss: scale the head so the toy task is
    learnable at all."""
    base = BaseModel("llama", seed=21)
    with torch.no_grad():
        base.model.lm_head.weight.mul_(25)
    return base


def _runtime(base: BaseModel, **config) -> HotswapRuntime:
    config.setdefault("max_rank", 16)
    config.setdefault("device_slots", 3)
    return HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, **config))


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int,
           lr: float = 1e-2, ids: torch.Tensor = IDS, labels: torch.Tensor = IDS) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _slot_region(rt: HotswapRuntime, slot: int) -> torch.Tensor:
    return rt.internals.arena.arenas[torch.float32][slot]


def test_new_adapter_starts_as_the_base_model(env) -> None:
    base, _ = env
    rt = _runtime(base)
    info = rt.add_adapter("new", rank=8, alpha=16)
    assert info.trainable and info.rank == 8 and info.tier == "device"
    rt.activate("new")
    assert torch.equal(logits(rt.model, IDS), logits(base.model, IDS))  # B = 0: exactly the base
    params = rt.trainable_parameters()
    assert len(params) == 2 * len(rt.targets)
    a, b = params[0], params[1]
    assert a.shape == (8, 64) and b.shape[1] == 8 and torch.count_nonzero(b) == 0
    assert 0 < a.abs().max() <= 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(d_in)


@pytest.mark.parametrize("init", ["gaussian", "zeros"])
def test_other_inits(env, init: str) -> None:
    base, _ = env
    rt = _runtime(base)
    rt.add_adapter("new", rank=4, alpha=4, init=init, targets=["q_proj"])
    params = rt.trainable_parameters()
    assert len(params) == 4  # q_proj of two layers, A and B each
    a = params[0]
    if init == "gaussian":
        assert a.std().item() == pytest.approx(1 / 4, rel=0.3)
    else:
        assert torch.count_nonzero(a) == 0


def test_training_touches_only_the_trained_adapter(env) -> None:
    base, adapters = env
    rt = _runtime(base, host_slots=4)
    rt.load("other", adapters["other"])
    rt.load("a", adapters["a"])  # third slot stays for "new"
    base_state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    rt.add_adapter("new", rank=4, alpha=8)
    slots = {n: rt.info(n).slot for n in ("other", "a", "new")}
    before = {n: _slot_region(rt, s).clone() for n, s in slots.items()}
    host_rows = {n: rt.internals.registry.records[n].staged.rows[torch.float32].clone() for n in ("other", "a")}
    rt.activate({"new": 1.0, "other": 0.5})  # trained next to an inference adapter
    losses = _train(rt.model, rt.trainable_parameters(), steps=4)
    assert losses[-1] < losses[0]
    for key, value in rt.model.state_dict().items():
        assert torch.equal(value, base_state[key]), key  # base weights bit-identical
    for name in ("other", "a"):
        assert torch.equal(_slot_region(rt, slots[name]), before[name]), name
        assert torch.equal(rt.internals.registry.records[name].staged.rows[torch.float32], host_rows[name])
    trained = _slot_region(rt, slots["new"])
    assert not torch.equal(trained, before["new"])
    for layer in rt.targets:  # padding beyond rank 4 stays exactly zero
        a_full, b_full = rt.internals.arena.slot_factors(slots["new"], layer, rt.config.max_rank)
        assert torch.count_nonzero(a_full[4:]) == 0 and torch.count_nonzero(b_full[:, 4:]) == 0
        assert torch.count_nonzero(b_full[:, :4]) > 0
    assert all(not p.requires_grad for p in rt.model.parameters())


def test_continued_training_matches_peft_training(env, tmp_path) -> None:
    base, adapters = env
    peft_model = PeftModel.from_pretrained(base.clone(), str(adapters["a"]), is_trainable=True)
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    rt = _runtime(base)
    rt.load("other", adapters["other"])
    rt.load("a", adapters["a"], trainable=True)
    rt.activate("a")
    assert len(rt.trainable_parameters()) == len(peft_params)
    _train(peft_model, peft_params, steps=5)
    _train(rt.model, rt.trainable_parameters(), steps=5)
    expected = logits(peft_model, IDS)
    assert max_diff(logits(rt.model, IDS), expected) <= 1e-4
    rt.activate_rows(["a", None, "other", "a"])  # the trainable adapter per row, unscaled slot
    mixed = logits(rt.model, IDS)
    assert max_diff(mixed[0], expected[0]) <= 1e-4 and max_diff(mixed[3], expected[3]) <= 1e-4
    assert max_diff(mixed[1], logits(base.model, IDS)[1]) <= 1e-5
    rt.activate("a")
    # hotswap_rt train -> save -> PEFT load: PEFT's logits equal the runtime's.
    out = Path(rt.save("a", tmp_path / "trained"))
    reloaded = PeftModel.from_pretrained(base.clone(), str(out)).eval()
    assert max_diff(logits(reloaded, IDS), logits(rt.model, IDS)) <= 1e-5
    assert max_diff(logits(reloaded, IDS), expected) <= 1e-4


def test_freeze_turns_it_into_an_inference_adapter(env, tmp_path) -> None:
    base, adapters = env
    rt = _runtime(base, device_slots=2)
    rt.add_adapter("new", rank=4, alpha=8)
    rt.activate("new")
    params = rt.trainable_parameters()
    _train(rt.model, params, steps=3, lr=5e-2)
    trained = logits(rt.model, IDS)
    assert max_diff(trained, logits(base.model, IDS)) > 1e-3
    info = rt.freeze("new")
    assert not info.trainable
    assert max_diff(logits(rt.model, IDS), trained) <= 1e-5  # scaling now folded into B
    with pytest.raises(HotswapError, match="no trainable adapter"):
        rt.trainable_parameters()
    served = logits(rt.model, IDS)
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(params, lr=1.0).step()  # a stray step on the old parameters...
    assert torch.equal(logits(rt.model, IDS), served)  # ...no longer reaches the slot
    saved = Path(rt.save("new", tmp_path / "new"))
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert config["task_type"] == "CAUSAL_LM" and config["use_rslora"] is False
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor(next(k for k in f.keys() if "lora_A" in k)).shape[0] == 4  # unpadded
    reloaded = PeftModel.from_pretrained(base.clone(), str(saved)).eval()
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    assert max_diff(logits(reloaded, IDS), served) <= 1e-5
    # Its slot is an ordinary slot again: LRU may evict it.
    rt.load("other", adapters["other"])
    rt.load("a", adapters["a"])
    rt.activate("other")
    rt.activate("a")
    assert rt.info("new").slot is None


def test_a_trained_adapter_is_never_read_back_from_its_files(env, tmp_path) -> None:
    """An adapter loaded from a directory and trained has values its files do not hold: it must
    never drop to the disk tier (whose re-read would serve, and save, the untrained values)."""
    base, adapters = env
    rt = _runtime(base, device_slots=1, host_slots=2)
    rt.load("t", adapters["a"], trainable=True)
    rt.activate("t")
    _train(rt.model, rt.trainable_parameters(), steps=3, lr=5e-2)
    trained = logits(rt.model, IDS)
    from_files = logits(PeftModel.from_pretrained(base.clone(), str(adapters["a"])).eval(), IDS)
    assert max_diff(trained, from_files) > 1e-3
    rt.freeze("t")
    rt.load("other", adapters["other"])
    rt.activate("other")  # "t" leaves the device slot: a host entry, no file to read it from
    before = snapshot_state(rt, IDS)
    with pytest.raises(SlotsBusyError, match="trained"):
        rt.load("patterned", adapters["patterned"])  # the ring is full; "t" cannot drop to disk
    assert_unchanged(before, snapshot_state(rt, IDS))
    assert {info.name: info.tier for info in rt.adapters()} == {"t": "host", "other": "device"}
    rt.activate("t")
    assert max_diff(logits(rt.model, IDS), trained) <= 1e-5
    saved = rt.save("t", tmp_path / "t")
    assert max_diff(logits(PeftModel.from_pretrained(base.clone(), str(saved)).eval(), IDS), trained) <= 1e-4
    rt.unload("other")
    rt.load("patterned", adapters["patterned"])  # room once an entry is free
    assert rt.info("t").tier in ("host", "device")


@pytest.mark.slow
def test_training_works_compiled_and_serves_after_freeze(env, toy_base) -> None:
    _, adapters = env
    torch._dynamo.reset()
    rt = _runtime(toy_base)
    rt.load("other", adapters["other"])
    rt.add_adapter("new", rank=8, alpha=16)
    rt.activate("new")
    # Training calls carry labels, serving calls do not: warm up both, with and without autograd.
    rt.compile({"input_ids": TOY_IDS, "labels": TOY_LABELS}, warmup_inputs=[TOY_IDS],
               training=True, guard="raise")
    losses = _train(rt.model, rt.trainable_parameters(), steps=15, lr=5e-2, ids=TOY_IDS,
                    labels=TOY_LABELS)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        trained = rt.model(TOY_IDS).logits
    rt.freeze("new")
    with torch.no_grad():
        assert max_diff(rt.model(TOY_IDS).logits, trained) <= 1e-5
        rt.activate("other")
        rt.model(TOY_IDS)
    assert rt.guard.recompiles == 0


def test_toy_task_loss_decreases(toy_base) -> None:
    """A tiny model learns to answer three fixed prompts with fixed tokens."""
    rt = _runtime(toy_base)
    rt.add_adapter("toy", rank=8, alpha=16, targets=["q_proj", "v_proj", "o_proj"])
    rt.activate("toy")
    losses = _train(rt.model, rt.trainable_parameters(), steps=40, lr=5e-2, ids=TOY_IDS,
                    labels=TOY_LABELS)
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        predicted = rt.model(input_ids=TOY_IDS).logits[:, 3:5].argmax(-1)
    assert torch.equal(predicted, ANSWERS)


def test_bad_training_requests_change_nothing(env) -> None:
    base, adapters = env
    rt = _runtime(base, device_slots=2, host_slots=4)
    rt.load("a", adapters["a"])
    rt.add_adapter("t", rank=4, alpha=8)
    rt.activate("a")
    before = snapshot_state(rt, IDS)
    cases = [
        (lambda: rt.add_adapter("t2", rank=4, alpha=8), HotswapError, "being trained"),
        (lambda: rt.load("p", adapters["other"], trainable=True), HotswapError, "being trained"),
        (lambda: rt.load("t", adapters["other"], replace=True), HotswapError, "being trained"),
        (lambda: rt.add_adapter("x", rank=17, alpha=8, trainable=False), HotswapError, "max_rank"),
        (lambda: rt.add_adapter("x", rank=4, alpha=-1, trainable=False), HotswapError, "alpha"),
        (lambda: rt.add_adapter("x", rank=4, alpha=4, init="xavier", trainable=False),
         HotswapError, "init"),
        (lambda: rt.add_adapter("x", rank=4, alpha=4, targets=["nope"], trainable=False),
         IncompatibleAdapterError, "match no injected layer"),
        (lambda: rt.add_adapter("a", rank=4, alpha=4, trainable=False), HotswapError, "already"),
        (lambda: rt.prefetch("x", adapters["other"], trainable=True), HotswapError, "prefetch"),
        (lambda: rt.freeze("a"), HotswapError, "not trainable"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(before, snapshot_state(rt, IDS))


def test_trainable_load_needs_one_scaling(env) -> None:
    base, adapters = env
    rt = _runtime(base)
    rt.load("a", adapters["a"])
    before = snapshot_state(rt, IDS)
    with pytest.raises(IncompatibleAdapterError, match="one scaling"):
        rt.load("p", adapters["patterned"], trainable=True)
    assert_unchanged(before, snapshot_state(rt, IDS))


def test_trainable_needs_a_slot_the_selection_does_not_read(env) -> None:
    base, adapters = env
    rt = _runtime(base, device_slots=1)
    rt.load("a", adapters["a"])
    rt.activate("a")
    before = snapshot_state(rt, IDS)
    with pytest.raises(SlotsBusyError, match="trainable"):
        rt.add_adapter("t", rank=4, alpha=8)
    assert_unchanged(before, snapshot_state(rt, IDS))
    rt.activate(None)
    rt.add_adapter("t", rank=4, alpha=8)  # now "a" may be evicted to the host
    assert rt.info("a").slot is None


def test_unload_and_eject_end_training(env) -> None:
    base, _ = env
    rt = _runtime(base)
    rt.add_adapter("t", rank=4, alpha=8)
    rt.activate("t")
    _train(rt.model, rt.trainable_parameters(), steps=1)
    rt.unload("t", force=True)
    with pytest.raises(HotswapError, match="no trainable adapter"):
        rt.trainable_parameters()
    rt.add_adapter("t2", rank=4, alpha=8)  # training another one is allowed again
    model = rt.eject()
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, IDS), logits(base.model, IDS))


def test_pickle_bin_adapters_need_allow_pickle(env, tmp_path) -> None:
    base, _ = env
    directory = tmp_path / "bin"
    base.make_adapter(directory, seed=9, r=4, lora_alpha=8)
    state = {}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    (directory / "adapter_model.safetensors").unlink()
    torch.save(state, directory / "adapter_model.bin")
    rt = _runtime(base)
    with pytest.raises(AdapterFormatError, match="allow_pickle=True"):
        rt.load("bin", directory)
    rt.load("bin", directory, allow_pickle=True)
    rt.activate("bin")
    reference = base.peft_reference({"bin": directory})
    assert max_diff(logits(rt.model, IDS), logits(reference, IDS)) <= 1e-4


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_with_code_is_refused_even_when_allowed(env, tmp_path, monkeypatch) -> None:
    base, _ = env
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with open(directory / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    rt = _runtime(base)
    with pytest.raises(AdapterFormatError, match="unreadable"):
        rt.load("evil", directory, allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()
    assert rt.adapters() == []
