#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on a GPU machine whose image has PyTorch, transformers and
# PEFT but not hotswap-rt's serve extra (the CUDA tests of grammars and sampling import pydantic
# and outlines-core), downloaded into .whl/ for CPython 3.12 on x86-64 Linux. Run it where pip
# reaches a registry, then carry .whl/ to the GPU machine: gpu_check.sh installs what is there.
#
#   scripts/gpu_wheels.sh            the versions this checkout's .venv has (else pip's newest)
#   PYTHON_VERSION=3.11 scripts/gpu_wheels.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions outlines-core)
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY=python3
specs=()
for package in "${PACKAGES[@]}"; do
  version="$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$package")"
  specs+=("$package${version:+==$version}")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$ROOT/.whl"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d "$ROOT/.whl" "${specs[@]}"
echo "gpu_wheels: ${specs[*]} in .whl/ (carry it: the device tool's carry [\".whl\"])"
