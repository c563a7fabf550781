#!/usr/bin/env bash
# Set up .venv like scripts/test.sh, run the benchmarks, print ratios to the references and write
# benchmarks/results/<date>-<machine>.json, .md and .png (HOTSWAP_BENCH_RESULTS overrides the
# prefix). HOTSWAP_BENCH_UPDATE_README=1 also rewrites the README's summary table from the results.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh" "test,bench,serve,ray"
cd "$ROOT"
export HOTSWAP_BENCH_RESULTS="${HOTSWAP_BENCH_RESULTS:-$ROOT/benchmarks/results/$(date +%F)-$(hostname -s)}"
"$ROOT/.venv/bin/python" -m pytest benchmarks --benchmark-enable -s -q "$@"
"$ROOT/.venv/bin/python" "$ROOT/scripts/plot_bench.py" "$HOTSWAP_BENCH_RESULTS.json"
if [[ "${HOTSWAP_BENCH_UPDATE_README:-0}" == 1 ]]; then
  "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_summary.py" "$HOTSWAP_BENCH_RESULTS.json" --readme "$ROOT/README.md"
else
  "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_summary.py" "$HOTSWAP_BENCH_RESULTS.json"
fi
echo "results: $HOTSWAP_BENCH_RESULTS.json / .md / .png"
