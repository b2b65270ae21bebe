"""Ground truth for QLoRA (quantized frozen bases), from PyTorch + transformers + PEFT
on the dequantized weights, with the `gguf` package and bitsandbytes doing the
quantizing. Under tests/fixtures/qlora/ it writes:

  model.gguf             a llama GGUF at Llama 3's vocabulary (128,256) with hidden 32,
                         tied embeddings, every matrix in packed blocks: token_embd
                         Q4_0 (also the tied head), the projections a mix of Q8_0,
                         Q4_0, Q4_1 and Q4_K; attn_q/attn_k rows permuted as llama.cpp's
                         converter writes them; norms F32
  gguf_twin.safetensors  the dequantized twin of every layer matrix (Hugging Face names
                         and row order, f32), and of sampled embedding rows
  adapter/               a PEFT LoRA adapter (r 4, all seven projections, B non-zero)
                         for the GGUF model
  on_load.safetensors    tests/fixtures/llama/model quantized as `--quantize` does
                         (every matrix): NF4 codes and absmax from bitsandbytes with the
                         twin bitsandbytes dequantizes to; Q4_0 and Q8_0 blocks from the
                         `gguf` package
  expected.json          for the GGUF model: a batch whose ids and labels lie on both
                         sides of 65,536, the loss, five AdamW steps' losses; and the
                         five AdamW steps' losses of tests/fixtures/llama's adapter and
                         batch on each quantized-on-load twin

PyTorch trains in f32 on the twins: QLoRA's math (the packed kernels dequantize and
multiply in f32), without bitsandbytes' bf16 compute.

Run from the repository root: python tests/reference/gen_qlora.py
"""

import copy
import json
import os
import shutil

import numpy as np
import torch
import bitsandbytes.functional as bnbf
from gguf import GGMLQuantizationType as T, GGUFWriter, quants
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gen_reference import adamw_losses, lora_model, save_adapter
from gen_vocab import batch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "qlora")
LLAMA = os.path.join(ROOT, "tests", "fixtures", "llama")
VOCAB, HIDDEN, INTER, HEADS, KV = 128256, 32, 256, 2, 1
# The block type of each layer's matrices (Q4_K needs rows of 256: down_proj only).
TYPES = [
    {"q_proj": T.Q8_0, "k_proj": T.Q4_1, "v_proj": T.Q4_0, "o_proj": T.Q4_1,
     "gate_proj": T.Q8_0, "up_proj": T.Q4_0, "down_proj": T.Q4_K},
    {"q_proj": T.Q4_0, "k_proj": T.Q8_0, "v_proj": T.Q4_1, "o_proj": T.Q8_0,
     "gate_proj": T.Q4_1, "up_proj": T.Q8_0, "down_proj": T.Q4_K},
]
GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
SAMPLED_ROWS = [0, 1, 2, 31, 4095, 65535, 65536, 65537, 100000, 128000, 128255]


