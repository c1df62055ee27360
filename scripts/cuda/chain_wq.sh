#!/usr/bin/env bash
# One lease, most important first (carry .device/s): the wide prefill's checks and
# times on qwen-mix and llama3-8b with the shared-memory kernel as an alternative (no
# llama.cpp), then the 32-sequence mat-mats' other staging shapes (bit-identity and
# times), then Nsight Compute on the default 32-sequence mat-mats.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-./lease-out}"
export OUT
DOCTOR_ENV="CANDELA_CUDA_WIDE_SMEM_MAX=4096" HTTP_ENV="|CANDELA_CUDA_WIDE_SMEM_MAX=64 CANDELA_CUDA_PREFILL_MAX=8" \
    MODELS="qwen-mix llama3-8b" PEER=0 bash "$HERE/lease.sh" wide8b
echo "== tune at ${SECONDS} s"
QUICK=1 MODELS=llama3-8b FORCED="CANDELA_CUDA_TCS32_ROUNDS=16x2" bash "$HERE/lease.sh" tune
QUICK=1 MODELS=llama3-8b DEFAULT=0 FORCED="CANDELA_CUDA_TCS32_ROUNDS=8x4" bash "$HERE/lease.sh" tune
echo "== prof at ${SECONDS} s"
bash "$HERE/lease.sh" prof
