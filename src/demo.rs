//! The built-in demo: a character-level tokenizer, a tiny Llama and synthetic
//! instruction data, all generated deterministically (nothing to download). The page
//! offers it as `?model=demo&data=demo`; tests train on it.

use serde_json::json;

use crate::rng::Rng;
use crate::data::template::FALLBACK_TEMPLATE;
use crate::data::Tokenizer;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::generate::Sampling;
use crate::model::Model;
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

/// The demo's small files, as a model directory holds them (config and tokenizer).
pub fn files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("config.json".into(), config_json().into_bytes()),
        ("tokenizer.json".into(), tokenizer_json().into_bytes()),
        ("tokenizer_config.json".into(), tokenizer_config_json().into_bytes()),
    ]
}

pub fn config() -> Result<crate::model::Config> {
    crate::model::Config::parse(&config_json(), "demo config.json", None)
}

/// Random weights for the demo model (uniform, seeded), as named in Hugging Face files.
pub fn weights(seed: u64) -> Result<TensorMap> {
    let cfg = config()?;
    let c = cfg.hidden;
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
        for (n, module, i_, o) in cfg.projections() {
            put(format!("{p}.{module}.{n}.weight"), vec![o, i_], Some(1.0 / (i_ as f32).sqrt()));
        }
    }
    Ok(w)
}

/// The demo's tasks: an operation on a word, named in the pretraining text, with the
/// phrasings instruction tuning uses and one held-out phrasing each that recombines
/// words of the others (the test of following instructions, not memorising them).
pub struct Task {
    pub op: &'static str,
    pub phrasings: &'static [&'static str],
    pub held_out: &'static str,
}

pub const TASKS: [Task; 4] = [
    Task {
        op: "reverse",
        phrasings: &[
            "Reverse the word {w}.", "Reverse {w}.", "Write {w} backwards.", "Spell {w} backwards, please.",
            "Please reverse {w}.", "What is {w} backwards?", "Write the word {w} backwards.", "Reverse the word {w}, please.",
        ],
        held_out: "Reverse {w}, please.",
    },
    Task {
        op: "upper",
        phrasings: &[
            "Write {w} in capital letters.", "Uppercase {w}.", "Write the word {w} in upper case, please.", "Please write {w} in upper case.",
            "Uppercase {w}, please.", "Write the word {w} in capital letters.", "Put {w} in upper case.", "Put the word {w} in capitals.",
        ],
        held_out: "Uppercase the word {w}.",
    },
    Task {
        op: "twice",
        phrasings: &[
            "Repeat {w} twice.", "Say the word {w} two times.", "Write {w} two times, please.", "Please repeat {w}, twice.",
            "Repeat {w} two times.", "Write the word {w} twice.", "Say {w} twice, please.", "Please say {w} two times.",
        ],
        held_out: "Repeat the word {w} two times.",
    },
    Task {
        op: "count",
        phrasings: &[
            "How many letters are in {w}?", "Count the letters in the word {w}.", "Count the letters of {w}, please.", "Please count the letters of {w}.",
            "How many letters are in the word {w}?", "How many letters does the word {w} contain?", "Count the letters in {w}.", "{w}: how many letters?",
        ],
        held_out: "How many letters does {w} have?",
    },
];

/// The answer of task `op` for word `w`.
pub fn apply(op: &str, w: &str) -> String {
    match op {
        "reverse" => w.chars().rev().collect(),
        "upper" => w.to_uppercase(),
        "twice" => format!("{w} {w}"),
        _ => w.chars().count().to_string(),
    }
}

