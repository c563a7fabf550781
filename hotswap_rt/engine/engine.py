"""The generation engine: continuous batching over compiled shape buckets, an adapter per row.

One thread owns the compiled model. Each iteration::

    run queued commands (adapter loads/unloads)          between steps, never under a forward
    drop cancelled requests, admit waiting ones           leases keep their adapters in slots
                   a prompt that begins with blocks of tokens an earlier request computed
                   under the same adapters copies their KV from the prefix cache
    prefill step   every prefilling prompt feeds its next chunk (<= prefill_chunk tokens);
                   prompts that are done sample their first token and join the decode rows
                   (their KV is kept in the prefix cache)
    decode step    every decoding sequence feeds its last token and samples the next
    retire         finished sequences leave at once (their KV kept in the prefix cache); their
                   rows are refilled by moving others

A request joins at the next step and never waits for running sequences to end; a long prompt
takes several steps, and running sequences decode one token between each of them. Each forward
runs the smallest compiled batch bucket that fits (padding rows are inert); every bucket is
compiled at start, then the recompilation guard proves nothing else compiles. The selection is
rewritten per step from the rows (``activate_rows``): no copy unless an adapter must move into a
device slot, which happens only when a request is admitted (its lease).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence as Seq

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ..errors import HotswapError, UnknownAdapterError
from ..forward import check_eager_meanwhile, mode_options
from ..freed_memory import can_keep_freed_memory, keep_freed_memory
from ..runtime import HotswapRuntime
from ..selection import Activation, row_spec
from .config import EngineConfig, bucket_for, context_length
from .kv_cache import KVMemory, rows_for_budget
from .prefix_cache import BLOCK, PrefixCache
from .structured import Grammars
from .leases import AdapterLeases
from .sampling import RequestError, RowSampling, Sampler, SamplingParams
from .sequence import Event, RequestHandle, Sequence, Tokenizer
from .step import StepRunner, StepShapes, build_inputs
from .warmup import Progress, compile_buckets

log = logging.getLogger(__name__)
# compile_cache_counts' names for inductor's FX graph cache counters
_CACHE_COUNTERS = {"hit": "fxgraph_cache_hit", "built": "fxgraph_cache_miss",
                   "bypassed": "fxgraph_cache_bypass"}
StepObserver = Callable[[str, list[Sequence], float], None]  # (kind, rows, seconds)


class GenerationEngine:
    """Generate for many requests at once, each with its own adapter (see the module doc).

    Args:
        rt: the runtime; not yet compiled (the engine compiles its buckets). Its
            ``max_batch_size`` must hold the largest bucket.
        tokenizer: decodes tokens (``decode(ids) -> str``, ``eos_token_id``).
        config: sizes and buckets.
        on_step: called after every forward with ``(kind, rows, seconds)`` (metrics).

    Raises:
        HotswapError: the model, the runtime and the config do not fit together.
    """

    def __init__(self, rt: HotswapRuntime, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 *, on_step: StepObserver | None = None) -> None:
        self.rt, self.tokenizer = rt, tokenizer
        self.config = config = config or EngineConfig()
        model_config = rt.model.config
        self.device = next(rt.model.parameters()).device
        self.max_len = config.max_model_len or context_length(model_config)
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        layers = model_config.num_hidden_layers
        dtype = rt.model.get_input_embeddings().weight.dtype
        self.max_seqs = rows_for_budget(config, KVMemory.bytes_per_token(layers, kv_heads, head_dim, dtype),
                                  self.max_len + 1, self.device)
        decode_buckets, prefill_buckets = config.buckets(self.max_seqs)
        on_cpu = self.device.type == "cpu"
        # whether the engine thread sets malloc to keep freed memory before its first step
        # (see hotswap_rt.freed_memory)
        self.keeps_freed_memory = (config.keep_freed_memory if config.keep_freed_memory is not None
                                   else on_cpu) and can_keep_freed_memory()
        if config.keep_freed_memory and not self.keeps_freed_memory:
            raise HotswapError("EngineConfig.keep_freed_memory=True needs glibc's malloc (Linux); this "
                               "C library is not glibc (None: only where it is)")
        dynamic = config.dynamic_lengths if config.dynamic_lengths is not None else on_cpu
        dynamic_batch = config.dynamic_batch if config.dynamic_batch is not None else on_cpu
        self.shapes = StepShapes(decode_buckets, prefill_buckets, self.max_len, config.prefill_chunk,
                                 dynamic, dynamic_batch)
        largest = max(decode_buckets[-1], prefill_buckets[-1])
        if rt.config.max_batch_size < largest:
            raise HotswapError(f"RuntimeConfig.max_batch_size={rt.config.max_batch_size} is smaller "
                               f"than the largest engine bucket ({largest} rows)")
        self.memory = KVMemory(layers, kv_heads, head_dim, self.max_seqs + config.max_prefill_seqs,
                               self.max_len, dtype, self.device)
        prefix_tokens = config.prefix_cache_tokens
        if prefix_tokens is None:
            prefix_tokens = self.memory.rows * (self.max_len + 1) // 8
        self.prefix_cache = PrefixCache(self.memory, prefix_tokens) if prefix_tokens else None
        if self.prefix_cache is not None:
            log.info("prefix cache: %d blocks of %d tokens (%.1f MiB beside %.1f MiB of KV rows)",
                     self.prefix_cache.stats.capacity_blocks, BLOCK, self.prefix_cache.nbytes / 2**20,
                     self.memory.nbytes / 2**20)
        self.vocab_size = rt.model.get_output_embeddings().weight.shape[0]
        generation = getattr(rt.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._runner = StepRunner(rt, self.memory, self.max_seqs)
        self._sampler = Sampler(self.device)
        self._on_step = on_step
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []  # row i = KV row max_seqs + i
        self._decoding: list[Sequence] = []  # row i = KV row i
        self._leases = AdapterLeases(rt)
        self._commands: deque[tuple[Callable[[HotswapRuntime], Any], Future]] = deque()
        self._prefetching: dict[str, Future] = {}
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._ids = itertools.count()
        self._progress: Progress | None = None
        self._before_compile: Callable[[], None] | None = None
        self.startup_seconds: float | None = None
        self._compile_mode = config.compile_mode or ("reduce-overhead" if self.device.type == "cuda" else None)
        if config.serve_while_compiling:
            check_eager_meanwhile(rt.graphs_per_shape,
                                  mode_options(self._compile_mode, None, "EngineConfig.compile_mode"))
        # "off", "compiling", "compiled" or "failed" (compile_error says why)
        self.compile_state = "compiling" if config.compile else "off"
        self.compile_error: BaseException | None = None
        self.compile_seconds: float | None = None  # how long compiling every bucket took
        # graphs inductor's compile cache gave ("hit"), "built", could not cache ("bypassed")
        self.compile_cache_counts: dict[str, int] | None = None
        self._thread = threading.Thread(target=self._main, name="hotswap-engine", daemon=True)
        self._compiler: threading.Thread | None = None  # serve_while_compiling's compile thread

    # ------------------------------------------------------------------------------- lifecycle
    def start(self, progress: Progress | None = None, timeout: float | None = None, *,
              before_compile: Callable[[], None] | None = None) -> None:
        """Start the engine thread; return once every bucket is compiled and warmed up (with
        ``serve_while_compiling``: at once, the compile running on). ``progress(done, total,
        what)`` is called as each graph is ready. ``before_compile``: with
        ``serve_while_compiling``, run on the compile thread before it compiles (e.g. fill the
        compile cache from another process); what it raises fails the compile."""
        if before_compile is not None and not self.config.serve_while_compiling:
            raise HotswapError("before_compile runs only with EngineConfig.serve_while_compiling")
        self._progress = progress
        self._before_compile = before_compile
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the engine did not finish compiling in time")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        """Finish every request ("error": shutting down) and stop the thread (and wait for a
        compile in flight to end: it cannot be interrupted)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=60)
        if self._compiler is not None and self._compiler.is_alive():
            log.info("waiting for the compile in flight to end")
            self._compiler.join()

    # --------------------------------------------------------------------------- any thread
    def submit(self, prompt_ids: Seq[int], adapter: Activation = None,
               sampling: SamplingParams | None = None, *, sink: Callable[[Event], None] | None = None,
               request_id: str | None = None, cache_salt: str | None = None) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step.

        Args:
            prompt_ids: the prompt's token ids.
            adapter: None (base model), an adapter name, or ``{name: weight}`` (a weighted sum).
            sampling: defaults to :class:`SamplingParams()`; ``max_tokens=None`` means what
                remains of the context.
            sink: where events go (see :class:`RequestHandle`); default: the handle's queue.
            cache_salt: its prompt reuses (and leaves) prefix-cache KV only for requests with
                the same salt (a non-empty string; None: those without one), so that one tenant
                cannot tell from its latency what another one's prompts begin with.

        Raises:
            RequestError: a bad prompt or parameter (``param`` names it); UnknownAdapterError:
                an unknown adapter; SelectionError: a malformed adapter mix. Nothing is queued.
        """
        params = SamplingParams() if sampling is None else sampling
        if not isinstance(params, SamplingParams):
            raise RequestError("sampling", f"must be a SamplingParams, got {type(sampling).__name__}")
        if sink is not None and not callable(sink):
            raise RequestError("sink", f"must be a callable taking each event, got {sink!r}")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError("request_id", f"must be a string, got {request_id!r}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise RequestError("cache_salt", f"must be a non-empty string, got {cache_salt!r}")
        try:
            prompt = [] if isinstance(prompt_ids, (str, bytes)) else list(prompt_ids)
        except TypeError:  # not iterable
            prompt = []
        if not prompt or not all(type(t) is int and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError("prompt", f"must be 1 or more token ids (ints) in [0, {self.vocab_size})")
        remaining = self.max_len - len(prompt)
        if remaining < 1:
            raise RequestError("prompt", f"has {len(prompt)} tokens; the context holds {self.max_len}")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=remaining)
        elif params.max_tokens > remaining:
            raise RequestError("max_tokens", f"{params.max_tokens} tokens do not fit: the prompt has "
                                             f"{len(prompt)} of the context's {self.max_len}")
        params.check_vocab(self.vocab_size)
        adapter = self._check_adapter(adapter)
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", sink, self.notify)
        banned = tuple(sorted(self.eos_ids | set(params.stop_token_ids)))
        grammar = None if params.structured is None else self.grammars().row(params.structured)
        sampling_state = RowSampling(params, prompt, self.vocab_size, self.device, banned, grammar)
        sequence = Sequence(handle, prompt, adapter, params, sampling_state, self.tokenizer,
                            self.eos_ids, self.max_len, cache_salt=cache_salt)
        for name in sequence.adapter_names:
            self._prefetch_if_cold(name)
        with self._wake:
            if self._stopping:
                raise HotswapError("the engine is shutting down")
            self._waiting.append(sequence)
            self._wake.notify_all()
        return handle

    def grammars(self) -> Grammars:
        """Structured output's compiler over this engine's vocabulary (built at the first use;
        ``grammars().index(spec)`` compiles a spec ahead, e.g. on a worker thread, since a
        large vocabulary takes a while).

        Raises:
            RequestError: the tokenizer does not give its tokens' bytes (``token_bytes()``) or
                an end-of-sequence id, or outlines-core is missing.
        """
        with self._grammars_lock:
            if self._grammars is None:
                token_bytes = getattr(self.tokenizer, "token_bytes", None)
                if token_bytes is None or self.tokenizer.eos_token_id is None:
                    raise RequestError("response_format", "structured output needs a tokenizer that "
                                                          "gives its tokens' bytes and an end-of-sequence id")
                self._grammars = Grammars(token_bytes(), self.tokenizer.eos_token_id, self.vocab_size)
            return self._grammars

    def call(self, fn: Callable[[HotswapRuntime], Any]) -> Future:
        """Run ``fn(rt)`` on the engine thread between steps; its result or error in a Future."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify_all()
        return future

    def notify(self) -> None:
        """Wake the engine thread (something it waits on may have changed)."""
        with self._wake:
            self._wake.notify_all()

    def load(self) -> dict[str, Any]:
        """What runs and waits now: counts and the adapters involved."""
        with self._wake:
            waiting = list(self._waiting)
        running = self._prefilling + self._decoding
        return {"waiting": len(waiting), "running": len(running),
                "waiting_adapters": sorted({n for s in waiting for n in s.adapter_names}),
                "running_adapters": sorted({n for s in running for n in s.adapter_names})}

    def prefetched(self) -> list[str]:
        """Adapters whose background load (disk -> host) a request started, in or out of flight."""
        with self._wake:
            return sorted(self._prefetching)

    def _check_adapter(self, adapter: Activation) -> Activation:
        if adapter is None:
            return None
        spec = self.check_mix(adapter)
        for name in spec:
            self.rt.info(name)  # UnknownAdapterError
        return adapter if isinstance(adapter, str) else spec

    def check_mix(self, adapter: str | Mapping[str, float]) -> dict[str, float]:
        """``adapter`` as ``{name: weight}``, checked for what :meth:`submit` checks before
        the names: well formed, and no more adapters with a non-zero weight than one request
        may mix (whether the names are loaded is not checked).

        Raises:
            SelectionError: a malformed mix. RequestError: it mixes too many adapters.
        """
        spec = row_spec(adapter)
        config = self.rt.config
        field = "max_adapters_per_row" if config.mixes_overflow == "refuse" else "max_active_adapters"
        limit = getattr(config, field)
        used = len([w for w in spec.values() if w != 0.0])
        if used > limit:
            raise RequestError("adapters", f"mixes {used} adapters; at most {limit} per "
                                           f"request (RuntimeConfig.{field})")
        return spec

    def _prefetch_if_cold(self, name: str) -> None:
        info = self.rt.info(name)
        if info.tier != "disk" or info.source is None:
            return
        with self._wake:
            if name in self._prefetching and not self._prefetching[name].done():
                return
            try:
                future = self.rt.prefetch(name, info.source, replace=True)
            except HotswapError as exc:  # admission restages (and reports) it
                log.warning("prefetch of %r not started: %s", name, exc)
                return
            self._prefetching[name] = future
        future.add_done_callback(lambda _: self.notify())

    # ----------------------------------------------------------------------------- engine thread
    def _main(self) -> None:
        start = time.perf_counter()
        if self.config.torch_threads is not None:
            _own_thread_count(self.config.torch_threads)
        try:
            if self.config.serve_while_compiling:
                self._compiler = threading.Thread(target=self._compile_meanwhile, args=(start,),
                                                  name="hotswap-engine-compile", daemon=True)
                self._compiler.start()
            elif self.config.compile:
                self._compile(eager_meanwhile=False)
                self._compiled(start)
            if self.keeps_freed_memory:  # for the steps (set after a compile, which allocates otherwise)
                keep_freed_memory()
        except BaseException as exc:  # reported by start()
            self._startup_error, self.compile_error, self.compile_state = exc, exc, "failed"
            self._ready.set()
            return
        self.startup_seconds = time.perf_counter() - start
        self._ready.set()
        while True:
            with self._wake:
                while not (self._stopping or self._runnable_commands() or self._runnable()):
                    self._wake.wait(timeout=0.05 if self._waiting else None)
                if self._stopping:
                    break
                commands = []
                if self._runnable_commands():
                    commands = list(self._commands)
                    self._commands.clear()
            try:
                stepped = self._iterate(commands)
            except Exception:  # noqa: BLE001 - the engine thread must outlive any step
                log.exception("engine step failed")
                stepped = False
            if not stepped:  # waiting requests blocked (slots leased): a release or request wakes us
                with self._wake:
                    self._wake.wait(timeout=0.02)
        self._shutdown()

    def _compile_meanwhile(self, start: float) -> None:
        """serve_while_compiling: compile every bucket on this thread while the engine thread
        runs steps eagerly; a failed compile leaves the engine eager (logged, compile_state)."""
        if self.config.torch_threads is not None:  # dynamo guards on the thread count
            _own_thread_count(self.config.torch_threads)
        try:
            if self._before_compile is not None:
                self._before_compile()
                if self._stopping:  # stopped meanwhile: nothing left to compile for
                    return
            self._compile(eager_meanwhile=True)
        except BaseException as exc:  # noqa: BLE001 - the engine serves on, eagerly
            log.error("compiling the engine's buckets failed; steps keep running the eager "
                      "forward: %s", exc, exc_info=exc)
            with self._wake:
                self.compile_error, self.compile_state = exc, "failed"
                self._wake.notify_all()
            return
        self._compiled(start)
        counts = self.compile_cache_counts
        log.info("every bucket compiled in %.1f s (%d graphs from the compile cache, %d built): "
                 "steps run the compiled graphs from now on", self.compile_seconds, counts["hit"],
                 counts["built"])

    def _compile(self, eager_meanwhile: bool) -> None:
        """:func:`compile_buckets`, counting what inductor's FX graph cache gave meanwhile."""
        before = {name: counters["inductor"][key] for name, key in _CACHE_COUNTERS.items()}
        compile_buckets(self.rt, self._runner, self.shapes, self._compile_mode, self._progress,
                        eager_meanwhile=eager_meanwhile)
        # read again: the first compile of a process may put a new counter in place
        self.compile_cache_counts = {name: counters["inductor"][key] - before[name]
                                     for name, key in _CACHE_COUNTERS.items()}

    def _compiled(self, start: float) -> None:
        with self._wake:
            self.compile_seconds = time.perf_counter() - start
            self.compile_state = "compiled"
            self._wake.notify_all()  # commands held back while compiling may run

    def _runnable_commands(self) -> bool:
        """Commands wait while the compile thread runs (an adapter load may change what it
        traces)."""
        return bool(self._commands) and self.compile_state != "compiling"

    def _runnable(self) -> bool:
        return bool(self._prefilling or self._decoding or any(self._ready_to_admit(s) for s in self._waiting))

    def _iterate(self, commands: list[tuple[Callable[[HotswapRuntime], Any], Future]]) -> bool:
        """One iteration (see the module doc); whether a forward ran."""
        for fn, future in commands:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.rt))
                except BaseException as exc:
                    future.set_exception(exc)
        if commands:
            self._fail_unloaded()
        self._drop_cancelled()
        self._admit()
        stepped = bool(self._prefilling or self._decoding)
        if self._prefilling:
            self._prefill_step()
        if self._decoding:
            self._decode_step()
        if stepped and not (self._prefilling or self._decoding):
            # Idle: select nothing, so the last forward's adapters hold no slot (a lease from
            # another thread, e.g. Ray's multiplexing, may then take any slot not leased).
            self.rt.activate(None)
        return stepped

    # -- admission and retirement -----------------------------------------------------------
    def _ready_to_admit(self, sequence: Sequence) -> bool:
        if sequence.handle.cancelled.is_set():
            return True  # to be dropped
        return all(self._prefetching.get(n) is None or self._prefetching[n].done()
                   for n in sequence.adapter_names)

    def _admit(self) -> None:
        """Move waiting requests into prefill rows, in arrival order, while rows are free; a
        request whose adapter cannot have a slot yet (every slot leased) waits, others pass."""
        config = self.config
        with self._wake:
            candidates = list(self._waiting)
        for sequence in candidates:
            if len(self._prefilling) >= config.max_prefill_seqs or \
                    len(self._prefilling) + len(self._decoding) >= self.max_seqs:
                return
            if sequence.finished:  # cancelled meanwhile
                continue
            if not self._ready_to_admit(sequence) or not self._may_join(sequence):
                continue
            try:
                if not self._leases.acquire(sequence.adapter_names):
                    continue
            except HotswapError as exc:  # e.g. its adapter failed to load: it fails alone
                self._unqueue(sequence)
                sequence.finish("error", str(exc))
                continue
            self._unqueue(sequence)
            self._prefilling.append(sequence)
            self._reuse_prefix(sequence, self.max_seqs + len(self._prefilling) - 1)

    # -- prefix cache ----------------------------------------------------------------------------
    def _weights_key(self, sequence: Sequence) -> tuple | None:
        """The prefix cache's key of ``sequence``'s KV: its cache salt, and what the KV is
        computed with (each adapter's name, mix weight and ``weights_id``); None (never
        cached) while one of them trains, or once one is unloaded."""
        spec = {} if sequence.adapter is None else row_spec(sequence.adapter)
        key = []
        for name, weight in sorted(spec.items()):
            if weight == 0.0:
                continue
            try:
                info = self.rt.info(name)
            except UnknownAdapterError:
                return None
            if info.trainable:
                return None
            key.append((name, weight, info.weights_id))
        return (sequence.cache_salt, tuple(key))

    def _reuse_prefix(self, sequence: Sequence, row: int) -> None:
        """A new prefill row: the KV of its prompt's longest cached prefix into row ``row``."""
        if self.prefix_cache is None:
            return
        sequence.weights_key = self._weights_key(sequence)
        if sequence.weights_key is None:
            return
        match = self.prefix_cache.match(sequence.weights_key, sequence.prompt_ids)
        self.prefix_cache.load(match, row)
        sequence.cached = sequence.cached_prompt_tokens = match.tokens

    def _keep_prefix(self, sequence: Sequence, row: int) -> None:
        """Keep the KV row ``row`` holds for ``sequence`` in the prefix cache, unless one of
        its adapters changed since it was admitted."""
        if self.prefix_cache is None or sequence.weights_key is None:
            return
        if self._weights_key(sequence) != sequence.weights_key:
            return
        self.prefix_cache.store(sequence.weights_key, sequence.computed_ids, row)

    def _may_join(self, sequence: Sequence) -> bool:
        """Mixed adapters, or (the baseline) every running request has this one's adapter."""
        if self.config.mixed_adapters:
            return True
        return all(s.adapter == sequence.adapter for s in (*self._prefilling, *self._decoding))

    def _unqueue(self, sequence: Sequence) -> None:
        with self._wake:
            self._waiting.remove(sequence)

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled = [s for s in self._waiting if s.handle.cancelled.is_set()]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in [*cancelled, *self._prefilling, *self._decoding]:
            if sequence.handle.cancelled.is_set():
                sequence.finish("cancelled")
        self._retire_finished()

    def _fail_unloaded(self) -> None:
        known = {info.name for info in self.rt.adapters()}
        for sequence in [*self._prefilling, *self._decoding, *list(self._waiting)]:
            missing = [n for n in sequence.adapter_names if n not in known]
            if missing:
                sequence.finish("error", f"adapter {missing[0]!r} was unloaded")
                if sequence in self._waiting:
                    self._unqueue(sequence)
        self._retire_finished()
        self._leases.forget_unloaded(known)

    def _retire_finished(self) -> None:
        """Release finished sequences and refill their rows from the end (one move each)."""
        self._prefilling = self._compact(self._prefilling, self.max_seqs)
        self._decoding = self._compact(self._decoding, 0)

    def _compact(self, rows: list[Sequence], base: int) -> list[Sequence]:
        kept = [s for s in rows if not s.finished]
        for row, sequence in enumerate(rows):
            if sequence.finished:
                if sequence.finish_reason in ("stop", "length"):
                    self._keep_prefix(sequence, base + row)
                self._leases.release(sequence.adapter_names)
        holes = [i for i in range(len(kept)) if rows[i].finished]
        movers = [(i, s) for i, s in enumerate(rows) if i >= len(kept) and not s.finished]
        for hole, (source, sequence) in zip(holes, movers):
            self.memory.move(base + source, base + hole, sequence.cached)
            rows[hole] = sequence
        return rows[:len(kept)]

    # -- steps ---------------------------------------------------------------------------------
    def _prefill_step(self) -> None:
        rows = self._prefilling
        chunks = [(s.next_chunk(self.config.prefill_chunk), s.cached) for s in rows]
        longest = max(len(tokens) for tokens, _ in chunks)
        length = self.shapes.chunk_length(longest)
        needed = max(start + len(tokens) for tokens, start in chunks)
        logits = self._forward(True, rows, chunks, bucket_for(self.shapes.prefill_buckets, len(rows)),
                               length, needed)
        if logits is None:
            return
        for sequence, (tokens, _) in zip(rows, chunks):
            sequence.cached += len(tokens)
        done = [i for i, s in enumerate(rows) if s.prefill_done]
        for i in done:
            self._keep_prefix(rows[i], self.max_seqs + i)
        if done:
            self._sample(logits[done], [rows[i] for i in done])
        for i in done:
            sequence = rows[i]
            if not sequence.finished:  # first token sampled: it joins the decode rows
                self.memory.move(self.max_seqs + i, len(self._decoding), sequence.cached)
                self._decoding.append(sequence)
        self._prefilling = self._compact_prefill(rows, set(done))

    def _compact_prefill(self, rows: list[Sequence], left: set[int]) -> list[Sequence]:
        """Prefill rows after ``left`` (indices) moved on or finished."""
        for i in left:
            if rows[i].finished:
                self._leases.release(rows[i].adapter_names)
        kept = [s for i, s in enumerate(rows) if i not in left]
        for new, sequence in enumerate(kept):
            old = rows.index(sequence)
            self.memory.move(self.max_seqs + old, self.max_seqs + new, sequence.cached)
        return kept

    def _decode_step(self) -> None:
        rows = self._decoding
        chunks = [([s.output_ids[-1]], s.cached) for s in rows]
        needed = max(s.cached for s in rows) + 1
        bucket = bucket_for(self.shapes.decode_buckets, len(rows))
        logits = self._forward(False, rows, chunks, bucket, 1, needed)
        if logits is None:
            return
        for sequence in rows:
            sequence.cached += 1
        self._sample(logits, rows)
        self._retire_finished()

    def _forward(self, prefill: bool, rows: list[Sequence], chunks: list[tuple[list[int], int]],
                 bucket: int, length: int, needed: int) -> torch.Tensor | None:
        """Run one forward; on failure every row of it finishes with the error (None)."""
        kv_length = self.shapes.kv_length(needed)
        adapters: list[Activation] = [s.adapter for s in rows] + [None] * (bucket - len(rows))
        start = time.perf_counter()
        try:
            inputs = build_inputs(chunks, bucket, length, kv_length, self.memory.scratch, self.device)
            logits = self._runner.forward(prefill, inputs, adapters)
        except Exception as exc:  # noqa: BLE001 - reported to the rows of this forward
            log.exception("%s forward failed", "prefill" if prefill else "decode")
            for sequence in rows:
                sequence.finish("error", f"generation failed: {exc}")
            self._retire_finished()
            return None
        if self._on_step is not None:
            self._on_step("prefill" if prefill else "decode", rows, time.perf_counter() - start)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> None:
        try:
            sampled = self._sampler.sample(logits, [s.sampling for s in rows])
        except Exception as exc:  # noqa: BLE001
            log.exception("sampling failed")
            for sequence in rows:
                sequence.finish("error", f"sampling failed: {exc}")
            return
        for sequence, token, logprobs in zip(rows, sampled.tokens, sampled.logprobs):
            try:
                sequence.accept(token, logprobs)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer error: this row only
                log.exception("streaming a token failed")
                sequence.finish("error", f"streaming failed: {exc}")

    def _shutdown(self) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for sequence in [*waiting, *self._prefilling, *self._decoding]:
            sequence.finish("error", "the engine is shutting down")
        self._retire_finished()

def _own_thread_count(threads: int) -> None:
    """Set this thread's intra-op thread count only. ``torch.set_num_threads`` also sets the
    count every thread started later begins with (and dynamo guards on it: a model compiled on
    one thread would recompile on another): put that default back from a helper thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,))
    restore.start()
    restore.join()

