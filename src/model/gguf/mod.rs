//! GGUF, llama.cpp's model file: the header, the metadata and the tensor table read
//! up front; a tensor's rows read and dequantized to f32 when the loader asks
//! (`Tensors`), under their Hugging Face names, with llama.cpp's Q/K row permutation
//! undone for `llama`. `config_json` maps the metadata onto a Hugging Face
//! `config.json`, so the one config parser serves both. `Writer` writes GGUF files.
//!
//! Types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, each dequantized as
//! ggml's `dequantize_row_*` does (bit for bit: `tests/gguf.rs` against the `gguf`
//! package on `tests/fixtures/gguf/blocks.json`).

//!
//! By concern: `reader.rs` (the file's header, metadata and tensors, and `Tensors`),
//! `config.rs` (metadata → `config.json`), `tokenizer.rs` (the tokenizer both ways),
//! `writer.rs` (GGUF files: merged models and LoRA adapters). The block formats and
//! their dequantization live in `crate::quant`, which imports nothing from here.

mod config;
mod reader;
mod tokenizer;
mod writer;

pub use crate::quant::{dequantize_ggml as dequantize, GgmlType};

/// A GGUF file's first four bytes.
const MAGIC: &[u8; 4] = b"GGUF";
pub use reader::{Gguf, TensorInfo};
pub use tokenizer::tokenizer_metadata;
pub use writer::{export_type, lora_file, model_file, Writer};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The llama.cpp name of a Hugging Face tensor (the inverse of `hf_name`).
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, true)
}

/// The Hugging Face name of a file tensor (the inverse of `gguf_name`).
pub(super) fn hf_name(file: &str) -> Option<String> {
    rename(file, false)
}

/// A tensor's name in the other convention: Hugging Face → llama.cpp (`to_gguf`) or
/// back, through `WHOLE_MODEL` (Hugging Face, llama.cpp) and `MODULES` (llama.cpp,
/// Hugging Face).
fn rename(name: &str, to_gguf: bool) -> Option<String> {
    let flip = |(a, b): (&'static str, &'static str), hf_first: bool| if to_gguf == hf_first { (a, b) } else { (b, a) };
    if let Some((_, to)) = WHOLE_MODEL.iter().map(|&p| flip(p, true)).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let to = MODULES.iter().map(|&p| flip(p, false)).find(|(from, _)| *from == module)?.1;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// The tensors outside the layers: Hugging Face name, llama.cpp name.
const WHOLE_MODEL: [(&str, &str); 3] = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// llama.cpp's per-layer tensor names and the Hugging Face modules they hold.
const MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// llama.cpp's converter's permutation of llama's q/k rows: per head, rows (2, HS/2)
/// become (HS/2, 2). Hugging Face row h·HS + i·HS/2 + j goes to row h·HS + 2j + i.
fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hs = rows / heads;
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        let (head, k) = (r / hs, r % hs);
        let f = head * hs + 2 * (k % (hs / 2)) + k / (hs / 2);
        out[f * cols..(f + 1) * cols].copy_from_slice(&data[r * cols..(r + 1) * cols]);
    }
    out
}

/// The head count llama.cpp permuted the rows of a Hugging Face weight by (llama's
/// q and k projections), if any.
fn permuted_heads(cfg: &super::Config, hf: &str) -> Option<usize> {
    if cfg.arch != super::Arch::Llama {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") {
        Some(cfg.heads)
    } else if hf.ends_with("self_attn.k_proj.weight") {
        Some(cfg.kv_heads)
    } else {
        None
    }
}
