#!/usr/bin/env bash
# The accelerator figures in one call (docs/benchmarks.md, "Accelerators"): forward and train
# step of the five backbones in float32 and bfloat16, peak memory, FLOPs, MFU, input stall.
#   bash benchmarks/run_accelerator.sh [OUT_DIR]      (default: $OUT if set, else .)
# Extra arguments after OUT_DIR go to benchmarks/accelerator.py (e.g. --dtypes=bfloat16);
# $PYTHON picks the interpreter (default python3); wheels in .whl/ (benchmarks/device_wheels.sh)
# are installed first. Every case is compiled first, 5 processes at
# once ($COMPILE_WORKERS; 0: none), and the timed processes load the programs from the cache.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-.}}"
shift || true
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Wheels carried from benchmarks/device_wheels.sh (the GPU machines have no registry).
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/mcibi_site "$repo"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/mcibi_site"
fi
"${PYTHON:-python3}" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "${PYTHON:-python3}" -u benchmarks/accelerator.py --out_dir="$out" \
  --compile_workers="${COMPILE_WORKERS:-5}" "$@"
