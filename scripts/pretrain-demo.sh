#!/usr/bin/env bash
# Makes the demo's pretrained base (assets/demo-base/model.safetensors, embedded in
# the binary and the wasm package) with webtune's own trainer, from the demo's random
# initialisation (`--model demo-random`), in two phases of full training:
#   1. `--data demo-pretrain`: the operations as text, `reverse(word) = drow`;
#   2. `--data demo-pretrain-chat`: the same, half of it as chat turns whose requests
#      are still `reverse(word)`, so the base answers in turns but knows no instruction.
# About 15 minutes on a 2-core CPU with lavapipe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
one=$(mktemp -d); two=$(mktemp -d)
cargo run --release --quiet -- train --model demo-random --data demo-pretrain --full --out "$one" \
  --steps 2500 --lr 3e-3 --schedule cosine --warmup 20 --batch-size 16 --max-seq-len 64 --seed 3 --f32-weights
cargo run --release --quiet -- train --model "$one" --data demo-pretrain-chat --full --out "$two" \
  --steps 1200 --lr 2e-3 --schedule cosine --warmup 20 --batch-size 16 --max-seq-len 64 --seed 4 --f32-weights
mkdir -p assets/demo-base
cp "$two/model.safetensors" assets/demo-base/model.safetensors
cat "$one/metrics.jsonl" "$two/metrics.jsonl" > assets/demo-base/pretrain-metrics.jsonl
rm -rf "$one" "$two"
echo "wrote assets/demo-base/model.safetensors ($(du -h assets/demo-base/model.safetensors | cut -f1))"
