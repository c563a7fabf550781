#!/usr/bin/env bash
# Set up .venv (torch 2.13.0 CPU + hotswap_rt) and run the demo on the embedded default model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh"
exec "$ROOT/.venv/bin/hotswap-rt" demo "$@"
