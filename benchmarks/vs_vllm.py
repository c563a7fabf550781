"""hotswap-rt serve next to vLLM's CPU build: same model, same PEFT adapters, vLLM's own client.

    .venv/bin/python -m benchmarks.vs_vllm [--out DIR] [--readme README.md]

Needs the peer tools in ``../shared/peers`` (``vllm_cpu.sh install`` once per machine). Builds the
bench model (``make_bench_model.py``: a 4-layer hidden-256 Llama, a real BPE tokenizer, 8 PEFT
adapters of rank 8/16 on every linear layer) unless ``--model-dir`` has one, then runs, in order:

1. hotswap-rt serve, started with an empty compile cache (time to ready: cold)
2. hotswap-rt serve --serve-while-compiling, an empty compile cache again: ready at once, the
   benchmarks start while it compiles (answered eagerly until ``/stats`` says compiled; when
   that happened is recorded next to when each benchmark ran)
3. vLLM (``vllm_cpu.sh start``; LoRA on, so eager on CPU)
4. hotswap-rt serve again, reusing torch's compile caches (time to ready: warm)

and against each, ``vllm bench serve`` with random 64-token prompts, 32 output tokens,
``--ignore-eos``, a random adapter per request, at each concurrency; then at concurrency 16
with a 448-token prefix every prompt shares before its 64 random tokens (a system prompt:
vLLM's automatic prefix caching and hotswap-rt's prefix cache both keep its KV per adapter). Writes
``benchmarks/results/<date>-vs-vllm.{json,md}``; ``--readme`` replaces the README's table
between ``<!-- vs-vllm:start -->`` and ``<!-- vs-vllm:end -->``. Figures are medians from one
run; both servers run on the same machine one after the other, never at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"
START, END = "<!-- vs-vllm:start -->", "<!-- vs-vllm:end -->"
METRICS = {"ttft_p50_ms": "median_ttft_ms", "tpot_p50_ms": "median_tpot_ms",
           "output_tok_s": "output_throughput", "ttft_p99_ms": "p99_ttft_ms",
           "completed": "completed"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(port: int, process: subprocess.Popen | None, timeout: float = 900) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


SHARED_PREFIX = 448  # tokens of the shared-prefix workload's common prefix
SHARED_PREFIX_CONCURRENCY = 16


def bench(port: int, model_dir: Path, adapters: list[str], concurrency: int, prompts: int,
          result_dir: Path, name: str, prefix: int = 0) -> dict:
    """vLLM's serving benchmark client against the server on ``port``; its medians.
    ``prefix``: tokens every prompt shares before its random 64."""
    subprocess.run(
        [str(PEERS / "vllm_cpu.sh"), "bench", "--backend", "openai",
         "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
         "--model", "base", "--tokenizer", str(model_dir), "--dataset-name", "random",
         "--random-input-len", "64", "--random-output-len", "32", "--num-prompts", str(prompts),
         "--random-prefix-len", str(prefix),
         "--max-concurrency", str(concurrency), "--ignore-eos", "--lora-modules", *adapters,
         "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1200)
    raw = json.loads((result_dir / f"{name}.json").read_text())
    return {key: raw[source] for key, source in METRICS.items()}


def start_hotswap(model_dir: Path, adapters: dict[str, Path], port: int, cache: Path,
                  log: Path, meanwhile: bool = False) -> subprocess.Popen:
    flags = [f"--adapter={name}={path}" for name, path in adapters.items()]
    if meanwhile:
        flags.append("--serve-while-compiling")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "hotswap-rt"), "serve", "--model", str(model_dir), *flags,
         "--max-rank", "16", "--device-slots", str(len(adapters)), "--max-model-len", "2048",
         "--port", str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)


class CompileWatch:
    """Polls ``/stats`` on a thread until the server says its graphs are compiled: when
    (seconds after ``started``), and the state it ended in."""

    def __init__(self, port: int, started: float) -> None:
        self.port, self.started = port, started
        self.compiled_s: float | None = None
        self.state = "compiling"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                state = httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()["compile"]["state"]
            except (httpx.HTTPError, KeyError, ValueError):
                state = "compiling"
            if state != "compiling":
                self.state, self.compiled_s = state, time.monotonic() - self.started
                return
            self._done.wait(0.5)

    def wait(self, timeout: float = 900) -> None:
        self._thread.join(timeout)
        self._done.set()


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def run(model_root: Path, concurrencies: list[int], work: Path) -> dict:
    model_dir, adapter_root = model_root / "model", model_root / "adapters"
    adapters = {p.name: p for p in sorted(adapter_root.iterdir()) if p.is_dir()}
    names = list(adapters)
    cache = work / "inductor-cache"
    runs: dict[str, dict] = {}

    workloads = [(str(c), c, 0) for c in concurrencies]
    workloads.append((f"{SHARED_PREFIX_CONCURRENCY} shared-prefix", SHARED_PREFIX_CONCURRENCY, SHARED_PREFIX))

    def measure(label: str, port: int, started: float | None = None) -> dict:
        results = {}
        for key, c, prefix in workloads:
            begun = time.monotonic()
            results[key] = bench(port, model_dir, names, c, max(24, 6 * c), work,
                                 f"{label}-{key.replace(' ', '-')}", prefix)
            if started is not None:  # when it ran, in seconds after the server started
                results[key]["ran_s"] = [begun - started, time.monotonic() - started]
        return results

    for label, cold in (("hotswap_rt", True), ("hotswap_rt_meanwhile", True), ("vllm", None),
                        ("hotswap_rt_warm", False)):
        port = free_port()
        if cold is None:
            started = time.monotonic()
            subprocess.run([str(PEERS / "vllm_cpu.sh"), "start", str(model_dir), str(adapter_root),
                            str(port)], check=True, stdout=subprocess.DEVNULL, timeout=900)
            ready = time.monotonic() - started
            try:
                runs[label] = {"ready_s": ready, "by_concurrency": measure(label, port)}
            finally:
                subprocess.run([str(PEERS / "vllm_cpu.sh"), "stop"], check=False)
            continue
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        meanwhile = label == "hotswap_rt_meanwhile"
        started = time.monotonic()
        process = start_hotswap(model_dir, adapters, port, cache, work / f"{label}.log", meanwhile)
        try:
            ready = wait_ready(port, process)
            if meanwhile:
                watch = CompileWatch(port, started)
                runs[label] = {"ready_s": ready, "by_concurrency": measure(label, port, started)}
                watch.wait()
                runs[label].update(compiled_s=watch.compiled_s, compile_state=watch.state)
            else:
                runs[label] = {"ready_s": ready, "by_concurrency": measure(label, port)}
        finally:
            stop(process)
        print(f"{label}: ready in {ready:.1f} s", flush=True)
    return runs


def table(payload: dict) -> str:
    runs = payload["runs"]
    ours, peer, warm = runs["hotswap_rt"], runs["vllm"], runs["hotswap_rt_warm"]
    lines = ["| concurrency | figure | vLLM-CPU | hotswap-rt (1st start) | ratio "
             "| hotswap-rt (2nd start) | ratio |", "|---|---|---|---|---|---|---|"]
    labels = {"ttft_p50_ms": "TTFT p50 (ms)", "tpot_p50_ms": "TPOT p50 (ms)",
              "output_tok_s": "output tok/s"}
    for concurrency in ours["by_concurrency"]:
        for key, label in labels.items():
            v = peer["by_concurrency"][concurrency][key]
            a = ours["by_concurrency"][concurrency][key]
            b = warm["by_concurrency"][concurrency][key]
            lines.append(f"| {concurrency} | {label} | {v:.1f} | {a:.1f} | {a / v:.2f}x "
                         f"| {b:.1f} | {b / v:.2f}x |")
    lines.append(f"| - | time to ready (s) | {peer['ready_s']:.0f} | {ours['ready_s']:.0f} (cold cache) | "
                 f"{ours['ready_s'] / peer['ready_s']:.2f}x | {warm['ready_s']:.0f} (warm cache) | "
                 f"{warm['ready_s'] / peer['ready_s']:.2f}x |")
    meanwhile = runs.get("hotswap_rt_meanwhile")
    if meanwhile is None:
        return "\n".join(lines)
    lines += ["", f"A cold start with `--serve-while-compiling`: ready in {meanwhile['ready_s']:.0f} s "
              f"({meanwhile['ready_s'] / peer['ready_s']:.2f}x vLLM's {peer['ready_s']:.0f} s), graphs "
              f"{meanwhile['compile_state']} {meanwhile['compiled_s'] or 0:.0f} s after the start; "
              "each benchmark ran from the start of the server:", "",
              "| concurrency | ran (s after start) | figure | vLLM-CPU | hotswap-rt | ratio |",
              "|---|---|---|---|---|---|"]
    for concurrency, figures in meanwhile["by_concurrency"].items():
        begun, ended = figures["ran_s"]
        for key, label in labels.items():
            v, a = peer["by_concurrency"][concurrency][key], figures[key]
            lines.append(f"| {concurrency} | {begun:.0f}-{ended:.0f} | {label} | {v:.1f} | {a:.1f} "
                         f"| {a / v:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="output of make_bench_model.py (default: build one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args()
    if not (PEERS / "vllm_cpu.sh").exists():
        print(f"no peer tools at {PEERS}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_root = args.model_dir
        if model_root is None:
            model_root = work / "bench-model"
            subprocess.run([sys.executable, str(PEERS / "make_bench_model.py"), "--out", str(model_root)],
                           check=True, stdout=subprocess.DEVNULL)
        runs = run(model_root, args.concurrency, work)
    payload = {"date": str(date.today()), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "setup": "4-layer hidden-256 Llama, 8 adapters r8/r16 all-linear, 64-token prompts, 32 "
                        "output tokens, --ignore-eos, random adapter per request, fp32, CPU; "
                        f"'shared-prefix': the same {SHARED_PREFIX} tokens before each prompt",
               "runs": runs}
    payload["table"] = table(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{payload['date']}-vs-vllm"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(f"# hotswap-rt serve vs vLLM-CPU ({payload['date']})\n\n"
                                       f"{payload['setup']}\n\n{payload['table']}\n")
    print(payload["table"])
    if args.readme is not None:
        text = args.readme.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        args.readme.write_text(f"{head}{START}\n{payload['table']}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
