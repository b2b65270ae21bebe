//! Writing GGUF files: `Writer` (metadata and tensors, quantized as llama.cpp's
//! reference quantizers do), a merged model (`model_file`) and a LoRA adapter
//! (`lora_file`) as llama.cpp reads them.

use std::collections::BTreeMap;

use super::{gguf_name, permute_rows, permuted_heads, tokenizer_metadata, Value, MAGIC};
use crate::error::{Error, Result};
use crate::quant::GgmlType;

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
            (other, _) => return Err(Error::Config(format!("{name}: writing {} tensors of shape {} is not supported (F32, F16; Q8_0, Q4_0, Q4_1 with rows of whole blocks)", other.name().to_uppercase(), crate::gpu::dims(shape)))),
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

/// A PEFT LoRA adapter as a llama.cpp LoRA adapter file, as `convert_lora_to_gguf.py`
/// writes one: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
/// and for each pair `blk.N.<tensor>.weight.lora_a` (A, `[r, in]`) and `.lora_b` (B,
/// `[out, r]`, its rows permuted as the base weight's are for llama's q and k), F32.
/// llama.cpp scales by alpha / r; an rsLoRA adapter's alpha is written as alpha·√r.
pub fn lora_file(name: &str, cfg: &crate::model::Config, lora: &crate::model::LoraConfig, tensors: &crate::model::TensorMap) -> Result<Vec<u8>> {
    let arch = match cfg.arch {
        crate::model::Arch::Llama => "llama",
        crate::model::Arch::Qwen2 => "qwen2",
        crate::model::Arch::Qwen3 => "qwen3",
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
    cfg: &crate::model::Config,
    tok: &crate::data::Tokenizer,
    tokenizer_json: &[u8],
    weights: &crate::model::TensorMap,
    ty: GgmlType,
    base: Option<&BTreeMap<String, Value>>,
) -> Result<Vec<u8>> {
    use crate::model::Arch;
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
        Some(crate::model::config::RopeScaling::Linear { factor }) => {
            w.meta(&format!("{arch}.rope.scaling.type"), Value::Str("linear".into())).meta(&format!("{arch}.rope.scaling.factor"), Value::F32(*factor as f32));
        }
        Some(crate::model::config::RopeScaling::Llama3 { .. }) => return Err(Error::Config(format!("{name}: exporting rope scaling `llama3` to GGUF is not supported yet"))),
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
