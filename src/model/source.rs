//! One loader for every model source: a directory, the files a page read from disk or
//! fetched (later GGUF and the Hub). A source is its small files by name and its
//! safetensors [`Checkpoint`]; [`open`] makes the config, the tokenizer with its chat
//! template, and the list of files a derived (merged, fully tuned) model copies.

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::model::{Checkpoint, Config};

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
    pub weights: Checkpoint,
    /// The small files present, as read (a derived model copies them).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A model from its small `files` (by name; others than `SMALL_FILES` are ignored) and
/// its weights; `name` names it in errors.
pub fn open(name: &str, files: Vec<(String, Vec<u8>)>, weights: Checkpoint) -> Result<Source> {
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
