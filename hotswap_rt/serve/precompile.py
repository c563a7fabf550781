"""The compile of a server that answers while it compiles (``serve_while_compiling``), run first
in another process on CPU, so that this one's compile takes every graph from the cache.

Tracing and lowering a graph is Python: on a thread of the serving process it holds the GIL
that every eager step needs between its ops. On the bench model of ``benchmarks/vs_vllm.py``
(ad hoc, 2-core VM) the eager steps took 16.4 ms a token (median) served alone, and 18.0 ms
median but 86 ms mean and 613 ms p99 next to a compile thread. A child process
(``python -m hotswap_rt.serve.precompile``, at a lower CPU priority) builds the same graphs into
the same inductor cache from the same :class:`ServeConfig` (its sizes fixed to the engine's, so
the buckets are the same); the server's compile thread then traces and takes each compiled
graph from the cache: seconds instead of minutes next to the eager steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from ..engine import GenerationEngine
from .config import ServeConfig

log = logging.getLogger(__name__)
_TUPLES = ("target_parameters", "modules_to_save", "api_keys", "admin_api_keys")  # JSON lists back


def child_config(config: ServeConfig, engine: GenerationEngine) -> dict[str, Any]:
    """``config`` for the child, as JSON values: the engine's resolved sizes (a KV budget
    computed from the free memory would differ in another process, and so would the buckets),
    nothing served."""
    data = dataclasses.asdict(config)
    data.update(serve_while_compiling=False, max_num_seqs=engine.max_seqs, max_model_len=engine.max_len,
                kv_cache_tokens=engine.memory.rows * (engine.memory.max_len + 1),
                api_keys=[], admin_api_keys=[], allow_runtime_adapter_updates=False, adapter_root=None)
    return data


class CompileInAnotherProcess:
    """``before_compile`` of a serving engine: run the child on this process's inductor cache
    and wait for it (:meth:`cancel` ends it from another thread: the server stops). A child that
    fails is logged (a warning with its output's end): this process's compile then builds the
    graphs."""

    def __init__(self, config: ServeConfig, engine: GenerationEngine) -> None:
        self.config, self.engine = config, engine
        self._child: subprocess.Popen | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        try:
            payload = json.dumps(child_config(self.config, self.engine))
        except TypeError as exc:  # a value JSON cannot carry
            log.warning("the compile runs in this process: the config cannot go to another (%s)", exc)
            return
        started = time.perf_counter()
        with self._lock:
            if self._cancelled:
                return
            self._child = subprocess.Popen(
                [sys.executable, "-m", "hotswap_rt.serve.precompile"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir()})
        log.info("compiling in another process first (pid %d), then taking its graphs from the "
                 "cache", self._child.pid)
        stdout, stderr = self._child.communicate(payload)
        seconds = time.perf_counter() - started
        if self._cancelled:
            log.info("the compile in another process was stopped after %.1f s", seconds)
        elif self._child.returncode != 0:
            log.warning("compiling in another process failed (exit %d after %.1f s); this process "
                        "builds every graph itself: %s", self._child.returncode, seconds, stderr[-3000:])
        else:
            counts = json.loads(stdout.strip().splitlines()[-1])
            log.info("another process compiled in %.1f s: %d graphs from the cache, %d built, %d not "
                     "cacheable", seconds, counts["hit"], counts["built"], counts["bypassed"])

    def cancel(self) -> None:
        """End the child, if it runs (any thread)."""
        with self._lock:
            self._cancelled = True
            if self._child is not None and self._child.poll() is None:
                self._child.kill()


def main() -> int:
    """The child: a :class:`ServeConfig` as JSON on stdin; compiles, prints the counts as JSON."""
    os.nice(10)  # the serving process goes first
    data = json.loads(sys.stdin.read())
    for name in _TUPLES:
        if data.get(name) is not None:
            data[name] = tuple(data[name])
    from .cli import compile_only

    logging.basicConfig(level=logging.WARNING)
    counts, _ = compile_only(ServeConfig(**data))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
