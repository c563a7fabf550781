"""Structured output's per-step cost in the sampler at real vocabulary sizes, against the
sampler with no grammar and against the previous way of masking (per row: unpack the packed
mask to a bool ``[V]`` with shifts, ``masked_fill_`` the row) in the same run.

    .venv/bin/python -m benchmarks.grammar_mask [--device cpu|cuda] [--steps 200]

A synthetic byte-level vocabulary (the 256 bytes, then distinct random ASCII strings) of 32k
and 128k tokens (Llama 2 / Llama 3 sizes); every structured row is a few tokens into a JSON
schema (inside a string, where most tokens are allowed, or between fields, where few are).
Prints microseconds per step (``Sampler.sample`` of the whole batch, greedy) and the ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

from hotswap_rt.engine.sampling import RowSampling, SamplingParams, Sampler
from hotswap_rt.engine.structured import Grammars, RowGrammar, StructuredOutput

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
          "required": ["name", "tags"]}


def vocabulary(size: int, seed: int = 0) -> list[bytes | None]:
    """The 256 bytes, then distinct random printable ASCII strings of 2..10 characters; the
    last id is end-of-sequence (no bytes)."""
    rng = random.Random(seed)
    tokens: list[bytes | None] = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    while len(tokens) < size - 1:
        token = bytes(rng.randrange(32, 127) for _ in range(rng.randint(2, 10)))
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return [*tokens, None]


def old_mask(scores: torch.Tensor, rows: list[RowGrammar]) -> None:
    """The previous masking, per row: shifts unpack the words to bool ``[V]``, then fill."""
    shifts = torch.arange(32, dtype=torch.int32)
    for i, grammar in enumerate(rows):
        words = torch.zeros(grammar.words, dtype=torch.int32)
        grammar.write_mask(words)
        allowed = ((words.unsqueeze(1) >> shifts) & 1).flatten()[:grammar.vocab_size].bool()
        scores[i].masked_fill_(~allowed.to(scores.device), float("-inf"))


def timed(step, steps: int, device: torch.device) -> float:
    """Median microseconds of ``step()`` over ``steps`` runs (after 5 not counted)."""
    return interleaved({"step": step}, steps, device)["step"]


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median microseconds of each of ``steps`` over ``rounds`` rounds that run every step once
    in turn (after 5 rounds not counted): a slower or faster spell of the machine falls on all
    of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for n in range(rounds + 5):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if n >= 5:
                samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    sampler = Sampler(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}; microseconds per sampling step (median)")
    print("| vocab | rows | no grammar | grammar (batched bias) | previous (per-row fill) | batched / none | "
          "previous / batched |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in (32000, 128256):
        tokens = vocabulary(size)
        grammars = Grammars(tokens, size - 1, vocab_size=size)
        spec = StructuredOutput.json_schema(SCHEMA)
        grammars.index(spec)  # compiled before timing
        for batch in (1, 16):
            rng = random.Random(batch)
            rows = []
            for r in range(batch):
                grammar = grammars.row(spec)
                for _ in range(r % 6):  # rows at different places in the output
                    allowed = grammar.allowed().nonzero().flatten().tolist()
                    grammar.advance(rng.choice([t for t in allowed if t != size - 1]))
                rows.append(grammar)
            logits = torch.randn(batch, size, device=device)
            plain = [RowSampling(SamplingParams(temperature=0.0), [1], size, device, ()) for _ in rows]
            structured = [RowSampling(SamplingParams(temperature=0.0), [1], size, device, (), g) for g in rows]
            for row in structured:  # sampling must not advance the grammars while timed
                row.observe = lambda token: None
            for row in plain:
                row.observe = lambda token: None
            none = timed(lambda: sampler.sample(logits, plain), args.steps, device)
            new = timed(lambda: sampler.sample(logits, structured), args.steps, device)

            def previous() -> None:
                scores = sampler.process(logits.float(), plain).clone()  # old_mask writes to it
                old_mask(scores, rows)
                scores.argmax(dim=-1).tolist()

            old = timed(previous, args.steps, device)
            print(f"| {size} | {batch} | {none:.0f} | {new:.0f} | {old:.0f} | {new / none:.2f}x | "
                  f"{old / new:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
