"""Reference blocks for webtune's quantizers (src/quant.rs): tests/fixtures/quant/blocks.json.

- NF4 from bitsandbytes (`quantize_4bit(quant_type="nf4", blocksize=64)`, no double
  quantization): the packed codes and each block's absmax;
- Q8_0, Q4_0, Q4_1 from the `gguf` package's `quants.quantize` (llama.cpp's reference
  quantizers).

Inputs: normal values, a block of one sign, a block of zeros, a block with one large
value, and values placed exactly on NF4's decision thresholds.

    env/bin/pip install torch bitsandbytes gguf numpy
    env/bin/python tests/reference/gen_quant.py
"""
import json
import pathlib

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from gguf import GGMLQuantizationType, quants

root = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(3)
n = 64 * 8
x = torch.randn(n, generator=g) * 0.7
x[64:128] = x[64:128].abs()
x[128:192] = 0.0
x[192:256] = torch.randn(64, generator=g) * 0.01
x[200] = 30.0
# Block 4: absmax 1 and the thresholds of dQuantizeNF4 themselves, both signs.
code = F.get_4bit_type("nf4", device="cpu")
mids = ((code[1:] + code[:-1]) / 2)
x[256:320] = 0.0
x[256] = 1.0
x[257:257 + 15] = mids
x[272:272 + 15] = -mids
x = x.float()

q, state = F.quantize_4bit(x.reshape(1, -1), blocksize=64, quant_type="nf4", compress_statistics=False)
out = {
    "x": x.tolist(),
    "nf4": {"codes": q.flatten().numpy().tobytes().hex(), "absmax": state.absmax.tolist(), "code": code.tolist(),
            "dequantized": F.dequantize_4bit(q, state).flatten().tolist()},
    "versions": {"bitsandbytes": bnb.__version__, "torch": torch.__version__},
}
xs = x.numpy().reshape(-1, 32 * 16)  # rows of whole blocks
for name, t in [("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0), ("q4_1", GGMLQuantizationType.Q4_1)]:
    out[name] = quants.quantize(xs, t).tobytes().hex()
path = root / "tests/fixtures/quant/blocks.json"
path.write_text(json.dumps(out))
print(f"wrote {path}")
