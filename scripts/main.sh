#!/usr/bin/env bash
# The main job: set up, then run the demo (`webtune` with no arguments): instruction-tune
# the built-in base on this machine's GPU (or lavapipe) and report held-out accuracy
# before and after. Arguments go to webtune instead (e.g. `bench kernels`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo run --release --quiet -- "$@"
