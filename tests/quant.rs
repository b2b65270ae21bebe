//! The quantizers of packed frozen weights (`webtune::quant`) against the libraries
//! people quantize with: bitsandbytes' NF4 (codes, absmax, packing order) and the
//! `gguf` package's Q8_0, Q4_0 and Q4_1 (llama.cpp's reference quantizers), bit for
//! bit on `tests/fixtures/quant/blocks.json` (`tests/reference/gen_quant.py`).

use webtune::quant::{dequantize, quantize, QType, NF4};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn quantizers_match_bitsandbytes_and_gguf_bit_for_bit() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant/blocks.json");
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let x = floats(&f["x"]);

    // NF4: bitsandbytes' code book, then per 64-value block its absmax (f32) and the
    // 32 bytes of codes, two per byte, the first in the high nibble.
    assert_eq!(NF4.to_vec(), floats(&f["nf4"]["code"]));
    let ours = quantize(QType::Nf4, &x).unwrap();
    let (codes, absmax) = (hex(f["nf4"]["codes"].as_str().unwrap()), floats(&f["nf4"]["absmax"]));
    assert_eq!(ours.len(), 36 * absmax.len());
    for (b, block) in ours.chunks(36).enumerate() {
        assert_eq!(f32::from_le_bytes(block[..4].try_into().unwrap()), absmax[b], "absmax of block {b}");
        assert_eq!(&block[4..], &codes[32 * b..32 * (b + 1)], "codes of block {b}");
    }
    assert_eq!(dequantize(QType::Nf4, &ours), floats(&f["nf4"]["dequantized"]));

    for (name, q) in [("q8_0", QType::Q8_0), ("q4_0", QType::Q4_0), ("q4_1", QType::Q4_1)] {
        let want = hex(f[name].as_str().unwrap());
        let ours = quantize(q, &x).unwrap();
        assert_eq!(ours.len(), want.len(), "{name}");
        let (_, bytes) = q.block();
        for (b, (a, w)) in ours.chunks(bytes).zip(want.chunks(bytes)).enumerate() {
            assert_eq!(a, w, "{name} block {b}");
        }
    }
    // Q4_K is read, not made; a row that is not whole blocks is an error naming both.
    assert!(quantize(QType::Q4K, &x).unwrap_err().to_string().contains("Q4_K"));
    let e = quantize(QType::Q4_0, &x[..33]).unwrap_err().to_string();
    assert!(e.contains("q4_0") && e.contains("33"), "{e}");
}
