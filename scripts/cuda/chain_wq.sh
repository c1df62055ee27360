#!/usr/bin/env bash
# One lease, most important first (carry .device/s): the wide prefill's checks and
# times on qwen-mix and llama3-8b with the shared-memory kernel as an alternative (no
# llama.cpp), then the 32-sequence mat-mats' staging shapes (bit-identity and times),
# then Nsight Compute on the 32-sequence mat-mats. The device tool brings back only a
# few files: everything the stages write goes into one archive, $OUT/lease.tgz,
# refreshed after each stage (so a call cut off by its time limit keeps what finished).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FINAL="${OUT:-./lease-out}"
mkdir -p "$FINAL"
export OUT="$(mktemp -d)"
pack() { tar czf "$FINAL/lease.tgz" -C "$OUT" . 2>/dev/null; }
DOCTOR_ENV="CANDELA_CUDA_WIDE_SMEM_MAX=4096" HTTP_ENV="|CANDELA_CUDA_WIDE_SMEM_MAX=64 CANDELA_CUDA_PREFILL_MAX=8" \
    MODELS="qwen-mix llama3-8b" PEER=0 bash "$HERE/lease.sh" wide8b
pack
echo "== tune at ${SECONDS} s"
QUICK=1 MODELS=llama3-8b FORCED="CANDELA_CUDA_TCS32_ROUNDS=8x2" bash "$HERE/lease.sh" tune
pack
echo "== prof at ${SECONDS} s"
KERNELS="${KERNELS:-tcs32w_}" bash "$HERE/lease.sh" prof
pack
