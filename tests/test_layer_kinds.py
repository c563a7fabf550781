"""LoRA on ``nn.Conv2d`` (with and without ``groups``) and ``nn.Embedding``, and models whose
forward does not take ``input_ids`` (``rt.compile(*args, **kwargs)``, ``batch_input``).

The reference is PEFT running each adapter alone (``get_peft_model(..., init_lora_weights=False)``
then ``save_pretrained``: the files we load), and PEFT loading what we save.
"""

from __future__ import annotations

import copy
import shutil
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from hotswap_rt import (AdapterFormatError, HotswapError, HotswapRuntime, IncompatibleAdapterError,
                        RuntimeConfig)
from hotswap_rt.layers import LoraSlotConv2d, LoraSlotEmbedding

from .conftest import VOCAB, BaseModel, logits

TOL = dict(atol=1e-5, rtol=1e-5)


class ConvNet(nn.Module):
    """A small image model: a plain 3x3 conv, a grouped strided conv, a linear head. Its forward
    takes ``sample``, not ``input_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8, 6)

    def forward(self, sample: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(sample)))  # [B, 8, H/2, W/2]
        out = self.head(h.mean((2, 3)))  # [B, 6]
        return out if scale is None else out * scale


CONV_TARGETS = ["conv1", "conv2", "head"]


def _peft_adapter(base: nn.Module, directory: Path, seed: int, **lora: object) -> tuple[Path, nn.Module]:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora)).eval()
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """The base ConvNet, two PEFT adapters (ranks 4 and 6; groups=2 needs even ranks), an input."""
    torch.manual_seed(0)
    base = ConvNet().eval()
    root = tmp_path_factory.mktemp("conv")
    a = _peft_adapter(base, root / "a", 1, r=4, lora_alpha=4, target_modules=CONV_TARGETS)
    b = _peft_adapter(base, root / "b", 2, r=6, lora_alpha=12, target_modules=["conv1", "conv2"])
    sample = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        refs = {"a": a[1](sample), "b": b[1](sample), None: base(sample)}
    return {"base": base, "a": a[0], "b": b[0], "sample": sample, "refs": refs}


def _conv_runtime(conv, **config: object) -> HotswapRuntime:
    settings = dict(target_modules=CONV_TARGETS, max_rank=8, device_slots=2, max_batch_size=4)
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(**{**settings, **config}))
    rt.load("a", conv["a"])
    rt.load("b", conv["b"])
    return rt


def test_conv_files_hold_peft_shapes(conv) -> None:
    """The reference is what we think it is: a 4-D A and a grouped 1x1 B in PEFT's files."""
    state = load_file(str(conv["b"] / "adapter_model.safetensors"))
    assert tuple(state["base_model.model.conv2.lora_A.weight"].shape) == (6, 8, 3, 3)
    assert tuple(state["base_model.model.conv2.lora_B.weight"].shape) == (8, 3, 1, 1)  # r / groups
    refs = conv["refs"]
    assert not torch.allclose(refs["a"], refs[None]) and not torch.allclose(refs["b"], refs["a"])


@pytest.mark.parametrize("per_row", [2, 1], ids=["stacked", "per-row"])
def test_conv_adapters_and_mixed_rows_equal_peft(conv, per_row) -> None:
    rt = _conv_runtime(conv, max_adapters_per_row=per_row)
    assert isinstance(rt.model.conv2, LoraSlotConv2d)
    sample, refs = conv["sample"], conv["refs"]
    with torch.no_grad():
        for name in ("a", "b"):
            rt.activate(name)
            torch.testing.assert_close(rt.model(sample), refs[name], **TOL)
        rt.activate_rows(["b", None, "a"])
        out = rt.model(sample)
    torch.testing.assert_close(out[0], refs["b"][0], **TOL)
    torch.testing.assert_close(out[1], refs[None][1], **TOL)
    torch.testing.assert_close(out[2], refs["a"][2], **TOL)


