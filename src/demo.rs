//! The built-in demo: a character-level tokenizer, a tiny Llama and synthetic
//! instruction data, all generated deterministically (nothing to download). The page
//! offers it as `?model=demo&data=demo`; tests train on it.

use serde_json::json;

use crate::check::Rng;
use crate::data::template::FALLBACK_TEMPLATE;
use crate::error::Result;
use crate::model::weights::{HostTensor, TensorMap};

const SPECIAL: [&str; 6] = ["<unk>", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"];

/// `tokenizer.json` of a character-level tokenizer: every printable ASCII character,
/// newline and tab is a token; the chat tags are special tokens.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, s) in SPECIAL.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
        added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    for ch in ['\n', '\t'].into_iter().chain((32u8..127).map(|b| b as char)) {
        let id = vocab.len();
        vocab.insert(ch.to_string(), id.into());
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// `tokenizer_config.json`: EOS `</s>`, pad `<pad>`, and the fallback chat template.
pub fn tokenizer_config_json() -> String {
    json!({"eos_token": "</s>", "pad_token": "<pad>", "bos_token": null, "chat_template": FALLBACK_TEMPLATE}).to_string()
}

pub const VOCAB: usize = SPECIAL.len() + 2 + 95;

/// `config.json` of the demo model: a 4-layer Llama, hidden 64, tied embeddings.
pub fn config_json() -> String {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 512, "bos_token_id": null, "eos_token_id": 2, "torch_dtype": "float32"
    })
    .to_string()
}

/// Random weights for the demo model (uniform, seeded), as named in Hugging Face files.
pub fn weights(seed: u64) -> Result<TensorMap> {
    let cfg = crate::model::Config::parse(&config_json(), "demo config.json", None)?;
    let (c, inter, kv) = (cfg.hidden, cfg.intermediate, cfg.kv_dim());
    let mut rng = Rng::new(seed);
    let mut w = TensorMap::new();
    let mut put = |name: String, shape: Vec<usize>, mag: Option<f32>| {
        let n: usize = shape.iter().product();
        let data = match mag {
            Some(m) => rng.vec(n, m),
            None => vec![1.0; n],
        };
        w.insert(name, HostTensor { shape, data });
    };
    put("model.embed_tokens.weight".into(), vec![cfg.vocab, c], Some(0.5));
    put("model.norm.weight".into(), vec![c], None);
    for i in 0..cfg.layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), vec![c], None);
        put(format!("{p}.post_attention_layernorm.weight"), vec![c], None);
        for (n, o, i_) in [
            ("self_attn.q_proj", c, c),
            ("self_attn.k_proj", kv, c),
            ("self_attn.v_proj", kv, c),
            ("self_attn.o_proj", c, c),
            ("mlp.gate_proj", inter, c),
            ("mlp.up_proj", inter, c),
            ("mlp.down_proj", c, inter),
        ] {
            put(format!("{p}.{n}.weight"), vec![o, i_], Some(1.0 / (i_ as f32).sqrt()));
        }
    }
    Ok(w)
}

const WORDS: [&str; 24] = [
    "apple", "river", "stone", "cloud", "green", "tiger", "paper", "music", "lemon", "night", "ocean", "bread", "chair", "light", "plant",
    "sugar", "train", "water", "zebra", "honey", "piano", "smile", "storm", "wheel",
];

/// One synthetic instruction and its answer: reverse, uppercase, repeat or count.
fn task(rng: &mut Rng) -> (String, String) {
    let w = WORDS[rng.below(WORDS.len() as u64) as usize];
    match rng.below(4) {
        0 => (format!("Reverse the word {w}."), w.chars().rev().collect()),
        1 => (format!("Write {w} in capital letters."), w.to_uppercase()),
        2 => (format!("Repeat {w} twice."), format!("{w} {w}")),
        _ => (format!("How many letters are in {w}?"), w.len().to_string()),
    }
}

/// Records in the demo data set (`webtune train --data demo`, the page's demo data).
pub const DATA_RECORDS: usize = 256;

/// The demo data set: `DATA_RECORDS` chat records of the synthetic tasks.
pub fn data() -> String {
    data_jsonl(7, DATA_RECORDS)
}

/// `n` chat records of the synthetic tasks, as JSONL.
pub fn data_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (q, a) = task(&mut rng);
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}
