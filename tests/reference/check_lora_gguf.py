"""Check a llama.cpp LoRA adapter written by `webtune export-lora` with the `gguf`
package: the adapter metadata, llama.cpp's tensor names (convert_lora_to_gguf.py's
`blk.N.<tensor>.weight.lora_a` / `.lora_b`), and that each pair's product B·A equals the
PEFT adapter's, rows permuted for llama's q/k as llama.cpp stores the base weights.

    env/bin/pip install gguf numpy safetensors
    webtune export-lora --adapter ADAPTER --out adapter.gguf
    env/bin/python tests/reference/check_lora_gguf.py ADAPTER adapter.gguf
"""
import json
import pathlib
import re
import sys

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file

adapter, path = pathlib.Path(sys.argv[1]), sys.argv[2]
cfg = json.loads((adapter / "adapter_config.json").read_text())
peft = load_file(adapter / "adapter_model.safetensors")
base = json.loads((pathlib.Path(cfg["base_model_name_or_path"]) / "config.json").read_text())
r = GGUFReader(path)
field = lambda k: r.fields[k]
text = lambda k: bytes(field(k).parts[field(k).data[0]]).decode()
assert text("general.type") == "adapter" and text("adapter.type") == "lora"
alpha = float(field("adapter.lora.alpha").parts[-1][0])
assert alpha == cfg["lora_alpha"], (alpha, cfg["lora_alpha"])
arch = text("general.architecture")
names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
tensors = {t.name: np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
assert len(tensors) == len(peft), (len(tensors), len(peft))
for key, a in peft.items():
    if "lora_A" not in key:
        continue
    m = re.match(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_A\.weight", key)
    layer, proj = m.group(1), m.group(2)
    b = peft[key.replace("lora_A", "lora_B")]
    ga, gb = tensors[f"blk.{layer}.{names[proj]}.weight.lora_a"], tensors[f"blk.{layer}.{names[proj]}.weight.lora_b"]
    assert ga.shape == a.shape and gb.shape == b.shape, (key, ga.shape, gb.shape)
    ba = b @ a
    if arch == "llama" and proj in ("q_proj", "k_proj"):
        # llama.cpp's permute(): per head, rows (2, HS/2) → (HS/2, 2); heads from the base's config.
        n_head = base["num_attention_heads"] if proj == "q_proj" else base.get("num_key_value_heads", base["num_attention_heads"])
        want = ba.reshape(n_head, 2, ba.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(ba.shape)
        ok = np.allclose(gb @ ga, want, rtol=1e-6, atol=1e-9) and not np.allclose(gb @ ga, ba, rtol=1e-6, atol=1e-9)
        assert ok, f"{key}: B·A rows are not llama.cpp's permutation of PEFT's"
    else:
        assert np.allclose(gb @ ga, ba, rtol=1e-6, atol=1e-9), key
print(f"{path}: {len(tensors)} tensors, {arch}, alpha {alpha}: names, shapes and B·A match the PEFT adapter")
