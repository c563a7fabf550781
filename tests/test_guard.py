"""Control tests: the guard really catches recompiles and graph breaks (so "0 recompiles" means
something), in each mode, and only for its own runtime.

A tiny hand-written model keeps each compile to a second or two.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hotswap_rt import GraphBreakError, HotswapError, HotswapRuntime, RecompileError, RuntimeConfig


class TinyLM(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` through two linear layers."""

    def __init__(self, vocab: int = 32, hidden: int = 16, graph_break: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.graph_break = graph_break

    def forward(self, input_ids: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.graph_break:
            torch._dynamo.graph_break()
        h = self.down(torch.relu(self.up(h)))
        if bias is not None:
            h = h + bias
        return self.head(h)


def _runtime(graph_break: bool = False) -> HotswapRuntime:
    torch.manual_seed(0)
    return HotswapRuntime(TinyLM(graph_break=graph_break), RuntimeConfig(["up", "down"], max_rank=4))


IDS = torch.randint(0, 32, (2, 5))


@pytest.fixture(autouse=True)
def _fresh_dynamo_no_grad():
    # Dynamo caches graphs per code object, shared by every TinyLM instance: reset so each test
    # sees its own compiles. rt.compile warms up under no_grad (serving); dynamo guards on it.
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["raise", "warn", "count"])
def test_deliberate_recompile_is_caught_in_each_mode(mode: str, caplog) -> None:
    rt = _runtime()
    rt.compile(IDS, guard=mode)
    assert rt.guard.compiles == 1 and rt.guard.recompiles == 0
    rt.model(IDS)  # same inputs: no recompile
    assert rt.guard.recompiles == 0
    new_input = {"input_ids": IDS, "bias": torch.zeros(16)}  # a new argument: a recompile
    with caplog.at_level(logging.WARNING, logger="hotswap_rt.guard"):
        if mode == "raise":
            with pytest.raises(RecompileError, match="recompiled"):
                rt.model(**new_input)
        else:
            rt.model(**new_input)
    assert rt.guard.recompiles == 1
    assert rt.guard.reasons and "bias" in rt.guard.reasons[0]
    assert ("recompiled" in caplog.text) == (mode == "warn")
    assert "recompiles=1" in rt.guard.report()


def test_dtype_change_is_a_recompile_with_reason() -> None:
    rt = _runtime()
    rt.compile(IDS, guard="count")
    rt.model(IDS.to(torch.int32))
    assert rt.guard.recompiles == 1
    assert any("int" in reason or "dtype" in reason for reason in rt.guard.reasons)


def test_graph_break_raises_with_fullgraph() -> None:
    rt = _runtime(graph_break=True)
    with pytest.raises(GraphBreakError, match="graph break"):
        rt.compile(IDS)
    assert not rt.compiled
    # The runtime still serves eagerly after the failed compile.
    assert rt.model(IDS).shape == (2, 5, 32)


def test_graph_break_counted_without_fullgraph() -> None:
    rt = _runtime(graph_break=True)
    rt.compile(IDS, fullgraph=False, guard="count")
    assert rt.guard.graph_breaks >= 1


def test_guard_ignores_other_compiled_functions() -> None:
    rt = _runtime()
    rt.compile(IDS, guard="raise")

    @torch.compile
    def other(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    other(torch.ones(3))
    other(torch.ones(3, dtype=torch.float64))  # recompiles *other*, not the runtime's forward
    assert rt.guard.recompiles == 0
    rt.model(IDS)
    assert rt.guard.recompiles == 0


def test_adapter_switches_on_tiny_model_do_not_recompile() -> None:
    rt = _runtime()
    rank, d = 2, 16
    state = {}
    for layer in ("up", "down"):
        state[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(rank, d)
        state[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(d, rank)
    rt.load("x", state_dict=state, config={"r": rank, "lora_alpha": 4})
    rt.compile(IDS, guard="raise")
    base = rt.model(IDS)
    rt.activate("x")
    with_x = rt.model(IDS)
    assert not torch.allclose(base, with_x)
    rt.activate_rows([None, "x"])
    mixed = rt.model(IDS)
    torch.testing.assert_close(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], with_x[1])
    assert rt.guard.recompiles == 0


def test_invalid_guard_mode_rejected() -> None:
    rt = _runtime()
    with pytest.raises(HotswapError, match="guard mode"):
        rt.guard.mode = "explode"  # type: ignore[assignment]
