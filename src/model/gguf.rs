//! GGUF, llama.cpp's model file: the header, the metadata and the tensor table read
//! up front; a tensor's rows read and dequantized to f32 when the loader asks
//! (`Tensors`), under their Hugging Face names, with llama.cpp's Q/K row permutation
//! undone for `llama`. `config_json` maps the metadata onto a Hugging Face
//! `config.json`, so the one config parser serves both. `Writer` writes GGUF files.
//!
//! Types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, each dequantized as
//! ggml's `dequantize_row_*` does (bit for bit: `tests/gguf.rs` against the `gguf`
//! package on `tests/fixtures/gguf/blocks.json`).

use std::collections::BTreeMap;

use super::weights::{Bytes, Tensors};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";

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

/// The ggml tensor types webtune reads, with their ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The name llama.cpp gives the type, lower case (`f16`, `q8_0`, `q4_k`).
    pub fn name(self) -> String {
        type_name(self.id()).to_lowercase()
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes holding `n` values (`n` a whole number of blocks).
    pub fn bytes(self, n: usize) -> usize {
        let (per, size) = self.block();
        n / per * size
    }
}

/// The name of a ggml type id, for errors about the ones webtune does not read.
fn type_name(id: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(id as usize).map_or(format!("type {id}"), |n| n.to_string())
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_K and Q5_K: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantize `raw` (whole blocks of `ty`) to f32, as ggml's `dequantize_row_*`.
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (per, size) = ty.block();
    let mut y = Vec::with_capacity(raw.len() / size * per);
    for b in raw.chunks_exact(size) {
        match ty {
            GgmlType::F32 => y.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => y.push(f16(b)),
            GgmlType::BF16 => y.push(f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            GgmlType::Q8_0 => {
                let d = f16(b);
                y.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4_0 => {
                let (d, qs) = (f16(b), &b[2..18]);
                y.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
                y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let (d, m, qs) = (f16(b), f16(&b[2..]), &b[4..20]);
                y.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q4K => {
                let (d, min, scales, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..144]);
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1 as f32, min * m1 as f32, d * sc2 as f32, min * m2 as f32);
                    y.extend(q.iter().map(|&q| d1 * (q & 0xF) as f32 - m1));
                    y.extend(q.iter().map(|&q| d2 * (q >> 4) as f32 - m2));
                }
            }
            GgmlType::Q5K => {
                let (d, min, scales, qh, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..48], &b[48..176]);
                for (k, ql) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1 as f32, min * m1 as f32, d * sc2 as f32, min * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
                    y.extend(ql.iter().zip(qh).map(|(&q, &h)| d1 * ((q & 0xF) + if h & u1 != 0 { 16 } else { 0 }) as f32 - m1));
                    y.extend(ql.iter().zip(qh).map(|(&q, &h)| d2 * ((q >> 4) + if h & u2 != 0 { 16 } else { 0 }) as f32 - m2));
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16(&b[208..]));
                let mut out = [0f32; 256];
                for half in 0..2 {
                    let (ql, qh, sc, y) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..], &mut out[128 * half..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
    }
    y
}

/// One tensor of the file: its name in the file, its ggml dims (fastest first), type
/// and offset from the start of the data section.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    /// The shape as Hugging Face and webtune write it: the dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().cloned().collect()
    }
}

/// A cursor over the header bytes; running out asks for more (`Short`).
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

/// The header did not fit the bytes read so far.
struct Short;

