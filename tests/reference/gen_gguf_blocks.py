"""Sample blocks of every GGUF tensor type webtune reads, with what the `gguf`
package's `dequantize` makes of them: tests/fixtures/gguf/blocks.json. The quantized
bytes are random, except each block's f16 scales, which are drawn as normal values
(random bytes would make NaN and infinity scales). Values are stored as f32 bit
patterns, so the test compares bit for bit.

    python3 -m venv env && env/bin/pip install gguf numpy
    env/bin/python tests/reference/gen_gguf_blocks.py
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(20261125)

# Byte offsets of each block's f16 scale fields (d, and dmin or m where there is one).
F16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def blocks(t, n_blocks):
    per, size = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1), per * n_blocks


out = {}
for t in F16_FIELDS:
    raw, n = blocks(t, 4)
    values = dequantize(raw, t).astype(np.float32).reshape(-1)
    assert values.size == n
    out[t.name] = {"type": int(t), "bytes": raw.tobytes().hex(), "bits": values.view(np.uint32).tolist()}
# The float types: F16 and BF16 from random finite values, F32 as is.
x = (rng.standard_normal(64) * 3).astype(np.float32)
for t, raw in [(T.F32, x.view(np.uint8)), (T.F16, x.astype(np.float16).view(np.uint8)),
               (T.BF16, (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))]:
    values = dequantize(raw.copy(), t).astype(np.float32).reshape(-1)
    out[t.name] = {"type": int(t), "bytes": raw.tobytes().hex(), "bits": values.view(np.uint32).tolist()}

path = pathlib.Path(__file__).resolve().parents[1] / "fixtures/gguf/blocks.json"
path.write_text(json.dumps(out, indent=0))
counts = ", ".join(f"{k} {len(v['bits'])}" for k, v in out.items())
print(f"wrote {path}: {counts}")
