#!/usr/bin/env bash
# Prune llama.cpp's source (176 MB) to what building llama-bench needs and xz it to
# .device/a/llamacpp.tar.xz (~2.3 MB) for scripts/cuda/lease.sh stage1.
# Usage: scripts/cuda/llamacpp_tar.sh [SRC]   (default ~/.cache/candela-bench/llama.cpp/src)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="${1:-$HOME/.cache/candela-bench/llama.cpp/src}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/src/tools"
(cd "$SRC" && cp -r CMakeLists.txt cmake ggml src include common vendor LICENSE "$TMP/src/")
cp -r "$SRC/tools/llama-bench" "$TMP/src/tools/"
echo 'add_subdirectory(llama-bench)' >"$TMP/src/tools/CMakeLists.txt"
for b in sycl vulkan opencl hexagon metal et cann musa webgpu zdnn openvino; do
    rm -rf "$TMP/src/ggml/src/ggml-$b"
done
mkdir -p "$REPO/.device/a"
tar cJf "$REPO/.device/a/llamacpp.tar.xz" -C "$TMP" src
ls -l "$REPO/.device/a/llamacpp.tar.xz"
