"""What a server serves and its limits: :class:`ServeConfig` (one field per ``hotswap-rt serve``
flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import EngineConfig
from .reasoning import REASONING_PARSERS
from .tools import TOOL_CALL_PARSERS


@dataclass
class ServeConfig:
    """Server settings; every CLI flag of ``hotswap-rt serve`` maps to one field.

    Args:
        model: a local directory or Hub id; None serves the built-in tiny model and its demo
            adapters (no download).
        adapters: adapter name -> directory (or Hub id), loaded at start.
        max_num_seqs: sequences generating at once (continuous batching; vLLM's name).
        max_model_len: longest prompt + output (default: the model's context length).
        kv_cache_tokens: KV memory budget in tokens (default: what ``max_num_seqs`` needs,
            capped at 40% of the free memory).
        prefill_chunk, max_prefill_seqs: prompt tokens per sequence per step; prompts
            prefilled together.
        prefix_cache_tokens: KV of prompt prefixes kept for later requests with the same first
            tokens and adapters (``EngineConfig.prefix_cache_tokens``), in tokens, beside the
            KV budget; default: an eighth of the KV rows' tokens; 0: off.
        allow_runtime_adapter_updates: expose ``/v1/load_lora_adapter`` and
            ``/v1/unload_lora_adapter``; paths must lie under ``adapter_root``.
        compile: ``torch.compile`` the engine's buckets at start (off only for quick tests).
        serve_while_compiling: take requests at once, answered by the eager forward while the
            buckets compile on a thread of their own, then by the compiled graphs
            (``EngineConfig.serve_while_compiling``); adapter loads and unloads wait for the
            compile. Needs ``compile``; not with ``stacked_mixes`` (two graphs per shape); CPU
            only (on CUDA the server records CUDA graphs).
        mixed_batches: requests for different adapters run together; False runs one adapter
            at a time (the PEFT-style baseline of ``benchmarks/serve_load.py``).
        max_adapters_per_request: adapters one request may mix (``"adapters"``); each row of
            a forward is computed with that many adapters' factors, whatever runs next to it
            (``RuntimeConfig.max_adapters_per_row``), so keep it small.
        stacked_mixes: requests may also mix more (up to ``device_slots``): a step holding such
            a request runs the stacked product instead (``RuntimeConfig.per_row_overflow=
            "stacked"``, both graphs compiled at start); needs ``max_adapters_per_request <
            device_slots``.
        api_keys: accepted ``Authorization: Bearer`` keys on every ``/v1/*`` route and ``/stats``
            (none: no authentication); ``/health`` and ``/metrics`` stay open.
        admin_api_keys: if given, only these keys may load and unload adapters.
        target_parameters, modules_to_save, scale_vectors: as in
            :class:`~hotswap_rt.RuntimeConfig`: MoE expert parameters that get LoRA slots,
            modules adapters may train in full (``lm_head``), and scale vectors reserved for
            IA3 / DoRA / LoRA-bias adapters loaded after start (those loaded at start add them).
        torch_threads: intra-op threads of the engine thread (``torch.set_num_threads`` there);
            default on CPU: every core but one, which the HTTP side keeps (on 2 cores a small model's
            decode step is also faster on one thread than on two).
        keep_freed_memory: the engine sets malloc to keep freed memory for reuse
            (``EngineConfig.keep_freed_memory``; None: on a CPU with glibc; False: malloc as it is).
        map_adapter_files: stage adapters from a private memory map of their files under a
            read lease that holds writers off meanwhile (``RuntimeConfig.map_adapter_files``:
            faster loads; files that cannot be leased are read). False: read each file into
            memory first.
        enable_auto_tool_choice, tool_call_parser: vLLM's pair: ``tool_choice`` "auto" (the
            default with ``tools``) reads the calls the model writes with this parser
            (``"hermes"``, ``"llama3_json"``, ``"pythonic"`` or ``"mistral"``,
            :mod:`~hotswap_rt.serve.tools`); both or neither.
        reasoning_parser: a reasoning model's ``<think>`` block goes to ``message.reasoning``
            (``"deepseek_r1"`` or ``"qwen3"``, :mod:`~hotswap_rt.serve.reasoning`; vLLM's
            ``--reasoning-parser``); None: all text is content.
        compile_cache: inductor's compile cache for ``hotswap-rt serve`` and each Ray replica
            (:mod:`~hotswap_rt.serve.compile_cache`): None is ``$TORCHINDUCTOR_CACHE_DIR`` as the
            process started, else ``~/.cache/hotswap_rt/inductor`` (``$XDG_CACHE_HOME``), which
            outlives reboots. ``build_app`` in your own process leaves inductor's setting alone.
    """

    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    target_modules: Any = "all-linear"
    max_rank: int = 16
    device_slots: int = 4
    host_slots: int = 16
    max_num_seqs: int = 32
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    prefill_chunk: int = 256
    max_prefill_seqs: int = 4
    prefix_cache_tokens: int | None = None
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    allow_runtime_adapter_updates: bool = False
    adapter_root: str | None = None
    device: str = "cpu"
    compile: bool = True
    serve_while_compiling: bool = False
    mixed_batches: bool = True
    torch_threads: int | None = None
    max_adapters_per_request: int = 2
    stacked_mixes: bool = False
    target_parameters: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    scale_vectors: bool = False
    api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()
    compile_cache: str | None = None
    map_adapter_files: bool = True
    keep_freed_memory: bool | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        self.api_keys, self.admin_api_keys = tuple(self.api_keys), tuple(self.admin_api_keys)
        if not all(isinstance(k, str) and k for k in (*self.api_keys, *self.admin_api_keys)):
            raise ValueError("API keys must be non-empty strings")
        for name in ("max_rank", "device_slots", "host_slots", "max_num_seqs", "prefill_chunk",
                     "max_prefill_seqs", "max_body_bytes", "max_adapters_per_request"):
            _positive(name, getattr(self, name))
        for name in ("max_model_len", "kv_cache_tokens", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.prefix_cache_tokens is not None and (
                not isinstance(self.prefix_cache_tokens, int) or isinstance(self.prefix_cache_tokens, bool)
                or self.prefix_cache_tokens < 0):
            raise ValueError(f"prefix_cache_tokens must be an int >= 0 (0: off), "
                             f"got {self.prefix_cache_tokens!r}")
        if self.stacked_mixes and self.max_adapters_per_request >= self.device_slots:
            raise ValueError(f"stacked_mixes needs max_adapters_per_request ({self.max_adapters_per_request}) "
                             f"< device_slots ({self.device_slots}): requests cannot mix more than that")
        if self.serve_while_compiling and not self.compile:
            raise ValueError("serve_while_compiling needs compile (nothing compiles without it)")
        if self.serve_while_compiling and self.device != "cpu":
            raise ValueError(f"serve_while_compiling runs on CPU only (device {self.device!r}: the "
                             f"server records CUDA graphs, which cannot be recorded while steps run)")
        if self.serve_while_compiling and self.stacked_mixes:
            raise ValueError("serve_while_compiling cannot be combined with stacked_mixes (a per-row "
                             "and a stacked graph per shape; it compiles one)")
        if self.enable_auto_tool_choice != (self.tool_call_parser is not None):
            raise ValueError("enable_auto_tool_choice and tool_call_parser go together (vLLM's "
                             "--enable-auto-tool-choice --tool-call-parser): give both or neither")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, "
                             f"got {self.reasoning_parser!r}")
        if self.keep_freed_memory is not None and not isinstance(self.keep_freed_memory, bool):
            raise ValueError(f"keep_freed_memory must be True, False or None, got {self.keep_freed_memory!r}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.allow_runtime_adapter_updates and not self.adapter_root:
            raise ValueError("allow_runtime_adapter_updates needs adapter_root (the only place "
                             "adapters may be loaded from)")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ValueError(f"adapter_root {self.adapter_root!r} is not a directory")

    def auto_tool_parser(self) -> str | None:
        """The parser "auto" tool choice uses, or None when it is off."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    def threads(self) -> int | None:
        """The intra-op thread count to set, or None to leave torch's."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (os.cpu_count() or 2) - 1) if self.device == "cpu" else None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
            kv_cache_tokens=self.kv_cache_tokens, prefill_chunk=self.prefill_chunk,
            max_prefill_seqs=self.max_prefill_seqs, prefix_cache_tokens=self.prefix_cache_tokens,
            compile=self.compile,
            serve_while_compiling=self.serve_while_compiling, mixed_adapters=self.mixed_batches,
            torch_threads=self.threads(), keep_freed_memory=self.keep_freed_memory)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
