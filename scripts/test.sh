#!/usr/bin/env bash
# Set up .venv (torch 2.13.0 CPU + hotswap_rt + test, serve, ray and diffusers extras) and run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh" "test,serve,ray,diffusers"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
