#!/usr/bin/env bash
# Build the wasm package into web/pkg: the wasm32 target, wasm-bindgen-cli at exactly
# the wasm-bindgen crate's version (installed when missing), then wasm-bindgen; and
# vendor the page's one library, uPlot (the loss chart, from npm), into web/vendor.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "installing wasm-bindgen-cli $want (a few minutes)" >&2
  # --locked fails for some versions (a locked dependency is missing from the registry).
  cargo install wasm-bindgen-cli --version "$want" --quiet
fi
cargo build --release --lib --target wasm32-unknown-unknown --quiet
wasm-bindgen --target web --no-typescript --out-dir web/pkg target/wasm32-unknown-unknown/release/webtune.wasm
[ -f node_modules/uplot/dist/uPlot.esm.js ] || npm ci --no-audit --no-fund --loglevel=error
mkdir -p web/vendor
cp node_modules/uplot/dist/uPlot.esm.js node_modules/uplot/dist/uPlot.min.css node_modules/uplot/LICENSE web/vendor/
echo "built web/pkg ($(du -h web/pkg/webtune_bg.wasm | cut -f1))"
