"""``modules_to_save``: adapters that train a whole module (a classification ``score`` head, an
``lm_head``) hold its weight delta in their slot, selected per row like LoRA, against real PEFT.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (LlamaConfig, LlamaForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from hotswap_rt import HotswapRuntime, IncompatibleAdapterError, RuntimeConfig, TargetNotFoundError

from .conftest import (
    VOCAB, BaseModel, assert_rows_equal_alone, assert_unchanged, loaded_and_compiled, logits, max_diff,
    snapshot_state,
)

TARGETS = ["q_proj", "v_proj"]
TOL = 1e-4


def tiny_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def make_adapter(base: torch.nn.Module, directory: Path, seed: int, **lora: object) -> Path:
    """A PEFT LoRA adapter (on ``TARGETS`` unless ``target_modules=``); the fully trained
    modules' copies randomised (PEFT copies the base)."""
    torch.manual_seed(seed)
    lora.setdefault("target_modules", TARGETS)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return directory


def peft_alone(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A classifier, two SEQ_CLS adapters (PEFT adds ``score`` to modules_to_save), one plain LoRA
    adapter, PEFT references, and a compiled runtime holding ``score`` per slot."""
    base = tiny_classifier()
    root = tmp_path_factory.mktemp("heads")
    dirs = {
        "cls_a": make_adapter(base, root / "cls_a", 1, task_type="SEQ_CLS"),
        "cls_b": make_adapter(base, root / "cls_b", 2, task_type="SEQ_CLS"),
        "plain": make_adapter(base, root / "plain", 3),
    }
    references = {name: peft_alone(base, path) for name, path in dirs.items()}
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
    rt = loaded_and_compiled(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=8, device_slots=3, host_slots=4, modules_to_save=["score"]), dirs, ids)
    return base, dirs, references, rt, ids


def test_files_hold_the_head(heads) -> None:
    _, dirs, _, rt, _ = heads
    state = load_file(str(dirs["cls_a"] / "adapter_model.safetensors"))
    assert state["base_model.model.score.weight"].shape == (3, 64)
    assert rt.info("cls_a").modules_to_save == ("score",) and rt.info("plain").modules_to_save == ()


@pytest.mark.parametrize("name", ["cls_a", "cls_b", "plain"])
def test_each_alone_equals_peft(heads, name) -> None:
    _, _, references, rt, ids = heads
    rt.activate(name)
    assert max_diff(logits(rt.model, ids), logits(references[name], ids)) <= TOL


def test_mixed_batch_each_row_equals_peft_alone(heads) -> None:
    base, _, references, rt, ids = heads
    rows = ["cls_a", None, "plain", "cls_b"]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base, TOL)
    assert rt.guard.recompiles == 0


def test_weighted_heads_are_the_weighted_deltas(heads) -> None:
    base, dirs, _, rt, _ = heads
    rt.activate({"cls_a": 0.25, "cls_b": 0.5})
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    expected = base.score(x)
    for name, weight in (("cls_a", 0.25), ("cls_b", 0.5)):
        saved = load_file(str(dirs[name] / "adapter_model.safetensors"))["base_model.model.score.weight"]
        expected = expected + weight * x @ (saved - base.score.weight).T
    with torch.no_grad():
        assert max_diff(rt.model.score(x), expected) <= 1e-5


def test_slot_size_counts_the_head(heads) -> None:
    base, _, _, rt, _ = heads
    without = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, max_rank=8, device_slots=3))
    assert rt.slot_nbytes - without.slot_nbytes == 3 * (64 + 1) * 4


def test_save_loads_in_peft(heads, tmp_path) -> None:
    base, _, references, rt, ids = heads
    out = Path(rt.save("cls_a", tmp_path / "a"))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    assert max_diff(logits(peft_alone(base, out), ids), logits(references["cls_a"], ids)) <= TOL


def test_runtime_without_the_head_refuses_and_changes_nothing(heads) -> None:
    base, dirs, _, _, ids = heads
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, max_rank=8, device_slots=2))
    rt.load("plain", dirs["plain"])
    rt.activate("plain")
    before = snapshot_state(rt, ids)
    with pytest.raises(IncompatibleAdapterError, match="RuntimeConfig.modules_to_save"):
        rt.load("cls_a", dirs["cls_a"])
    assert_unchanged(before, snapshot_state(rt, ids))


def test_config_errors(heads) -> None:
    base, _, _, _, _ = heads
    with pytest.raises(TargetNotFoundError, match="must be nn.Linear or nn.Embedding"):
        HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, modules_to_save=["model.norm"]))
    with pytest.raises(TargetNotFoundError, match="both LoRA targets and modules_to_save"):
        HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, modules_to_save=["q_proj"]))


def test_lazy_runtime_holds_lm_head(tmp_path, input_ids) -> None:
    """A causal LM adapter with ``modules_to_save=["lm_head"]`` in a lazy runtime."""
    base = BaseModel("llama", seed=4)
    path = make_adapter(base.model, tmp_path / "head", 5, modules_to_save=["lm_head"])
    rt = HotswapRuntime(base.clone(), RuntimeConfig(None, max_rank=8, device_slots=2))
    rt.load("head", path)
    assert "lm_head" in rt.targets
    rt.activate_rows(["head", None, "head", None])
    ours = logits(rt.model, input_ids)
    reference = logits(peft_alone(base.model, path), input_ids)
    assert max_diff(ours[0::2], reference[0::2]) <= TOL
    assert max_diff(ours[1::2], logits(base.model, input_ids[1::2])) <= TOL


def test_per_row_mode_equals_peft(heads) -> None:
    """``max_adapters_per_row=1``: each row combines its own slot's head delta (one bmm)."""
    base, dirs, references, _, ids = heads
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, max_rank=8, device_slots=3,
                                                           max_adapters_per_row=1, modules_to_save=["score"]))
    for name, path in dirs.items():
        rt.load(name, path)
    rows = ["cls_b", "plain", None, "cls_a"]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base, TOL)


