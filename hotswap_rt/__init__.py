"""hotswap_rt: serve many LoRA adapters from one torch.compile'd model, swapping without recompiles.

Public API: :class:`HotswapRuntime`, :class:`RuntimeConfig`, :class:`AdapterInfo` and the
:class:`HotswapError` family. Everything else is internal.
"""

from .config import AdapterInfo, RuntimeConfig
from .errors import (
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
from .runtime import HotswapRuntime

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "AdapterInfo",
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
]
