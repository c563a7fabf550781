""":class:`EngineConfig`: how many sequences run at once, how long they may grow, and the shape
buckets compiled at warm-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import HotswapError


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of a :class:`~hotswap_rt.engine.GenerationEngine`.

    Args:
        max_seqs: sequences decoding at once (one KV row each).
        max_model_len: longest sequence (prompt + output); default: the model's
            ``max_position_embeddings``.
        kv_cache_tokens: KV memory budget in tokens, allocated once; it must hold
            ``(max_seqs + max_prefill_seqs) * max_model_len`` tokens (``max_seqs`` is lowered to
            fit). Default: what ``max_seqs`` needs, capped at 40% of the free memory.
        prefill_chunk: prompt tokens one sequence feeds per step (longer prompts take several
            steps, between which every running sequence decodes one token).
        max_prefill_seqs: prompts prefilled together in one forward.
        decode_buckets: batch sizes of the compiled decode graphs (default: 1, 4, 16, ...
            then ``max_seqs``); each step runs the smallest that fits.
        prefill_buckets: batch sizes of the compiled prefill graphs (default: 1 and
            ``max_prefill_seqs``).
        dynamic_lengths: chunk and KV lengths are dynamic dimensions of each graph (one kernel
            for every length; default on CPU). Off, every prefill is padded to
            ``prefill_chunk`` and attention reads the whole KV row: fully static graphs, as CUDA
            graphs need (default on CUDA).
        dynamic_batch: every decode bucket runs one graph whose batch dimension is dynamic
            (an unbacked size, 1 included: compiled at the first bucket; the buckets still pad
            the rows), and every prefill bucket another, so a start compiles two graphs
            instead of one per bucket (default on CPU). A model whose forward branches on the
            batch size cannot be traced so: its buckets then fall back (with a warning) to a
            graph for one row and one dynamic graph for the others, or a graph per bucket if
            it specializes on the size. Off, a graph per bucket (default on CUDA, where CUDA
            graphs are recorded per shape anyway).
        compile: ``torch.compile`` every bucket at start (off only for quick tests).
        serve_while_compiling: ``start`` returns at once and steps run the eager forward
            while every bucket compiles on a thread of its own, then the compiled graphs (no
            step waits for the switch). Adapter loads and unloads (``call``) wait until the
            compile has ended. Needs ``compile``; refused with CUDA graphs and with a runtime
            that compiles more than one graph per shape (``rt.graphs_per_shape``).
        compile_mode: ``torch.compile`` mode (default: ``"reduce-overhead"`` on CUDA, i.e. CUDA
            graphs, else None).
        torch_threads: intra-op threads of the engine thread (``torch.set_num_threads`` there,
            where every graph is compiled and run; dynamo guards on it); None leaves torch's.
        prefix_cache_tokens: KV of prompt prefixes kept for later requests with the same first
            tokens and the same adapters (whole blocks of 16 tokens; least recently used
            evicted first), allocated once beside the KV rows, in tokens. Default: an eighth of
            the KV rows' tokens; 0: no prefix cache.
        mixed_adapters: requests for different adapters run together (False: a request joins
            only while every running request has its adapter; the one-adapter-per-batch
            baseline that benchmarks compare with).
        keep_freed_memory: before the first step (after the compile), set malloc to keep freed
            memory for reuse, so each step's fresh tensors (logits, the sampler's work) reuse
            mapped pages instead of faulting in new ones
            (:func:`hotswap_rt.freed_memory.keep_freed_memory`: the whole process, not undone).
            None: on a CPU where the C library is glibc; True: required (an error elsewhere);
            False: malloc as it is.
    """

    max_seqs: int = 32
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    prefill_chunk: int = 256
    max_prefill_seqs: int = 4
    decode_buckets: tuple[int, ...] | None = None
    prefill_buckets: tuple[int, ...] | None = None
    dynamic_lengths: bool | None = None
    dynamic_batch: bool | None = None
    compile: bool = True
    serve_while_compiling: bool = False
    compile_mode: str | None = None
    mixed_adapters: bool = True
    torch_threads: int | None = None
    prefix_cache_tokens: int | None = None
    keep_freed_memory: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_seqs", "prefill_chunk", "max_prefill_seqs"):
            _positive(name, getattr(self, name))
        for name in ("max_model_len", "kv_cache_tokens", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.prefix_cache_tokens is not None and (
                not isinstance(self.prefix_cache_tokens, int) or isinstance(self.prefix_cache_tokens, bool)
                or self.prefix_cache_tokens < 0):
            raise HotswapError(f"EngineConfig.prefix_cache_tokens must be an int >= 0 (0: off) or "
                               f"None, got {self.prefix_cache_tokens!r}")
        for name in ("compile", "serve_while_compiling", "mixed_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise HotswapError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.serve_while_compiling and not self.compile:
            raise HotswapError("EngineConfig.serve_while_compiling needs compile=True")
        for name in ("dynamic_lengths", "dynamic_batch", "keep_freed_memory"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise HotswapError(f"EngineConfig.{name} must be True, False or None (by device), "
                                   f"got {getattr(self, name)!r}")
        if self.prefill_chunk < 2:
            raise HotswapError("EngineConfig.prefill_chunk must be >= 2")
        for name, limit in (("decode_buckets", self.max_seqs),
                            ("prefill_buckets", self.max_prefill_seqs)):
            buckets = getattr(self, name)
            if buckets is None:
                continue
            buckets = tuple(buckets)
            if not buckets or any(not isinstance(b, int) or b < 1 or b > limit for b in buckets):
                raise HotswapError(f"EngineConfig.{name} must be sizes in 1..{limit}, got {buckets!r}")
            object.__setattr__(self, name, tuple(sorted(set(buckets))))

    def buckets(self, max_seqs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(decode, prefill) batch buckets for ``max_seqs`` decode rows; the largest of each
        covers every batch."""
        decode = self.decode_buckets or tuple(b for b in (1, 4, 16) if b < max_seqs)
        decode = tuple(sorted({b for b in decode if b <= max_seqs} | {max_seqs}))
        prefill = self.prefill_buckets or (1,)
        prefill = tuple(sorted(set(prefill) | {self.max_prefill_seqs}))
        return decode, prefill


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HotswapError(f"EngineConfig.{name} must be a positive int, got {value!r}")


def bucket_for(buckets: tuple[int, ...], rows: int) -> int:
    """The smallest bucket that holds ``rows`` rows."""
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    raise HotswapError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def context_length(config: Any) -> int:
    """A transformers model config's context length."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise HotswapError("the model config gives no context length: set EngineConfig.max_model_len")
