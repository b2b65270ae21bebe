"""Check that an adapter webtune trained on a GGUF base (kept packed: QLoRA) loads in
PEFT on the Hugging Face model of that GGUF, and gives webtune's loss there.

  python tests/reference/check_gguf_adapter.py FILE.gguf ADAPTER_DIR DATA.jsonl

The base is what transformers dequantizes the GGUF to (the values webtune's packed
kernels compute with), copied into a fresh model class as gen_smollm2.py does, with
SmolLM2's digit splitting restored. Prints PEFT's warnings (missing or unexpected keys)
and the answer-only loss of the chat records (the answer through its end-of-turn
token), the mean over all trained tokens as
`webtune eval --model FILE.gguf --adapter ADAPTER_DIR --data DATA.jsonl` reports it.
"""

import json
import pathlib
import sys
import warnings

import torch
from peft import PeftModel
from tokenizers import pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

gguf, adapter_dir, data = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model = type(loaded)(loaded.config)
model.load_state_dict(loaded.state_dict())
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
if "smollm" in gguf.name.lower():
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(model, adapter_dir)
for w in caught:
    print("warning:", w.message)
model.eval()
total, count = 0.0, 0
for line in open(data):
    messages = json.loads(line)["messages"]
    prompt = tok(tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    # Trained: the answer through its end-of-turn token (not the newline a template adds after it).
    full = full[: len(full) - full[::-1].index(tok.eos_token_id)]
    labels = torch.tensor([-100] * len(prompt) + full[len(prompt):])
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
    total += loss.item()
    count += int((labels[1:] >= 0).sum())
print(json.dumps({"loss": total / count, "tokens": count}))
