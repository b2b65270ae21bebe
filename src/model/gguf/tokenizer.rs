//! The tokenizer both ways: a GGUF's `tokenizer.ggml.*` as a Hugging Face
//! `tokenizer.json` (`Gguf::tokenizer_json`), and a `tokenizer.json` as that metadata
//! (`tokenizer_metadata`), as llama.cpp's converter writes it.

use std::collections::BTreeMap;

use super::{Gguf, Value};
use crate::error::{Error, Result};

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