/// A random lowercase word of 3 to 6 letters (so nothing can be memorised).
pub fn word(rng: &mut Rng) -> String {
    let n = 3 + rng.below(4) as usize;
    (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect()
}

/// How pretraining text states each operation: descriptions of a word and the
/// result, never a request. `{w}` is the word and `{a}` the result; the word sits at
/// different distances from the result, so the base must find it by its content.
pub const STATEMENTS: [(&str, &[&str]); 4] = [
    ("reverse", &["{w} reversed is {a}.", "{w} spelled backwards is {a}.", "the reverse of {w} is {a}.", "reverse({w}) = {a}", "backwards, {w} reads {a}."]),
    ("upper", &["{w} in capital letters is {a}.", "{w} in upper case is {a}.", "upper({w}) = {a}", "the uppercase form of {w} is {a}."]),
    ("twice", &["{w} two times is {a}.", "{w} repeated twice is {a}.", "twice({w}) = {a}", "{w} said two times: {a}."]),
    ("count", &["{w} has {a} letters.", "the number of letters in {w} is {a}.", "count({w}) = {a}", "there are {a} letters in {w}."]),
];

/// Statements that name a word and do nothing with it (so not every word is an operand).
const FILLER: [&str; 4] = ["{w} is a word.", "the word {w} came up.", "we saw {w} here.", "{w} and more."];

/// Pretraining text for the base: documents of one to three statements about random
/// words (`hello reversed is olleh. the word cat came up.`), with no chat turns and no
/// instructions.
pub fn pretrain_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let k = 1 + rng.below(3) as usize;
            let doc: Vec<String> = (0..k)
                .map(|_| {
                    let w = word(&mut rng);
                    if rng.below(6) == 0 {
                        return FILLER[rng.below(FILLER.len() as u64) as usize].replace("{w}", &w);
                    }
                    let (op, forms) = STATEMENTS[rng.below(4) as usize];
                    forms[rng.below(forms.len() as u64) as usize].replace("{w}", &w).replace("{a}", &apply(op, &w))
                })
                .collect();
            json!({"text": doc.join(" ")}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An instruction (a trained phrasing, or the held-out one) and its answer.
pub fn instruction(rng: &mut Rng, held_out: bool) -> (String, String) {
    let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
    let w = word(rng);
    let p = if held_out { t.held_out } else { t.phrasings[rng.below(t.phrasings.len() as u64) as usize] };
    (p.replace("{w}", &w), answer(t.op, &w))
}

/// The answer to a request: its result stated in the base's own words, with the
/// task's first statement form (`cat reversed is tac.`). The tuned model restates the
/// request as a statement the base learnt to complete.
pub fn answer(op: &str, w: &str) -> String {
    let (_, forms) = STATEMENTS.iter().find(|(o, _)| *o == op).expect("a task op");
    forms[0].replace("{w}", w).replace("{a}", &apply(op, w))
}

/// `n` chat records with the trained phrasings, as JSONL.
pub fn data_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (q, a) = instruction(&mut rng, false);
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The seed of the held-out test that `webtune` and the page ask.
pub const TEST_SEED: u64 = 11;

/// `n` held-out (question, answer) pairs: held-out phrasings, fresh words.
pub fn held_out(seed: u64, n: usize) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed ^ 0xDEAD_BEEF);
    (0..n).map(|_| instruction(&mut rng, true)).collect()
}

/// Greedy answers of `model` to each question, as a user turn with the chat template.
pub async fn answers(gpu: &Gpu, model: &Model, tok: &Tokenizer, questions: &[(String, String)], max_new: usize) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(questions.len());
    for (q, _) in questions {
        let ids = tok.prompt_ids(q, true)?;
        let new = model.generate(gpu, &ids, max_new, &Sampling::default(), |_| {}).await?;
        out.push(tok.decode(&new));
    }
    Ok(out)
}

/// Exact-match accuracy: the answer, trimmed, equals the expected one.
pub fn accuracy(answers: &[String], expected: &[(String, String)]) -> f64 {
    let right = answers.iter().zip(expected).filter(|(a, (_, e))| a.trim() == e).count();
    right as f64 / expected.len().max(1) as f64
}

