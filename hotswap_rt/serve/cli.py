"""``hotswap-rt serve``: flags -> :class:`ServeConfig` -> uvicorn on loopback (by default)."""

from __future__ import annotations

import argparse
import os
import sys

from .compile_cache import use_compile_cache
from .tools import TOOL_CALL_PARSERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or Hub id (default: the built-in tiny "
                                        "model with its demo adapters)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to load at start (repeatable)")
    parser.add_argument("--target-modules", nargs="*", default=None,
                        help="layers to inject (default: all-linear)")
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--device-slots", type=int, default=4)
    parser.add_argument("--host-slots", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=32,
                        help="sequences generating at once (continuous batching)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's context length)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV memory budget in tokens (default: what --max-num-seqs needs, "
                             "at most 40%% of free memory)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None,
                        help="KV of prompt prefixes kept for later requests with the same first "
                             "tokens and adapter, in tokens (default: an eighth of the KV rows'; 0: off)")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens per sequence per step")
    parser.add_argument("--max-prefill-seqs", type=int, default=4,
                        help="prompts prefilled together in one forward")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--allow-runtime-adapter-updates", action="store_true")
    parser.add_argument("--adapter-root", help="the only directory runtime loads may read from")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-compile", action="store_true", help="serve eagerly (debugging)")
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help="inductor's compile cache (default: $TORCHINDUCTOR_CACHE_DIR, else "
                             "~/.cache/hotswap_rt/inductor, which outlives reboots; a warm cache "
                             "saves most of the start: 125 s cold, 25 s warm in benchmarks/vs_vllm.py)")
    parser.add_argument("--compile-only", action="store_true",
                        help="build every graph these flags serve with into the compile cache, "
                             "say how many came from it, and exit without listening (a deploy "
                             "step: the same command without it then starts warm)")
    parser.add_argument("--serve-while-compiling", action="store_true",
                        help="listen at once and answer with the eager forward while the graphs "
                             "compile (in another process first, CPU only), then with them (a cold "
                             "start answers in seconds, slower until compiled; adapter loads wait "
                             "for the compile)")
    parser.add_argument("--no-mixed-batches", action="store_true",
                        help="one adapter at a time (the baseline the load benchmark compares)")
    parser.add_argument("--max-adapters-per-request", type=int, default=2,
                        help="adapters one request may mix (each row's cost follows it)")
    parser.add_argument("--stacked-mixes", action="store_true",
                        help="requests may mix up to --device-slots adapters; a step holding one that "
                             "mixes more than --max-adapters-per-request runs the stacked product")
    parser.add_argument("--target-parameters", nargs="+", default=None, metavar="PARAM",
                        help="MoE expert parameters that get LoRA slots (PEFT's target_parameters, "
                             "e.g. mlp.experts.gate_up_proj mlp.experts.down_proj)")
    parser.add_argument("--modules-to-save", nargs="+", default=None, metavar="MODULE",
                        help="modules adapters may train in full (PEFT's modules_to_save, e.g. lm_head)")
    parser.add_argument("--scale-vectors", action="store_true",
                        help="reserve IA3 / DoRA / LoRA-bias vectors for adapters loaded after start")
    parser.add_argument("--no-map-adapter-files", action="store_true",
                        help="read adapter files into memory before staging them instead of staging "
                             "from a memory map held under a read lease (slower loads)")
    parser.add_argument("--api-key", action="append", default=[],
                        help="accepted bearer key on /v1/* (repeatable; also HOTSWAP_API_KEY, "
                             "comma-separated)")
    parser.add_argument("--admin-api-key", action="append", default=[],
                        help="only these keys may load/unload adapters (repeatable)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='tool_choice "auto" (the default with tools): calls read from the '
                             'output with --tool-call-parser (vLLM\'s pair of flags)')
    parser.add_argument("--tool-call-parser", default=None, choices=list(TOOL_CALL_PARSERS),
                        help="the model's tool call format: hermes (<tool_call>{...}</tool_call>: "
                             "Hermes, Qwen 2.5/3, the built-in model), llama3_json (Llama 3.x), "
                             "pythonic (Llama 3.2/4) or mistral ([TOOL_CALLS])")
    parser.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                        help="a reasoning model's <think> block goes to message.reasoning")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads (default on CPU: every core but one)")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave malloc as it is (by default on CPU with glibc it keeps freed "
                             "memory for reuse: each step's fresh tensors then reuse mapped pages)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ray", action="store_true",
                        help="serve through Ray Serve replicas on a local Ray (ray extra)")
    parser.add_argument("--replicas", type=int, default=2, help="with --ray: worker replicas")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="with --ray: CPUs per replica")
    parser.add_argument("--worker-gpus", type=float, default=0.0, help="with --ray: GPUs per replica")


