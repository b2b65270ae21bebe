"""PyTorch + PEFT's speed on the step `webtune bench train` measures (issue 24's
side-by-side, run by scripts/bench-gpu.sh on a GPU machine): a model of a config's
shape with random weights (SmolLM2-135M by default), LoRA r16 (alpha 32, dropout 0.05)
on all seven projections, AdamW, batches of B x T random tokens, with and without
gradient checkpointing, in f32 (TF32 off) and under bf16 autocast. Prints one JSON line
per variant: {"variant", "tokens_per_s", "ms_per_step", "steps"}.

    python3 tests/reference/bench_pytorch.py [--config configs/SmolLM2-135M.json]
        [--batch 4] [--seq 512] [--steps 10] [--warmup 3]
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def step_time(model, opt, ids, steps, warmup, bf16):
    """Mean seconds per optimizer step (after `warmup` steps), CUDA synchronised."""
    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/SmolLM2-135M.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    # f32 means f32: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = AutoConfig.from_pretrained(a.config)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    for ckpt in (False, True):
        for bf16 in (False, True):
            base = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).cuda()
            if ckpt:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.enable_input_require_grads()
            lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            model = get_peft_model(base, lora)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            secs = step_time(model, opt, ids, a.steps, a.warmup, bf16)
            variant = f"{'bf16 autocast' if bf16 else 'f32'}{', checkpointing' if ckpt else ''}"
            print(json.dumps({"variant": variant, "tokens_per_s": a.batch * a.seq / secs, "ms_per_step": 1e3 * secs, "steps": a.steps}), flush=True)
            del model, base, opt
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
