#!/usr/bin/env bash
# Issue 24's measurement on a GPU machine, in one call of at most 8 minutes (BUDGET,
# 450 s, for the stages, most important first; see `stage` below): webtune's
# kernels and a SmolLM2-135M-shaped LoRA step (random weights, r16 on all seven
# projections, batch 4 x 512 packed tokens, with and without gradient checkpointing),
# the same matmuls and the step without checkpointing again with matmul's wide kernel
# (--wide-matmul all|large: 128x128 tiles, 8x8 an invocation; off on GPUs until measured),
# the row kernels with their reductions as workgroup-memory trees (--subgroup-sums off),
# the frozen-weight matmuls and the step without cooperative matrices (--coop-matrix off;
# on by default where the adapter offers them), the matmuls and the step with split-K
# (--split-k on: products with few tiles and a long k run their k-ranges at once; off
# by default until measured),
# then PyTorch + PEFT on the same step (tests/reference/bench_pytorch.py: f32 with TF32
# off, and bf16 autocast), and the ratios. Needs the release binary built elsewhere
# (the GPU machine has no Rust) and the Vulkan loader: where `ldconfig -p` lists no
# libvulkan, unpack the loader debs carried in .gl/ (see the device tool's README).
# Writes every output under $OUT (default /tmp/bench-gpu).
#
#   bash scripts/bench-gpu.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/bench-gpu}
mkdir -p "$out"
if ! ldconfig -p | grep -q libvulkan && [ -d .gl ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nv=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$nv" ] && export VK_DRIVER_FILES=${VK_DRIVER_FILES:-$nv}
bin=${WEBTUNE_BIN:-target/release/webtune}
[ -x "$bin" ] || { echo "error: $bin is not built (cargo build --release, then carry target/release/webtune)" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
"$bin" info | tee "$out/info.txt"
model=$(mktemp -d)
"$bin" random-model --config configs/SmolLM2-135M.json --out "$model" >/dev/null
# One call has ${BUDGET:-450} seconds (the device tool allows 600 a command): the step and
# PyTorch's first, then the kernels, then the variants; a stage that would run past the
# budget is cut to what is left, and one with under 20 s left is skipped, saying so.
deadline=$((SECONDS + ${BUDGET:-450}))
stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND under a timeout, output to $out/NAME.txt
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then echo "skipped $name: the ${BUDGET:-450} s budget is spent" | tee "$out/$name.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "stopped $name after $limit s" | tee -a "$out/$name.txt"
  return 0
}
train() {  # train NAME [FLAGS...]: the SmolLM2-135M-shaped LoRA step
  local name=$1; shift
  stage "train-$name" 150 "$bin" bench train --model "$model" --data demo --batch-size 4 --max-seq-len 512 --pack --steps 5 "$@"
}
train none
stage pytorch 150 env PYTHONUNBUFFERED=1 python3 tests/reference/bench_pytorch.py --config configs/SmolLM2-135M.json --batch 4 --seq 512
mv "$out/pytorch.txt" "$out/pytorch.jsonl"
stage kernels 120 "$bin" bench kernels --min-secs 0.3
train grad-checkpoint --grad-checkpoint
stage kernels-no-coop 40 "$bin" bench kernels --min-secs 0.3 --only frozen --coop-matrix off
train no-coop --coop-matrix off
stage kernels-wide 60 "$bin" bench kernels --min-secs 0.3 --only matmul --wide-matmul all
train wide --wide-matmul large
stage kernels-split-k 60 "$bin" bench kernels --min-secs 0.3 --only matmul --split-k on
train split-k --split-k on
for only in rmsnorm cross-entropy "grad norm"; do
  stage "kernels-trees-${only// /-}" 40 "$bin" bench kernels --min-secs 0.3 --only "$only" --subgroup-sums off
done
python3 - "$out" <<'EOF'
import json, re, sys, pathlib
out = pathlib.Path(sys.argv[1])
def ours(name):
    m = re.search(r"^mean: ([\d.]+) tokens/s", (out / name).read_text(), re.M) if (out / name).exists() else None
    return float(m.group(1)) if m else None
torch = {}
for line in (out / "pytorch.jsonl").read_text().splitlines() if (out / "pytorch.jsonl").exists() else []:
    try:
        j = json.loads(line)
        torch[j["variant"]] = j["tokens_per_s"]
    except (ValueError, KeyError):
        pass
for ck, suffix in (("none", ""), ("grad-checkpoint", ", checkpointing"), ("wide", ""), ("no-coop", ""), ("split-k", "")):
    w = ours(f"train-{ck}.txt")
    for dtype in ("f32", "bf16 autocast"):
        t = torch.get(dtype + suffix)
        ratio = f"{w / t:.3f}" if w and t else "n/a"
        how = {"wide": " (wide matmul)", "no-coop": " (no cooperative matrices)", "split-k": " (split-K)"}.get(ck, "")
        print(f"webtune{how} {w} tokens/s vs PyTorch {dtype}{suffix} {t} tokens/s: ratio {ratio}")
EOF
rm -rf "$model"
