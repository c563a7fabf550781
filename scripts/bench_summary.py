"""The README's benchmark summary table, computed from a results file of ``scripts/bench.sh``.

Usage: ``python scripts/bench_summary.py RESULTS.json [--readme README.md]``. Prints the Markdown;
with ``--readme`` it also replaces the text between ``<!-- bench-summary:start -->`` and
``<!-- bench-summary:end -->`` in that file. Every figure comes from the results file: medians
(ratios to each group's reference), the swap-matrix figures and the counts the benchmarks keep
with ``figure()``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


class Results:
    def __init__(self, payload: dict) -> None:
        self.medians: dict[str, dict[str, float]] = payload["medians_s"]
        self.references: dict[str, str] = payload["references"]
        self.figures: dict[str, float] = payload.get("figures", {})
        self.tables: dict[str, dict] = payload.get("tables", {})
        self.notes: dict[str, list[str]] = payload.get("notes", {})
        self.machine: dict = payload["machine"]

    def groups(self, prefix: str) -> list[str]:
        return sorted(g for g in self.medians if g.startswith(prefix))

    def ratio(self, group: str, case_prefix: str) -> float:
        cases = self.medians[group]
        case = next(name for name in cases if name.startswith(case_prefix))
        return cases[case] / cases[self.references[group]]

    def span(self, key_prefix: str) -> str:
        values = [v for k, v in self.figures.items() if k.startswith(key_prefix)]
        if not values:
            return "n/a"
        low, high = f"{min(values):.2f}", f"{max(values):.2f}"
        return f"{low}x" if low == high else f"{low}-{high}x"


def _shape(group: str) -> str:
    match = re.search(r"llama[^,(]*(, (fp32|bf16))?", group)
    return (match.group(0) if match else group).strip()


def rows(r: Results) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    f = r.figures
    ops = int(f.get("recompiles/ops", 0))
    ours_key = next((k for k in f if k.startswith("recompiles/hotswap_rt")), None)
    set_key = next((k for k in f if k.startswith("recompiles/peft load_adapter")), None)
    hot_key = next((k for k in f if k.startswith("recompiles/peft hotswap_adapter")), None)
    if ours_key and set_key:
        set_seconds = f[set_key.replace("recompiles/", "compile_seconds/")]
        out.append((f"recompiles over {ops:,} random adapter operations", f"{f[ours_key]:.0f}",
                    f"PEFT load_adapter+set_adapter: {f[set_key]:.0f} ({set_seconds:.1f} s "
                    f"compiling, then eager past dynamo's limit); PEFT hotswap_adapter (prepared): "
                    f"{f.get(hot_key, float('nan')):.0f}"))
    for group in r.groups("guard overhead per compiled forward (ratio to the unguarded compiled "
                          "forward), interleaved"):
        out.append(("guard cost per compiled forward", f"{r.ratio(group, 'guard.call'):.2f}x "
                    f"({f.get('guard_noop_us', float('nan')):.1f} us per call)",
                    "unguarded compiled forward = 1.00x"))
    for group in sorted(g for g in r.tables if g.startswith("swap matrix")):
        label = _shape(group)
        out.append((f"ring -> slot swap, {label}, ranks 4/16/64 x attention/all-linear, "
                    f"max_rank 64", f"{r.span(f'swap_vs_copy/{label}/')} a `copy_` of the adapter's "
                    f"bytes; a rank-4 swap takes {r.span(f'swap_vs_rank64_swap/{label}/attention/r4')} "
                    f"(attention) / {r.span(f'swap_vs_rank64_swap/{label}/all-linear/r4')} (all-linear) "
                    f"of a rank-64 swap's time",
                    f"PEFT hotswap_adapter_from_state_dict "
                    f"{r.span(f'swap_speedup_vs_peft_state_dict/{label}/')} slower, from disk "
                    f"{r.span(f'swap_speedup_vs_peft_disk/{label}/')} slower"))
    switches = [v for k, v in f.items() if k.startswith("resident_switch_us/")]
    if switches:
        low, high = f"{min(switches):.0f}", f"{max(switches):.0f}"
        out.append(("switch between device-resident adapters",
                    f"{low if low == high else low + '-' + high} us, no copy", ""))
    flushed = [k.split("/", 1)[1] for k in f if k.startswith("flushed_switch_us/")]
    if flushed:
        out.append(("swap and switch with the CPU caches flushed before each call (as after a forward)",
                    "; ".join(f"{label}: swap {f[f'flushed_swap_over_copy/{label}']:.2f}x a `copy_`, "
                              f"switch {f[f'flushed_switch_us/{label}']:.0f} us" for label in sorted(flushed)),
                    "one dispatched op (`copy_` of 4 floats) under the same flush: " + ", ".join(
                        f"{f[f'flushed_one_op_us/{label}']:.0f} us" for label in sorted(flushed))))
    for group in r.groups("switch + forward"):
        out.append(("switch + forward, compiled, 4 resident adapters",
                    f"{r.ratio(group, 'hotswap_rt'):.2f}x the forward alone",
                    f"PEFT set_adapter {r.ratio(group, 'peft'):.2f}x once cached; first switch to "
                    f"each adapter {f.get('peft_first_switch_ms', float('nan')):.0f} ms "
                    f"(recompile)"))
    for group in r.groups("forward, prefill"):
        out.append((f"prefill 1x128, one adapter, {_shape(group)}",
                    f"{r.ratio(group, 'hotswap_rt'):.2f}x uninjected",
                    f"merged {r.ratio(group, 'adapter merged'):.2f}x, "
                    f"PEFT {r.ratio(group, 'peft'):.2f}x"))
    for group in r.groups("decode, batch 8"):
        out.append((f"decode batch 8, static cache, per token, {_shape(group)}",
                    f"{r.ratio(group, 'hotswap_rt'):.2f}x uninjected",
                    f"merged {r.ratio(group, 'adapter merged'):.2f}x, "
                    f"PEFT {r.ratio(group, 'peft'):.2f}x"))
    for group in r.groups("mixed batch"):
        out.append(("mixed batch, 4 adapters in 8 rows", f"{r.ratio(group, 'hotswap_rt 4'):.2f}x "
                    f"one adapter", f"PEFT adapter_names= (eager) {r.ratio(group, 'peft'):.2f}x"))
    for group in r.groups("padding"):
        bucketed = (f"; with rank_buckets {r.ratio(group, 'max_rank 64, rank_buckets'):.2f}x"
                    if any("rank_buckets" in case for case in r.medians[group]) else "")
        out.append(("rank-4 adapter in max_rank-64 slots, prefill", f"{r.ratio(group, 'max_rank 64'):.2f}x"
                    f" a max_rank-4 runtime{bucketed}", ""))
    modes = sorted({k.split("/")[1] for k in f if k.startswith("mixed_decode/")})
    if modes:
        # the dtype it ran in (bf16 where the CPU has bf16 matmuls, else fp32), named in its group
        group = next(iter(r.groups("decode step, batch 16, Llama-7B layer shapes x2")), "")
        match = re.search(r"x2 (bfloat16|float32),", group)
        dtype = {"bfloat16": " bf16", "float32": " fp32"}[match.group(1)] if match else ""
        out.append((f"decode step, batch 16, Llama-7B layer shapes x2{dtype}, all-linear r=16, 8 / 16 "
                    "distinct adapters", "; ".join(f"{mode}: {f[f'mixed_decode/{mode}/k8']:.2f}x / "
                                          f"{f[f'mixed_decode/{mode}/k16']:.2f}x" for mode in modes),
                    "uninjected compiled model = 1.00x"))
    if "serve_k16_over_k1/mixed" in f:
        out.append(("HTTP server throughput with 16 adapters, as a share of 1 adapter",
                    f"{f['serve_k16_over_k1/mixed']:.0%} (adapters mixed in every step)",
                    f"one adapter at a time: {f['serve_k16_over_k1/baseline']:.0%}"))
    if "ray_req_s/1" in f:
        out.append(("Ray Serve, 8 adapters: 2 replicas vs 1 (same machine)",
                    f"{f['ray_req_s/2']:.1f} vs {f['ray_req_s/1']:.1f} req/s; "
                    f"{f['ray_resident_share/2']:.0%} of requests found their adapter resident",
                    "2 CPUs shared by both replicas, Ray and the client"))
    out += adapter_type_rows(r)
    for group in r.groups("cold load"):
        cases = r.medians[group]
        ours = cases[REPEAT_LOAD]
        one_pass = next(v for k, v in cases.items() if k.startswith("load_file + one pass"))
        first = cases.get("hotswap_rt load, first of its structure")
        floor = next((v for k, v in cases.items() if k.startswith("floor:")), None)
        mapped = next((v for k, v in cases.items() if k.startswith("floor, mapped:")), None)
        extra = [f"first of its structure: {first / one_pass:.2f}x"] if first is not None else []
        read_first = next((v for k, v in cases.items()
                           if k.startswith("hotswap_rt load, file read into memory")), None)
        if read_first is not None:
            extra.append(f"file read into memory first (map_adapter_files=False): {read_first / one_pass:.2f}x")
        if floor is not None and mapped is not None:
            extra.append(f"floor of rank-major staging, a read and the transposing writes: "
                         f"{floor / one_pass:.2f}x, from the mapped file with nothing kept: "
                         f"{mapped / one_pass:.2f}x")
        extra_text = f" ({'; '.join(extra)})" if extra else ""
        out.append((f"cold load disk -> ring, {_shape(group)}", f"{ours / one_pass:.2f}x "
                    f"load_file + one pass over the data{extra_text}", f"{r.ratio(group, REPEAT_LOAD):.2f}x "
                    "a lazy load_file"))
    return out


REPEAT_LOAD = "hotswap_rt load (read+validate+stage)"  # benchmarks/test_ring.py's cold-load case
ADAPTER_TYPES = (("lora", "LoRA"), ("dora", "DoRA"), ("lora_bias", "LoRA bias"), ("ia3", "IA3"))


def adapter_type_rows(r: Results) -> list[tuple[str, str, str]]:
    """Issue 18's figures (``benchmarks/test_adapter_types.py``): forward per adapter type and
    MoE expert LoRA as ratios to the uninjected model, swaps as ratios to a ``copy_``."""
    out: list[tuple[str, str, str]] = []
    for label, prefix in (("prefill 1x128", "adapter types, prefill"),
                          ("one-token batch 8", "adapter types, one-token")):
        for group in r.groups(prefix):
            types = ", ".join(f"{name} {r.ratio(group, key + ', runtime with'):.2f}x"
                              for key, name in ADAPTER_TYPES)
            out.append((f"adapter types, {label}, llama h512 x4 fp32 r16 (scale vectors on)",
                        f"{types}; + per-slot lm_head {r.ratio(group, 'lora + lm_head'):.2f}x",
                        f"uninjected = 1.00x; LoRA without scale vectors "
                        f"{r.ratio(group, 'lora, runtime without'):.2f}x"))
    swaps = []
    for group in r.groups("adapter types, swap "):
        name = group.removeprefix("adapter types, swap ").split(":")[0]
        size = (r.notes.get(group) or ["? MB"])[0]
        swaps.append(f"{name} {r.ratio(group, 'write_slot'):.2f}x ({size})")
    if swaps:
        out.append(("adapter types, swap (write_slot of the staged row)", ", ".join(swaps),
                    "`copy_` of the same bytes = 1.00x"))
    for prefix in ("MoE expert LoRA, prefill", "MoE expert LoRA, one-token"):
        for group in r.groups(prefix):
            label = group.removeprefix("MoE expert LoRA, ").split(", compiled")[0]
            out.append((f"MoE expert LoRA, {label}, qwen3-moe h512 x4, 8 experts top-2",
                        f"{r.ratio(group, 'runtime with expert slots'):.2f}x uninjected",
                        "uninjected: transformers' grouped_mm experts (CPU fallback)"))
    for group in r.groups("MoE expert LoRA, swap"):
        size = (r.notes.get(group) or ["? MB"])[0]
        out.append(("MoE expert LoRA, swap", f"{r.ratio(group, 'write_slot'):.2f}x a `copy_` of its {size}",
                    ""))
    return out


def markdown(r: Results, source: str) -> str:
    m = r.machine
    lines = [f"From `{source}` ({m['processor']}, {m['cpus']} CPUs, torch {m['torch']}"
             f"{', ' + m['cuda'] if m['cuda'] else ', no GPU'}):", "",
             "| what | hotswap_rt | reference |", "|---|---|---|"]
    lines += [f"| {what} | {ours} | {ref} |" for what, ours, ref in rows(r)]
    lines += ["", f"![benchmark ratios]({Path(source).with_suffix('.png').as_posix()})"]
    return "\n".join(lines)


def replace_block(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    readme.write_text(head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args()
    path = Path(args.results)
    source = path.as_posix()
    if args.readme is not None:
        try:
            source = path.resolve().relative_to(args.readme.resolve().parent).as_posix()
        except ValueError:
            pass
    block = markdown(Results(json.loads(path.read_text())), source)
    print(block)
    if args.readme is not None:
        replace_block(args.readme, block)


if __name__ == "__main__":
    main()
