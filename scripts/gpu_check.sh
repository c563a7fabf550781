#!/usr/bin/env bash
# The first thing to run on a machine with a GPU (nothing here had run on one before it).
#
#   scripts/gpu_check.sh            run the CUDA tests and the GPU benchmarks (< 8 minutes)
#   scripts/gpu_check.sh --dry-run  print what it would run and check that every file it needs
#                                   exists (runs anywhere; the test suite does this on CPU)
#
# Python: $PYTHON, else .venv/bin/python if its torch sees CUDA, else python3 (a GPU image's
# own python with CUDA torch). hotswap_rt is used from this checkout (PYTHONPATH), so nothing is
# downloaded; wheels in .whl/ (if any) are installed first into a private site directory
# (scripts/gpu_wheels.sh fetches those the CUDA tests need beyond PyTorch, transformers, PEFT).
# Writes benchmarks/results/<date>-gpu.json (the benchmarks) and <date>-gpu-tests.xml (JUnit);
# with $OUT set (the device tool), copies both there too. Exit status: non-zero if any step failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

NEEDED=(
  pyproject.toml
  hotswap_rt/__init__.py
  hotswap_rt/engine/engine.py
  tests/conftest.py
  tests/test_cuda.py
  tests/test_layer_kinds.py
  tests/test_guard.py
  benchmarks/__init__.py
  benchmarks/gpu_check.py
)
missing=()
for file in "${NEEDED[@]}"; do
  [[ -f "$ROOT/$file" ]] || missing+=("$file")
done
if (( ${#missing[@]} )); then
  echo "gpu_check: missing files: ${missing[*]}" >&2
  exit 1
fi

RESULTS="$ROOT/benchmarks/results/$(date +%F)-gpu"
TESTS=(tests/test_cuda.py "tests/test_guard.py::test_reduce_overhead_cuda_graphs_switch_without_rerecord"
       "tests/test_guard.py::test_cuda_graph_forwards_from_other_threads_equal_eager")
STEPS=(
  "environment: nvidia-smi; python -c 'import torch; torch.cuda.is_available()'"
  "tests (timeout 240 s): python -m pytest ${TESTS[*]} --junitxml $RESULTS-tests.xml"
  "benchmarks (timeout 400 s): python -m benchmarks.gpu_check --device cuda --out $RESULTS.json"
)
echo "gpu_check steps:"
printf '  %s\n' "${STEPS[@]}"
if (( DRY_RUN )); then
  echo "gpu_check --dry-run: all ${#NEEDED[@]} needed files exist; nothing run"
  exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c \
    "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site "$ROOT"/.whl/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_check_inductor}"
cd "$ROOT"
mkdir -p "$(dirname "$RESULTS")"

nvidia-smi || true
"$PY" - <<'EOF' || exit 1
import sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (set PYTHON to a CUDA build's python)")
print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
EOF

status=0
# The CUDA tests of grammars and sampling import pydantic and outlines-core (the serve extra),
# which a GPU image may lack (the 2026-11-30 H200 image did): say so before they fail.
if ! "$PY" -c "import pydantic, outlines_core" 2>/dev/null; then
  echo "gpu_check: pydantic or outlines-core is missing: run scripts/gpu_wheels.sh where pip works" \
       "and carry .whl/ (two CUDA tests will fail without them)" >&2
  status=1
fi
timeout 240 "$PY" -m pytest "${TESTS[@]}" -v --durations=20 -p no:cacheprovider -o addopts="" -o log_level=WARNING \
  --junitxml "$RESULTS-tests.xml" || status=1
timeout 400 "$PY" -m benchmarks.gpu_check --device cuda --out "$RESULTS.json" || status=1
if [[ -n "${OUT:-}" ]]; then
  cp -f "$RESULTS.json" "$RESULTS-tests.xml" "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED); results $RESULTS.json"
exit $status