# ---------------------------------------------------------------------- an nn.Embedding in full
@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A tiny Llama, two adapters training ``embed_tokens`` in full (plus LoRA on q/v), PEFT
    alone on each, and a compiled runtime holding ``embed_tokens`` per slot."""
    base = BaseModel("llama", seed=8)
    root = tmp_path_factory.mktemp("embeddings")
    dirs = {name: make_adapter(base.model, root / name, seed, modules_to_save=["embed_tokens"])
            for seed, name in enumerate(("emb_a", "emb_b"), start=11)}
    references = {name: peft_alone(base.model, path) for name, path in dirs.items()}
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5))
    rt = loaded_and_compiled(base.clone(), RuntimeConfig(
        TARGETS, max_rank=8, device_slots=2, max_batch_size=4, modules_to_save=["embed_tokens"]), dirs, ids)
    return base, dirs, references, rt, ids


def test_embed_tokens_in_full_compiled_alone_and_mixed_equal_peft(embeddings) -> None:
    base, dirs, references, rt, ids = embeddings
    state = load_file(str(dirs["emb_a"] / "adapter_model.safetensors"))
    assert state["base_model.model.model.embed_tokens.weight"].shape == (VOCAB, 64)
    for name in dirs:
        rt.activate(name)
        expected = logits(references[name], ids)
        assert max_diff(expected, logits(base.model, ids)) > 0.1  # the trained embedding matters
        assert max_diff(logits(rt.model, ids), expected) <= TOL
    rows = ["emb_b", None, "emb_a", "emb_b"]
    rt.activate_rows(rows)
    assert_rows_equal_alone(logits(rt.model, ids), ids, rows, references, base.model, TOL)
    assert rt.guard.recompiles == 0


def test_weighted_embeddings_are_the_weighted_deltas(embeddings) -> None:
    base, dirs, _, rt, ids = embeddings
    rt.activate({"emb_a": 0.25, "emb_b": 0.5})
    expected = base.model.model.embed_tokens(ids)
    for name, weight in (("emb_a", 0.25), ("emb_b", 0.5)):
        file = load_file(str(dirs[name] / "adapter_model.safetensors"))
        saved = file["base_model.model.model.embed_tokens.weight"]
        expected = expected + weight * (saved - base.model.model.embed_tokens.weight)[ids]
    with torch.no_grad():
        assert max_diff(rt.model.model.embed_tokens(ids), expected) <= 1e-6
    assert rt.slot_nbytes - HotswapRuntime(base.clone(), RuntimeConfig(
        TARGETS, max_rank=8, device_slots=2)).slot_nbytes == VOCAB * 64 * 4


def test_embed_tokens_save_loads_in_peft_and_a_lazy_runtime_holds_it(embeddings, tmp_path) -> None:
    base, dirs, references, rt, ids = embeddings
    out = Path(rt.save("emb_a", tmp_path / "a"))
    assert max_diff(logits(peft_alone(base.model, out), ids), logits(references["emb_a"], ids)) <= TOL
    lazy = HotswapRuntime(base.clone(), RuntimeConfig(None, max_rank=8, device_slots=2))
    lazy.load("emb_b", dirs["emb_b"])
    assert "model.embed_tokens" in lazy.targets
    lazy.activate_rows(["emb_b", None])
    ours = logits(lazy.model, ids[:2])
    assert max_diff(ours[0], logits(references["emb_b"], ids[:1])[0]) <= TOL
    assert max_diff(ours[1], logits(base.model, ids[1:2])[0]) <= TOL


def test_a_resized_embedding_is_refused_and_changes_nothing(embeddings, tmp_path) -> None:
    """An adapter whose trained embedding has another vocabulary size (a resized model)."""
    base, dirs, _, rt, ids = embeddings
    state = load_file(str(dirs["emb_a"] / "adapter_model.safetensors"))
    config = json.loads((dirs["emb_a"] / "adapter_config.json").read_text())
    key = "base_model.model.model.embed_tokens.weight"
    resized = {**state, key: torch.cat([state[key], state[key][:1]])}
    rt.activate("emb_a")
    before = snapshot_state(rt, ids)
    with pytest.raises(IncompatibleAdapterError, match=r"has weight \(129, 64\), the model's is \(128, 64\)"):
        rt.load("resized", state_dict=resized, config=config)
    assert_unchanged(before, snapshot_state(rt, ids))


# ------------------------------------------------------- a head made of layers (RoBERTa's classifier)
ROBERTA_TARGETS = ["query", "value"]


def tiny_roberta_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_labels=3, max_position_embeddings=64)
    return RobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def roberta_heads(tmp_path_factory):
    """A RoBERTa classifier (its ``classifier`` a head of two linears, ``dense`` and
    ``out_proj``), two SEQ_CLS adapters (PEFT saves the head as ``classifier.dense.weight``,
    ...), PEFT alone on each, and a compiled runtime holding ``classifier`` per slot."""
    base = tiny_roberta_classifier()
    root = tmp_path_factory.mktemp("roberta")
    dirs = {name: make_adapter(base, root / name, seed, task_type="SEQ_CLS", target_modules=ROBERTA_TARGETS)
            for seed, name in enumerate(("head_a", "head_b"), start=21)}
    references = {name: peft_alone(base, path) for name, path in dirs.items()}
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(6))
    rt = loaded_and_compiled(copy.deepcopy(base), RuntimeConfig(
        ROBERTA_TARGETS, max_rank=8, device_slots=2, max_batch_size=4, modules_to_save=["classifier"]),
        dirs, ids)
    return base, dirs, references, rt, ids


def test_a_head_made_of_linears_is_held_as_its_linears(roberta_heads) -> None:
    _, dirs, _, rt, _ = roberta_heads
    state = load_file(str(dirs["head_a"] / "adapter_model.safetensors"))
    assert {key for key in state if "lora" not in key} == {
        f"base_model.model.classifier.{layer}.{param}"
        for layer in ("dense", "out_proj") for param in ("weight", "bias")}
    assert [t for t in rt.targets if t.startswith("classifier")] == ["classifier.dense", "classifier.out_proj"]
    assert rt.info("head_a").modules_to_save == ("classifier.dense", "classifier.out_proj")


def test_a_head_made_of_linears_alone_and_mixed_equals_peft(roberta_heads) -> None:
    base, _, references, rt, ids = roberta_heads
    for name in ("head_a", "head_b"):
        rt.activate(name)
        assert max_diff(logits(rt.model, ids), logits(references[name], ids)) <= TOL
    rows = ["head_b", None, "head_a", "head_b"]
    rt.activate_rows(rows)
    assert_rows_equal_alone(logits(rt.model, ids), ids, rows, references, base, TOL)
    assert rt.guard.recompiles == 0


def test_a_head_made_of_linears_saves_for_peft_and_a_lazy_runtime_holds_it(roberta_heads, tmp_path) -> None:
    base, dirs, references, rt, ids = roberta_heads
    out = Path(rt.save("head_a", tmp_path / "saved"))
    assert max_diff(logits(peft_alone(base, out), ids), logits(references["head_a"], ids)) <= TOL
    lazy = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(None, max_rank=8, device_slots=2))
    lazy.load("head_a", dirs["head_a"])
    assert {"classifier.dense", "classifier.out_proj"} <= set(lazy.targets)
    lazy.activate("head_a")
    assert max_diff(logits(lazy.model, ids), logits(references["head_a"], ids)) <= TOL


def test_a_module_to_save_with_parameters_outside_linears_is_refused() -> None:
    """RoBERTa's ``embeddings`` hold a LayerNorm beside their embedding tables: not held."""
    stray = r"roberta\.embeddings\.LayerNorm\.weight.*must be nn\.Linear"
    with pytest.raises(TargetNotFoundError, match=stray):
        HotswapRuntime(tiny_roberta_classifier(), RuntimeConfig(ROBERTA_TARGETS,
                                                                modules_to_save=["embeddings"]))
    with pytest.raises(TargetNotFoundError, match="both LoRA targets and modules_to_save"):
        HotswapRuntime(tiny_roberta_classifier(), RuntimeConfig(["dense"], modules_to_save=["classifier"]))
