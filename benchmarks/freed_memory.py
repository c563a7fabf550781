"""What keeping freed memory (``hotswap_rt.freed_memory``, the engine's default on a CPU) saves:
malloc as it is against freed memory kept, each measurement in a child process of its own
(malloc's settings are the process's, and are not undone), the two taking turns.

    .venv/bin/python -m benchmarks.freed_memory [--rounds 3]

1. ``Sampler.sample`` of 16 rows on a thread of its own (as the engine thread samples), at
   temperature 1 and at Qwen3's defaults (0.6, top_p 0.95, top_k 20), for a 32k and a 152k
   (Qwen's) vocabulary: steps of the 32k one first, then of the 152k one (which allocations
   came before decides where malloc settles). Milliseconds and minor page faults per step.
2. A ``GenerationEngine`` (eager, ``sampler_step --engine``'s model: a random 4-layer
   hidden-256 Llama with a 32k vocabulary, lm_head scaled) serving 16 requests of 32 prompt and
   64 generated tokens at once, at temperature 1 and greedy: output tokens per second, with
   ``EngineConfig(keep_freed_memory=False)`` and with the default.

Medians over the rounds (each child: the median of its own repeats) and the ratio kept / as is.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = 16
VOCABS = (32000, 151936)
SAMPLING = {"temperature 1": {"temperature": 1.0},
            "Qwen3 defaults": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}}
ENGINE_CASES = {"temperature 1": {"temperature": 1.0}, "greedy": {"temperature": 0.0}}


def sampler_steps(kept: bool, steps: int = 30) -> dict[str, float]:
    """Child: ms and faults per sampler step, per vocabulary and case (see the module doc)."""
    import torch

    from hotswap_rt.engine.sampling import RowSampling, Sampler, SamplingParams
    from hotswap_rt.freed_memory import keep_freed_memory

    if kept:
        keep_freed_memory()
    result: dict[str, float] = {}

    def run() -> None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        sampler = Sampler(torch.device("cpu"))
        for vocab in VOCABS:
            logits = torch.randn(ROWS, vocab) * 3
            for label, params in SAMPLING.items():
                rows = [RowSampling(SamplingParams(max_tokens=8, **params), [1, 2, 3], vocab,
                                    torch.device("cpu"), ()) for _ in range(ROWS)]
                for _ in range(5):
                    sampler.sample(logits, rows)
                times = []
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(steps):
                    start = time.perf_counter()
                    sampler.sample(logits, rows)
                    times.append(time.perf_counter() - start)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                result[f"sampler {vocab}, {label}: ms"] = statistics.median(times) * 1e3
                result[f"sampler {vocab}, {label}: faults"] = faults / steps

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def engine_throughput(kept: bool, repeats: int = 3) -> dict[str, float]:
    """Child: output tokens per second of an eager engine (see the module doc)."""
    from hotswap_rt.engine.sampling import SamplingParams

    from .sampler_step import eager_engine, peaked_llama, tokens_per_second

    vocab = VOCABS[0]
    engine = eager_engine(peaked_llama(vocab), torch_threads=1, keep_freed_memory=None if kept else False)
    result = {}
    try:
        for label, params in ENGINE_CASES.items():
            sampling_params = SamplingParams(max_tokens=64, ignore_eos=True, **params)
            tokens_per_second(engine, vocab, sampling_params)  # warms up
            rates = [tokens_per_second(engine, vocab, sampling_params) for _ in range(repeats)]
            result[f"engine, 16 requests, {label}: tok/s"] = statistics.median(rates)
    finally:
        engine.stop()
    return result


def _child(part: str, kept: bool) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.freed_memory", "--child", part,
                           "--kept" if kept else "--as-is"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"child {part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["sampler", "engine"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--kept", action="store_true")
    mode.add_argument("--as-is", action="store_true")
    args = parser.parse_args()
    if args.child:
        work = sampler_steps if args.child == "sampler" else engine_throughput
        print(json.dumps(work(args.kept)))
        return 0
    figures: dict[str, dict[bool, list[float]]] = {}
    for _ in range(args.rounds):
        for part in ("sampler", "engine"):
            for kept in (False, True):
                for name, value in _child(part, kept).items():
                    figures.setdefault(name, {False: [], True: []})[kept].append(value)
    print(f"\n| {args.rounds} rounds, medians | malloc as it is | freed memory kept | kept / as is |")
    print("|---|---:|---:|---:|")
    for name, values in figures.items():
        as_is, kept = statistics.median(values[False]), statistics.median(values[True])
        ratio = f"{kept / as_is:.2f}x" if as_is else "-"
        print(f"| {name} | {as_is:.1f} | {kept:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