impl Reader<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], Short> {
        let s = self.b.get(self.pos..self.pos + n).ok_or(Short)?;
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> std::result::Result<u32, Short> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> std::result::Result<u64, Short> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn string(&mut self) -> std::result::Result<String, Short> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32) -> std::result::Result<std::result::Result<Value, String>, Short> {
        let b = |r: &mut Self, n| -> std::result::Result<Vec<u8>, Short> { Ok(r.take(n)?.to_vec()) };
        Ok(Ok(match ty {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(b(self, 1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let (ty, n) = (self.u32()?, self.u64()? as usize);
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    match self.value(ty)? {
                        Ok(v) => items.push(v),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => return Ok(Err(format!("metadata value type {ty} is not a GGUF type"))),
        }))
    }
}

/// A GGUF file: metadata and tensor table, the tensors' bytes left where they are.
pub struct Gguf {
    pub name: String,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    bytes: Box<dyn Bytes>,
}

impl Gguf {
    /// Read the header of `bytes` (`name` names the file in errors).
    pub fn open(bytes: Box<dyn Bytes>, name: &str) -> Result<Gguf> {
        let bad = |m: String| Error::Weights(format!("{name}: {m}"));
        let mut want = (1usize << 20).min(bytes.len() as usize);
        loop {
            let head = bytes.read(0, want)?;
            match Self::parse(&head, bytes.len()) {
                Ok(Ok((version, meta, tensors, data_start))) => {
                    return Ok(Gguf { name: name.to_string(), version, meta, tensors, data_start, bytes });
                }
                Ok(Err(m)) => return Err(bad(m)),
                Err(Short) if want < bytes.len() as usize => want = (want * 4).min(bytes.len() as usize),
                Err(Short) => return Err(bad("the file ends inside its header".into())),
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse(b: &[u8], file_len: u64) -> std::result::Result<std::result::Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>, u64), String>, Short> {
        let mut r = Reader { b, pos: 0 };
        if r.take(4)? != MAGIC {
            return Ok(Err("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Ok(Err(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            match r.value(ty)? {
                Ok(v) => meta.insert(key, v),
                Err(e) => return Ok(Err(format!("`{key}`: {e}"))),
            };
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()? as usize);
            }
            let id = r.u32()?;
            let offset = r.u64()?;
            let Some(ty) = GgmlType::from_id(id) else {
                return Ok(Err(format!(
                    "tensor `{name}` is {}, which webtune does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)",
                    type_name(id)
                )));
            };
            if dims[0] % ty.block().0 != 0 {
                return Ok(Err(format!("tensor `{name}`: a row of {} values is not whole {:?} blocks", dims[0], ty)));
            }
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let align = meta.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32).max(1);
        let data_start = (r.pos as u64).div_ceil(align) * align;
        for t in &tensors {
            let end = data_start + t.offset + t.ty.bytes(t.dims.iter().product()) as u64;
            if end > file_len {
                return Ok(Err(format!("tensor `{}` runs past the end of the file ({end} > {file_len} bytes)", t.name)));
            }
        }
        Ok(Ok((version, meta, tensors, data_start)))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// `general.architecture`.
    pub fn arch(&self) -> Result<&str> {
        self.get("general.architecture").and_then(|v| v.as_str()).ok_or_else(|| Error::Config(format!("{}: no `general.architecture`", self.name)))
    }

    fn info(&self, file_name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == file_name)
    }

    /// Rows `r0..r1` of a tensor as stored (rows of its fastest dim), dequantized.
    pub fn file_rows(&self, t: &TensorInfo, r0: usize, r1: usize) -> Result<Vec<f32>> {
        Ok(dequantize(t.ty, &self.file_raw(t, r0, r1)?))
    }

    /// Rows `r0..r1` of a tensor as stored, in its type's blocks.
    fn file_raw(&self, t: &TensorInfo, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let row = t.ty.bytes(t.dims[0]);
        self.bytes.read(self.data_start + t.offset + (r0 * row) as u64, (r1 - r0) * row)
    }

    /// The llama.cpp tensor name of a Hugging Face one, and for `llama`'s q and k
    /// projections the head count their rows were permuted by.
    fn file_name(&self, hf: &str) -> Option<(String, Option<usize>)> {
        let permute = |key: &str| -> Option<usize> {
            if self.arch().ok()? != "llama" {
                return None;
            }
            self.get(&format!("llama.attention.{key}")).and_then(|v| v.as_u64()).map(|v| v as usize)
        };
        let file = gguf_name(hf)?;
        let heads = if file.ends_with(".attn_q.weight") {
            permute("head_count")
        } else if file.ends_with(".attn_k.weight") {
            permute("head_count_kv").or_else(|| permute("head_count"))
        } else {
            None
        };
        Some((file, heads))
    }

    /// The Hugging Face name of a file tensor (the inverse of `gguf_name`).
    fn hf_name(&self, file: &str) -> Option<String> {
        if let Some((h, _)) = WHOLE_MODEL.iter().find(|(_, f)| *f == file) {
            return Some(h.to_string());
        }
        let rest = file.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (name, suffix) = rest.rsplit_once('.')?;
        let module = MODULES.iter().find(|(f, _)| *f == name)?.1;
        Some(format!("model.layers.{layer}.{module}.{suffix}"))
    }

    /// The metadata as a Hugging Face `config.json` (for `Config::parse`).
    pub fn config_json(&self) -> Result<String> {
        let arch = self.arch()?;
        let model_type = match arch {
            "llama" => "llama",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            other => return Err(Error::Config(format!("{}: architecture `{other}` is not supported (llama, qwen2, qwen3)", self.name))),
        };
        let need = |key: &str| -> Result<&Value> {
            self.get(&format!("{arch}.{key}")).ok_or_else(|| Error::Config(format!("{}: metadata `{arch}.{key}` is missing", self.name)))
        };
        let num = |key: &str| -> Result<u64> {
            need(key)?.as_u64().ok_or_else(|| Error::Config(format!("{}: metadata `{arch}.{key}` is not a count", self.name)))
        };
        let heads = num("attention.head_count")?;
        let hidden = num("embedding_length")?;
        let vocab = match self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len(),
            None => self.info("token_embd.weight").map(|t| t.dims[1]).ok_or_else(|| Error::Config(format!("{}: no vocabulary", self.name)))?,
        };
        if self.info("rope_freqs.weight").is_some() {
            return Err(Error::Config(format!("{}: rope frequency factors (`rope_freqs.weight`, Llama 3.1-style scaling) are not supported yet", self.name)));
        }
        let mut cfg = serde_json::json!({
            "architectures": [match model_type { "llama" => "LlamaForCausalLM", "qwen2" => "Qwen2ForCausalLM", _ => "Qwen3ForCausalLM" }],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": num("feed_forward_length")?,
            "num_hidden_layers": num("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.get(&format!("{arch}.attention.head_count_kv")).and_then(|v| v.as_u64()).unwrap_or(heads),
            "rms_norm_eps": need("attention.layer_norm_rms_epsilon")?.as_f64().unwrap_or(1e-6),
            "rope_theta": self.get(&format!("{arch}.rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0),
            "max_position_embeddings": self.get(&format!("{arch}.context_length")).and_then(|v| v.as_u64()).unwrap_or(2048),
            "vocab_size": vocab,
            "tie_word_embeddings": self.info("output.weight").is_none(),
            "torch_dtype": "float32",
        });
        let o = cfg.as_object_mut().expect("an object");
        if let Some(k) = self.get(&format!("{arch}.attention.key_length")).and_then(|v| v.as_u64()) {
            o.insert("head_dim".into(), k.into());
        }
        if self.info("blk.0.attn_q.bias").is_some() {
            o.insert("attention_bias".into(), true.into());
        }
        for (key, hf) in [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")] {
            if let Some(v) = self.get(key).and_then(|v| v.as_u64()) {
                o.insert(hf.into(), v.into());
            }
        }
        match self.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self.get(&format!("{arch}.rope.scaling.factor")).and_then(|v| v.as_f64()).unwrap_or(1.0);
                o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": factor}));
            }
            Some(other) => return Err(Error::Config(format!("{}: rope scaling `{other}` is not supported (linear is)", self.name))),
        }
        Ok(cfg.to_string())
    }
}

/// The pre-tokenizer regexes of llama.cpp's BPE pre-tokenizer types, as the Hub's
/// tokenizer.json files of those models write them.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Gguf {
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let a = self.get(key).and_then(|v| v.as_array()).ok_or_else(|| Error::Config(format!("{}: metadata `{key}` is missing", self.name)))?;
        a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::Config(format!("{}: `{key}` holds something other than strings", self.name)))).collect()
    }

    /// The tokenizer as a Hugging Face `tokenizer.json`, rebuilt from `tokenizer.ggml.*`:
    /// - `gpt2`: byte-level BPE with merges for the pre-tokenizer types `llama-bpe`,
    ///   `qwen2`, `smollm` and `gpt2`, each pre-tokenized as the Hub's tokenizer of that
    ///   family is (SmolLM2 splits digits one by one, as llama.cpp's `smollm` does);
    /// - `llama`: SentencePiece BPE (Llama 2, TinyLlama) as transformers converts it:
    ///   merges from the scores, byte fallback, `▁` for spaces.
    ///
    /// Control and unknown tokens become special added tokens, user-defined ones plain
    /// added tokens; `tokenizer.ggml.add_bos_token` (llama.cpp's default where absent:
    /// on for `llama`, off for `gpt2`) adds the bos token to plain text.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = self.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("");
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match self.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), id.into());
            // 2: unknown, 3: control, 4: user-defined (llama.cpp's token types).
            if let Some(&ty @ (2..=4)) = types.get(id) {
                added.push(serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": ty != 4}));
            }
        }
        let flag = |key: &str| match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        let bos = self.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).and_then(|i| tokens.get(i as usize).map(|t| (i, t)));
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
        let post_processor = |otherwise: serde_json::Value| match bos {
            Some((id, t)) if add_bos => serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t.as_str(): {"id": t, "ids": [id], "tokens": [t]}},
            }),
            _ => otherwise,
        };
        let mut json = match model {
            "gpt2" => {
                let pre = self.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
                let split = |regex: &str| serde_json::json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
                let byte_level = |use_regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
                let (normalizer, pretokenizers, ignore_merges) = match pre {
                    "llama-bpe" | "llama3" => (serde_json::Value::Null, vec![split(LLAMA3_REGEX), byte_level(false)], true),
                    "qwen2" => (serde_json::json!({"type": "NFC"}), vec![split(QWEN2_REGEX), byte_level(false)], false),
                    "smollm" => (serde_json::Value::Null, vec![serde_json::json!({"type": "Digits", "individual_digits": true}), byte_level(true)], false),
                    "gpt2" | "gpt-2" | "default" => (serde_json::Value::Null, vec![byte_level(true)], false),
                    other => return Err(Error::Config(format!("{}: pre-tokenizer `{other}` is not supported (llama-bpe, qwen2, smollm, gpt2)", self.name))),
                };
                serde_json::json!({
                    "normalizer": normalizer,
                    "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
                    "post_processor": post_processor(serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})),
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": self.strings("tokenizer.ggml.merges")?},
                })
            }
            "llama" => {
                let scores: Vec<f64> = match self.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                    Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                    _ => return Err(Error::Config(format!("{}: metadata `tokenizer.ggml.scores` is missing or not one per token", self.name))),
                };
                let unk = self.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.as_u64()).and_then(|i| tokens.get(i as usize)).cloned();
                let mut normalizers = vec![serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
                if flag("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
                    normalizers.insert(0, serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                serde_json::json!({
                    "normalizer": {"type": "Sequence", "normalizers": normalizers},
                    "pre_tokenizer": null,
                    "post_processor": post_processor(serde_json::Value::Null),
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"},
                        {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                    ]},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": sentencepiece_merges(&tokens, &scores)},
                })
            }
            other => return Err(Error::Config(format!("{}: tokenizer model `{other}` is not supported (gpt2, byte-level BPE, and llama, SentencePiece BPE, are)", self.name))),
        };
        json["version"] = "1.0".into();
        json["truncation"] = serde_json::Value::Null;
        json["padding"] = serde_json::Value::Null;
        json["added_tokens"] = added.into();
        Ok(json.to_string())
    }
}

