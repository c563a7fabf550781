"""One server (hotswap-rt serve, or vLLM's CPU build) under workloads ``vs_vllm`` does not run,
with vLLM's own client; one run per workload, medians printed as JSON lines.

    .venv/bin/python -m benchmarks.vs_vllm_workloads MODEL_ROOT {ours|vllm} DEVICE_SLOTS WORKLOADS \\
        [extra flags of that server]

``MODEL_ROOT``: the output of ``../shared/peers/make_bench_model.py`` (``--adapters 32`` for a
run with more adapters than slots); ``WORKLOADS``: comma-separated names of :data:`WORKLOADS`.
hotswap-rt uses the compile cache ``$TORCHINDUCTOR_CACHE_DIR`` (default: ``/tmp/vv/cache``; the
first start compiles); vLLM gets ``--max-loras DEVICE_SLOTS``. Run both servers one after the
other, never at the same time, and compare the printed figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.vs_vllm import PEERS, ROOT, free_port, stop, wait_ready

# name -> prompt tokens, output tokens, concurrency, prompts, tokens every prompt shares first
WORKLOADS = {
    "long": dict(inp=512, out=128, c=16, n=48, prefix=0),
    "prefix": dict(inp=64, out=32, c=16, n=96, prefix=448),
    "c16": dict(inp=64, out=32, c=16, n=96, prefix=0),
    "c32": dict(inp=64, out=32, c=32, n=192, prefix=0),
    "c64": dict(inp=64, out=32, c=64, n=256, prefix=0),
}
FIGURES = ("median_ttft_ms", "median_tpot_ms", "output_throughput", "completed", "p99_ttft_ms")


def cache_env() -> dict[str, str]:
    """This process's environment, with the compile cache these benchmarks share by default."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/vv/cache")}


def bench(port: int, model_dir: Path, names: list[str], workload: dict, work: Path, tag: str) -> dict:
    """vLLM's client against the server on ``port``: its figures (:data:`FIGURES`)."""
    args = [str(PEERS / "vllm_cpu.sh"), "bench", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/completions", "--model", "base", "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(workload["inp"]),
            "--random-output-len", str(workload["out"]), "--random-prefix-len", str(workload["prefix"]),
            "--num-prompts", str(workload["n"]), "--max-concurrency", str(workload["c"]),
            "--ignore-eos", "--lora-modules", *names, "--save-result", "--result-dir", str(work),
            "--result-filename", f"{tag}.json", "--seed", "1"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1800)
    raw = json.loads((work / f"{tag}.json").read_text())
    return {key: round(raw[key], 1) for key in FIGURES}


def start_server(which: str, root: Path, slots: int, flags: list[str],
                 work: Path) -> tuple[int, subprocess.Popen | None]:
    """Start ``which`` ("ours" or "vllm", with its extra command-line ``flags``) on the bench
    model under ``root`` with every adapter; returns its port and process (None: vLLM's,
    stopped by :func:`stop_server`)."""
    model_dir, adapter_root = root / "model", root / "adapters"
    names = sorted(p.name for p in adapter_root.iterdir() if p.is_dir())
    port, started = free_port(), time.monotonic()
    process = None
    if which == "vllm":
        subprocess.run([str(PEERS / "vllm_cpu.sh"), "start", str(model_dir), str(adapter_root), str(port),
                        "--max-loras", str(slots), *flags], check=True, stdout=subprocess.DEVNULL,
                       timeout=900)
    else:
        process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "hotswap-rt"), "serve", "--model", str(model_dir),
             *[f"--adapter={n}={adapter_root / n}" for n in names], "--max-rank", "16",
             "--device-slots", str(slots), "--max-model-len", "2048", "--port", str(port), *flags],
            env=cache_env(), stdout=(work / f"{which}.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_ready(port, process)
    print(which, "ready", round(time.monotonic() - started, 1), flush=True)
    return port, process


def stop_server(process: subprocess.Popen | None) -> None:
    if process is None:
        subprocess.run([str(PEERS / "vllm_cpu.sh"), "stop"], check=False)
    else:
        stop(process)


def main() -> int:
    root, which, slots, names_arg = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    work = Path("/tmp/vv")
    work.mkdir(exist_ok=True)
    names = sorted(p.name for p in (root / "adapters").iterdir() if p.is_dir())
    port, process = start_server(which, root, slots, sys.argv[5:], work)
    try:
        for name in names_arg.split(","):
            figures = bench(port, root / "model", names, WORKLOADS[name], work, f"{which}-{name}")
            print(which, name, figures, flush=True)
    finally:
        stop_server(process)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
