"""A sampling step's cost at real vocabulary sizes: ``Sampler.sample`` of 16 rows as it is,
against the previous sampler in the same run (``torch.argmax``; sampled rows by the
exponential race ``argmax(p / E)`` with ``E`` drawn for every token, top-p by sorting every
row whole; penalties row by row). Rows with penalties have a 100-token prompt.

    .venv/bin/python -m benchmarks.sampler_step [--device cpu|cuda] [--rounds 100] [--engine]

Logits are Zipf-like, as a language model's are (the token of rank ``r`` at ``-1.1 ln r``
plus noise, shuffled); each case's nucleus size is printed. Microseconds per step (medians of
interleaved rounds, ``grammar_mask.interleaved``) and the ratio. ``--engine`` also times what
it means for generation: a ``GenerationEngine`` on a random 4-layer hidden-256 Llama with a 32k
vocabulary (eager: no compile; its ``lm_head`` scaled so that its next-token distribution is
peaked, as a trained model's is, where a random one's is near uniform), 16 requests of 32
prompt and 64 generated tokens at once, output tokens per second with each sampler, in turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.engine import EngineConfig, GenerationEngine, sampling
from hotswap_rt.engine.sampling import RowSampling, Sampler, SamplingParams

from .gpu_check import _Tokens
from .grammar_mask import interleaved

ROWS = 16
LM_HEAD_SCALE = 12.0  # engine_throughput: the random model's logits spread like a trained model's
CASES = {"greedy": {"temperature": 0.0},
         "temperature 1": {"temperature": 1.0},
         "temperature 0.8, top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
         "temperature 0.6, top_p 0.95, top_k 20 (Qwen3's defaults)":
             {"temperature": 0.6, "top_p": 0.95, "top_k": 20},
         "temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05 (Qwen2.5's defaults)":
             {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}}


def previous_draw(self: Sampler, scores: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """The sampler's draw before the blocked argmax, the nucleus from the largest and the
    running-sum draw (all of ``sampling`` then)."""
    params = [row.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=self.device)
    scores = scores / temperature.unsqueeze(1)
    top_k = [p.top_k if p.top_k > 0 else scores.shape[1] for p in params]
    if min(top_k) < scores.shape[1]:
        kth = scores.topk(max(top_k), dim=-1).values
        index = torch.tensor([k - 1 for k in top_k], device=self.device).unsqueeze(1)
        scores = scores.masked_fill(scores < kth.gather(1, index), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=self.device).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs).exponential_(generator=self._generator)
    return (probs / noise.clamp_(min=1e-20)).argmax(dim=-1)


def previous_penalize(self: Sampler, scores: torch.Tensor, rows: list[RowSampling], at: list[int]) -> None:
    """The penalties before they were applied to all rows at once: row by row, by ``where``."""
    for i, row in zip(at, rows):
        params = row.params
        seen = (row.counts > 0) | (row.prompt_mask > 0)
        penalty = params.repetition_penalty
        if penalty != 1.0:
            scores[i] = torch.where(seen, torch.where(scores[i] > 0, scores[i] / penalty, scores[i] * penalty),
                                    scores[i])
        scores[i] -= params.frequency_penalty * row.counts
        scores[i] -= params.presence_penalty * (row.counts > 0).float()


def zipf_logits(rows: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -1.1 * ranks.log() + 0.5 * torch.randn(rows, vocab, generator=generator)
    order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)])
    return logits.gather(1, order).to(device)


def with_previous_sampler(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run with the previous sampler patched in (``previous_draw``, ``previous_penalize``,
    ``torch.argmax``)."""
    now_draw, now_penalize, now_argmax = Sampler._draw, Sampler._penalize, sampling.argmax_rows

    def run() -> object:
        Sampler._draw, Sampler._penalize = previous_draw, previous_penalize
        sampling.argmax_rows = lambda s: s.argmax(dim=-1)
        try:
            return step()
        finally:
            Sampler._draw, Sampler._penalize, sampling.argmax_rows = now_draw, now_penalize, now_argmax
    return run


