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
exec "$ROOT/.venv/bin/python" -m pytest "$@"