def config_from_args(args: argparse.Namespace):
    from .config import ServeConfig

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"hotswap-rt serve: --adapter takes NAME=DIR, not {item!r}")
        adapters[name] = path
    targets = args.target_modules or "all-linear"
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0] if targets[0] == "all-linear" else targets
    return ServeConfig(
        model=args.model, adapters=adapters, target_modules=targets, max_rank=args.max_rank,
        device_slots=args.device_slots, host_slots=args.host_slots,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens, prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=args.prefix_cache_tokens,
        max_prefill_seqs=args.max_prefill_seqs, request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        allow_runtime_adapter_updates=args.allow_runtime_adapter_updates,
        adapter_root=args.adapter_root, device=args.device, compile=not args.no_compile,
        serve_while_compiling=args.serve_while_compiling,
        mixed_batches=not args.no_mixed_batches, torch_threads=args.torch_threads,
        api_keys=(*args.api_key, *(k for k in os.environ.get("HOTSWAP_API_KEY", "").split(",") if k)),
        admin_api_keys=tuple(args.admin_api_key),
        max_adapters_per_request=args.max_adapters_per_request, stacked_mixes=args.stacked_mixes,
        target_parameters=None if args.target_parameters is None else tuple(args.target_parameters),
        modules_to_save=None if args.modules_to_save is None else tuple(args.modules_to_save),
        scale_vectors=args.scale_vectors, compile_cache=args.compile_cache,
        map_adapter_files=not args.no_map_adapter_files,
        keep_freed_memory=False if args.no_keep_freed_memory else None,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser)


def run(args: argparse.Namespace) -> int:
    """Serve with uvicorn in this process, or (``--ray``) through Ray Serve replicas."""
    conflicts = {"--no-compile": args.no_compile,
                 "--ray (Ray replicas compile in their own processes)": args.ray,
                 "--serve-while-compiling (nothing is served)": args.serve_while_compiling}
    if args.compile_only and any(conflicts.values()):
        other = next(flag for flag, given in conflicts.items() if given)
        print(f"hotswap-rt serve: --compile-only cannot be combined with {other}", file=sys.stderr)
        return 2
    if args.serve_while_compiling and args.ray:
        print("hotswap-rt serve: --serve-while-compiling is not supported with --ray (untested with "
              "Ray Serve's replica health checks)", file=sys.stderr)
        return 2
    extra = "ray" if args.ray else "serve"
    try:
        import uvicorn  # noqa: F401 - both need the serve extra; --ray needs ray too

        if args.ray:
            import ray  # noqa: F401
    except ImportError as exc:
        print(f"hotswap-rt serve{' --ray' if args.ray else ''} needs the {extra} extra: "
              f"pip install 'hotswap-rt[{extra}]' ({exc})", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"hotswap-rt serve: {exc}", file=sys.stderr)
        return 2
    cache, warm = use_compile_cache(config.compile_cache)  # Ray replicas do the same with it
    state = "warm" if warm else "empty: the first start compiles"
    if not config.compile:
        state = "unused: --no-compile"
    print(f"hotswap-rt serve: compile cache {cache} ({state})", file=sys.stderr)
    if args.compile_only:
        _log_like_uvicorn()
        counts, seconds = compile_only(config)
        print(f"hotswap-rt serve --compile-only: {counts['hit']} graphs from the cache, {counts['built']} "
              f"built, {counts['bypassed']} not cacheable, in {seconds:.1f} s; cache {cache}", file=sys.stderr)
        return 0
    return _serve_ray(config, args) if args.ray else _serve_local(config, args)


def compile_only(config) -> tuple[dict[str, int], float]:
    """Load the model and adapters and compile every bucket as a start does (into inductor's
    cache), then stop the engine: what a deploy step runs before the server's first start, and
    :mod:`.precompile`'s child process. Returns how many graphs inductor took from the cache,
    built, and could not cache (the engine's ``compile_cache_counts``), and the seconds the
    compile took."""
    from .backend import LocalBackend
    from .model import build_runtime

    backend = LocalBackend(config, build_runtime(config))
    try:
        backend.start()
    finally:  # a failed compile stops the engine thread too
        backend.stop()
    return backend.engine.compile_cache_counts, backend.engine.startup_seconds or 0.0


def _log_like_uvicorn() -> None:
    """Log INFO and up to stderr in uvicorn's format (the engine's compile progress)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")


def _serve_local(config, args: argparse.Namespace) -> int:
    import uvicorn

    _log_like_uvicorn()

    from .app import build_app

    then = "listening while compiling" if config.serve_while_compiling else "compiling; then listening"
    print(f"hotswap-rt serve: loading, {then} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(build_app(config), host=args.host, port=args.port, log_level="info")
    return 0


def _serve_ray(config, args: argparse.Namespace) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and run the Ray Serve application."""
    import ray
    from ray import serve

    from .ray.app import build_ray_app

    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"hotswap-rt serve --ray: {args.replicas} replicas; http://{args.host}:{args.port}",
          file=sys.stderr)
    serve.run(build_ray_app(config, replicas=args.replicas, worker_cpus=args.worker_cpus,
                            worker_gpus=args.worker_gpus),
              name="hotswap", route_prefix="/", blocking=True)
    return 0
