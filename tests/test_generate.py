"""``rt.model.generate`` on the compiled model: static cache, adapter switches between calls and
per-row adapters inside one batched call, with no recompile and PEFT's exact greedy tokens.

transformers documents compiled generation as a static cache + a compiled forward; the runtime's
compiled forward is what ``generate`` calls. One compiled model is shared by the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch._dynamo

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import VOCAB, BaseModel

pytestmark = pytest.mark.slow  # compiles prefill and decode graphs on CPU

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SPECS = {
    "a": dict(r=4, lora_alpha=8),
    "b": dict(r=8, lora_alpha=16, use_rslora=True),
    "c": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
PROMPT = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(11))
GENERATE = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0)


@dataclass
class Generation:
    rt: HotswapRuntime
    expected: dict[str | None, torch.Tensor]  # eager PEFT tokens per adapter (None: base)


def _generate(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=PROMPT, **GENERATE)


@pytest.fixture(scope="module")
def generation(tmp_path_factory) -> Generation:
    torch._dynamo.reset()  # earlier modules compiled the same Llama code object
    base = BaseModel("llama", seed=5)
    root = tmp_path_factory.mktemp("generate-adapters")
    adapters = {n: base.make_adapter(root / n, seed=200 + i, **s) for i, (n, s) in enumerate(SPECS.items())}
    reference = base.peft_reference(adapters)
    expected: dict[str | None, torch.Tensor] = {}
    for name in adapters:
        reference.set_adapter(name)
        expected[name] = _generate(reference)
    expected[None] = _generate(base.model)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(target_modules=TARGETS, max_rank=16, device_slots=3))
    for name, directory in adapters.items():
        rt.load(name, directory)
    rt.activate("a")
    rt.compile(warmup=_generate, guard="raise")  # compiles the prefill and the decode graph
    return Generation(rt, expected)


def _tokens(rt: HotswapRuntime) -> torch.Tensor:
    with torch._dynamo.config.patch(error_on_recompile=True):
        return _generate(rt.model)


def test_adapters_differ_so_the_comparison_means_something(generation: Generation) -> None:
    tokens = [generation.expected[n] for n in ("a", "b", "c", None)]
    assert all(not torch.equal(x, y) for i, x in enumerate(tokens) for y in tokens[i + 1:])


def test_switching_between_generate_calls_matches_peft(generation: Generation) -> None:
    rt = generation.rt
    for name in ("b", "c", "a", "c", "b"):
        rt.activate(name)
        assert torch.equal(_tokens(rt), generation.expected[name]), name
    rt.activate(None)
    assert torch.equal(_tokens(rt), generation.expected[None])
    assert rt.guard.recompiles == 0 and rt.guard.compiles >= 2


def test_per_row_adapters_inside_one_generate(generation: Generation) -> None:
    rt = generation.rt
    rows = ["c", None, "a"]
    rt.activate_rows(rows)
    tokens = _tokens(rt)
    for row, name in enumerate(rows):
        assert torch.equal(tokens[row], generation.expected[name][row]), (row, name)
    rt.activate_rows(["b", "a", "c"])
    tokens = _tokens(rt)
    for row, name in enumerate(["b", "a", "c"]):
        assert torch.equal(tokens[row], generation.expected[name][row]), (row, name)
    assert rt.guard.recompiles == 0


def test_disabled_generate_is_the_base_model(generation: Generation) -> None:
    rt = generation.rt
    rt.activate("b")
    with rt.disabled():
        assert torch.equal(_tokens(rt), generation.expected[None])
    assert torch.equal(_tokens(rt), generation.expected["b"])
    assert rt.guard.recompiles == 0


def test_auto_compile_of_transformers_is_off(generation: Generation) -> None:
    assert generation.rt.model.generation_config.disable_compile is True
