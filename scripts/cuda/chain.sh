#!/usr/bin/env bash
# Several lease.sh stages in one device call (carry .device/s), most important first,
# each a shell snippet in which $L is lease.sh, e.g.
#
#   OUT=$OUT bash scripts/cuda/chain.sh 'MODELS=llama3-8b bash $L tune' \
#       'MODELS=llama3-8b PEER=0 TTFT=16,32,512 bash $L wide8b'
#
# The device tool brings back only a few files and the console's tail: everything the
# stages write goes into one archive, $OUT/lease.tgz, refreshed after each stage (so a
# call cut off by its time limit keeps what finished).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FINAL="${OUT:-./lease-out}"
mkdir -p "$FINAL"
export OUT="$(mktemp -d)"
export L="$HERE/lease.sh"
pack() { tar czf "$FINAL/lease.tgz" -C "$OUT" . 2>/dev/null; }
for stage in "$@"; do
    echo "== chain: $stage at ${SECONDS} s"
    bash -c "$stage"
    pack
done
