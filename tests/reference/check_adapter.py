"""Check that a webtune output loads in PEFT and generates what webtune generates.

  python tests/reference/check_adapter.py MODEL_DIR ADAPTER_DIR "prompt"

Loads the base with transformers, the adapter with PeftModel.from_pretrained (printing
any warning, e.g. missing keys), wraps the prompt as a user turn with the model's chat
template and prints the greedy continuation; compare with
`webtune generate --model MODEL_DIR --adapter ADAPTER_DIR --prompt "prompt" --chat`.
"""

import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, adapter_dir, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
tok = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, adapter_dir)
for w in caught:
    print("warning:", w.message)
messages = [{"role": "user", "content": prompt}]
if tok.chat_template:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
else:  # webtune's documented fallback template
    text = f"<|user|>\n{prompt}{tok.eos_token}\n<|assistant|>\n"
ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
