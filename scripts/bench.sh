#!/usr/bin/env bash
# Set up .venv like scripts/test.sh, run the benchmarks, print ratios to the references and write
# benchmarks/results/<date>-<machine>.json and .md (HOTSWAP_BENCH_RESULTS overrides the prefix).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh" "test,bench"
cd "$ROOT"
export HOTSWAP_BENCH_RESULTS="${HOTSWAP_BENCH_RESULTS:-$ROOT/benchmarks/results/$(date +%F)-$(hostname -s)}"
"$ROOT/.venv/bin/python" -m pytest benchmarks --benchmark-enable -s -q "$@"
"$ROOT/.venv/bin/python" "$ROOT/scripts/plot_bench.py" "$HOTSWAP_BENCH_RESULTS.json"
echo "results: $HOTSWAP_BENCH_RESULTS.json / .md / .png"
