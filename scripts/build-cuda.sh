#!/usr/bin/env bash
# Builds potptq with the `cuda` feature on a machine without a GPU or a CUDA install: the CUDA 13.0
# toolkit from PyPI (matching the GPU machine's CUDA 13.0 driver), a root of links with a link-time
# stub libcuda.so, and sm_90 kernels. The binary lands in target-cuda/release/potptq (the folder is
# kept between runs: a clean build takes ~9 minutes on 2 cores).
# Usage: scripts/build-cuda.sh [CUDA_ROOT=/opt/cuda-13.0]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/opt/cuda-13.0}
VENV=${CUDA_VENV:-/opt/cuda13-venv}
if [ ! -x "$ROOT/bin/nvcc" ] || [ ! -e "$ROOT/lib64/stubs/libcuda.so" ]; then
  bash scripts/setup-cuda-root.sh "$ROOT" "$VENV"
fi
export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_COMPUTE_CAP=90
export PATH=$ROOT/bin:$PATH
export LIBRARY_PATH=$ROOT/lib64:$ROOT/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
CARGO_TARGET_DIR=target-cuda cargo build --release --locked --features cuda -p potptq-cli
ls -l target-cuda/release/potptq