/// The BPE merges equivalent to SentencePiece's scores, as transformers'
/// `SentencePieceExtractor` makes them: every split of a token into two tokens, the
/// splits of one token ordered by the pieces' ids, then all of them by the merged
/// token's score, highest first (a stable sort, so ties keep id order).
fn sentencepiece_merges(tokens: &[String], scores: &[f64]) -> Vec<String> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f64, String)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (l, r) = t.split_at(i);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(_, _, l, r)| (score, format!("{l} {r}"))));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, m)| m).collect()
}

impl Tensors for Gguf {
    fn names(&self) -> Vec<String> {
        self.tensors.iter().filter_map(|t| self.hf_name(&t.name)).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (file, _) = self.file_name(name)?;
        self.info(&file).map(|t| t.shape())
    }

    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let (t, _) = self.lookup(name)?;
        if t.dims.len() == 1 {
            // A vector: its rows are its elements.
            return Ok(self.file_rows(t, 0, 1)?[r0..r1].to_vec());
        }
        Ok(dequantize(t.ty, &self.raw_rows(name, r0, r1)?))
    }

    fn packed_type(&self, name: &str) -> Option<crate::quant::QType> {
        let (t, _) = self.lookup(name).ok()?;
        crate::quant::QType::of_ggml(t.ty).filter(|_| t.dims.len() == 2)
    }

    fn packed_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        self.raw_rows(name, r0, r1)
    }
}

