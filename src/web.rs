//! The wasm-bindgen front end: one `Session` the page's Web Worker drives. It holds
//! the GPU, the model, the tokenizer, the data and the trainer; every method maps an
//! `Error` to a JS error at this boundary only.

use wasm_bindgen::prelude::*;

use crate::data::batch::{prepare, Dataset};
use crate::data::{parse_records, Tokenizer};
use crate::error::Error;
use crate::gpu::Gpu;
use crate::model::weights::{self, Checkpoint, TensorMap};
use crate::model::{Config, LoraConfig, Model, Tuning};
use crate::train::{Options, Trainer};

fn js(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

/// Run options sent by the page as JSON.
#[derive(serde::Deserialize)]
struct RunOptions {
    lora_rank: usize,
    lora_alpha: f32,
    #[serde(default)]
    lora_dropout: f32,
    targets: Vec<String>,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    grad_checkpoint: bool,
    #[serde(flatten)]
    opts: Options,
}

impl RunOptions {
    fn tuning(&self) -> Tuning {
        if self.full {
            Tuning::Full
        } else {
            Tuning::Lora(LoraConfig { r: self.lora_rank, alpha: self.lora_alpha, dropout: self.lora_dropout, targets: self.targets.clone(), use_rslora: false })
        }
    }
}

/// A safetensors file the page fetched or read, left in its JS array (outside the wasm
/// heap): the loader copies one tensor's rows at a time.
struct JsBytes(js_sys::Uint8Array);

impl weights::Bytes for JsBytes {
    fn len(&self) -> u64 {
        self.0.length() as u64
    }

    fn read(&self, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        Ok(self.0.subarray(offset as u32, (offset + len as u64) as u32).to_vec())
    }
}

#[wasm_bindgen]
pub struct Session {
    gpu: Gpu,
    cfg: Option<Config>,
    /// The model's safetensors files, still in the JS arrays they arrived in: only their
    /// headers are read until the model is built, a tensor at a time.
    weights: Checkpoint,
    tok: Option<Tokenizer>,
    model_name: String,
    /// The files a merged model copies: config.json, tokenizer.json, tokenizer_config.json.
    files: Vec<(String, Vec<u8>)>,
    data: Option<Dataset>,
    model: Option<Model>,
    trainer: Option<Trainer>,
}

#[wasm_bindgen]
impl Session {
    /// Request the WebGPU adapter and device.
    pub async fn create() -> Result<Session, JsError> {
        let gpu = Gpu::new().await.map_err(js)?;
        Ok(Session { gpu, cfg: None, weights: Checkpoint::new(), tok: None, model_name: String::new(), files: vec![], data: None, model: None, trainer: None })
    }

    /// The adapter, its limits and features, in one line.
    pub fn adapter(&self) -> String {
        self.gpu.describe()
    }

    /// Whether the adapter offers timestamp queries (GPU time per kernel).
    pub fn timestamps(&self) -> bool {
        self.gpu.caps.timestamps
    }

    /// The built-in demo model (character-level, generated, no download).
    pub fn load_demo_model(&mut self) -> Result<(), JsError> {
        let s = crate::model::source::open("demo", crate::demo::files(), crate::demo::base_checkpoint().map_err(js)?).map_err(js)?;
        self.model = None;
        (self.cfg, self.weights, self.tok, self.model_name, self.files) = (Some(s.cfg), s.weights, Some(s.tokenizer), "webtune-demo".into(), s.files);
        Ok(())
    }

    /// The small files a model is read from (`config.json` and `tokenizer.json` are
    /// required), for the page to pick from a folder or fetch.
    pub fn model_file_names() -> Vec<String> {
        crate::model::source::SMALL_FILES.iter().map(|f| f.to_string()).collect()
    }

    /// A Hugging Face model from its small files (`names[i]` holds `bytes[i]`; see
    /// `model_file_names`) and its safetensors files (one, or every shard), through
    /// the loader the command line uses.
    pub fn load_model(&mut self, name: &str, names: Vec<String>, bytes: Vec<js_sys::Uint8Array>, shards: Vec<js_sys::Uint8Array>) -> Result<(), JsError> {
        let files = names.into_iter().zip(bytes.iter().map(|b| b.to_vec())).collect();
        let mut w = Checkpoint::new();
        for (i, s) in shards.into_iter().enumerate() {
            w.add(&format!("{name} safetensors file {}", i + 1), Box::new(JsBytes(s))).map_err(js)?;
        }
        let s = crate::model::source::open(name, files, w).map_err(js)?;
        self.model = None;
        (self.cfg, self.weights, self.tok, self.model_name, self.files) = (Some(s.cfg), s.weights, Some(s.tokenizer), name.to_string(), s.files);
        Ok(())
    }

    /// Where the model's chat template came from, or a warning that it has none and
    /// the fallback is used (shown in the page's log).
    pub fn chat_template(&self) -> Result<String, JsError> {
        Ok(self.tok.as_ref().ok_or_else(|| JsError::new("load a model first"))?.template.describe())
    }

    /// A data file's bytes as text; bytes that are not UTF-8 are an error naming the line.
    pub fn data_text(bytes: &[u8], name: &str) -> Result<String, JsError> {
        crate::data::decode(bytes.to_vec(), name).map_err(js)
    }

    /// The demo's synthetic instruction data, as JSONL (the same as `--data demo`).
    pub fn demo_data() -> String {
        crate::demo::data()
    }

    /// Parse, validate and tokenize training data; returns a summary as JSON.
    pub fn load_data(&mut self, text: &str, name: &str, max_seq_len: usize, pack: bool) -> Result<String, JsError> {
        let tok = self.tok.as_ref().ok_or_else(|| JsError::new("load a model first"))?;
        let records = parse_records(text, name).map_err(js)?;
        let ds = prepare(tok, &records, max_seq_len, pack, false).map_err(js)?;
        let tokens: usize = ds.sequences.iter().map(|s| s.ids.len()).sum();
        let trained: usize = ds.examples.iter().map(|e| e.trained_count()).sum();
        let summary = serde_json::json!({
            "records": records.len(), "sequences": ds.sequences.len(),
            "skipped": ds.skipped.no_trained_tokens, "tokens": tokens, "trained_tokens": trained,
        });
        self.data = Some(ds);
        Ok(summary.to_string())
    }

    /// What will be trained: the first `show` records as runs of [text, trained] and
    /// the summary of the whole file (as `webtune data inspect --json`), as JSON.
    pub fn inspect(&self, text: &str, name: &str, max_seq_len: usize, pack: bool, show: usize) -> Result<String, JsError> {
        let tok = self.tok.as_ref().ok_or_else(|| JsError::new("load a model first"))?;
        let records = parse_records(text, name).map_err(js)?;
        let (_, summary) = crate::data::inspect::summarize(tok, &records, max_seq_len, pack, false).map_err(js)?;
        let mut shown = Vec::new();
        for r in records.iter().take(show) {
            let mut e = tok.example(r, false).map_err(js)?;
            crate::data::batch::truncate(&mut e, max_seq_len);
            let runs = crate::data::inspect::runs(tok, &e, false);
            shown.push(serde_json::json!({"place": e.place, "format": e.format.name(), "tokens": e.ids.len(), "trained": e.trained_count(), "truncated": e.truncated, "runs": runs}));
        }
        Ok(serde_json::json!({"records": shown, "summary": summary}).to_string())
    }

    /// Build the model with LoRA (or full tuning) and plan the run; `options` is JSON
    /// with lora_rank, lora_alpha, lora_dropout, targets, full, grad_checkpoint and the
    /// training options (lr, schedule, warmup, batch_size, grad_accum, epochs, steps, seed, ...).
    pub fn start(&mut self, options: &str) -> Result<f64, JsError> {
        let o: RunOptions = serde_json::from_str(options).map_err(|e| JsError::new(&format!("options: {e}")))?;
        let cfg = self.cfg.clone().ok_or_else(|| JsError::new("load a model first"))?;
        let data = self.data.as_ref().ok_or_else(|| JsError::new("load data first"))?;
        let tok = self.tok.as_ref().expect("with the model");
        let tuning = o.tuning();
        self.model = None;
        let mut model = Model::load(&self.gpu, cfg, &self.weights, tuning, o.opts.seed).map_err(js)?;
        model.grad_checkpoint = o.grad_checkpoint;
        let trainer = Trainer::new(o.opts, data, tok.pad_id).map_err(js)?;
        let total = trainer.total_steps();
        (self.model, self.trainer) = (Some(model), Some(trainer));
        Ok(total as f64)
    }

    // Counts are f64 on the JS side (a u64 would arrive as a BigInt).
    pub fn step_count(&self) -> f64 {
        self.trainer.as_ref().map_or(0, |t| t.step) as f64
    }

    pub fn total_steps(&self) -> f64 {
        self.trainer.as_ref().map_or(0, |t| t.total_steps()) as f64
    }

    /// One optimizer step; returns its statistics as JSON.
    pub async fn step(&mut self) -> Result<String, JsError> {
        let (Some(model), Some(trainer), Some(data)) = (&self.model, &mut self.trainer, &self.data) else {
            return Err(JsError::new("start a run first"));
        };
        let s = trainer.step(&self.gpu, model, data).await.map_err(js)?;
        Ok(serde_json::to_string(&s).expect("serialisable"))
    }

    /// Time every kernel of the following steps with timestamp queries (or stop).
    /// Returns false where the adapter has no `timestamp-query`.
    pub fn set_profiling(&self, on: bool) -> bool {
        self.gpu.set_profiling(on)
    }

    /// GPU time per kernel of what ran while profiling, as JSON `[{kernel, calls, ms}]`,
    /// slowest first.
    pub async fn kernel_times(&self) -> Result<String, JsError> {
        let times = self.gpu.kernel_times().await.map_err(js)?;
        Ok(serde_json::to_string(&times).expect("serialisable"))
    }

    /// Answer `prompt` as a user turn (chat template), greedily, with or without the adapter.
    pub async fn generate(&mut self, prompt: &str, max_new: usize, adapter: bool) -> Result<String, JsError> {
        let mut out = self.answers(&[(prompt.to_string(), String::new())], max_new, adapter).await?;
        Ok(out.remove(0))
    }

    /// The demo's held-out test, the first `n` of the requests `webtune` asks (phrasings
    /// and words never trained on): greedy answers with or without the adapter, as
    /// JSON `{accuracy, answers: [{question, expected, answer}]}`.
    pub async fn demo_test(&mut self, n: usize, adapter: bool) -> Result<String, JsError> {
        let held = crate::demo::held_out(crate::demo::TEST_SEED, n);
        let out = self.answers(&held, crate::demo::ANSWER_TOKENS, adapter).await?;
        let rows: Vec<_> = held.iter().zip(&out).map(|((q, e), a)| serde_json::json!({"question": q, "expected": e, "answer": a})).collect();
        Ok(serde_json::json!({"accuracy": crate::demo::accuracy(&out, &held), "answers": rows}).to_string())
    }

    /// The PEFT adapter: `{config: string, weights: Uint8Array}` (adapter_config.json
    /// and adapter_model.safetensors).
    pub async fn adapter_files(&self) -> Result<js_sys::Object, JsError> {
        let model = self.model.as_ref().ok_or_else(|| JsError::new("nothing trained yet"))?;
        let Tuning::Lora(l) = &model.tuning else { return Err(JsError::new("full fine-tuning has no adapter; download the model")) };
        let tensors = crate::train::checkpoint::trained_tensors(&self.gpu, model).await.map_err(js)?;
        let obj = js_sys::Object::new();
        js_sys::Reflect::set(&obj, &"config".into(), &crate::peft::config_json(l, &self.model_name).into()).ok();
        let bytes = weights::serialize(&tensors, None).map_err(js)?;
        js_sys::Reflect::set(&obj, &"weights".into(), &js_sys::Uint8Array::from(&bytes[..]).into()).ok();
        Ok(obj)
    }

    /// The base model with the adapter merged in (stored in the base's dtype), or the
    /// fully tuned weights (f32): an array of `[file name, Uint8Array]` pairs
    /// (config.json, model.safetensors, the tokenizer files).
    pub async fn merged_model_files(&self) -> Result<js_sys::Array, JsError> {
        let model = self.model.as_ref().ok_or_else(|| JsError::new("nothing trained yet"))?;
        let trained = crate::train::checkpoint::trained_tensors(&self.gpu, model).await.map_err(js)?;
        let (merged, dtype) = match &model.tuning {
            Tuning::Lora(l) => {
                let mut w = weights::to_map(&self.weights).map_err(js)?;
                crate::peft::merge_into(&mut w, &trained, l, "adapter").map_err(js)?;
                (w, self.weights.weights_dtype())
            }
            _ => (trained, safetensors::Dtype::F32),
        };
        let out = js_sys::Array::new();
        let push = |name: &str, bytes: &[u8]| {
            out.push(&js_sys::Array::of2(&name.into(), &js_sys::Uint8Array::from(bytes).into()));
        };
        for (name, bytes) in crate::peft::model_files(&self.files, &merged, dtype).map_err(js)? {
            push(&name, &bytes);
        }
        Ok(out)
    }

    /// The GPU memory a training step of this run needs, estimated from the config
    /// (MiB), to show before training and to warn when it will not fit.
    pub fn memory_estimate(&self, options: &str) -> Result<String, JsError> {
        let o: RunOptions = serde_json::from_str(options).map_err(|e| JsError::new(&format!("options: {e}")))?;
        let cfg = self.cfg.as_ref().ok_or_else(|| JsError::new("load a model first"))?;
        let tuning = o.tuning();
        let seq = self.data.as_ref().map_or(512, |d| d.sequences.iter().map(|s| s.ids.len()).max().unwrap_or(1));
        let plan = crate::model::memory::Plan {
            tuning,
            batch: o.opts.batch_size,
            seq,
            grad_checkpoint: o.grad_checkpoint,
            f16_weights: self.gpu.caps.shader_f16,
            max_binding: self.gpu.caps.max_binding,
        };
        let m = crate::model::memory::estimate(cfg, &plan);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        Ok(serde_json::json!({"weights": mib(m.weights), "training_state": mib(m.training_state), "activations": mib(m.activations), "total": mib(m.total())}).to_string())
    }

    /// Teaching view: one training record's tokens with the loss of each trained one,
    /// as JSON `[[text, loss or null], ...]` (null: masked, not trained).
    pub async fn token_losses(&mut self, index: usize) -> Result<String, JsError> {
        self.ensure_model()?;
        let (Some(model), Some(data), Some(tok)) = (&self.model, &self.data, &self.tok) else { return Err(JsError::new("load a model and data first")) };
        let e = data.examples.get(index).ok_or_else(|| JsError::new("no such record"))?;
        let b = crate::data::batch::Batch::new(&[&crate::data::batch::Sequence::from_example(e)], tok.pad_id);
        let inp = crate::model::Inputs::new(&self.gpu, crate::model::Shape { b: 1, t: b.t }, &b.ids, &b.pos, &b.seg).map_err(js)?;
        let losses = model.token_losses(&self.gpu, &inp, &b.targets).await.map_err(js)?;
        // The loss at row i is that of predicting token i + 1.
        let runs = crate::data::inspect::runs(tok, e, true);
        let out: Vec<serde_json::Value> = runs
            .iter()
            .enumerate()
            .map(|(i, (text, _))| serde_json::json!([text, if i == 0 { None } else { losses[i - 1] }]))
            .collect();
        Ok(serde_json::Value::Array(out).to_string())
    }

    /// Teaching view: attention probabilities of `layer`/`head` on `prompt` (as a user
    /// turn), as JSON `{tokens: [...], weights: [T×T]}`.
    pub async fn attention_map(&mut self, prompt: &str, layer: usize, head: usize) -> Result<String, JsError> {
        self.ensure_model()?;
        let (Some(model), Some(tok)) = (&self.model, &self.tok) else { return Err(JsError::new("load a model first")) };
        let ids = tok.prompt_ids(prompt, true).map_err(js)?;
        let inp = crate::model::Inputs::sequences(&self.gpu, crate::model::Shape { b: 1, t: ids.len() }, &ids).map_err(js)?;
        let w = model.attention_map(&self.gpu, &inp, layer, head).await.map_err(js)?;
        let tokens: Vec<String> = ids.iter().map(|&i| tok.decode_with_special(&[i])).collect();
        Ok(serde_json::json!({"tokens": tokens, "weights": w, "layers": model.cfg.layers, "heads": model.cfg.heads}).to_string())
    }

    /// Teaching view: the gradient norm of each layer after the last step, as JSON.
    pub async fn layer_grad_norms(&self) -> Result<String, JsError> {
        let model = self.model.as_ref().ok_or_else(|| JsError::new("train first"))?;
        Ok(serde_json::to_string(&model.layer_grad_norms(&self.gpu).await.map_err(js)?).expect("json"))
    }

    /// Greedy answers to `questions` (user turns), with or without the adapter; the
    /// adapter is on again afterwards.
    async fn answers(&mut self, questions: &[(String, String)], max_new: usize, adapter: bool) -> Result<Vec<String>, JsError> {
        self.ensure_model()?;
        let tok = self.tok.as_ref().ok_or_else(|| JsError::new("load a model first"))?;
        let model = self.model.as_mut().expect("just set");
        model.adapter_enabled = adapter;
        let out = crate::demo::answers(&self.gpu, model, tok, questions, max_new).await;
        model.adapter_enabled = true;
        out.map_err(js)
    }

    fn ensure_model(&mut self) -> Result<(), JsError> {
        if self.model.is_none() {
            let cfg = self.cfg.clone().ok_or_else(|| JsError::new("load a model first"))?;
            self.model = Some(Model::load(&self.gpu, cfg, &self.weights, Tuning::Frozen, 0).map_err(js)?);
        }
        Ok(())
    }

    /// A checkpoint of the run in one safetensors file (values, moments; the step in
    /// its metadata), for the page to keep in the Origin Private File System.
    pub async fn checkpoint(&self) -> Result<js_sys::Uint8Array, JsError> {
        let (Some(model), Some(trainer)) = (&self.model, &self.trainer) else { return Err(JsError::new("nothing to save")) };
        let t = crate::train::checkpoint::read_state(&self.gpu, model, true).await.map_err(js)?;
        let meta = std::collections::HashMap::from([("step".to_string(), trainer.step.to_string())]);
        Ok(js_sys::Uint8Array::from(&weights::serialize(&t, Some(meta)).map_err(js)?[..]))
    }

    /// Continue from a `checkpoint()` of a run started with the same options.
    pub fn resume(&mut self, bytes: &[u8]) -> Result<f64, JsError> {
        let (Some(model), Some(trainer)) = (&self.model, &mut self.trainer) else { return Err(JsError::new("start the run first")) };
        let st = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| JsError::new(&e.to_string()))?;
        let step: u64 = st.1.metadata().as_ref().and_then(|m| m.get("step")).and_then(|s| s.parse().ok()).ok_or_else(|| JsError::new("checkpoint has no step"))?;
        let mut t = TensorMap::new();
        weights::parse(bytes, "checkpoint", &mut t).map_err(js)?;
        crate::train::checkpoint::write_state(&self.gpu, model, &t, true, "checkpoint").map_err(js)?;
        trainer.step = step;
        Ok(step as f64)
    }

    /// Bytes the model holds on the GPU (weights, trainable state).
    pub fn resident_bytes(&self) -> f64 {
        self.model.as_ref().map_or(0.0, |m| m.resident_bytes() as f64)
    }
}
