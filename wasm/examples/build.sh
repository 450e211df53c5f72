#!/usr/bin/env bash
# Builds the example plugins for wasm32-wasip1 and puts each module beside its source, with
# their SHA-256 in SHA256SUMS. Paths are remapped so the bytes do not depend on where the
# clone or the cargo home is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi
export CARGO_TARGET_DIR="${WASM_EXAMPLES_TARGET_DIR:-/var/tmp/gatehouse-wasm-examples}"
export RUSTFLAGS="--remap-path-prefix=$here=/examples --remap-path-prefix=$cargo_home=/cargo"
cargo build --quiet --release --locked --target wasm32-wasip1 --manifest-path "$here/Cargo.toml"
cd "$here"
: > SHA256SUMS
for example in add_header deny_by_header json_field http_call_auth; do
  cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/$example.wasm" "$example/$example.wasm"
  sha256sum "$example/$example.wasm" >> SHA256SUMS
done
cat SHA256SUMS
# The shipped example config names the modules by checksum: keep it current.
config="$here/../../conf/examples/wasm.yaml"
if [ -f "$config" ]; then
  while read -r sum file; do
    sed -i -E "\|path: wasm/examples/$file|{n;s|sha256: [0-9a-f]{64}|sha256: $sum|}" "$config"
  done < SHA256SUMS
fi
