#!/usr/bin/env bash
# Here (not on the GPU machine): download the wheels benchmarks/gpu_check.py needs there (the pins of
# benchmarks/gpu_wheels.txt, for CPython 3.12 on manylinux x86-64, no dependencies resolved: each is pinned) into
# .whl/ at the repository root (ignored by git; about 5 MB). The device tool's `run` then carries ".whl".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mapfile -t pins < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' benchmarks/gpu_wheels.txt)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
shopt -s nullglob
for f in .whl/*.whl; do  # two versions of one package stop the install there
  name=$(basename "$f" | cut -d- -f1-2 | tr '_' '-' | tr '[:upper:]' '[:lower:]' | sed 's/-/==/')
  printf '%s\n' "${pins[@]}" | tr '_' '-' | tr '[:upper:]' '[:lower:]' | grep -qxF "$name" || echo "warning: $f is not pinned in benchmarks/gpu_wheels.txt: remove it" >&2
done
du -ch .whl/*.whl
