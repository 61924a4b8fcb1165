#!/usr/bin/env bash
# Downloads, here (where pip reaches the registry), the wheels of what the accelerator benchmark
# imports and the lent GPU machines' image lacks (it has JAX with CUDA, flax, optax, orbax,
# OpenCV, Pillow, SciPy; not grain or ml_collections), for their Python 3.12 on x86-64, into
# .whl/ (git-ignored, 4.4 MB). Carry .whl with the call; benchmarks/run_accelerator.sh installs
# them first when the folder is there:
#   bash benchmarks/device_wheels.sh            # then run(..., carry=[".whl"])
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/.whl}"
# The versions the test suite runs with (pyproject.toml), and grain's two needs missing there.
packages=(grain==0.2.18 ml_collections==1.1.0 array-record==0.8.6 portpicker==1.6.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${packages[@]}"
ls -1 "$dest"