def test_conv_compiled_with_positional_and_keyword_inputs_swaps_without_recompiling(conv, tmp_path) -> None:
    """``rt.compile(sample, scale=...)`` on a model without input_ids; A -> B -> A as hotswaps
    into one name and a mixed batch all run on the one graph; the batch is found in `sample`."""
    rt = _conv_runtime(conv)
    sample, refs = conv["sample"], conv["refs"]
    scale = torch.ones(1)
    with torch.no_grad():
        rt.compile(sample, scale=scale, warmup_inputs=[(sample[:2],)])
        rt.activate("a")
        torch.testing.assert_close(rt.model(sample, scale=scale), refs["a"], **TOL)
        rt.load("a", conv["b"], replace=True)
        torch.testing.assert_close(rt.model(sample, scale=scale), refs["b"], **TOL)
        rt.load("a", conv["a"], replace=True)
        torch.testing.assert_close(rt.model(sample=sample, scale=scale), refs["a"], **TOL)
        rt.activate_rows(["a", "b", None])
        out = rt.model(sample, scale=scale)
        torch.testing.assert_close(out[1], refs["b"][1], **TOL)
        rt.activate_rows(["a", "b", None, "a"])
        with pytest.raises(HotswapError, match="rows"):  # the batch is found in `sample`
            rt.model(sample, scale=scale)
    assert rt.guard.recompiles == 0


def test_conv_save_loads_in_peft(conv, tmp_path) -> None:
    rt = _conv_runtime(conv)
    rt.save("b", tmp_path / "b")
    state = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert tuple(state["base_model.model.conv2.lora_B.weight"].shape) == (8, 3, 1, 1)
    reference = PeftModel.from_pretrained(copy.deepcopy(conv["base"]), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(conv["sample"]), conv["refs"]["b"], **TOL)


def test_conv_adapter_for_other_groups_or_kernel_is_refused(conv, tmp_path) -> None:
    """A conv LoRA whose groups or kernel differ from the layer's is refused, nothing changed."""
    rt = _conv_runtime(conv)
    before = {dtype: arena.clone() for dtype, arena in rt.internals.arena.arenas.items()}
    state = load_file(str(conv["a"] / "adapter_model.safetensors"))
    config = json.loads((conv["a"] / "adapter_config.json").read_text())
    regrouped = dict(state)  # conv2's B as if groups were 4: [8, 1, 1, 1]
    regrouped["base_model.model.conv2.lora_B.weight"] = state["base_model.model.conv2.lora_B.weight"][:, :1]
    with pytest.raises(IncompatibleAdapterError, match="groups=4.*groups=2"):
        rt.load("c", state_dict=regrouped, config=config)
    flat = dict(state)  # conv1 as a linear LoRA of the same total size
    flat["base_model.model.conv1.lora_A.weight"] = state["base_model.model.conv1.lora_A.weight"].flatten(1)
    flat["base_model.model.conv1.lora_B.weight"] = state["base_model.model.conv1.lora_B.weight"].flatten(1)
    with pytest.raises(IncompatibleAdapterError, match="a linear LoRA but the layer is a Conv2d"):
        rt.load("c", state_dict=flat, config=config)
    assert [info.name for info in rt.adapters()] == ["a", "b"]
    for dtype, arena in rt.internals.arena.arenas.items():
        assert torch.equal(arena, before[dtype])


VECTOR_CONFIGS = {  # IA3, DoRA and LoRA bias on Conv2d layers (DoRA and the bias: ungrouped ones)
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["conv1", "head"],
                               init_lora_weights=False),
    "bias": lambda: LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["conv1", "head"],
                               init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=CONV_TARGETS, feedforward_modules=["conv2"],  # grouped
                             init_ia3_weights=False),
}


@pytest.fixture(scope="module")
def conv_vectors(conv, tmp_path_factory):
    """PEFT adapters carrying vectors on the ConvNet's convs (DoRA magnitudes and LoRA biases
    moved away from their initial values, so they matter), and PEFT's output for each."""
    root = tmp_path_factory.mktemp("conv-vectors")
    paths, refs = {}, {}
    for seed, (name, make_config) in enumerate(VECTOR_CONFIGS.items()):
        torch.manual_seed(20 + seed)
        model = get_peft_model(copy.deepcopy(conv["base"]), make_config()).eval()
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "magnitude" in key:
                    param.mul_(1 + 0.5 * torch.rand_like(param))
                elif "lora_B" in key and key.endswith(".bias"):
                    param.normal_()
            refs[name] = model(conv["sample"])
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths, refs


