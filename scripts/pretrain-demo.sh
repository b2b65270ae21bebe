#!/usr/bin/env bash
# Makes the demo's pretrained base (assets/demo-base/model.safetensors, embedded in
# the binary and the wasm package) with webtune's own trainer, from the demo's random
# initialisation (`--model demo-random`), by full training on `--data demo-pretrain`:
# documents of statements about random words (`hello reversed is olleh. mat has 3
# letters.`), with no chat turns and no instructions (src/demo.rs, pretrain_jsonl).
# About 45 minutes on a 2-core CPU with lavapipe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Three cosine cycles (1100, 1400, 1300 steps); the loss plateaus near 1.15 nats per
# character until the copying heads form in the third (0.74 at the end).
one=$(mktemp -d); two=$(mktemp -d); out=$(mktemp -d)
train() {
  cargo run --release --quiet -- train --model "$1" --data demo-pretrain --full --out "$2" --steps "$3" --seed "$4" \
    --lr 3e-3 --schedule cosine --warmup "$5" --batch-size 16 --max-seq-len 128 --pack --f32-weights
}
train demo-random "$one" 1100 3 30
train "$one" "$two" 1400 4 10
train "$two" "$out" 1300 5 10
mkdir -p assets/demo-base
cp "$out/model.safetensors" assets/demo-base/model.safetensors
cat "$one/metrics.jsonl" "$two/metrics.jsonl" "$out/metrics.jsonl" > assets/demo-base/pretrain-metrics.jsonl
rm -rf "$one" "$two" "$out"
echo "wrote assets/demo-base/model.safetensors ($(du -h assets/demo-base/model.safetensors | cut -f1))"