impl Gguf {
    /// The file tensor holding the Hugging Face tensor `name`, and the head count its
    /// rows were permuted by (llama's q and k).
    fn lookup(&self, name: &str) -> Result<(&TensorInfo, Option<usize>)> {
        let (file, heads) = self.file_name(name).ok_or_else(|| Error::Weights(format!("{}: tensor `{name}` is missing", self.name)))?;
        let t = self.info(&file).ok_or_else(|| Error::Weights(format!("{}: tensor `{name}` (`{file}`) is missing", self.name)))?;
        Ok((t, heads))
    }

    /// Rows `r0..r1` of the Hugging Face matrix `name` as the file stores them (its
    /// type's blocks), in Hugging Face row order (llama's q/k permutation undone by
    /// moving whole rows).
    fn raw_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let (t, heads) = self.lookup(name)?;
        let n_rows: usize = t.dims[1..].iter().product::<usize>().max(1);
        let raw_of = |a: usize, b: usize| self.file_raw(t, a, b);
        if r1 > n_rows {
            return Err(Error::Weights(format!("{}: rows {r0}..{r1} of `{name}` ({n_rows} rows)", self.name)));
        }
        let Some(heads) = heads else { return raw_of(r0, r1) };
        // llama.cpp stores each head's rows as (pairs, 2) where Hugging Face has
        // (2, pairs): Hugging Face row h·HS + i·HS/2 + j is file row h·HS + 2j + i.
        let hs = n_rows / heads;
        let mut out = Vec::with_capacity((r1 - r0) * t.ty.bytes(t.dims[0]));
        for r in r0..r1 {
            let (h, k) = (r / hs, r % hs);
            let (i, j) = (k / (hs / 2), k % (hs / 2));
            let f = h * hs + 2 * j + i;
            out.extend(raw_of(f, f + 1)?);
        }
        Ok(out)
    }
}