def test_conv_ia3_dora_and_bias_compiled_equal_peft_with_zero_recompiles(conv, conv_vectors) -> None:
    """Loaded before compile (the scale vectors are added for them), then swapped and mixed per
    row in the one graph: each adapter, and each row of a mixed batch, as PEFT computes it."""
    paths, refs = conv_vectors
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=CONV_TARGETS, max_rank=8, device_slots=4, max_batch_size=4))
    for name, path in paths.items():
        rt.load(name, path)
    rt.load("a", conv["a"])  # plain LoRA next to them
    sample = conv["sample"]
    for name in (*paths, "a"):
        assert not torch.allclose(({**refs, "a": conv["refs"]["a"]})[name], conv["refs"][None])
    with torch.no_grad():
        rt.compile(sample, warmup_inputs=[(sample[:2],)])
        for name in paths:
            rt.activate(name)
            torch.testing.assert_close(rt.model(sample), refs[name], **TOL)
        rows = ["dora", "ia3", "bias"]
        rt.activate_rows(rows)
        out = rt.model(sample)
        for i, name in enumerate(rows):
            torch.testing.assert_close(out[i], refs[name][i], **TOL)
        rt.activate_rows(["a", None, "ia3"])
        out = rt.model(sample)
    torch.testing.assert_close(out[0], conv["refs"]["a"][0], **TOL)
    torch.testing.assert_close(out[1], conv["refs"][None][1], **TOL)
    torch.testing.assert_close(out[2], refs["ia3"][2], **TOL)
    assert rt.guard.recompiles == 0


def test_conv_vector_adapters_save_in_peft_shapes_and_load_in_peft(conv, conv_vectors, tmp_path) -> None:
    paths, refs = conv_vectors
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=CONV_TARGETS, max_rank=8, device_slots=1, scale_vectors=True))
    for name, path in paths.items():
        rt.load(name, path)
        rt.save(name, tmp_path / name)
        saved = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        original = load_file(str(path / "adapter_model.safetensors"))
        assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in original.items()}
        reference = PeftModel.from_pretrained(copy.deepcopy(conv["base"]), tmp_path / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(reference(conv["sample"]), refs[name], **TOL)
    assert tuple(saved["base_model.model.conv2.ia3_l"].shape) == (1, 8, 1, 1)


def test_conv_vectors_that_do_not_fit_are_refused_and_change_nothing(conv, conv_vectors, tmp_path) -> None:
    """DoRA on a grouped conv; an IA3 vector of a linear layer's shape on a conv, and a conv
    vector that is not [1, C, 1, 1]: clear errors, nothing loaded or written."""
    paths, _ = conv_vectors
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=CONV_TARGETS, max_rank=8, device_slots=2, scale_vectors=True))
    rt.load("ia3", paths["ia3"])
    before = {dtype: arena.clone() for dtype, arena in rt.internals.arena.arenas.items()}
    torch.manual_seed(5)
    grouped = get_peft_model(copy.deepcopy(conv["base"]), LoraConfig(
        r=4, use_dora=True, target_modules=["conv2"], init_lora_weights=False))
    grouped.save_pretrained(tmp_path / "grouped")
    with pytest.raises(AdapterFormatError, match="grouped Conv2d 'conv2'"):
        rt.load("g", tmp_path / "grouped")
    state = load_file(str(paths["ia3"] / "adapter_model.safetensors"))
    config = json.loads((paths["ia3"] / "adapter_config.json").read_text())
    key = "base_model.model.conv1.ia3_l"
    with pytest.raises(IncompatibleAdapterError, match="linear layer's shape but the layer is a Conv2d"):
        rt.load("flat", state_dict={**state, key: state[key].reshape(-1, 1)}, config=config)
    with pytest.raises(AdapterFormatError, match=r"\[1, C, 1, 1\]"):
        rt.load("tall", state_dict={**state, key: state[key].reshape(1, 4, 2, 1)}, config=config)
    assert [info.name for info in rt.adapters()] == ["ia3"]
    for dtype, arena in rt.internals.arena.arenas.items():
        assert torch.equal(arena, before[dtype])


