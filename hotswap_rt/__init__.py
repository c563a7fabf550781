"""hotswap_rt: serve many LoRA adapters from one torch.compile'd model, swapping without recompiles.

Public API: :func:`enable_hotswap` (transformers' adapter methods on a runtime),
:func:`drop_process_registry_guards` (a ``guard_filter_fn`` for your own ``torch.compile``),
:class:`HotswapRuntime`, :class:`RuntimeConfig`, :class:`AdapterInfo`,
:class:`AdapterLease` and the :class:`HotswapError` family. Everything else is internal
(``rt.internals`` exposes the composed objects to tests and tools).
"""

import os as _os

# Read before anything below imports torch._dynamo, which sets it to inductor's temp-dir
# default: the user's own setting, which `hotswap-rt serve` keeps (see serve.cli).
_STARTUP_INDUCTOR_CACHE_DIR = _os.environ.get("TORCHINDUCTOR_CACHE_DIR")

# ruff: noqa: E402 (the imports below come after that read)
from .config import AdapterInfo, RuntimeConfig
from .errors import (
    AdapterChangedError,
    AdapterFormatError,
    GraphBreakError,
    HotswapError,
    IncompatibleAdapterError,
    RankTooLargeError,
    RecompileError,
    SelectionError,
    SlotsBusyError,
    TargetNotFoundError,
    UnknownAdapterError,
)
from .forward import drop_process_registry_guards
from .residency import AdapterLease
from .runtime import HotswapRuntime
from .transformers_api import enable_hotswap

__version__ = "0.1.0"

__all__ = [
    "AdapterChangedError",
    "AdapterFormatError",
    "AdapterInfo",
    "AdapterLease",
    "GraphBreakError",
    "HotswapError",
    "HotswapRuntime",
    "IncompatibleAdapterError",
    "RankTooLargeError",
    "RecompileError",
    "RuntimeConfig",
    "SelectionError",
    "SlotsBusyError",
    "TargetNotFoundError",
    "UnknownAdapterError",
    "drop_process_registry_guards",
    "enable_hotswap",
]
