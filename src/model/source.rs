//! One loader for every model source: a directory, the files a page read from disk or
//! fetched, a GGUF file (later the Hub). A source is its small files by name and its
//! weights (safetensors [`Checkpoint`] or [`Gguf`]); [`open`] makes the config, the
//! tokenizer with its chat template, and the list of files a derived (merged, fully
//! tuned) model copies. A GGUF file's small files are made from its metadata
//! ([`open_gguf`]).

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::model::gguf::{GgmlType, Gguf};
use crate::model::weights::{Bytes, Tensors};
use crate::model::{Checkpoint, Config};

/// Where a model's weights are read from.
pub enum Weights {
    Safetensors(Checkpoint),
    Gguf(Gguf),
}

impl From<Checkpoint> for Weights {
    fn from(c: Checkpoint) -> Weights {
        Weights::Safetensors(c)
    }
}

impl Weights {
    fn inner(&self) -> &dyn Tensors {
        match self {
            Weights::Safetensors(c) => c,
            Weights::Gguf(g) => g,
        }
    }

    /// The dtype a merged model is written in: the checkpoint's own; for GGUF, f32 or
    /// bf16 where every tensor is, else f16 (as llama.cpp's converter writes by default).
    pub fn weights_dtype(&self) -> safetensors::Dtype {
        match self {
            Weights::Safetensors(c) => c.weights_dtype(),
            Weights::Gguf(g) if g.tensors.iter().all(|t| t.ty == GgmlType::F32) => safetensors::Dtype::F32,
            Weights::Gguf(g) if g.tensors.iter().all(|t| matches!(t.ty, GgmlType::BF16 | GgmlType::F32)) => safetensors::Dtype::BF16,
            Weights::Gguf(_) => safetensors::Dtype::F16,
        }
    }
}

impl Tensors for Weights {
    fn names(&self) -> Vec<String> {
        self.inner().names()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner().shape(name)
    }

    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>> {
        self.inner().rows(name, r0, r1)
    }

    fn packed_type(&self, name: &str) -> Option<crate::quant::QType> {
        self.inner().packed_type(name)
    }

    fn packed_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        self.inner().packed_rows(name, r0, r1)
    }
}

/// The small files of a Hugging Face model that the loader reads when present
/// (`config.json` and `tokenizer.json` are required) and a derived model copies.
pub const SMALL_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// A model ready to load onto the GPU: weights stay where they are until then.
pub struct Source {
    pub name: String,
    pub cfg: Config,
    pub tokenizer: Tokenizer,
    pub weights: Weights,
    /// The small files present, as read (a derived model copies them).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A model from its small `files` (by name; others than `SMALL_FILES` are ignored) and
/// its weights; `name` names it in errors.
pub fn open(name: &str, files: Vec<(String, Vec<u8>)>, weights: impl Into<Weights>) -> Result<Source> {
    let weights = weights.into();
    let files: Vec<(String, Vec<u8>)> = files.into_iter().filter(|(f, _)| SMALL_FILES.contains(&f.as_str())).collect();
    let get = |f: &str| files.iter().find(|(n, _)| n == f).map(|(_, b)| b.clone());
    let text = |f: &str| -> Result<Option<String>> {
        get(f).map(|b| String::from_utf8(b).map_err(|e| Error::Config(format!("{name}/{f}: not UTF-8 ({e})")))).transpose()
    };
    let config = text("config.json")?
        .ok_or_else(|| Error::Io(format!("{name}: no config.json (a model needs config.json, tokenizer.json and safetensors weights)")))?;
    let cfg = Config::parse(&config, &format!("{name}/config.json"), text("generation_config.json")?.as_deref())?;
    let tokenizer = Tokenizer::from_files(get, name)?;
    Ok(Source { name: name.to_string(), cfg, tokenizer, weights, files })
}

/// The files of a model directory that `open` reads (natively).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    SMALL_FILES.iter().filter_map(|f| std::fs::read(dir.join(f)).ok().map(|b| (f.to_string(), b))).collect()
}

/// A model from a GGUF file: `config.json`, `tokenizer.json` and `tokenizer_config.json`
/// (special tokens, the chat template from `tokenizer.chat_template`) made from its
/// metadata, then the same loader as every source.
pub fn open_gguf(name: &str, bytes: Box<dyn Bytes>) -> Result<Source> {
    let g = Gguf::open(bytes, name)?;
    let config = g.config_json()?;
    let tokenizer = g.tokenizer_json()?;
    let tokens: Vec<&str> = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    let token = |key: &str| g.get(key).and_then(|v| v.as_u64()).and_then(|i| tokens.get(i as usize)).map(|t| t.to_string());
    let mut tc = serde_json::Map::new();
    for (key, field) in [("tokenizer.ggml.bos_token_id", "bos_token"), ("tokenizer.ggml.eos_token_id", "eos_token"), ("tokenizer.ggml.padding_token_id", "pad_token")] {
        if let Some(t) = token(key) {
            tc.insert(field.into(), t.into());
        }
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        tc.insert("chat_template".into(), t.into());
    }
    let files = vec![
        ("config.json".to_string(), config.into_bytes()),
        ("tokenizer.json".to_string(), tokenizer.into_bytes()),
        ("tokenizer_config.json".to_string(), serde_json::Value::Object(tc).to_string().into_bytes()),
    ];
    let mut s = open(name, files, Weights::Gguf(g))?;
    if !s.tokenizer.template.fallback {
        s.tokenizer.template.origin = format!("{name} (tokenizer.chat_template)");
    }
    Ok(s)
}