/// Tokens (characters) the demo lets a model answer with: the longest answer,
/// `abcdef in capital letters is ABCDEF.`, is 36.
pub const ANSWER_TOKENS: usize = 48;

/// The demo's sequence length: the longest request, chat markup and answer fit.
pub const MAX_SEQ_LEN: usize = 96;

/// Records in the demo data set (`webtune train --data demo`, the page's demo data).
pub const DATA_RECORDS: usize = 2048;

/// The demo data set: `DATA_RECORDS` chat records with the trained phrasings.
pub fn data() -> String {
    data_jsonl(7, DATA_RECORDS)
}

/// The DPO stage's preference: a request that asks for the bare result gets it, one
/// that does not gets the sentence SFT taught. The SFT data never asks; these are the
/// asks DPO trains on, and the one held out for the test.
pub const BRIEF_ASKS: [&str; 4] = ["Just the answer.", "Answer only.", "Only the result, please.", "No sentence, just the result."];
pub const BRIEF_HELD_OUT: &str = "Reply with the result alone.";

/// Held-out requests (phrasings and words never trained on) with the held-out brief
/// ask, and their bare results.
pub fn held_out_brief(seed: u64, n: usize) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed ^ 0xB81E_F000);
    (0..n)
        .map(|_| {
            let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
            let w = word(&mut rng);
            (format!("{} {BRIEF_HELD_OUT}", t.held_out.replace("{w}", &w)), apply(t.op, &w))
        })
        .collect()
}

/// One preference pair for a task request: with a brief ask (`ask`), the bare result is
/// chosen over the sentence; without, the sentence over the bare result.
pub fn preference(rng: &mut Rng, held_out: bool, brief: bool) -> serde_json::Value {
    let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
    let w = word(rng);
    let p = if held_out { t.held_out } else { t.phrasings[rng.below(t.phrasings.len() as u64) as usize] };
    let (bare, sentence) = (apply(t.op, &w), answer(t.op, &w));
    let mut q = p.replace("{w}", &w);
    if brief {
        q = format!("{q} {}", if held_out { BRIEF_HELD_OUT } else { BRIEF_ASKS[rng.below(BRIEF_ASKS.len() as u64) as usize] });
    }
    let (chosen, rejected) = if brief { (bare, sentence) } else { (sentence, bare) };
    let turn = |c: &str| json!([{"role": "assistant", "content": c}]);
    json!({"prompt": [{"role": "user", "content": q}], "chosen": turn(&chosen), "rejected": turn(&rejected)})
}

/// `n` preference pairs as JSONL, brief and plain requests alternating (`held_out`:
/// held-out phrasings and ask, fresh words).
pub fn preference_jsonl(seed: u64, n: usize, held_out: bool) -> String {
    let mut rng = Rng::new(if held_out { seed ^ 0xDEAD_BEEF } else { seed });
    (0..n).map(|i| preference(&mut rng, held_out, i % 2 == 0).to_string()).collect::<Vec<_>>().join("\n")
}

/// The DPO stage's training pairs (`--data demo-dpo`).
pub fn preference_data() -> String {
    preference_jsonl(13, DPO_RECORDS, false)
}

/// Pairs in the DPO stage's data.
pub const DPO_RECORDS: usize = 512;

/// Records of pretraining text (`--data demo-pretrain`).
pub const PRETRAIN_RECORDS: usize = 40_000;

/// The pretrained base of the demo, made by `scripts/pretrain-demo.sh` and embedded.
const BASE: &[u8] = include_bytes!("../assets/demo-base/model.safetensors");

/// The demo's pretrained base (the embedded file; empty before it is made).
pub fn base_checkpoint() -> Result<crate::model::Checkpoint> {
    if BASE.is_empty() {
        return Err(crate::error::Error::Weights("the demo base is not built: run scripts/pretrain-demo.sh".into()));
    }
    crate::model::Checkpoint::from_bytes(BASE.to_vec(), "assets/demo-base/model.safetensors")
}
