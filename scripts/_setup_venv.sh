#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh: create .venv if missing and install
# torch==2.13.0 first (a plain "torch" requirement would pull a multi-GB CUDA build), then the package.
# Usage: source scripts/_setup_venv.sh [extra]   (extra: "test" installs the test dependencies)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
EXTRA="${1:-}"
SPEC="$ROOT"
[ -n "$EXTRA" ] && SPEC="$ROOT[$EXTRA]"
"$PY" -m pip install --quiet -e "$SPEC"