def blocks(w, ty, rng):
    """`w` [rows, cols] in `ty`'s blocks, a row of blocks per row. Q4_K (which the gguf
    package only dequantizes) gets valid random blocks: small f16 d and dmin, random
    6-bit scales and mins, random nibbles."""
    if ty != T.Q4_K:
        return quants.quantize(w.numpy(), ty)
    rows, cols = w.shape
    n = rows * cols // 256
    b = np.zeros((n, 144), dtype=np.uint8)
    b[:, 0:2] = np.frombuffer(rng.uniform(1e-4, 3e-4, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
    b[:, 2:4] = np.frombuffer(rng.uniform(1e-4, 3e-4, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
    b[:, 4:] = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return b.reshape(rows, -1)


def permute(rows, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (whole rows, so it applies
    to packed blocks as to floats)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_model(rng):
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    )
    torch.manual_seed(1)
    ref = LlamaForCausalLM(config).float()
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    # RMSNorm weights of 1 would hide a transposed or misplaced norm.
    for k in sd:
        if "norm" in k:
            sd[k] = 1.0 + 0.2 * torch.randn(sd[k].shape)

    w = GGUFWriter(os.path.join(OUT, "model.gguf"), "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(2)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)

    twin = {}
    b = blocks(sd["model.embed_tokens.weight"], T.Q4_0, rng)
    w.add_tensor("token_embd.weight", b, raw_dtype=T.Q4_0)
    embed = torch.from_numpy(quants.dequantize(b, T.Q4_0).copy())
    sd["model.embed_tokens.weight"] = embed
    twin["model.embed_tokens.sampled_rows"] = embed[SAMPLED_ROWS].contiguous()
    for layer in range(2):
        for mod, ty in TYPES[layer].items():
            group = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{group}.{mod}.weight"
            b = blocks(sd[name], ty, rng)
            deq = torch.from_numpy(quants.dequantize(b, ty).copy())
            sd[name] = deq
            twin[name] = deq.contiguous()
            if mod == "q_proj":
                b = permute(b, HEADS)
            elif mod == "k_proj":
                b = permute(b, KV)
            w.add_tensor(f"blk.{layer}.{GGUF[mod]}.weight", b, raw_dtype=ty)
        w.add_tensor(f"blk.{layer}.attn_norm.weight", sd[f"model.layers.{layer}.input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", sd[f"model.layers.{layer}.post_attention_layernorm.weight"].numpy())
        twin[f"model.layers.{layer}.input_layernorm.weight"] = sd[f"model.layers.{layer}.input_layernorm.weight"]
        twin[f"model.layers.{layer}.post_attention_layernorm.weight"] = sd[f"model.layers.{layer}.post_attention_layernorm.weight"]
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    twin["model.norm.weight"] = sd["model.norm.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(twin, os.path.join(OUT, "gguf_twin.safetensors"))

    model = LlamaForCausalLM(config).float()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd)
    return model


def on_load(rng):
    """tests/fixtures/llama quantized as `--quantize` does, and PEFT's losses on each twin."""
    base = load_file(os.path.join(LLAMA, "model", "model.safetensors"))
    expected = json.load(open(os.path.join(LLAMA, "expected.json")))
    ids, mask, labels = (torch.tensor(expected[k]) for k in ("input_ids", "attention_mask", "labels"))
    out, losses = {}, {}
    for kind in ("nf4", "q4_0", "q8_0"):
        sd = dict(base)
        for name, t in base.items():
            if t.dim() != 2:
                continue
            if kind == "nf4":
                q, state = bnbf.quantize_4bit(t.float().reshape(1, -1), blocksize=64, quant_type="nf4",
                                              compress_statistics=False)
                deq = bnbf.dequantize_4bit(q, state).reshape(t.shape)
                out[f"nf4.{name}.codes"] = q.flatten().contiguous()
                out[f"nf4.{name}.absmax"] = state.absmax.float().contiguous()
                out[f"nf4.{name}.twin"] = deq.contiguous()
            else:
                ty = {"q4_0": T.Q4_0, "q8_0": T.Q8_0}[kind]
                b = blocks(t.float(), ty, rng)
                deq = torch.from_numpy(quants.dequantize(b, ty).copy())
                out[f"{kind}.{name}.blocks"] = torch.from_numpy(b.reshape(-1).copy())
            sd[name] = deq
        model = AutoModelForCausalLM.from_pretrained(os.path.join(LLAMA, "model"), dtype=torch.float32)
        model.load_state_dict(sd)
        model = PeftModel.from_pretrained(model, os.path.join(LLAMA, "adapter"), is_trainable=True)
        losses[kind] = adamw_losses(model, ids, mask, labels)
        print(kind, losses[kind])
    save_file(out, os.path.join(OUT, "on_load.safetensors"))
    return losses


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    rng = np.random.default_rng(3)
    model = gguf_model(rng)
    fresh = copy.deepcopy(model)
    peft = lora_model(model)
    save_adapter(peft, OUT, "tests/fixtures/qlora/model.gguf")
    ids, mask, labels = batch(VOCAB, torch.Generator().manual_seed(5))  # ids on both sides of 65,536
    loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    peft = PeftModel.from_pretrained(fresh, os.path.join(OUT, "adapter"), is_trainable=True)
    losses = adamw_losses(peft, ids, mask, labels)
    print("gguf", loss, losses)
    expected = {
        "gguf": {
            "types": {f"{layer}.{m}": t.name for layer, ts in enumerate(TYPES) for m, t in ts.items()},
            "sampled_rows": SAMPLED_ROWS,
            "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist(),
            "loss": loss,
            "adamw": {"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0, "losses": losses},
        },
        "on_load": {"adamw": {"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0, "losses": on_load(rng)}},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
                     "gguf": __import__("importlib.metadata").metadata.version("gguf")},
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()
