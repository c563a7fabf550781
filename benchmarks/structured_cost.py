"""Time per output token with and without ``response_format`` (a JSON schema), one client,
against one compiled ``hotswap-rt serve`` of the bench model; requests interleaved.

    .venv/bin/python -m benchmarks.structured_cost [MODEL_ROOT]

``MODEL_ROOT``: the output of ``../shared/peers/make_bench_model.py`` (default ``/tmp/bm``).
Uses the compile cache ``$TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/vv/cache``). Prints the
median ms per token (the request's time over its tokens, prefill included) of 7 requests each,
after one of each not counted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import httpx

from benchmarks.vs_vllm import ROOT, free_port, stop, wait_ready
from benchmarks.vs_vllm_workloads import cache_env

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
          "required": ["name", "tags"]}


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/bm"
    names = sorted(os.listdir(f"{root}/adapters"))
    port = free_port()
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "hotswap-rt"), "serve", "--model", f"{root}/model",
         *[f"--adapter={n}={root}/adapters/{n}" for n in names], "--max-rank", "16", "--device-slots", "8",
         "--max-model-len", "2048", "--port", str(port)],
        env=cache_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, process)
        ms_per_token: dict[str, list[float]] = {"none": [], "json_schema": []}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for round_ in range(8):
                for kind, times in ms_per_token.items():
                    body = {"model": names[round_ % len(names)], "prompt": "Describe a fruit as JSON:",
                            "max_tokens": 48, "temperature": 1.0, "seed": round_}
                    if kind != "none":
                        body["response_format"] = {"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": SCHEMA}}
                    start = time.perf_counter()
                    out = client.post("/v1/completions", json=body).json()
                    if round_:  # the first of each warms up
                        times.append((time.perf_counter() - start) / out["usage"]["completion_tokens"] * 1e3)
        print({kind: round(statistics.median(times), 2) for kind, times in ms_per_token.items()},
              "ms per token (prefill included)")
    finally:
        stop(process)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
