"""``hotswap-rt``: the command line.

::

    hotswap-rt demo [--rounds N]                     what scripts/demo.sh runs
    hotswap-rt inspect DIR [--max-rank R] [--target-modules ...] [--model PATH_OR_ID] [--json]
    hotswap-rt bench [--model PATH_OR_ID] [--adapters DIR ...] [--device cpu|cuda]
                     [--max-rank R] [--target-modules ...] [--rounds N] [--json]
    hotswap-rt serve [--model PATH_OR_ID] [--adapter NAME=DIR ...] [--port 8000] ...
                                                     (see hotswap_rt.serve; needs the serve extra)

``inspect`` reads one adapter (validated like a load) and says whether a runtime configuration
can host it; with ``--model`` it checks against the model's real layer shapes, built on the meta
device (no weights are read). ``bench`` measures, on a user's model and adapters (default: the
demo model with random adapters), the swap from the host ring into a device slot next to one
``copy_`` of the same bytes, and the eager forward with and without an adapter (medians).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RuntimeConfig, name_matches
from .errors import HotswapError
from .peft_format import parse_adapter, read_adapter_dir, resolve_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotswap-rt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the demo on the embedded default model")
    demo.add_argument("--rounds", type=_positive_int, default=2)
    inspect = commands.add_parser("inspect", help="describe an adapter; check it fits a runtime")
    inspect.add_argument("adapter", help="adapter directory or Hub id (local cache)")
    _runtime_options(inspect)
    inspect.add_argument("--model", help="model directory or Hub id to check layer shapes against")
    inspect.add_argument("--json", action="store_true")
    bench = commands.add_parser("bench", help="swap / switch / forward timings on your model")
    bench.add_argument("--model", help="model directory or Hub id (default: the demo model)")
    bench.add_argument("--adapters", nargs="*", default=[], help="adapter directories (>= 2)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--rounds", type=_positive_int, default=50)
    _runtime_options(bench)
    bench.add_argument("--json", action="store_true")
    from .serve.cli import add_arguments as serve_arguments

    serve_arguments(commands.add_parser("serve", help="OpenAI-compatible HTTP server (serve extra)"))
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(["--rounds", str(args.rounds)])
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "serve":
            from .serve.cli import run as serve

            return serve(args)
        return _bench(args)
    except HotswapError as exc:
        print(f"hotswap-rt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (else a usage error saying so)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


_TASK_MODELS = {  # PEFT's task_type -> the transformers Auto class and what to call it
    "SEQ_CLS": ("AutoModelForSequenceClassification", "sequence classifier"),
    "TOKEN_CLS": ("AutoModelForTokenClassification", "token classifier"),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "question-answering model"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "sequence-to-sequence LM"),
    "FEATURE_EXTRACTION": ("AutoModel", "base model"),
}


def _load_model(name: str, meta: bool = False, task_type: str | None = None) -> torch.nn.Module:
    """The model from a directory or Hub id, as ``task_type`` (PEFT's; default
    ``AutoModelForCausalLM``) needs it (on the meta device: its config only); a path or id
    that does not load is a :class:`HotswapError`, not a traceback."""
    import transformers

    class_name, what = _TASK_MODELS.get(task_type or "", ("AutoModelForCausalLM", "causal LM"))
    auto = getattr(transformers, class_name)
    try:
        if meta:
            with torch.device("meta"):
                return auto.from_config(transformers.AutoConfig.from_pretrained(name))
        return auto.from_pretrained(name).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise HotswapError(f"--model {name!r} does not load as a {what} ({exc})") from None


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-rank", type=_positive_int, default=64)
    parser.add_argument("--target-modules", nargs="*", default=None,
                        help="names/suffixes (default: the adapter's own, or all-linear)")


# ---------------------------------------------------------------------------------------- inspect
def _inspect(args: argparse.Namespace) -> int:
    directory = resolve_source(args.adapter)
    config, state = read_adapter_dir(directory)
    adapter = parse_adapter(config, state, str(directory))
    modules = adapter.modules
    report: dict[str, Any] = {
        "source": str(directory),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "max_module_rank": max(m.rank for m in modules.values()),
        "modules": len(modules),
        "target_suffixes": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "modules_to_save": list(adapter.saved_modules),
        "bytes": sum(m.lora_A.nbytes + m.lora_B.nbytes for m in modules.values())
        + sum(t.nbytes for params in adapter.saved_modules.values() for t in params.values()),
        "base_model_name_or_path": adapter.base_model_name_or_path,
    }
    problems = []
    if report["max_module_rank"] > args.max_rank:
        problems.append(f"rank {report['max_module_rank']} > --max-rank {args.max_rank}")
    if args.target_modules:
        outside = [n for n in modules if not name_matches(args.target_modules, n)]
        if outside:
            problems.append(f"{len(outside)} modules outside --target-modules, e.g. {outside[0]}")
    if args.model:
        problems += _check_against_model(args, adapter)
    report["fits"] = not problems
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value}")
    return 0 if not problems else 1


def _check_against_model(args: argparse.Namespace, adapter: Any) -> list[str]:
    """Build the model (as the adapter's ``task_type`` needs it) on the meta device and run the
    runtime's own shape checks, its ``modules_to_save`` held in full as a lazy runtime would."""
    from .arena import SlotArena
    from .staging import Stager
    from .inject import find_targets
    from .layers import layer_shape

    model = _load_model(args.model, meta=True, task_type=adapter.task_type)
    targets = args.target_modules or sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    try:
        names = find_targets(model, targets)
        shapes = {name: layer_shape(model.get_submodule(name)) for name in names}
        for name in adapter.saved_modules:
            try:
                shapes[name] = layer_shape(model.get_submodule(name), full=True)
            except (AttributeError, TypeError) as exc:
                return [f"the adapter trains {name!r} in full (modules_to_save), which "
                        f"{type(model).__name__} cannot hold per slot ({exc})"]
        Stager(SlotArena(shapes, args.max_rank, 1, torch.device("meta"))).check(adapter)
    except HotswapError as exc:
        return [str(exc)]
    return []


# ------------------------------------------------------------------------------------------ bench
def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import HotswapRuntime
    from .demo import ADAPTER_RANKS, TARGETS, build_model, write_random_adapter

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HotswapError("--device cuda: this torch sees no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = _load_model(args.model)
            targets = args.target_modules or "all-linear"
        else:
            model, targets = build_model(), args.target_modules or TARGETS
        adapters = [Path(a) for a in args.adapters]
        if not adapters:  # two random adapters for the model at hand
            ranks = list(ADAPTER_RANKS.values())[:2]
            adapters = [write_random_adapter(model, Path(tmp) / f"a{i}", rank, seed=i)
                        for i, rank in enumerate(ranks)]
        if len(adapters) < 2:
            raise HotswapError("bench needs at least two adapters (--adapters DIR DIR ...)")
        model = model.to(device)
        uninjected = _median_ms(lambda: model(torch.randint(0, 100, (1, 32), device=device)),
                                args.rounds, device)
        rt = HotswapRuntime(model, RuntimeConfig(
            targets, max_rank=args.max_rank, device_slots=1, host_slots=len(adapters) + 1))
        for i, path in enumerate(tqdm(adapters, desc="loading adapters", disable=args.json)):
            rt.load(f"a{i}", path)
        names = [f"a{i}" for i in range(len(adapters))]
        results = _measure(rt, names, args.rounds, device, quiet=args.json)
    results["forward_uninjected_ms"] = uninjected
    results["forward_overhead_vs_uninjected"] = results["forward_adapter_ms"] / uninjected
    results.update(device=str(device), adapters=len(names), injected_layers=len(rt.targets),
                   slot_mib=rt.slot_nbytes / 2**20)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:>32}: {value:.4f}" if isinstance(value, float) else f"{key:>32}: {value}")
    return 0


def _median_ms(fn: Callable[[], Any], rounds: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` under ``no_grad`` (synchronized on CUDA)."""
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure(rt: Any, names: list[str], rounds: int, device: torch.device,
             quiet: bool) -> dict[str, Any]:
    from tqdm import tqdm

    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    nbytes = rt.slot_nbytes
    sources = itertools.cycle([torch.randn(nbytes // 4, device="cpu") for _ in range(2)])
    destination = torch.empty(nbytes // 4, device=device)
    cycle = itertools.cycle(names[1:] + names[:1])  # names[0] sits in the slot: every call copies
    ids = torch.randint(0, 100, (1, 32), device=device)
    timings: dict[str, list[float]] = {
        "copy_ms": [], "swap_ms": [], "forward_adapter_ms": [], "forward_disabled_ms": []}

    def timed(key: str, fn: Callable[[], Any]) -> None:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        timings[key].append((time.perf_counter() - start) * 1e3)

    with torch.no_grad():
        for _ in tqdm(range(rounds), desc="timing", disable=quiet):
            timed("copy_ms", lambda: destination.copy_(next(sources)))
            timed("swap_ms", lambda: rt.activate(next(cycle)))
            timed("forward_adapter_ms", lambda: rt.model(ids))
            with rt.disabled():
                timed("forward_disabled_ms", lambda: rt.model(ids))
    results: dict[str, Any] = {key: statistics.median(values) for key, values in timings.items()}
    results["swap_over_copy"] = results["swap_ms"] / results["copy_ms"]
    results["swaps"] = rt.stats()["swaps"]
    return results


if __name__ == "__main__":
    raise SystemExit(main())
