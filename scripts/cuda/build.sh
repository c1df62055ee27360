#!/usr/bin/env bash
# Build a CUDA (sm_90, Hopper) release binary of candela on a machine with no GPU and
# no system CUDA: the toolkit comes from PyPI into a venv, pinned to CUDA 13.0 so that
# the PTX it emits is accepted by a 13.0 driver/ptxas (unpinned nvvm/crt are newer and
# are rejected there). libcuda.so is not available here, so the link goes against an
# empty stub with soname libcuda.so.1; the real driver library is found at run time.
#
# Output: target-cuda/x86_64-unknown-linux-gnu/release/candela, plus a stripped copy in .device/candela
# (ignored by git; name `.device` in the device tool's `carry` to send it).
#
# Usage: scripts/cuda/build.sh            (from anywhere; ~2 cores: expect a long nvcc step)
# Env:   CANDELA_CUDA_HOME  cache dir for venv + stub (default ~/.cache/candela-cuda)
#        CUDA_COMPUTE_CAP   default 90 (H100/H200)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${CANDELA_CUDA_HOME:-$HOME/.cache/candela-cuda}"
VENV="$CACHE/venv"
STUB="$CACHE/stub"
mkdir -p "$CACHE" "$STUB"

# 1. Toolkit from PyPI, every piece on 13.0.
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
    'nvidia-cuda-nvcc==13.0.88' 'nvidia-nvvm==13.0.88' 'nvidia-cuda-crt==13.0.88' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand'

SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
CU="$SITE/nvidia/cu13"
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU/bin (layout changed?)" >&2; exit 1; }
export PATH="$CU/bin:$PATH"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -n 2

# 2. Link stubs: an empty libcuda.so.1 and unversioned names for the venv's libraries.
if [ ! -e "$STUB/libcuda.so" ]; then
    echo 'void candela_cuda_stub(void) {}' > "$STUB/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/stub.c"
    ln -sf libcuda.so.1 "$STUB/libcuda.so"
fi
for lib in nvrtc cublas cublasLt curand cudart; do
    real="$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1 || true)"
    [ -n "$real" ] || { echo "lib$lib.so.* not found in $CU/lib" >&2; exit 1; }
    ln -sf "$real" "$STUB/lib$lib.so"
done

# 3. Build. The GPU machine's CPU is an Intel Xeon: x86-64-v3, not this host's native.
#    Symbols of the stub libcuda stay unresolved at link time; the CUDA libraries are
#    forced into NEEDED because candle's crates reach them through dlopen-free FFI.
#    An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which run
#    here and would fail to load with the stub libcuda in NEEDED.
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$STUB \
-C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files \
-C link-arg=-Wl,--push-state,--no-as-needed,-lcuda,-lnvrtc,-lcublasLt,--pop-state"
export CARGO_TARGET_DIR="$REPO/target-cuda"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
cd "$REPO"
start=$(date +%s)
TARGET=x86_64-unknown-linux-gnu
cargo build --release --features cuda --bin candela --target "$TARGET"
echo "cargo build took $(( $(date +%s) - start )) s"

# 4. Stripped copy for carrying to the GPU machine.
mkdir -p "$REPO/.device"
cp "$CARGO_TARGET_DIR/$TARGET/release/candela" "$REPO/.device/candela"
strip "$REPO/.device/candela"
ls -l "$REPO/.device/candela"
