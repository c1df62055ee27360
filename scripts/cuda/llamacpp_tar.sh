#!/usr/bin/env bash
# Prune llama.cpp's source (176 MB) to what building llama-bench, llama-batched-bench and
# llama-server needs and xz it to .device/a/llamacpp.tar.xz for scripts/cuda/lease.sh
# stage1. The server is built without its web UI (no assets download on the GPU machine).
# Usage: scripts/cuda/llamacpp_tar.sh [SRC]   (default ~/.cache/candela-bench/llama.cpp/src,
#        fetched by benches/peer/build_llama_cpp.sh's FETCH_ONLY=1 where missing)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="${1:-$HOME/.cache/candela-bench/llama.cpp/src}"
# The default source is fetched (the llama-cpp-python sdist from PyPI) where missing.
if [ -z "${1:-}" ] && [ ! -f "$SRC/CMakeLists.txt" ]; then
    SRC="$(FETCH_ONLY=1 bash "$REPO/benches/peer/build_llama_cpp.sh" | tail -n 1)"
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/src/tools" "$TMP/src/scripts"
(cd "$SRC" && cp -r CMakeLists.txt cmake ggml src include common vendor LICENSE "$TMP/src/")
cp "$SRC"/scripts/*.cmake "$TMP/src/scripts/" 2>/dev/null || true
for t in llama-bench batched-bench mtmd server; do
    cp -r "$SRC/tools/$t" "$TMP/src/tools/"
done
mkdir -p "$TMP/src/tools/ui"
(cd "$SRC/tools/ui" && cp CMakeLists.txt ./*.in "$TMP/src/tools/ui/")
printf 'add_subdirectory(%s)\n' llama-bench batched-bench mtmd ui server >"$TMP/src/tools/CMakeLists.txt"
for b in sycl vulkan opencl hexagon metal et cann musa webgpu zdnn openvino; do
    rm -rf "$TMP/src/ggml/src/ggml-$b"
done
mkdir -p "$REPO/.device/a"
tar cJf "$REPO/.device/a/llamacpp.tar.xz" -C "$TMP" src
ls -l "$REPO/.device/a/llamacpp.tar.xz"
