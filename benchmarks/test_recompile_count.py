"""Recompiles over 1,000 random adapter operations, each followed by a forward, on a compiled
tiny Llama: hotswap_rt vs PEFT ``load_adapter`` + ``set_adapter`` on a ``torch.compile``d
PeftModel vs PEFT ``hotswap_adapter`` (after ``prepare_model_for_compiled_hotswap``).

Compiles are counted with dynamo's compile-start/end callbacks (trigger DYNAMO) from the end of
warm-up on; the compile time is the sum of start->end intervals. ``HOTSWAP_BENCH_OPS`` changes
the number of operations. Printed, never asserted.
"""

from __future__ import annotations

import copy
import os
import random
from typing import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import CompileCount, counting_compiles, figure, note, record

GROUP = "recompiles over random adapter operations (total wall time ratio to hotswap_rt)"
OPS = int(os.environ.get("HOTSWAP_BENCH_OPS", "1000"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = [2, 4, 8, 16, 4, 8]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("recompile")
    paths = []
    for i, rank in enumerate(RANKS):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        model.save_pretrained(str(root / f"a{i}"))
        paths.append(str(root / f"a{i}"))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    return base, paths, ids


def _run(benchmark, label: str, warm: Callable[[], None], op: Callable[[random.Random], None],
         forward: Callable[[], None]) -> CompileCount:
    torch._dynamo.reset()
    with torch.no_grad():
        warm()
        rng = random.Random(0)

        def run() -> CompileCount:
            with counting_compiles() as count:
                for _ in range(OPS):
                    op(rng)
                    forward()
            return count

        count = benchmark.pedantic(run, rounds=1, iterations=1)
    record(GROUP, label, benchmark, reference=label.startswith("hotswap_rt"))
    figure(f"recompiles/{label}", count.compiles)
    figure(f"compile_seconds/{label}", count.seconds)
    figure("recompiles/ops", OPS)
    note(GROUP, f"{label:<44} {OPS} ops: {count.compiles:4d} recompiles, "
                f"{count.seconds:7.2f} s compiling")
    return count


def test_hotswap_rt(benchmark, setup) -> None:
    base, paths, ids = setup
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, max_rank=16, device_slots=4,
                                                           host_slots=8))
    for i, path in enumerate(paths):
        rt.load(f"a{i}", path)
    names = [f"a{i}" for i in range(len(paths))]

    def op(rng: random.Random) -> None:
        kind = rng.random()
        if kind < 0.4:
            rt.activate(rng.choice(names))
        elif kind < 0.55:
            rt.activate_rows([rng.choice([*names, None]) for _ in range(ids.shape[0])])
        elif kind < 0.7:
            rt.activate({rng.choice(names): rng.uniform(0.1, 1.0), rng.choice(names): 0.5})
        elif kind < 0.8:
            rt.load(rng.choice(names), rng.choice(paths), replace=True)
        elif kind < 0.9:
            name = rng.choice(names)
            rt.unload(name, force=True)
            rt.load(name, rng.choice(paths))
        else:
            rt.disable() if rng.random() < 0.5 else rt.enable()

    count = _run(benchmark, "hotswap_rt (load/replace/unload/activate/rows)",
                 lambda: rt.compile(ids, guard="count"), op, lambda: rt.model(ids))
    assert count.compiles == 0 and rt.guard.recompiles == 0


def test_peft_load_and_set_adapter(benchmark, setup) -> None:
    base, paths, ids = setup
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="n0").eval()
    compiled = torch.compile(model)
    loaded = ["n0"]

    def op(rng: random.Random) -> None:
        if rng.random() < 0.25:
            name = f"n{len(loaded)}"
            model.load_adapter(rng.choice(paths), adapter_name=name)
            loaded.append(name)
        model.set_adapter(rng.choice(loaded))

    count = _run(benchmark, "peft load_adapter + set_adapter (compiled)",
                 lambda: compiled(input_ids=ids), op, lambda: compiled(input_ids=ids))
    note(GROUP, f"  (dynamo stops compiling at recompile_limit="
                f"{torch._dynamo.config.recompile_limit} and runs that frame eagerly)")
    assert count.compiles > 0


def test_peft_hotswap_adapter(benchmark, setup) -> None:
    base, paths, ids = setup
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    compiled = torch.compile(model)

    def op(rng: random.Random) -> None:
        hotswap_adapter(model, rng.choice(paths), adapter_name="default")

    _run(benchmark, "peft hotswap_adapter (compiled, prepared)",
         lambda: compiled(input_ids=ids), op, lambda: compiled(input_ids=ids))
