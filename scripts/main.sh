#!/usr/bin/env bash
# The main job: set up, then benchmark the kernels on this machine's GPU (or lavapipe).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo run --release --quiet -- bench kernels "$@"