def test_grouped_conv_adapter_cannot_be_trainable(conv) -> None:
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=CONV_TARGETS, max_rank=8, device_slots=2, max_batch_size=4))
    with pytest.raises(IncompatibleAdapterError, match="grouped Conv2d"):
        rt.load("a", conv["a"], trainable=True)
    with pytest.raises(IncompatibleAdapterError, match="groups=2"):
        rt.add_adapter("new", rank=4, alpha=4, targets=["conv2"])
    assert rt.adapters() == []


def test_conv_training_gradients_equal_peft(conv) -> None:
    """A trainable adapter on an ungrouped conv and a linear layer: loss and gradients of A and
    B equal PEFT's (ours are the matrix forms of PEFT's conv weights)."""
    targets = ["conv1", "head"]
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=targets, max_rank=8, device_slots=2, max_batch_size=4))
    _, reference = _peft_adapter(conv["base"], Path(conv["a"]).parent / "train", 5, r=4, lora_alpha=8,
                                 target_modules=targets)
    rt.load("t", Path(conv["a"]).parent / "train", trainable=True)
    rt.activate("t")
    sample = conv["sample"]
    rt.model(sample).square().mean().backward()
    reference.train()
    reference(sample).square().mean().backward()
    ours = dict(zip(["conv1.A", "conv1.B", "head.A", "head.B"], rt.trainable_parameters()))
    peft_conv = reference.base_model.model.conv1
    torch.testing.assert_close(ours["conv1.A"].grad, peft_conv.lora_A["default"].weight.grad.flatten(1), **TOL)
    torch.testing.assert_close(ours["conv1.B"].grad, peft_conv.lora_B["default"].weight.grad.flatten(1), **TOL)
    peft_head = reference.base_model.model.head
    torch.testing.assert_close(ours["head.B"].grad, peft_head.lora_B["default"].weight.grad, **TOL)


# ------------------------------------------------------------------------------------- Embedding
@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """A tiny Llama and two PEFT adapters on ``embed_tokens`` (+ attention), saved by PEFT with
    its default ``save_embedding_layers="auto"`` (the base embedding weight is in the file)."""
    base = BaseModel("llama", seed=7)
    root = tmp_path_factory.mktemp("emb")
    paths = {
        "a": base.make_adapter(root / "a", seed=1, r=4, lora_alpha=8,
                               target_modules=["embed_tokens", "q_proj"]),
        "b": base.make_adapter(root / "b", seed=2, r=8, lora_alpha=8, target_modules=["embed_tokens"]),
    }
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    refs = {name: logits(base.peft_reference({name: path}), ids) for name, path in paths.items()}
    refs[None] = logits(base.clone(), ids)
    return {"base": base, "ids": ids, "refs": refs, **paths}


def _emb_runtime(emb, **config: object) -> HotswapRuntime:
    settings = dict(target_modules=["embed_tokens", "q_proj"], max_rank=8, device_slots=2,
                    max_batch_size=4)
    rt = HotswapRuntime(emb["base"].clone(), RuntimeConfig(**{**settings, **config}))
    rt.load("a", emb["a"])
    rt.load("b", emb["b"])
    return rt


