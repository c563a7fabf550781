"""Demo: one compiled model, several adapters, swaps without recompiling.

Builds a small random Llama-style model from a config (no download), writes PEFT-format adapters
of different ranks to a temp dir with hotswap_rt's own writer, loads them, compiles once, then
swaps through them and prints per-swap latency, how much the output changed, and recompiles.

Run: ``python -m hotswap_rt.demo`` (or ``scripts/demo.sh``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from . import HotswapRuntime, RuntimeConfig
from .config import lora_scaling
from .peft_format import LoraModule, ParsedAdapter, write_adapter_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTER_RANKS = {"sql": 4, "chat": 8, "code": 16, "math": 32, "legal": 64}


def build_model(hidden: int = 256, layers: int = 4, vocab: int = 1024) -> torch.nn.Module:
    """A random Llama-style causal LM built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_random_adapter(model: torch.nn.Module, directory: Path, rank: int, seed: int) -> Path:
    """Write a random LoRA adapter for ``model``'s attention projections in PEFT's format."""
    generator = torch.Generator().manual_seed(seed)
    alpha = 2.0 * rank
    modules = {}
    for name, layer in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            d_out, d_in = layer.weight.shape
            modules[name] = LoraModule(
                lora_A=torch.randn(rank, d_in, generator=generator) / d_in**0.5,
                lora_B=torch.randn(d_out, rank, generator=generator) / rank,
                rank=rank, alpha=alpha, scaling=lora_scaling(rank, alpha, False),
            )
    adapter = ParsedAdapter(rank=rank, alpha=alpha, use_rslora=False, modules=modules,
                            base_model_name_or_path="hotswap-rt/demo-llama", task_type="CAUSAL_LM")
    return write_adapter_dir(adapter, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the adapters")
    args = parser.parse_args(argv)

    model = build_model()
    prompt = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for i, (name, rank) in enumerate(ADAPTER_RANKS.items()):
            write_random_adapter(model, Path(tmp) / name, rank, seed=100 + i)
        rt = HotswapRuntime(model, RuntimeConfig(TARGETS, max_rank=64, device_slots=3))
        for name in ADAPTER_RANKS:
            rt.load(name, Path(tmp) / name)
        print(f"model: Llama-style, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params, {len(rt.targets)} injected layers; {len(ADAPTER_RANKS)} adapters, "
              f"{rt.config.device_slots} device slots, max_rank {rt.config.max_rank}")
        start = time.perf_counter()
        rt.compile(prompt, guard="count")
        print(f"compiled in {time.perf_counter() - start:.1f} s "
              f"(compiles={rt.guard.compiles}, graph breaks={rt.guard.graph_breaks})\n")
        base_logits = rt.model(prompt).logits
        print(f"{'round':>5} {'adapter':>8} {'rank':>4} {'from':>6} {'swap ms':>8} "
              f"{'forward ms':>10} {'max|Δlogits|':>12} {'recompiles':>10}")
        for round_ in range(1, args.rounds + 1):
            for name, rank in ADAPTER_RANKS.items():
                tier = next(i.tier for i in rt.adapters() if i.name == name)
                t0 = time.perf_counter()
                rt.activate(name)
                t1 = time.perf_counter()
                out = rt.model(prompt).logits
                t2 = time.perf_counter()
                change = (out - base_logits).abs().max().item()
                print(f"{round_:>5} {name:>8} {rank:>4} {tier:>6} {(t1 - t0) * 1e3:>8.3f} "
                      f"{(t2 - t1) * 1e3:>10.2f} {change:>12.4f} {rt.guard.recompiles:>10}")
        rt.activate_rows(["sql", "code"])
        rt.model(prompt)
        rt.disable()
        disabled_change = (rt.model(prompt).logits - base_logits).abs().max().item()
    stats = rt.stats()
    print(f"\nper-row mix [sql, code] and disable: max|Δlogits| disabled = {disabled_change:.2e}")
    print(f"swaps (host->device copies): {stats['swaps']}, evictions: {stats['evictions']}, "
          f"copy latency p50 {stats['swap_latency_ms_p50']:.3f} ms, "
          f"p99 {stats['swap_latency_ms_p99']:.3f} ms")
    print(f"recompiles after compile: {rt.guard.recompiles}")
    return 0 if rt.guard.recompiles == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
