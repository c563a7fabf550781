"""Exceptions raised by hotswap_rt.

Every error a user can cause derives from :class:`HotswapError`, so a server can catch one type.
Each message names the file, key or value at fault. An operation that raises changes nothing:
slots, the host store, the active selection and the compiled graph stay as they were.
"""

from __future__ import annotations


class HotswapError(Exception):
    """Base class of every error hotswap_rt raises on bad input or a broken promise."""


class AdapterFormatError(HotswapError):
    """An adapter's files or state dict are missing, corrupt, or use an unsupported PEFT feature."""


class AdapterChangedError(AdapterFormatError):
    """An adapter's files changed on disk after it was loaded, so the adapter the runtime holds
    can no longer be read back from them (load it again with ``replace=True`` to take the new
    files)."""


class IncompatibleAdapterError(HotswapError):
    """An adapter does not fit the injected model (shape mismatch, target not injected)."""


class RankTooLargeError(IncompatibleAdapterError):
    """An adapter's rank exceeds the runtime's ``max_rank``."""


class TargetNotFoundError(HotswapError):
    """``target_modules`` matched no supported layer of the model."""


class UnknownAdapterError(HotswapError, KeyError):
    """An adapter name that the runtime does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class SlotsBusyError(HotswapError):
    """No device slot or host entry can be freed for the requested operation."""


class SelectionError(HotswapError):
    """An activation request the selection tensors cannot express (too many adapters, bad weight)."""


class RecompileError(HotswapError):
    """The compiled model recompiled after ``rt.compile`` (guard mode "raise")."""


class GraphBreakError(HotswapError):
    """Compiling the model found a graph break while ``fullgraph=True``."""