/// Writes a GGUF file (version 3): metadata, then tensors (F32, F16, Q8_0, Q4_0 or
/// Q4_1, quantized as llama.cpp's reference quantizers do: `crate::quant`) aligned to 32.
#[derive(Default)]
pub struct Writer {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_string(out, s),
        Value::Array(items) => {
            out.extend(items.first().map_or(4, value_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl Writer {
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.meta.push((key.to_string(), v));
        self
    }

    /// A tensor of `shape` (Hugging Face order; stored reversed) as `ty`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, data: &[f32]) -> Result<&mut Self> {
        use crate::quant::QType;
        let q = QType::of_ggml(ty).filter(|q| matches!(q, QType::Q8_0 | QType::Q4_0 | QType::Q4_1));
        let bytes: Vec<u8> = match (ty, q) {
            (GgmlType::F32, _) => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            (GgmlType::F16, _) => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            (_, Some(q)) if shape.last().is_some_and(|&c| q.fits(c)) => crate::quant::quantize(q, data)?,
            (other, _) => return Err(Error::Config(format!("{name}: writing {other:?} tensors of shape {shape:?} is not supported (F32, F16; Q8_0, Q4_0, Q4_1 with rows of whole blocks)"))),
        };
        self.tensors.push((name.to_string(), shape.iter().rev().cloned().collect(), ty, bytes));
        Ok(self)
    }

    pub fn finish(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_string(&mut out, k);
            out.extend(value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            put_string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        out
    }
}

/// The llama.cpp name of a Hugging Face tensor (the inverse of `Gguf::hf_name`).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, f)) = WHOLE_MODEL.iter().find(|(h, _)| *h == hf) {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let name = MODULES.iter().find(|(_, h)| *h == module)?.0;
    Some(format!("blk.{layer}.{name}.{suffix}"))
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

/// llama.cpp's pre-tokenizer type of a Hugging Face byte-level BPE `tokenizer.json`
/// (the inverse of `Gguf::tokenizer_json`).
fn pre_type(t: &serde_json::Value) -> Option<&'static str> {
    let pre = &t["pre_tokenizer"];
    let list: Vec<&serde_json::Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = list.iter().filter_map(|p| p["type"].as_str()).collect();
    let regex = list.iter().find_map(|p| p["pattern"]["Regex"].as_str());
    match (kinds.as_slice(), regex) {
        (["Split", "ByteLevel"], Some(r)) if r == LLAMA3_REGEX => Some("llama-bpe"),
        (["Split", "ByteLevel"], Some(r)) if r == QWEN2_REGEX => Some("qwen2"),
        (["Digits", "ByteLevel"], None) if list[0]["individual_digits"].as_bool() == Some(true) => Some("smollm"),
        (["ByteLevel"], None) if list[0]["use_regex"].as_bool() != Some(false) => Some("gpt2"),
        _ => None,
    }
}

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

/// A PEFT LoRA adapter as a llama.cpp LoRA adapter file, as `convert_lora_to_gguf.py`
/// writes one: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
/// and for each pair `blk.N.<tensor>.weight.lora_a` (A, `[r, in]`) and `.lora_b` (B,
/// `[out, r]`, its rows permuted as the base weight's are for llama's q and k), F32.
/// llama.cpp scales by alpha / r; an rsLoRA adapter's alpha is written as alpha·√r.
pub fn lora_file(name: &str, cfg: &super::Config, lora: &super::LoraConfig, tensors: &super::TensorMap) -> Result<Vec<u8>> {
    let arch = match cfg.arch {
        super::Arch::Llama => "llama",
        super::Arch::Qwen2 => "qwen2",
        super::Arch::Qwen3 => "qwen3",
    };
    let alpha = if lora.use_rslora { lora.alpha * (lora.r as f32).sqrt() } else { lora.alpha };
    let mut w = Writer::default();
    w.meta("general.architecture", Value::Str(arch.into()))
        .meta("general.type", Value::Str("adapter".into()))
        .meta("general.name", Value::Str(name.into()))
        .meta("adapter.type", Value::Str("lora".into()))
        .meta("adapter.lora.alpha", Value::F32(alpha));
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort_by_key(|n| (n.split('.').find_map(|p| p.parse::<usize>().ok()), n.to_string()));
    for peft in names {
        let t = &tensors[peft];
        let bad = || Error::Weights(format!("{name}: `{peft}` is not a PEFT LoRA tensor of a projection"));
        let module = peft.strip_prefix("base_model.model.").ok_or_else(bad)?;
        let (base, which) = match (module.strip_suffix(".lora_A.weight"), module.strip_suffix(".lora_B.weight")) {
            (Some(m), _) => (format!("{m}.weight"), "lora_a"),
            (_, Some(m)) => (format!("{m}.weight"), "lora_b"),
            _ => return Err(bad()),
        };
        let file = gguf_name(&base).ok_or_else(bad)?;
        let data = match permuted_heads(cfg, &base) {
            Some(h) if which == "lora_b" => permute_rows(&t.data, t.shape[0], t.shape[1], h),
            _ => t.data.clone(),
        };
        w.tensor(&format!("{file}.{which}"), &t.shape, GgmlType::F32, &data)?;
    }
    Ok(w.finish())
}

/// The tensor types of a GGUF export: `F16` (or `F32`) matrices, or `Q8_0` where a
/// row is whole blocks; vectors (norms, biases) stay F32, as llama.cpp keeps them.
pub fn export_type(name: &str) -> Result<GgmlType> {
    match name {
        "f32" => Ok(GgmlType::F32),
        "f16" => Ok(GgmlType::F16),
        "q8_0" => Ok(GgmlType::Q8_0),
        "q4_0" => Ok(GgmlType::Q4_0),
        "q4_1" => Ok(GgmlType::Q4_1),
        other => Err(Error::Config(format!("GGUF type `{other}` is not one webtune writes (f32, f16, q8_0, q4_0, q4_1)"))),
    }
}

/// The `tokenizer.ggml.*` metadata llama.cpp's converter writes for a Hugging Face
/// `tokenizer.json` (the inverse of `Gguf::tokenizer_json`), with `vocab` rows (the
/// embedding's rows past the tokenizer's ids, as Qwen pads them, become `[PAD{id}]`,
/// type 5 unused):
/// - byte-level BPE: model `gpt2`, the pre-tokenizer type, tokens, types, merges;
/// - SentencePiece BPE (byte fallback, `▁` for spaces): model `llama`, tokens, types
///   (6 for byte tokens) and scores that order the merges as the merge list does.
pub fn tokenizer_metadata(name: &str, tok: &crate::data::Tokenizer, tokenizer_json: &[u8], vocab: usize) -> Result<Vec<(String, Value)>> {
    let t: serde_json::Value = serde_json::from_slice(tokenizer_json).map_err(|e| Error::Tokenizer(format!("{name}: tokenizer.json: {e}")))?;
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::Tokenizer(format!("{name}: only BPE tokenizers (byte-level or SentencePiece) export to GGUF yet (this one is {})", model["type"])));
    }
    let sentencepiece = model["byte_fallback"].as_bool() == Some(true);
    let unk = model["unk_token"].as_str();
    let mut by_id: BTreeMap<u64, (String, i32)> = model["vocab"]
        .as_object()
        .map(|v| {
            v.iter()
                .map(|(k, id)| {
                    let byte = sentencepiece && k.len() == 6 && k.starts_with("<0x") && k.ends_with('>');
                    (id.as_u64().unwrap_or(0), (k.clone(), if byte { 6 } else { 1 }))
                })
                .collect()
        })
        .unwrap_or_default();
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let content = a["content"].as_str().unwrap_or("");
        let ty = match a["special"].as_bool() {
            _ if Some(content) == unk => 2,
            Some(true) => 3,
            _ => 4,
        };
        by_id.insert(a["id"].as_u64().unwrap_or(0), (content.to_string(), ty));
    }
    let n = by_id.len() as u64;
    if by_id.keys().last().map_or(0, |k| k + 1) != n || n > vocab as u64 {
        return Err(Error::Tokenizer(format!("{name}: tokenizer ids are not dense 0..{n} within the vocabulary of {vocab}")));
    }
    for id in n..vocab as u64 {
        by_id.insert(id, (format!("[PAD{id}]"), 5));
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m.as_str().map(str::to_string).unwrap_or_else(|| m.as_array().map(|p| p.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join(" ")).unwrap_or_default()))
        .collect();
    let u32v = |v: u32| Value::U32(v);
    let mut meta = vec![("tokenizer.ggml.tokens".to_string(), Value::Array(by_id.values().map(|(s, _)| Value::Str(s.clone())).collect()))];
    meta.push(("tokenizer.ggml.token_type".into(), Value::Array(by_id.values().map(|(_, ty)| Value::I32(*ty)).collect())));
    if sentencepiece {
        // A token's score is minus the rank of the first merge that makes it, so that
        // llama.cpp, which merges the pair whose result scores highest, merges in the
        // list's order; tokens no merge makes (characters, bytes, specials) rank last.
        let mut rank: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (i, m) in merges.iter().enumerate() {
            rank.entry(m.replacen(' ', "", 1)).or_insert(i);
        }
        let scores = by_id.iter().map(|(id, (s, _))| Value::F32(-(rank.get(s).copied().unwrap_or(merges.len() + *id as usize) as f32))).collect();
        let prefix = t["normalizer"].to_string().contains("\"Prepend\"") || t["pre_tokenizer"]["prepend_scheme"].as_str().is_some_and(|p| p != "never");
        meta.push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::Str("default".into())));
        meta.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
        meta.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(prefix)));
        if let Some(u) = unk.and_then(|u| tok.inner.token_to_id(u)) {
            meta.push(("tokenizer.ggml.unknown_token_id".into(), u32v(u)));
        }
    } else {
        let pre = pre_type(&t).ok_or_else(|| Error::Tokenizer(format!("{name}: tokenizer.json's pre-tokenizer is none llama.cpp knows by type ({})", t["pre_tokenizer"])))?;
        meta.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::Str(pre.into())));
        meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::Str).collect())));
    }
    meta.push(("tokenizer.ggml.eos_token_id".into(), u32v(tok.eos_id)));
    meta.push(("tokenizer.ggml.padding_token_id".into(), u32v(tok.pad_id)));
    if let Some(b) = tok.bos_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), u32v(b)));
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(t["post_processor"].to_string().contains("\"SpecialToken\"") && tok.bos_id.is_some())));
    if !tok.template.fallback {
        meta.push(("tokenizer.chat_template".into(), Value::Str(tok.template.source.clone())));
    }
    Ok(meta)
}

