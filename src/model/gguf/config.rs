//! A GGUF file's metadata as a Hugging Face `config.json`, so the one config parser
//! serves both.

use super::{Gguf, Value};
use crate::error::{Error, Result};

impl Gguf {
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
