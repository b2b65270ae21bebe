"""Check a GGUF file written by `webtune merge --out FILE.gguf` with transformers' GGUF
loader: it loads, its tokenizer gives the Hugging Face tokenizer's ids, and its
logits equal those of the merged safetensors directory within the type's rounding.

    env/bin/pip install torch transformers gguf
    webtune merge --model M --adapter A --out merged
    webtune merge --model M --adapter A --out merged.gguf --type f16
    env/bin/python tests/reference/check_gguf.py merged merged.gguf [tolerance]
"""
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf_dir, gguf_path = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tol = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-2
ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(hf_dir)
gtok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
text = "Say word 7. The year 2026 has 365 days; naïve café 👋 fn main() {}"
ids = tok(text, add_special_tokens=False)["input_ids"]
gids = gtok(text, add_special_tokens=False)["input_ids"]
assert ids == gids, f"tokenizer ids differ:\n{ids}\n{gids}"
x = torch.tensor([ids])
with torch.no_grad():
    a, b = ref(x).logits, model(x).logits
err = (a - b).abs().max().item()
scale = a.abs().max().item()
print(f"{gguf_path.name}: {len(ids)} tokens, tokenizer ids equal, max |logit diff| {err:.3g} (logits up to {scale:.3g})")
assert err <= tol * max(1.0, scale), f"logits differ by {err}"
