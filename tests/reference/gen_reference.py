"""Ground truth for webtune's model tests, from PyTorch + transformers + PEFT.

For each architecture (Llama without tied embeddings and with llama3 rope scaling,
Qwen2 with q/k/v biases and tied embeddings, Qwen3 with q/k norms, a head_dim that is
not hidden/heads, and tied embeddings) it writes under tests/fixtures/<name>/:

  model/                 save_pretrained of a small random model (safetensors)
  adapter/               a PEFT LoRA adapter on all seven projections, B non-zero
  expected.safetensors   logits, loss and every LoRA gradient for one batch, and the
                         gradient of every base weight in full fine-tuning
  expected.json          the batch, the loss, five AdamW steps' losses, greedy tokens

Run from the repository root: python tests/reference/gen_reference.py
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def configs():
    yield "llama", LlamaConfig(
        **COMMON,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    )
    yield "qwen2", Qwen2Config(**COMMON, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)
    yield "qwen3", Qwen3Config(**COMMON, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)


def classic_rope_keys(path):
    """Rewrite v5's nested rope_parameters as the top-level rope_theta / rope_scaling
    that checkpoints on the Hub (SmolLM2, Llama 3.2) carry, so both forms are tested."""
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    if rp:
        cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rp
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # the second sequence is 6 tokens long, right-padded
    ids[1, 6:] = 0
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained
    labels[1, 6:] = -100  # padding
    return ids, mask, labels


def lora_model(base):
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def save_adapter(model, root, base_path):
    """save_pretrained of the adapter under root/adapter, naming the base by its path."""
    model.save_pretrained(os.path.join(root, "adapter"))
    os.remove(os.path.join(root, "adapter", "README.md"))
    cfg_path = os.path.join(root, "adapter", "adapter_config.json")
    with open(cfg_path) as f:
        adapter_cfg = json.load(f)
    adapter_cfg["base_model_name_or_path"] = base_path
    with open(cfg_path, "w") as f:
        json.dump(adapter_cfg, f, indent=2)


def adamw_losses(model, ids, mask, labels, steps=5):
    """The losses of `steps` AdamW steps on the trainable params, clipping at 1.0 as TRL does."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    torch.manual_seed(0)
    for name, config in configs():
        root = os.path.join(OUT, name)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        base.save_pretrained(os.path.join(root, "model"), safe_serialization=True)
        if name == "llama":
            classic_rope_keys(os.path.join(root, "model", "config.json"))
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "model"), dtype=torch.float32)
        model = lora_model(base)
        save_adapter(model, root, f"tests/fixtures/{name}/model")

        ids, mask, labels = batch()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        tensors = {"logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
        for pname, p in model.named_parameters():
            if p.grad is not None:
                tensors["grad." + pname] = p.grad.detach().contiguous()
        # Full fine-tuning: the gradient of every base weight (tied ones once).
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "model"), dtype=torch.float32)
        full = base(input_ids=ids, attention_mask=mask, labels=labels)
        full.loss.backward()
        tensors["full_loss"] = full.loss.detach().reshape(1)
        for pname, p in base.named_parameters():
            tensors["full." + pname] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(root, "expected.safetensors"))

        # Five AdamW steps from the saved adapter, clipping at 1.0 as TRL does.
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "model"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(root, "adapter"), is_trainable=True)
        losses = adamw_losses(model, ids, mask, labels)

        # Greedy generation with the saved adapter, and with the base model alone.
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "model"), dtype=torch.float32)
        prompt = torch.tensor([[1, 17, 93, 200, 45]])
        base_tokens = base.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        model = PeftModel.from_pretrained(base, os.path.join(root, "adapter"))
        lora_tokens = model.generate(
            input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
        )
        saved_cfg = AutoConfig.from_pretrained(os.path.join(root, "model"))
        rope_type = (getattr(saved_cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "default":
            hd = getattr(saved_cfg, "head_dim", None) or saved_cfg.hidden_size // saved_cfg.num_attention_heads
            inv_freq = 1.0 / (saved_cfg.rope_parameters["rope_theta"] ** (
                torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](saved_cfg, "cpu")
        expected = {
            "inv_freq": inv_freq.tolist(),
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": labels.tolist(),
            "loss": out.loss.item(),
            "adamw": {"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0, "losses": losses},
            "generate": {
                "prompt": prompt[0].tolist(),
                "max_new_tokens": 12,
                "base": base_tokens[0, prompt.shape[1]:].tolist(),
                "lora": lora_tokens[0, prompt.shape[1]:].tolist(),
            },
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__},
        }
        with open(os.path.join(root, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(name, "loss", out.loss.item(), "adamw", losses, "greedy", expected["generate"])


if __name__ == "__main__":
    main()