/// What a fine-tune's GGUF keeps of its base's metadata, as llama.cpp's converter
/// writes a fine-tune: the base's `general.*` description (name, basename, size label,
/// license, organization, …) and tokenizer flags the tokenizer.json does not say, and
/// `general.base_model.*` naming the base; `general.finetune` gains "webtune".
fn fine_tune_metadata(base_name: &str, base: Option<&BTreeMap<String, Value>>) -> Vec<(String, Value)> {
    let str_of = |k: &str| base.and_then(|m| m.get(k)).and_then(|v| v.as_str()).map(str::to_string);
    let mut out: Vec<(String, Value)> = Vec::new();
    for (k, v) in base.into_iter().flatten() {
        let carried = (k.starts_with("general.") && !matches!(k.as_str(), "general.architecture" | "general.file_type" | "general.alignment" | "general.finetune" | "general.type"))
            && !k.starts_with("general.base_model.")
            || matches!(k.as_str(), "tokenizer.ggml.add_space_prefix" | "tokenizer.ggml.unknown_token_id");
        if carried {
            out.push((k.clone(), v.clone()));
        }
    }
    out.push(("general.type".into(), Value::Str("model".into())));
    let finetune = str_of("general.finetune").map_or("webtune".to_string(), |f| format!("{f}-webtune"));
    out.push(("general.finetune".into(), Value::Str(finetune)));
    out.push(("general.base_model.count".into(), Value::U32(1)));
    out.push(("general.base_model.0.name".into(), Value::Str(str_of("general.name").unwrap_or_else(|| base_name.to_string()))));
    for (from, to) in [("general.organization", "general.base_model.0.organization"), ("general.repo_url", "general.base_model.0.repo_url"), ("general.version", "general.base_model.0.version")] {
        if let Some(v) = str_of(from) {
            out.push((to.into(), Value::Str(v)));
        }
    }
    out
}

