//! The built-in demo: a character-level tokenizer, a tiny Llama and synthetic
//! instruction data (`crate::data::demo`, re-exported here), all generated
//! deterministically (nothing to download). The page offers it as
//! `?model=demo&data=demo`; tests train on it.

use serde_json::json;

pub use crate::data::demo::*;
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

/// Greedy answers of `model` to each question, as a user turn with the chat template
/// (all decoded at once, `Model::generate_batch`).
pub async fn answers(gpu: &Gpu, model: &Model, tok: &Tokenizer, questions: &[(String, String)], max_new: usize) -> Result<Vec<String>> {
    let prompts = questions.iter().map(|(q, _)| tok.prompt_ids(q, true)).collect::<Result<Vec<_>>>()?;
    let new = model.generate_batch(gpu, &prompts, max_new, &Sampling::default()).await?;
    Ok(new.iter().map(|ids| tok.decode(ids)).collect())
}

/// The built-in demo's check: the answer, trimmed, is exactly the expected one.
pub fn exact(answer: &str, expected: &str) -> bool {
    answer.trim() == expected
}

/// The share of answers that pass `correct` against the expected ones.
pub fn accuracy(answers: &[String], expected: &[(String, String)], correct: fn(&str, &str) -> bool) -> f64 {
    share(&answers.iter().zip(expected).map(|(a, (_, e))| correct(a, e)).collect::<Vec<_>>())
}

/// The share of marks that are true.
pub fn share(marks: &[bool]) -> f64 {
    marks.iter().filter(|&&m| m).count() as f64 / marks.len().max(1) as f64
}

/// A demo's held-out test: its (question, expected answer) pairs, how many tokens an
/// answer may take, and how an answer is checked against the expected one. `webtune
/// demo` and the page's held-out test ask it by task name.
pub struct HeldOutTest {
    pub pairs: Vec<(String, String)>,
    pub answer_tokens: usize,
    pub correct: fn(&str, &str) -> bool,
}

impl HeldOutTest {
    /// The test of `task`, `n` questions: `demo` (the built-in demo's held-out
    /// phrasings and words, answered exactly) or `tools` (held-out tool-call requests,
    /// checked field by field: `data::tools::correct`).
    pub fn named(task: &str, n: usize) -> Result<HeldOutTest> {
        use crate::data::tools;
        match task {
            "demo" => Ok(HeldOutTest { pairs: held_out(TEST_SEED, n), answer_tokens: ANSWER_TOKENS, correct: exact }),
            "tools" => Ok(HeldOutTest { pairs: tools::held_out(tools::TEST_SEED, n), answer_tokens: tools::ANSWER_TOKENS, correct: tools::correct }),
            _ => Err(crate::error::Error::Config(format!("no held-out test called “{task}” (demo or tools)"))),
        }
    }

    /// Whether each answer (in the order of `pairs`) passes the check.
    pub fn marks(&self, answers: &[String]) -> Vec<bool> {
        self.pairs.iter().zip(answers).map(|((_, e), a)| (self.correct)(a, e)).collect()
    }
}

/// Tokens (characters) the demo lets a model answer with: the longest answer,
/// `abcdef in capital letters is ABCDEF.`, is 36.
pub const ANSWER_TOKENS: usize = 48;

/// The DPO stage's held-out measures of a model: the fraction of held-out pairs whose
/// chosen completion it gives the higher log-probability, for requests with the
/// held-out brief ask and for plain ones; and its greedy answers (`answers`) to `n`
/// held-out brief requests (`held_out_requests(TEST_SEED, n, true)`) and `n` plain
/// ones, by `form`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DpoTest {
    pub prefers_brief: f64,
    pub prefers_plain: f64,
    /// Brief requests answered with exactly the bare result.
    pub bare: f64,
    /// Brief requests answered in the bare form, right or wrong.
    pub bare_form: f64,
    /// Plain requests answered in the sentence form, right or wrong.
    pub sentence_form: f64,
    /// Answers in neither form (garbled), of brief and plain requests together.
    pub garbled: f64,
    pub answers: Vec<String>,
    pub plain_answers: Vec<String>,
}

/// `DpoTest` of `model` on 64 held-out pairs and `n` held-out brief and plain requests.
pub async fn dpo_test(gpu: &Gpu, model: &Model, tok: &Tokenizer, n: usize) -> Result<DpoTest> {
    // At the DPO stage's sequence length, as it trains them.
    let seq = crate::train::RunOptions::demo_dpo(0).max_seq_len;
    let held = crate::data::load(tok, &preference_jsonl(TEST_SEED, 64, true), "held-out pairs", seq, false, false)?;
    let lp = crate::train::pair_logps(gpu, model, &held, 16, tok.pad_id).await?;
    let (mut brief, mut plain) = ((0, 0), (0, 0));
    for (i, [c, r]) in lp.iter().enumerate() {
        let k = if held.examples[2 * i].text.contains(BRIEF_HELD_OUT) { &mut brief } else { &mut plain };
        *k = (k.0 + (c > r) as usize, k.1 + 1);
    }
    let f = |(a, n): (usize, usize)| a as f64 / n.max(1) as f64;
    let ask = |brief: bool| held_out_requests(TEST_SEED, n, brief);
    let (asked, plain_asked) = (ask(true), ask(false));
    // (question, bare result) pairs, as `answers` and `accuracy` take them.
    let questions = |rs: &[Request]| rs.iter().map(|r| (r.question.clone(), apply(r.op, &r.word))).collect::<Vec<_>>();
    let (brief_qs, plain_qs) = (questions(&asked), questions(&plain_asked));
    let brief_answers = answers(gpu, model, tok, &brief_qs, ANSWER_TOKENS).await?;
    let plain_answers = answers(gpu, model, tok, &plain_qs, ANSWER_TOKENS).await?;
    let forms = |rs: &[Request], a: &[String]| rs.iter().zip(a).map(|(r, a)| form(r.op, &r.word, a)).collect::<Vec<_>>();
    let (bf, pf) = (forms(&asked, &brief_answers), forms(&plain_asked, &plain_answers));
    let share = |fs: &[Form], x: Form| fs.iter().filter(|&&g| g == x).count() as f64 / fs.len().max(1) as f64;
    Ok(DpoTest {
        prefers_brief: f(brief),
        prefers_plain: f(plain),
        bare: accuracy(&brief_answers, &brief_qs, exact),
        bare_form: share(&bf, Form::Bare),
        sentence_form: share(&pf, Form::Sentence),
        garbled: (share(&bf, Form::Other) + share(&pf, Form::Other)) / 2.0,
        answers: brief_answers,
        plain_answers,
    })
}

/// The pretrained base of the demo, made by `scripts/pretrain-demo.sh` and embedded.
const BASE: &[u8] = include_bytes!("../assets/demo-base/model.safetensors");

/// The demo's pretrained base (the embedded file; empty before it is made).
pub fn base_checkpoint() -> Result<crate::model::Checkpoint> {
    if BASE.is_empty() {
        return Err(crate::error::Error::Weights("the demo base is not built: run scripts/pretrain-demo.sh".into()));
    }
    crate::model::Checkpoint::from_bytes(BASE.to_vec(), "assets/demo-base/model.safetensors")
}