def peaked_llama(vocab: int) -> LlamaForCausalLM:
    """A random 4-layer hidden-256 Llama whose ``lm_head`` is scaled by :data:`LM_HEAD_SCALE`: a
    random model's next token is near uniform; this makes it as peaked as a trained one's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                                         max_position_embeddings=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def eager_engine(model: torch.nn.Module, **config) -> GenerationEngine:
    """An eager engine of 16 rows (``config``: more :class:`EngineConfig` fields) over ``model``
    with all-linear slots, started."""
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=16, device_slots=2,
                                             host_slots=2, max_batch_size=ROWS))
    engine = GenerationEngine(rt, _Tokens(), EngineConfig(max_seqs=ROWS, max_model_len=128, prefill_chunk=64,
                                                           compile=False, **config))
    engine.start()
    return engine


def tokens_per_second(engine: GenerationEngine, vocab: int, params: SamplingParams) -> float:
    """Output tokens per second of :data:`ROWS` requests of 32 prompt tokens submitted at once."""
    begin = time.perf_counter()
    handles = [engine.submit([(7 * i + j) % vocab for j in range(32)], None, params) for i in range(ROWS)]
    tokens = sum(sum(1 for event in handle if hasattr(event, "token_id")) for handle in handles)
    return tokens / (time.perf_counter() - begin)


def engine_throughput(rounds: int, vocab: int = 32000) -> None:
    """Output tokens per second of an engine with each sampler (see the module doc)."""
    model = peaked_llama(vocab)
    with torch.no_grad():
        logits = model(torch.arange(16 * 32).view(16, 32) % vocab).logits[:, -1]
    probs = torch.softmax(logits / 0.8, dim=-1).sort(dim=-1, descending=True).values
    nucleus_size = int(((probs.cumsum(-1) - probs) <= 0.95).sum(-1).float().median())
    engine = eager_engine(model)
    print(f"\n| engine, 16 x (32 + 64) tokens, vocab {vocab}, eager, lm_head x{LM_HEAD_SCALE} (nucleus of "
          f"top_p 0.95 at temperature 0.8: {nucleus_size} tokens, median) | previous tok/s | now tok/s | "
          "speed-up |")
    print("|---|---:|---:|---:|")
    try:
        for label, params in CASES.items():
            sampling_params = SamplingParams(max_tokens=64, ignore_eos=True, **params)

            def generate() -> float:
                return tokens_per_second(engine, vocab, sampling_params)

            previous = with_previous_sampler(generate)
            generate()
            rates: dict[str, list[float]] = {"previous": [], "now": []}
            for _ in range(rounds):
                rates["previous"].append(previous())
                rates["now"].append(generate())
            old, new = statistics.median(rates["previous"]), statistics.median(rates["now"])
            print(f"| {label} | {old:.0f} | {new:.0f} | {new / old:.2f}x |")
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--engine", action="store_true", help="also the engine's tokens per second")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"device {device}, torch threads {torch.get_num_threads()}, {ROWS} rows; us per step (median)")
    print("| vocab | sampling | nucleus (top_p 0.95 at temperature 0.8, median tokens) | previous | now | "
          "speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    for vocab in (32000, 128000, 151936):
        logits = zipf_logits(ROWS, vocab, device)
        probs = torch.softmax(logits / 0.8, dim=-1).sort(dim=-1, descending=True).values
        size = int(((probs.cumsum(-1) - probs) <= 0.95).sum(-1).float().median())
        sampler = Sampler(device)
        for label, params in CASES.items():
            rows = [RowSampling(SamplingParams(**params), list(range(100)), vocab, device, ())
                    for _ in range(ROWS)]
            for row in rows:
                row.observe = lambda token: None  # the counts stay as they are while timed
            step = lambda rows=rows: sampler.sample(logits, rows)  # noqa: E731
            micros = interleaved({"previous": with_previous_sampler(step), "now": step}, args.rounds, device)
            print(f"| {vocab} | {label} | {size} | {micros['previous']:.0f} | {micros['now']:.0f} | "
                  f"{micros['previous'] / micros['now']:.2f}x |")
    if args.engine:
        engine_throughput(max(3, args.rounds // 10))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