/// A whole model as one GGUF file that llama.cpp and transformers' GGUF loader read:
/// architecture metadata from `cfg`, the tokenizer from `tokenizer.json` (BPE,
/// byte-level or SentencePiece; `tokenizer_metadata`) with the chat template, and `weights` (Hugging Face names) in llama.cpp's
/// names and layout (llama's q/k rows permuted as its converter does) as `ty`. `base`:
/// the base GGUF's metadata, whose description the file keeps (`fine_tune_metadata`).
#[allow(clippy::too_many_arguments)]
pub fn model_file(
    name: &str,
    cfg: &super::Config,
    tok: &crate::data::Tokenizer,
    tokenizer_json: &[u8],
    weights: &super::TensorMap,
    ty: GgmlType,
    base: Option<&BTreeMap<String, Value>>,
) -> Result<Vec<u8>> {
    use super::Arch;
    let arch = match cfg.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    let mut w = Writer::default();
    // llama.cpp's `llama_ftype`: the type of most tensors.
    let file_type = match ty {
        GgmlType::F32 => 0u32,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        _ => 7,
    };
    let u32v = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::Str(arch.into()))
        .meta("general.name", Value::Str(name.into()))
        .meta("general.file_type", Value::U32(file_type))
        .meta(&format!("{arch}.block_count"), u32v(cfg.layers))
        .meta(&format!("{arch}.context_length"), u32v(cfg.max_positions))
        .meta(&format!("{arch}.embedding_length"), u32v(cfg.hidden))
        .meta(&format!("{arch}.feed_forward_length"), u32v(cfg.intermediate))
        .meta(&format!("{arch}.attention.head_count"), u32v(cfg.heads))
        .meta(&format!("{arch}.attention.head_count_kv"), u32v(cfg.kv_heads))
        .meta(&format!("{arch}.attention.key_length"), u32v(cfg.head_dim))
        .meta(&format!("{arch}.attention.value_length"), u32v(cfg.head_dim))
        .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.eps))
        .meta(&format!("{arch}.rope.dimension_count"), u32v(cfg.head_dim))
        .meta(&format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta as f32));
    match &cfg.rope_scaling {
        None => {}
        Some(super::config::RopeScaling::Linear { factor }) => {
            w.meta(&format!("{arch}.rope.scaling.type"), Value::Str("linear".into())).meta(&format!("{arch}.rope.scaling.factor"), Value::F32(*factor as f32));
        }
        Some(other) => return Err(Error::Config(format!("{name}: exporting rope scaling {other:?} to GGUF is not supported yet"))),
    }
    for (key, v) in tokenizer_metadata(name, tok, tokenizer_json, cfg.vocab)? {
        w.meta(&key, v);
    }
    // The base's own description, where the lines above did not already say it
    // (its general.name replaces the file stem).
    for (key, v) in fine_tune_metadata(name, base) {
        match w.meta.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) if key == "general.name" => slot.1 = v,
            Some(_) => {}
            None => {
                w.meta(&key, v);
            }
        }
    }
    if ty != GgmlType::F32 && ty != GgmlType::F16 && !w.meta.iter().any(|(k, _)| k == "general.quantization_version") {
        w.meta("general.quantization_version", Value::U32(2));
    }
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort_by_key(|n| (n.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok()), n.to_string()));
    for hf in names {
        let t = &weights[hf];
        let file = gguf_name(hf).ok_or_else(|| Error::Weights(format!("{name}: `{hf}` has no llama.cpp name")))?;
        let heads = permuted_heads(cfg, hf);
        let data = match heads {
            Some(h) => permute_rows(&t.data, t.shape[0], t.shape[1], h),
            None => t.data.clone(),
        };
        let tty = if t.shape.len() < 2 {
            GgmlType::F32
        } else if crate::quant::QType::of_ggml(ty).is_some_and(|q| !q.fits(t.shape[1])) {
            // Rows that are not whole blocks stay f16, as llama.cpp's quantizer keeps them.
            GgmlType::F16
        } else {
            ty
        };
        w.tensor(&file, &t.shape, tty, &data)?;
    }
    Ok(w.finish())
}
