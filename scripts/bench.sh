#!/usr/bin/env bash
# Set up .venv like scripts/test.sh, then run the benchmarks and print ratios to the references.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh" test
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest benchmarks --benchmark-enable -s -q "$@"
