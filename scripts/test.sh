#!/usr/bin/env bash
# Set up .venv (torch 2.13.0 CPU + hotswap_rt + test, serve, ray and diffusers extras) and run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_setup_venv.sh" "test,serve,ray,diffusers"
cd "$ROOT"
# Inductor's C++ kernels without SIMD code for the tests (export TORCHINDUCTOR_VEC_ISA_OK=1 to
# test the vectorized ones): with an empty compile cache, as on a fresh machine, the suite
# compiles hundreds of kernels, and scalar ones build faster. What the tests check (recompiles,
# outputs against PEFT) does not depend on it; the demo, the server and the benchmarks keep
# inductor's default. This script with TORCHINDUCTOR_CACHE_DIR set to an empty directory, on the
# 2-core VM: 1384 s against 1757 s with SIMD kernels (449 s with a warm cache); on a 2-core AMD
# EPYC VM (2026-11-29): 1683 s with an empty cache (a fresh machine), 592 s with a warm one.
export TORCHINDUCTOR_VEC_ISA_OK="${TORCHINDUCTOR_VEC_ISA_OK:-0}"
# Test files run in parallel (pytest-xdist): one worker per core up to 4, none on one core;
# HOTSWAP_TEST_WORKERS sets the number (0: all in this process). Each file runs whole on one
# worker, so its module-scoped compiled fixtures are built once. On the 2-core AMD VM
# (2026-11-29): 425 s against 641 s in one process with a warm compile cache, 1239 s against
# 1683 s with an empty one. Arguments given to this script come after and win (e.g. -n 0).
CORES="$(nproc 2>/dev/null || echo 1)"
WORKERS="${HOTSWAP_TEST_WORKERS:-$(( CORES < 2 ? 0 : CORES < 4 ? CORES : 4 ))}"
exec "$ROOT/.venv/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
