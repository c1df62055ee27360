#!/usr/bin/env bash
# Build the single-stream mat-vec micro-benchmark (benches/cuda/mv_bench.cu: the fused
# decode's own kernels on Llama-3-8B's and SmolLM2's projection shapes) into
# .device/m/mv_bench with the toolkit scripts/cuda/build.sh installs, the CUDA runtime
# linked in statically (the GPU machine has the driver only). Run it there:
#
#   here:  scripts/cuda/mv_bench.sh
#   there: .device/m/mv_bench          (carry .device/m)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${CANDELA_CUDA_HOME:-$HOME/.cache/candela-cuda}"
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no CUDA toolkit under $VENV: run scripts/cuda/build.sh once first" >&2
    exit 1
fi
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
CU="$SITE/nvidia/cu13"
mkdir -p "$REPO/.device/m"
"$CU/bin/nvcc" -O3 -std=c++17 -arch=sm_${CUDA_COMPUTE_CAP:-90} -I"$CU/include" -L"$CU/lib" \
    "$REPO/benches/cuda/mv_bench.cu" -o "$REPO/.device/m/mv_bench" \
    -lcudart_static -lpthread -ldl -lrt
ls -la "$REPO/.device/m/mv_bench"
