"""Where ``hotswap-rt serve`` and its Ray replicas keep inductor's compile cache.

Inductor's default is a directory under the system's temp dir, which a reboot (or a container's
fresh ``/tmp``) empties, so every start after one compiled again. The server keeps it in
``$XDG_CACHE_HOME/hotswap_rt/inductor`` (``~/.cache`` when unset) unless told otherwise.
Library users who build the app in their own process keep inductor's setting: only the
server's entry points (the CLI, each Ray replica) call :func:`use_compile_cache`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def compile_cache_dir(chosen: str | None, environ: Mapping[str, str]) -> Path:
    """``chosen`` (``--compile-cache`` / ``ServeConfig.compile_cache``), else
    ``environ["TORCHINDUCTOR_CACHE_DIR"]``, else ``$XDG_CACHE_HOME/hotswap_rt/inductor``
    (``~/.cache`` when unset); absolute."""
    if chosen:
        return Path(chosen).expanduser().resolve()
    if environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(environ["TORCHINDUCTOR_CACHE_DIR"]).expanduser().resolve()
    root = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return (root / "hotswap_rt" / "inductor").resolve()


def use_compile_cache(chosen: str | None) -> tuple[Path, bool]:
    """Point this process's inductor at :func:`compile_cache_dir` (before anything compiles):
    the user's ``$TORCHINDUCTOR_CACHE_DIR`` is the one the process started with, since importing
    ``torch._dynamo`` sets it to inductor's default. Returns the directory and whether it
    already holds anything (a warm start)."""
    from .. import _STARTUP_INDUCTOR_CACHE_DIR as user_setting

    cache = compile_cache_dir(chosen, {**os.environ, "TORCHINDUCTOR_CACHE_DIR": user_setting or ""})
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by inductor at each compile
    return cache, cache.is_dir() and any(cache.iterdir())
