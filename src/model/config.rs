//! `config.json` (and `generation_config.json`) of a Hugging Face causal LM.

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`: SmolLM2, TinyLlama, Llama 3.2.
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v projections carry biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm on q and k.
    Qwen3,
}

impl std::fmt::Display for Arch {
    /// The transformers class name (`LlamaForCausalLM`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        })
    }
}

/// Rope scaling variants we implement (others are refused by name).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_embeddings: bool,
    pub vocab: usize,
    pub max_positions: usize,
    pub dtype: String,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Biases on q, k, v (Qwen2, or `attention_bias` on Llama).
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k (Qwen3).
    pub qk_norm: bool,
}

fn bad(source: &str, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{source}: `{field}` {msg}"))
}

fn float(v: &Value, source: &str, field: &str) -> Result<Option<f64>> {
    number(v, field, source, field)
}

fn uint(v: &Value, source: &str, field: &str) -> Result<usize> {
    match v.get(field) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| bad(source, field, format!("must be a non-negative integer, got {x}"))),
        None => Err(bad(source, field, "is missing")),
    }
}

/// `v[key]` as a number; `field` is its name in errors.
fn number(v: &Value, key: &str, source: &str, field: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| bad(source, field, format!("must be a number, got {x}"))),
    }
}

/// A token id or a list of them (`eos_token_id` is either).
fn ids(v: Option<&Value>, source: &str, field: &str) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => Ok(vec![n.as_u64().ok_or_else(|| bad(source, field, "must be a token id"))? as u32]),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| bad(source, field, "must list token ids"))).collect()
        }
        Some(x) => Err(bad(source, field, format!("must be a token id or a list of them, got {x}"))),
    }
}

impl Config {
    /// Parse `config.json`; `source` names the file in errors. `generation` is the
    /// optional `generation_config.json`, whose eos ids take precedence.
    pub fn parse(text: &str, source: &str, generation: Option<&str>) -> Result<Config> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config(format!("{source}: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| bad(source, "architectures", "is missing"))?;
        let arch = match arch_name {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Arch::Qwen3,
            other => {
                return Err(bad(
                    source,
                    "architectures",
                    format!("names {other}, which webtune does not support (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"),
                ))
            }
        };
        let hidden = uint(&v, source, "hidden_size")?;
        let heads = uint(&v, source, "num_attention_heads")?;
        let kv_heads = if v.get("num_key_value_heads").is_some_and(|x| !x.is_null()) {
            uint(&v, source, "num_key_value_heads")?
        } else {
            heads
        };
        let head_dim = if v.get("head_dim").is_some_and(|x| !x.is_null()) { uint(&v, source, "head_dim")? } else { hidden / heads.max(1) };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(source, "num_key_value_heads", format!("({kv_heads}) must divide num_attention_heads ({heads})")));
        }
        if head_dim % 4 != 0 || head_dim > 128 {
            return Err(bad(source, "head_dim", format!("is {head_dim}; webtune's attention needs a multiple of 4, at most 128")));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(bad(source, "hidden_act", format!("is {act}; only silu (SwiGLU) is supported")));
            }
        }
        if v.get("mlp_bias").and_then(|b| b.as_bool()) == Some(true) {
            return Err(bad(source, "mlp_bias", "is true; MLP biases are not supported"));
        }
        // Checkpoints on the Hub carry rope_theta / rope_scaling; transformers 5 writes rope_parameters.
        let rope_params = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = float(&v, source, "rope_theta")?
            .or(rope_params.map(|r| number(r, "rope_theta", source, "rope_parameters.rope_theta")).transpose()?.flatten())
            .unwrap_or(10000.0);
        let scaling = v.get("rope_scaling").filter(|r| !r.is_null()).or(rope_params);
        let rope_scaling = match scaling {
            None => None,
            Some(r) => {
                let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                let num = |f: &str| -> Result<f64> {
                    let name = format!("rope_scaling.{f}");
                    number(r, f, source, &name)?.ok_or_else(|| bad(source, &name, "is missing"))
                };
                match kind {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    }),
                    other => return Err(bad(source, "rope_scaling.rope_type", format!("is {other}; supported: default, linear, llama3"))),
                }
            }
        };
        let mut eos = ids(v.get("eos_token_id"), source, "eos_token_id")?;
        if let Some(g) = generation {
            let gv: Value = serde_json::from_str(g).map_err(|e| Error::Config(format!("generation_config.json: {e}")))?;
            let geos = ids(gv.get("eos_token_id"), "generation_config.json", "eos_token_id")?;
            if !geos.is_empty() {
                eos = geos;
            }
        }
        let bos = ids(v.get("bos_token_id"), source, "bos_token_id")?.first().copied();
        Ok(Config {
            arch,
            hidden,
            intermediate: uint(&v, source, "intermediate_size")?,
            layers: uint(&v, source, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            eps: float(&v, source, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_embeddings: v.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false),
            vocab: uint(&v, source, "vocab_size")?,
            max_positions: uint(&v, source, "max_position_embeddings").unwrap_or(2048),
            dtype: v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(|d| d.as_str()).unwrap_or("float32").to_string(),
            bos,
            eos,
            qkv_bias: arch == Arch::Qwen2 || v.get("attention_bias").and_then(|b| b.as_bool()) == Some(true),
            qk_norm: arch == Arch::Qwen3,
        })
    }

    /// RoPE inverse frequencies `[HS/2]`, computed in f32 as transformers does, with
    /// the configured scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        match &self.rope_scaling {
            None => inv,
            Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let (factor, lo, hi, old) =
                    (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        }
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The seven linear projections of a layer, in `LoraConfig::ALL_TARGETS` order:
    /// (name, module, din, dout); the weight is `model.layers.N.{module}.{name}.weight`.
    pub fn projections(&self) -> [(&'static str, &'static str, usize, usize); 7] {
        let (c, q, kv, i) = (self.hidden, self.q_dim(), self.kv_dim(), self.intermediate);
        let dims = [(c, q), (c, kv), (c, kv), (q, c), (c, i), (c, i), (i, c)];
        std::array::from_fn(|j| {
            let name = crate::model::LoraConfig::ALL_TARGETS[j];
            (name, if j < 4 { "self_attn" } else { "mlp" }, dims[j].0, dims[j].1)
        })
    }

    /// Every tensor a checkpoint of this config holds, by its Hugging Face name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.hidden;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, c])];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for (name, module, din, dout) in self.projections() {
                out.push((format!("{p}.{module}.{name}.weight"), vec![dout, din]));
                if self.qkv_bias && matches!(name, "q_proj" | "k_proj" | "v_proj") {
                    out.push((format!("{p}.{module}.{name}.bias"), vec![dout]));
                }
            }
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]));
            }
            out.push((format!("{p}.input_layernorm.weight"), vec![c]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
        }
        out.push(("model.norm.weight".to_string(), vec![c]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, c]));
        }
        out
    }
}
