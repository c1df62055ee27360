#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-server` (CPU only) for the peer
# comparison in benches/peer/peer_bench.py.
#
# The source is the llama.cpp that the llama-cpp-python sdist vendors, fetched
# from PyPI's simple index, so no other host is needed. Everything lands in a cache
# dir outside the repo; nothing from llama.cpp is committed. Idempotent: when
# both binaries already exist the build is skipped.
#
# Usage: benches/peer/build_llama_cpp.sh [CACHE_DIR]
#   CACHE_DIR  default: $CANDELA_BENCH_CACHE or $HOME/.cache/candela-bench/llama.cpp
#              (with ISA set: that path with "-$ISA" appended)
#   env LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default: nproc)
#   env FETCH_ONLY=1  only fetch and unpack the source (prints its dir), build nothing
#   env ISA    native (default: everything this CPU has, GGML_NATIVE) or one of the
#              levels candela's kernels can be capped at (CANDELA_ISA), so that both
#              sides of a comparison use the same instructions:
#                avx512   AVX-512 F/BW/DQ/VL + VNNI + VBMI (a Zen 4 / Ice Lake class set)
#                avx2vnni AVX2 + FMA + F16C + AVX-VNNI (Alder Lake class)
#                avx2     AVX2 + FMA + F16C (Haswell .. Zen 3 class)
#                scalar   none of them (SSE only)
# Prints the bin dir on its last line.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ISA="${ISA:-native}"
CACHE="${1:-${CANDELA_BENCH_CACHE:-$HOME/.cache/candela-bench/llama.cpp}}"
[[ -n "${1:-}" || "$ISA" == native ]] || CACHE="$CACHE-$ISA"
JOBS="${JOBS:-$(nproc 2>/dev/null || sysctl -n hw.ncpu)}"
BIN="$CACHE/build/bin"

if [[ -z "${FETCH_ONLY:-}" && -x "$BIN/llama-bench" && -x "$BIN/llama-server" ]]; then
    echo "llama.cpp binaries already built in $BIN (delete $CACHE to rebuild)" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"

if [[ -z "${FETCH_ONLY:-}" ]] && ! command -v cmake >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "cmake missing: install it (macOS: brew install cmake)" >&2
        exit 1
    fi
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
        # The sdist straight from the index (PEP 503 page, sha256 checked): `pip download
        # --no-binary :all:` would first build the build backend's own dependencies
        # (cmake among them) from source, which takes most of an hour on two cores.
        python3 - "$VERSION" "$DL" <<'PY' >&2
import hashlib, os, re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page = urllib.request.urlopen(f"{index}/llama-cpp-python/").read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
m = re.search(r'href="([^"]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', page)
if not m:
    sys.exit(f"{name} is not on {index}/llama-cpp-python/")
url, want = m.group(1), m.group(2)
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != want:
    sys.exit(f"{name}: sha256 mismatch")
with open(os.path.join(dest, name), "wb") as f:
    f.write(data)
print(f"fetched {name} ({len(data)} bytes)")
PY
    fi
    TARBALL=$(ls "$DL"/llama_cpp_python-"$VERSION".tar.gz)
    rm -rf "$CACHE/unpack" "$SRC"
    mkdir -p "$CACHE/unpack"
    tar -xzf "$TARBALL" -C "$CACHE/unpack"
    mv "$CACHE/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$CACHE/unpack"
fi
if [[ -n "${FETCH_ONLY:-}" ]]; then
    echo "$SRC"
    exit 0
fi

# The instruction set: GGML_NATIVE, or ggml's per-extension options for a capped level.
off="-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
     -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
case "$ISA" in
    native) ISA_FLAGS="-DGGML_NATIVE=ON" ;;
    avx512) ISA_FLAGS="-DGGML_NATIVE=OFF $off -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
                -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
                -DGGML_AVX512_VNNI=ON" ;;
    avx2vnni) ISA_FLAGS="-DGGML_NATIVE=OFF $off -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
                -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON" ;;
    avx2) ISA_FLAGS="-DGGML_NATIVE=OFF $off -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
                -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
    scalar) ISA_FLAGS="-DGGML_NATIVE=OFF $off -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF \
                -DGGML_F16C=OFF -DGGML_BMI2=OFF" ;;
    *) echo "ISA must be native, avx512, avx2vnni, avx2 or scalar (got $ISA)" >&2; exit 2 ;;
esac
echo "llama.cpp instruction set: $ISA" >&2

# ggml's AMX kernels crash on some Xeons (Sapphire Rapids class, seen with 0.3.36):
# build without them where the CPU has AMX, so the comparison runs at all.
if [[ "$ISA" == native ]] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CFLAGS="${CFLAGS:-} $NOAMX" CXXFLAGS="${CXXFLAGS:-} $NOAMX"
    echo "CPU has AMX: building llama.cpp without it ($NOAMX)" >&2
fi

cmake -S "$SRC" -B "$CACHE/build" \
    -DCMAKE_BUILD_TYPE=Release \
    $ISA_FLAGS \
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