def test_embedding_files_carry_the_base_weight(emb) -> None:
    keys = load_file(str(emb["a"] / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert tuple(keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape) == (4, VOCAB)


@pytest.mark.parametrize("per_row", [2, 1], ids=["stacked", "per-row"])
def test_embedding_adapters_compiled_and_mixed_rows_equal_peft(emb, per_row) -> None:
    rt = _emb_runtime(emb, max_adapters_per_row=per_row)
    assert isinstance(rt.model.model.embed_tokens, LoraSlotEmbedding)
    ids, refs = emb["ids"], emb["refs"]
    torch._dynamo.reset()  # earlier modules' compiles of the same code count towards the recompile limit
    with torch.no_grad():
        rt.compile(ids)
        for name in ("a", "b", "a"):
            rt.activate(name)
            torch.testing.assert_close(logits(rt.model, ids), refs[name], atol=1e-4, rtol=1e-4)
        rt.activate_rows([None, "b", "a"])
        out = logits(rt.model, ids)
    for row, name in enumerate([None, "b", "a"]):
        torch.testing.assert_close(out[row], refs[name][row], atol=1e-4, rtol=1e-4)
    assert rt.guard.recompiles == 0


def test_embedding_save_loads_in_peft_without_the_base_weight(emb, tmp_path) -> None:
    rt = _emb_runtime(emb)
    rt.save("a", tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert not any("base_layer" in key for key in keys)
    reference = PeftModel.from_pretrained(emb["base"].clone(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(reference, emb["ids"]), emb["refs"]["a"], atol=1e-4, rtol=1e-4)


def _moved_magnitudes(path: Path, seed: int) -> Path:
    """Multiply the DoRA magnitudes in ``path``'s file by random factors in [1, 1.5): at PEFT's
    init they equal the norms, which makes DoRA's scale exactly 1."""
    file = str(path / "adapter_model.safetensors")
    state = load_file(file)
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in state if k.endswith("lora_magnitude_vector")]:
        state[key] = state[key] * (1 + 0.5 * torch.rand(state[key].shape, generator=generator))
    save_file(state, file, metadata={"format": "pt"})
    return path


def test_dora_on_an_embedding_equals_peft_stacked_per_row_and_saved(emb, tmp_path) -> None:
    """DoRA on ``embed_tokens`` (an output scale per embedding feature, the norm over the
    vocabulary) next to q_proj: equal to PEFT alone, in mixed rows, and after a save."""
    base, ids = emb["base"], emb["ids"]
    path = _moved_magnitudes(base.make_adapter(tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                                               target_modules=["embed_tokens", "q_proj"]), seed=4)
    assert tuple(load_file(str(path / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.lora_magnitude_vector"].shape) == (64,)
    reference = logits(base.peft_reference({"dora": path}), ids)
    assert not torch.allclose(reference, emb["refs"][None])
    for per_row in (2, 1):
        rt = _emb_runtime(emb, max_adapters_per_row=per_row)
        rt.load("dora", path)
        rt.activate("dora")
        torch.testing.assert_close(logits(rt.model, ids), reference, **TOL)
        rt.activate_rows(["dora", "a", None])
        out = logits(rt.model, ids)
        torch.testing.assert_close(out[0], reference[0], **TOL)
        torch.testing.assert_close(out[1], emb["refs"]["a"][1], **TOL)
        torch.testing.assert_close(out[2], emb["refs"][None][2], **TOL)
    rt.save("dora", tmp_path / "saved")
    torch.testing.assert_close(logits(base.peft_reference({"dora": tmp_path / "saved"}), ids), reference, **TOL)


def test_ia3_or_lora_bias_on_an_embedding_is_refused_and_changes_nothing(emb, tmp_path) -> None:
    """PEFT has neither: a file that holds one anyway is refused, nothing loaded or written."""
    rt = _emb_runtime(emb, scale_vectors=True)
    before = {dtype: arena.clone() for dtype, arena in rt.internals.arena.arenas.items()}
    state = load_file(str(emb["b"] / "adapter_model.safetensors"))
    config = json.loads((emb["b"] / "adapter_config.json").read_text())
    key = "base_model.model.model.embed_tokens"
    biased = {**state, f"{key}.lora_B.bias": torch.ones(64)}
    with pytest.raises(AdapterFormatError, match="lora_bias on the embedding"):
        rt.load("bias", state_dict=biased, config={**config, "lora_bias": True})
    ia3 = {f"{key}.ia3_l": torch.ones(64, 1)}
    with pytest.raises(IncompatibleAdapterError, match="IA3 on an Embedding"):
        rt.load("ia3", state_dict=ia3, config={"peft_type": "IA3", "target_modules": ["embed_tokens"]})
    assert [info.name for info in rt.adapters()] == ["a", "b"]
    for dtype, arena in rt.internals.arena.arenas.items():
        assert torch.equal(arena, before[dtype])


def test_embedding_adapter_with_a_different_base_weight_is_refused(emb, tmp_path) -> None:
    """A resized or trained embedding saved with the adapter cannot be served: refused, and the
    runtime is unchanged."""
    rt = _emb_runtime(emb)
    before = {dtype: arena.clone() for dtype, arena in rt.internals.arena.arenas.items()}
    state = load_file(str(emb["a"] / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    state[key] = state[key] + 1.0
    target = tmp_path / "changed"
    target.mkdir()
    (target / "adapter_config.json").write_text((emb["a"] / "adapter_config.json").read_text())
    save_file(state, str(target / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="save_embedding_layers"):
        rt.load("a", target, replace=True)
    with pytest.raises(IncompatibleAdapterError, match="save_embedding_layers"):
        rt.load("c", target)
    assert [info.name for info in rt.adapters()] == ["a", "b"] and rt.info("a").version == 1
    for dtype, arena in rt.internals.arena.arenas.items():
        assert torch.equal(arena, before[dtype])


def test_batch_input_names_the_batch_argument(conv) -> None:
    rt = _conv_runtime(conv, batch_input="scale")
    rt.activate_rows(["a", "b"])
    with torch.no_grad(), pytest.raises(HotswapError, match="rows"):
        rt.model(conv["sample"][:2], scale=torch.ones(3, 1))  # `scale` has 3 rows, the selection 2
    with pytest.raises(HotswapError, match="batch_input"):
        RuntimeConfig(batch_input="")


def _files(path: Path) -> tuple[dict, float]:
    """An adapter's tensors (prefix stripped) and its scaling, read from its files."""
    config = json.loads((path / "adapter_config.json").read_text())
    state = {k.removeprefix("base_model.model."): v for k, v in
             load_file(str(path / "adapter_model.safetensors")).items()}
    return state, config["lora_alpha"] / config["r"]


def test_weighted_mix_at_a_grouped_conv_equals_the_formula_from_the_files(conv) -> None:
    """0.5 * a - 1.0 * b at conv2 (groups=2): base + sum_i w_i s_i conv1x1_grouped(conv(x, A_i), B_i)."""
    rt = _conv_runtime(conv)
    rt.activate({"a": 0.5, "b": -1.0})
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(9))
    layer = rt.model.conv2
    expected = layer.base(x)
    for name, weight in (("a", 0.5), ("b", -1.0)):
        state, scaling = _files(conv[name])
        a, b = state["conv2.lora_A.weight"], state["conv2.lora_B.weight"]
        h = torch.nn.functional.conv2d(x, a, stride=2, padding=1)
        expected = expected + weight * scaling * torch.nn.functional.conv2d(h, b, groups=2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **TOL)


def test_weighted_mix_at_an_embedding_equals_the_formula_from_the_files(emb) -> None:
    rt = _emb_runtime(emb)
    rt.activate({"a": 2.0, "b": 0.25})
    ids = emb["ids"]
    layer = rt.model.model.embed_tokens
    expected = layer.base(ids)
    for name, weight in (("a", 2.0), ("b", 0.25)):
        state, scaling = _files(emb[name])
        a, b = state["model.embed_tokens.lora_embedding_A"], state["model.embed_tokens.lora_embedding_B"]
        expected = expected + weight * scaling * (a.t()[ids] @ b.t())
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), expected, **TOL)


@pytest.mark.parametrize("per_row", [None, 2], ids=["stacked-in-place", "per-row-padded"])
def test_an_unselected_conv_adapter_whose_product_overflows_changes_no_row(conv, tmp_path, per_row) -> None:
    """Conv factors read at weight 0 (another slot in place, or a row's padding position at
    slot 0, which it holds) whose product overflows float32 add exactly nothing (inf * 0 = NaN)."""
    huge = tmp_path / "huge"
    shutil.copytree(conv["a"], huge)
    state = load_file(str(huge / "adapter_model.safetensors"))
    save_file({key: torch.full_like(t, 3e38) if ".lora_A." in key else t for key, t in state.items()},
              str(huge / "adapter_model.safetensors"))
    rt = HotswapRuntime(copy.deepcopy(conv["base"]), RuntimeConfig(
        target_modules=CONV_TARGETS, max_rank=8, device_slots=3, max_batch_size=4,
        max_adapters_per_row=per_row))
    rt.load("huge", huge)
    assert rt.info("huge").slot == 0
    rt.load("a", conv["a"])
    rt.load("b", conv["b"])
    sample, refs = conv["sample"], conv["refs"]
    with torch.no_grad():
        rt.activate("huge")
        assert not torch.isfinite(rt.model(sample)).all()  # it does overflow when selected
        rt.activate_rows(["b", None, "a"])
        out = rt.model(sample)
    assert rt.internals.selection.per_row is (per_row == 2)
    torch.testing.assert_close(out[0], refs["b"][0], **TOL)
    torch.testing.assert_close(out[1], refs[None][1], **TOL)
    torch.testing.assert_close(out[2], refs["a"][2], **TOL)
