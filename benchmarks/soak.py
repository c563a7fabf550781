"""Soak: thousands of random adapter operations against a compiled tiny model, with a PEFT-free
reference checking a sample of outputs.

Operations: load (new name or replace), prefetch, activate (one adapter or a weighted pair),
activate_rows, disable/enable, unload. After each one the compiled model runs a forward; every
``check_every`` operations its logits are compared with a reference computed from the adapter
files alone: the untouched base model called with merged weights ``W + sum_i w_i s_i B_i A_i``
(per row for per-row selections). Reports operations, mismatches, recompiles and resident
memory after warm-up and at the end.

Run: ``.venv/bin/python -m benchmarks.soak [--ops 10000] [--seed 0]``. A short version runs in
``tests/test_soak.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.func import functional_call

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(17))


@dataclass
class SoakResult:
    operations: int
    checks: int
    mismatches: int
    refused: int  # operations the runtime refused with a HotswapError (expected ones)
    recompiles: int
    rss_after_warmup_mb: float
    rss_end_mb: float
    max_diff: float
    first_mismatch: list[str]  # the operations leading to the first mismatch, if any

    def __str__(self) -> str:
        return (f"{self.operations} operations, {self.checks} checked, {self.mismatches} "
                f"mismatches (max |diff| {self.max_diff:.2e}), {self.refused} refused, "
                f"{self.recompiles} recompiles, RSS {self.rss_after_warmup_mb:.1f} MB after "
                f"warm-up -> {self.rss_end_mb:.1f} MB at the end")


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_adapters(base: torch.nn.Module, root: Path, count: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        rank = [2, 4, 8, 16][i % 4]
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False,
            use_rslora=i % 3 == 0))
        model.save_pretrained(str(root / f"adapter{i}"))
        paths.append(root / f"adapter{i}")
    return paths


class Reference:
    """Logits from the adapter files alone: the base model with merged weights."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.params = dict(base.named_parameters())
        self._factors: dict[Path, dict[str, torch.Tensor]] = {}

    def deltas(self, path: Path) -> dict[str, torch.Tensor]:
        """Parameter name -> ``s * B @ A`` for one adapter directory."""
        if path not in self._factors:
            config = json.loads((path / "adapter_config.json").read_text())
            state = load_file(str(path / "adapter_model.safetensors"))
            deltas = {}
            for key, lora_A in state.items():
                if ".lora_A." in key:
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    lora_B = state[key.replace(".lora_A.", ".lora_B.")]
                    rank = lora_A.shape[0]
                    alpha = config["lora_alpha"]
                    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
                    deltas[f"{module}.weight"] = scale * lora_B @ lora_A
            self._factors[path] = deltas
        return self._factors[path]

    @torch.no_grad()
    def logits(self, rows: list[list[tuple[Path, float]]], ids: torch.Tensor) -> torch.Tensor:
        """``rows``: one [(adapter dir, weight), ...] for all rows, or one per row (pairs, not
        a dict: two names may hold the same file)."""
        outputs = []
        for b in range(ids.shape[0]):
            spec = rows[0] if len(rows) == 1 else rows[b]
            params = dict(self.params)
            for path, weight in spec:
                for name, delta in self.deltas(path).items():
                    params[name] = params[name] + weight * delta
            outputs.append(functional_call(self.base, params, (ids[b : b + 1],)).logits)
        return torch.cat(outputs)


def run_soak(operations: int = 10_000, seed: int = 0, check_every: int = 25,
             workdir: Path | None = None) -> SoakResult:
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    root = Path(workdir or tempfile.mkdtemp(prefix="hotswap-soak-"))
    paths = _make_adapters(base, root, 6)
    reference = Reference(base)
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=16, device_slots=3, host_slots=4, max_active_adapters=2))
    names = [f"n{i}" for i in range(5)]
    content: dict[str, Path] = {}  # name -> the directory its current version came from
    rng = random.Random(seed)
    for name in names[:3]:
        content[name] = rng.choice(paths)
        rt.load(name, content[name])
    torch._dynamo.reset()
    rt.compile(IDS, guard="count")

    selection: list[dict[str, float]] = []
    enabled = True
    checks = mismatches = refused = 0
    worst = 0.0
    rss_warm = 0.0
    log: list[str] = []
    first_mismatch: list[str] = []
    for step in range(operations):
        kind = rng.random()
        log.append(f"{step}: kind={kind:.3f} selection={selection} enabled={enabled}")
        try:
            if kind < 0.15:  # load a new name, or replace an existing one
                name, path = rng.choice(names), rng.choice(paths)
                rt.load(name, path, replace=name in content)
                content[name] = path
            elif kind < 0.25:
                name, path = rng.choice(names), rng.choice(paths)
                rt.prefetch(name, path, replace=name in content).result()
                content[name] = path
            elif kind < 0.55 and content:
                pick = rng.sample(sorted(content), k=min(len(content), rng.choice([1, 2])))
                spec = {n: rng.choice([1.0, 0.5, -0.3]) for n in pick}
                rt.activate(spec)
                selection = [spec]
            elif kind < 0.7 and content:
                spec = [{rng.choice(sorted(content)): 1.0}, {}]
                rt.activate_rows([row or None for row in spec])
                selection = spec
            elif kind < 0.8:
                enabled = rng.random() < 0.7
                rt.enable() if enabled else rt.disable()
            elif content:
                name = rng.choice(sorted(content))
                rt.unload(name, force=True)
                del content[name]
                selection = [{n: w for n, w in row.items() if n != name} for row in selection]
            log.append(f"   -> content={ {n: p.name for n, p in content.items()} } "
                       f"selection={selection} enabled={enabled}")
        except HotswapError as exc:
            log.append(f"   -> refused: {exc}")
            refused += 1  # e.g. two adapters wanted at once that no longer both fit
        with torch.no_grad():
            out = rt.model(IDS).logits
        if step == operations // 5:
            rss_warm = _rss_mb()
        if step % check_every == 0:
            rows = [[(content[n], w) for n, w in row.items()] for row in selection] if enabled else []
            expected = reference.logits(rows or [[]], IDS)
            diff = (out - expected).abs().max().item()
            worst = max(worst, diff)
            checks += 1
            if diff > 1e-4 and not first_mismatch:
                first_mismatch = log[-16:] + [f"diff {diff:.3e} at step {step}"]
            mismatches += diff > 1e-4
    rt.eject()
    return SoakResult(operations, checks, mismatches, refused, rt.guard.recompiles,
                      rss_warm, _rss_mb(), worst, first_mismatch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=25)
    args = parser.parse_args()
    print(run_soak(args.ops, args.seed, args.check_every))


if __name__ == "__main__":
    main()
