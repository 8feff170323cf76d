#!/usr/bin/env bash
# The GPU check on a lent machine (benchmarks/gpu_check.py; the device tool's `run` with carry [".whl"]):
# installs the carried wheels (.whl/*.whl, made here by benchmarks/gpu_wheels.sh) into a private folder, puts it
# on PYTHONPATH, and runs the check from the repository root. Arguments go to gpu_check.py (default: --device cuda,
# JSON to stdout and to $OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
