#!/usr/bin/env bash
# Build the library's tests for aarch64 Linux and run them under qemu user-mode
# emulation, so the NEON kernels (src/engine/kernels/quant/neon.rs) are really executed and
# checked bit for bit against the portable reference. Emulation proves correctness
# only; timings under qemu mean nothing (NEON is untimed on real ARM hardware here).
#
# Usage: scripts/arm/test.sh [test filter, default "quant::"] [test harness args, e.g. --nocapture]
#   ARM_TARGETS="--test model" runs an integration test file instead of the library's
#   tests (set CANDELA_TEST_DATA_DIR for the real model, as on x86).
# Needs (Debian): apt-get install -y --no-install-recommends qemu-user \
#   gcc-aarch64-linux-gnu libc6-dev-arm64-cross   and rustup (network once).
# ARM_SETUP=1 installs those first (apt-get, needs root).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ "${ARM_SETUP:-0}" = 1 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends qemu-user gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross >/dev/null
fi
for tool in qemu-aarch64 aarch64-linux-gnu-gcc; do
    command -v "$tool" >/dev/null || { echo "missing $tool (see the header of $0)" >&2; exit 1; }
done
rustup target add aarch64-unknown-linux-gnu >/dev/null
cd "$REPO"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# .cargo/config.toml's target-cpu=native means this host's CPU. Generic armv8-a has
# NEON but not dotprod, so the dotprod kernel is chosen at run time (qemu's default
# "max" CPU has it); CANDELA_ISA=neon caps to the plain NEON kernel.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-cpu=generic"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/aarch64-qemu}"
filter="${1:-quant::}"
shift || true
# shellcheck disable=SC2086 # ARM_TARGETS is a list of cargo arguments
cargo test --release --target aarch64-unknown-linux-gnu ${ARM_TARGETS:---lib} -- "$filter" "$@"
