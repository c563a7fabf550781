"""``scripts/gpu_check.sh`` on a machine without a GPU: its ``--dry-run`` lists the steps and checks
its files, and every stage of its benchmark script runs (tiny shapes, CPU, not compiled), so the
script is correct before a GPU ever runs it."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_dry_run_lists_the_steps_and_finds_every_file() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tests/test_cuda.py" in done.stdout
    assert "benchmarks.gpu_check --device cuda" in done.stdout
    assert "nothing run" in done.stdout


def test_dry_run_fails_naming_a_missing_file(tmp_path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "gpu_check.sh")
    (tmp_path / "pyproject.toml").write_text("")
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "missing files" in done.stderr and "tests/test_cuda.py" in done.stderr


def test_unknown_argument_is_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr


def test_every_benchmark_stage_runs_on_cpu(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--no-compile",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["failed"] == []
    stages = results["stages"]
    assert set(stages) == {"swap", "overlap", "decode_k", "engine", "kernels"}
    assert stages["swap"]["swaps"] >= 5  # every timed activation really copied a slot
    swap = stages["swap"]
    assert swap["peft_state_dict_host_us"] > 0 and swap["swap_speedup_vs_peft_state_dict_device"] > 0
    assert all(swap[f"rank{rank}_swap_us"] > 0 and swap[f"rank{rank}_copy_us"] > 0 for rank in (4, 16, 64))
    assert swap["rank4_over_rank64"] > 0
    assert all(swap[f"part_{part}_us"] > 0 for part in ("write_slot", "copy_nowait", "selection_write"))
    overlap = stages["overlap"]
    assert overlap["replace_loads_during"] > 0 and overlap["new_loads_during"] > 0
    assert overlap["activate_loads_during"] > 0 and overlap["activate_copies_during"] > 0
    assert overlap["recompiles"] == 0
    products = ("auto", "stacked", "per_row", "per_row_reduce")
    assert all(stages["decode_k"][f"{mode}_k{k}_us"] > 0 for mode in products for k in (1, 4, 8, 16))
    # uncompiled, auto runs the stacked product (rt.compile adds the per-row graph)
    assert [stages["decode_k"][f"{mode}_ran_per_row"] for mode in products] == [False, False, True, True]
    decode = stages["decode_k"]
    # ratios over the faster of the uninjected step timed before and after the products
    assert decode["uninjected_us"] == min(decode["uninjected_first_us"], decode["uninjected_last_us"]) > 0
    assert all(decode[f"{mode}_k{k}_over_uninjected"] == decode[f"{mode}_k{k}_us"] / decode["uninjected_us"]
               for mode in products for k in (1, 4, 8, 16))
    for label in ("uninjected", *(f"{mode}_k8" for mode in products)):  # the step's profile
        assert decode[f"{label}_kernels_per_step"] > 0 and decode[f"{label}_top_kernels"]
    assert (stages["decode_k"]["stacked_k8_kernels_per_step"]
            > stages["decode_k"]["uninjected_kernels_per_step"])  # the LoRA layers' own ops
    assert stages["engine"]["base_tok_s"] > 0 and stages["engine"]["mixed8_tok_s"] > 0
    kernels = stages["kernels"]
    shapes = ("64x64", "64x128", "128x64")  # --quick: hidden 64, intermediate 128
    for shape, form in itertools.product(shapes, ("reduce", "rank_unrolled", "bmm", "dense")):
        assert kernels[f"{shape}_{form}_us"] > 0 and kernels[f"{shape}_base_us"] > 0
        assert kernels[f"{shape}_{form}_max_diff"] < 1e-6  # float32 on CPU: each form computes the delta
    for shape, part in itertools.product(shapes, ("shrink", "expand")):  # reduce's two sums alone
        assert kernels[f"{shape}_reduce_{part}_us"] > 0
    for shape in shapes:  # base and delta, the d_in sum folded into the base matmul
        assert kernels[f"{shape}_fused_us"] > 0 and kernels[f"{shape}_fused_max_diff"] < 1e-4
    assert not [key for key in kernels if key.endswith("_error")]  # a failing form is recorded, not raised
    for shape in shapes:  # the candidates that did not run say why
        assert "bfloat16" in kernels[f"{shape}_grouped_skipped"] and f"{shape}_grouped_us" not in kernels
        assert "CUDA" in kernels[f"{shape}_triton_skipped"] and f"{shape}_triton_us" not in kernels


def test_the_grouped_kernel_form_equals_the_gathered_one_compiled_in_bfloat16() -> None:
    """``gpu_check``'s segment-matmul candidate (rows grouped by slot, ``torch._grouped_mm``)
    computes what the gathered batched matmuls do, for any mix of slots (empty groups, a slot
    for every row, all rows on one), and compiled once it runs every mix without recompiling."""
    import torch._dynamo.testing

    from benchmarks.gpu_check import _rank_sum_forms

    forms = _rank_sum_forms()
    generator = torch.Generator().manual_seed(0)
    layers = [(torch.randn(8, 16, 32, generator=generator).bfloat16(),
               torch.randn(8, 16, 48, generator=generator).bfloat16()) for _ in range(2)]
    x = torch.randn(6, 32, generator=generator).bfloat16()
    exact = lambda slots: forms["bmm"](x.float(), [(a.float(), bt.float()) for a, bt in layers], slots)  # noqa: E731
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(forms["grouped"], backend=counter, fullgraph=True)
    for slots in ([3, 1, 3, 0, 7, 1], [5] * 6, [0, 1, 2, 3, 4, 5]):
        slots = torch.tensor(slots).view(6, 1)
        expected = exact(slots)
        for got in (forms["grouped"](x, layers, slots), compiled(x, layers, slots)):
            assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert counter.frame_count == 1
