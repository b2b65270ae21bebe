#!/usr/bin/env bash
# Every test: set up, then run the whole suite on the GPU path (lavapipe without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --release "$@"
