#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-server` (CPU only) for the peer
# comparison in benches/peer/peer_bench.py.
#
# The source is the llama.cpp that the llama-cpp-python sdist vendors, fetched
# from PyPI with pip, so no other host is needed. Everything lands in a cache
# dir outside the repo; nothing from llama.cpp is committed. Idempotent: when
# both binaries already exist the build is skipped.
#
# Usage: benches/peer/build_llama_cpp.sh [CACHE_DIR]
#   CACHE_DIR  default: $CANDELA_BENCH_CACHE or $HOME/.cache/candela-bench/llama.cpp
#   env LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default: nproc)
# Prints the bin dir on its last line.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${1:-${CANDELA_BENCH_CACHE:-$HOME/.cache/candela-bench/llama.cpp}}"
JOBS="${JOBS:-$(nproc)}"
BIN="$CACHE/build/bin"

if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-server" ]]; then
    echo "llama.cpp binaries already built in $BIN (delete $CACHE to rebuild)" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"

if ! command -v cmake >/dev/null 2>&1; then
    echo "cmake missing: installing it with apt-get" >&2
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq cmake
fi

SRC="$CACHE/src"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    DL="$CACHE/sdist"
    mkdir -p "$DL"
    if ! ls "$DL"/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
        python3 -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==$VERSION" -d "$DL" >&2
    fi
    TARBALL=$(ls "$DL"/llama_cpp_python-"$VERSION".tar.gz)
    rm -rf "$CACHE/unpack" "$SRC"
    mkdir -p "$CACHE/unpack"
    tar -xzf "$TARBALL" -C "$CACHE/unpack"
    mv "$CACHE/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$CACHE/unpack"
fi

# ggml's AMX kernels crash on some Xeons (Sapphire Rapids class, seen with 0.3.36):
# build without them where the CPU has AMX, so the comparison runs at all.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CFLAGS="${CFLAGS:-} $NOAMX" CXXFLAGS="${CXXFLAGS:-} $NOAMX"
    echo "CPU has AMX: building llama.cpp without it ($NOAMX)" >&2
fi

cmake -S "$SRC" -B "$CACHE/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$CACHE/build" --config Release -j "$JOBS" \
    --target llama-bench llama-server >&2

for b in llama-bench llama-server; do
    [[ -x "$BIN/$b" ]] || { echo "build finished but $BIN/$b is missing" >&2; exit 1; }
done
echo "$BIN"
