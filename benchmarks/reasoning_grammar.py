"""What reasoning before a constrained answer costs: a grammar that is the reasoning's pattern
(any text without ``</think>``, then ``</think>``) followed by a JSON schema, against the
schema's grammar alone, in the same run.

    .venv/bin/python -m benchmarks.reasoning_grammar [--vocab 32000] [--steps 200]

A synthetic byte-level vocabulary (``benchmarks.grammar_mask.vocabulary``, Llama 2's size by
default) with ``<think>`` and ``</think>`` as tokens of their own (as Qwen3's vocabulary has
them). Prints, for each grammar: seconds to compile its index (outlines-core; a fresh
vocabulary each time, best of 2), and microseconds per sampling step of 16 rows (greedy,
``Sampler.sample``) with every row inside the reasoning, and with every row inside the answer,
next to the step with no grammar, and with each row's mask written and unpacked every step
("nothing kept") instead of taken from what is kept per automaton state (``Grammars.masks``,
``Grammars.biases``); inside the reasoning also with the state kept as a bias of the
vocabulary's width (as every state was kept before banned ids were) against its banned ids (what
``mask_scores`` keeps where a state bans few tokens). The cases run in turn, round after
round (``interleaved``).
"""

from __future__ import annotations

import argparse
import time

import torch

from hotswap_rt.engine.sampling import RowSampling, Sampler, SamplingParams
from hotswap_rt.engine import structured
from hotswap_rt.engine.structured import Grammars, StructuredOutput
from hotswap_rt.serve.reasoning import THINK_CLOSE, THINK_OPEN, reasoning_pattern

from .grammar_mask import SCHEMA, interleaved, vocabulary

ROWS = 16


def compile_seconds(tokens: list[bytes | None], eos: int, spec: StructuredOutput) -> float:
    best = float("inf")
    for _ in range(2):
        grammars = Grammars(tokens, eos, vocab_size=len(tokens))
        start = time.perf_counter()
        grammars.index(spec)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    tokens = vocabulary(args.vocab - 2)
    eos = len(tokens) - 1
    tokens = [*tokens[:-1], THINK_OPEN.encode(), THINK_CLOSE.encode(), None]  # end-of-sequence last
    eos = len(tokens) - 1
    size, device = len(tokens), torch.device("cpu")
    schema = StructuredOutput.json_schema(SCHEMA)
    cases = {"schema alone": schema,
             "reasoning, then the schema (deepseek_r1 / an opened block)": schema.after(
                 reasoning_pattern("deepseek_r1", "open")),
             "<think>, reasoning, then the schema (qwen3, block not opened)": schema.after(
                 reasoning_pattern("qwen3", None))}
    print(f"vocabulary {size} tokens, torch threads {torch.get_num_threads()}")
    print("| grammar | index compile s | vs schema alone |")
    print("|---|---:|---:|")
    seconds = {name: compile_seconds(tokens, eos, spec) for name, spec in cases.items()}
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {value / seconds['schema alone']:.2f}x |")

    grammars = Grammars(tokens, eos, vocab_size=size)
    as_bias = Grammars(tokens, eos, vocab_size=size)  # keeps every state as a bias (as before banned ids)
    sampler = Sampler(device)
    logits = torch.randn(ROWS, size)
    params = SamplingParams(temperature=0.0)

    def rows_of(grammar_rows) -> list[RowSampling]:
        rows = [RowSampling(params, [1], size, device, (), g) for g in grammar_rows]
        for row in rows:  # sampling must not advance the grammars while timed
            row.observe = lambda token: None
        return rows

    def advanced(spec: StructuredOutput, text: bytes, cache_masks: bool = True, within=grammars) -> object:
        grammar = within.row(spec, cache_masks)
        for byte in text:
            grammar.advance(byte)  # token ids 0..255 are the bytes
        return grammar

    reasoning = cases["reasoning, then the schema (deepseek_r1 / an opened block)"]
    thinking = b"Let me think about it"
    steps = {
        "no grammar": rows_of([None] * ROWS),
        "schema alone, inside the answer, nothing kept": rows_of(
            [advanced(schema, b'{"name": "ab', cache_masks=False) for _ in range(ROWS)]),
        "schema alone, inside the answer": rows_of([advanced(schema, b'{"name": "ab') for _ in range(ROWS)]),
        "reasoning grammar, inside the reasoning, nothing kept": rows_of(
            [advanced(reasoning, thinking, cache_masks=False) for _ in range(ROWS)]),
        "reasoning grammar, inside the reasoning, kept as a bias": rows_of(
            [advanced(reasoning, thinking, within=as_bias) for _ in range(ROWS)]),
        "reasoning grammar, inside the reasoning, kept as banned ids": rows_of(
            [advanced(reasoning, thinking) for _ in range(ROWS)]),
        "reasoning grammar, inside the answer": rows_of(
            [advanced(reasoning, b'Done.</think>\n{"name": "ab') for _ in range(ROWS)]),
    }
    sparse_below, structured.SPARSE_BELOW = structured.SPARSE_BELOW, size + 1  # as_bias keeps no ids
    sampler.sample(logits, steps["reasoning grammar, inside the reasoning, kept as a bias"])
    structured.SPARSE_BELOW = sparse_below
    micros = interleaved({name: lambda rows=rows: sampler.sample(logits, rows) for name, rows in steps.items()},
                         args.steps, device)
    print(f"\n| sampling step, {ROWS} rows | us (median) | vs no grammar |")
    print("|---|---:|---:|")
    for name, value in micros.items():
        print(f"| {name} | {value:.0f} | {value / micros['no grammar']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
