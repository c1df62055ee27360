#!/usr/bin/env bash
# Type-check the macOS code (Apple probes, the `metal` feature) from Linux: no macOS
# SDK or Apple linker here, so C build steps of dependencies go to a shim that writes
# empty objects — fine for `cargo check`, which never links. This proves the code
# compiles for aarch64-apple-darwin; it does not run it (no Mac hardware here).
#
# Usage: scripts/macos/check.sh [extra cargo args]   (needs network once for rustup)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rustup target add aarch64-apple-darwin >/dev/null
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
cat > "$SHIM/cc" <<'SH'
#!/bin/sh
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
[ -n "$out" ] && : > "$out"
exit 0
SH
cat > "$SHIM/ar" <<'SH'
#!/bin/sh
for a in "$@"; do case "$a" in *.a) printf '!<arch>\n' > "$a";; esac; done
exit 0
SH
chmod +x "$SHIM/cc" "$SHIM/ar"
cd "$REPO"
export CC_aarch64_apple_darwin="$SHIM/cc" AR_aarch64_apple_darwin="$SHIM/ar"
# .cargo/config.toml's target-cpu=native means this host's CPU; not for an Apple target.
export CARGO_TARGET_AARCH64_APPLE_DARWIN_RUSTFLAGS="-C target-cpu=apple-m1"
for features in "" "metal"; do
    echo "== cargo clippy --target aarch64-apple-darwin --features '$features'"
    cargo clippy --release --target aarch64-apple-darwin --all-targets --features "$features" "$@" -- -D warnings
done
