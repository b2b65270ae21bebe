//! The wasm-bindgen front end: one `Session` the page's Web Worker drives, a thin shim
//! over the library. It holds the GPU, the model source, the data and the `Run` (the
//! loop the command line drives too); values cross the boundary through serde
//! (`serde-wasm-bindgen`), and `Error`s become JS errors here only.

use std::rc::Rc;

use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::data::batch::Dataset;
use crate::data::{parse_records, Tokenizer};
use crate::error::Error;
use crate::gpu::Gpu;
use crate::model::source::Source;
use crate::model::weights::{self, Checkpoint};
use crate::model::{Model, Tuning};
use crate::train::export::Export;
use crate::train::{Run, RunOptions};

fn js(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

/// A Rust value as a plain JS value (objects, not Maps; u64 as numbers).
fn out<T: Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(|e| JsError::new(&e.to_string()))
}

/// The page's options, checked as the command line's are (`RunOptions::check`).
fn run_options(v: JsValue) -> Result<RunOptions, JsError> {
    let o: RunOptions = serde_wasm_bindgen::from_value(v).map_err(|e| JsError::new(&format!("options: {e}")))?;
    o.check().map_err(js)?;
    Ok(o)
}

/// The page keeps a checkpoint in its Origin Private File System this often.
const PAGE_SAVE_EVERY: u64 = 10;

/// A weights file the page fetched or read, as a `Blob`: one from disk, or the copy in
/// this browser's Cache Storage. The browser keeps its bytes (on disk, or in its own
/// process), not the tab: the loader reads one tensor's rows at a time, synchronously
/// (`FileReaderSync`, in the worker), so the tab holds a model's bytes at most once
/// and only a tensor's worth at a time.
struct JsBlob {
    blob: web_sys::Blob,
    name: String,
}

impl weights::Bytes for JsBlob {
    fn len(&self) -> u64 {
        self.blob.size() as u64
    }

    fn read(&self, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        let fail = |e: JsValue| crate::error::Error::Io(format!("{}: reading {len} bytes at {offset}: {}", self.name, js_message(&e)));
        let part = self.blob.slice_with_f64_and_f64(offset as f64, (offset + len as u64) as f64).map_err(fail)?;
        let buf = web_sys::FileReaderSync::new().map_err(fail)?.read_as_array_buffer(&part).map_err(fail)?;
        let bytes = js_sys::Uint8Array::new(&buf).to_vec();
        if bytes.len() != len {
            return Err(crate::error::Error::Io(format!("{}: read {} of {len} bytes at {offset} (the file changed or was removed)", self.name, bytes.len())));
        }
        Ok(bytes)
    }
}

/// A thrown JS value as text (an Error's message).
fn js_message(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| e.as_string()).unwrap_or_else(|| "unknown error".into())
}

/// Named files as a JS array of `[name, Uint8Array]` pairs.
fn file_array(files: &[(String, Vec<u8>)]) -> js_sys::Array {
    let out = js_sys::Array::new();
    for (name, bytes) in files {
        out.push(&js_sys::Array::of2(&name.into(), &js_sys::Uint8Array::from(&bytes[..]).into()));
    }
    out
}

#[wasm_bindgen]
pub struct Session {
    gpu: Gpu,
    source: Option<Rc<Source>>,
    data: Option<Rc<Dataset>>,
    /// The run, once started.
    run: Option<Run>,
    /// The base model without an adapter, for the teaching views before a run.
    frozen: Option<Model>,
}

#[wasm_bindgen]
impl Session {
    /// Request the WebGPU adapter and device.
    pub async fn create() -> Result<Session, JsError> {
        let gpu = Gpu::new().await.map_err(js)?;
        Ok(Session { gpu, source: None, data: None, run: None, frozen: None })
    }

    /// The adapter, its limits and features, in one line.
    pub fn adapter(&self) -> String {
        self.gpu.describe()
    }

    /// Whether the adapter offers timestamp queries (GPU time per kernel).
    pub fn timestamps(&self) -> bool {
        self.gpu.caps.timestamps
    }

    /// The run options the page starts from: `{default, demo, demo_dpo, tools}`
    /// (`RunOptions`; `tools`: the real-model demo's, `webtune demo --model`), with a
    /// checkpoint kept every `PAGE_SAVE_EVERY` steps.
    pub fn presets() -> Result<JsValue, JsError> {
        let page = |o: RunOptions| RunOptions { save_every: Some(PAGE_SAVE_EVERY), ..o };
        out(&serde_json::json!({
            "default": page(RunOptions::default()),
            "demo": page(RunOptions::demo(300)),
            "demo_dpo": page(RunOptions::demo_dpo(60)),
            "tools": page(RunOptions::tools(crate::data::tools::STEPS)),
            "targets": crate::model::LoraConfig::ALL_TARGETS,
        }))
    }

    fn set_source(&mut self, s: Source) {
        (self.source, self.run, self.frozen) = (Some(Rc::new(s)), None, None);
        // Cached bind groups would keep the old model's buffers alive.
        self.gpu.trim();
    }

    /// The built-in demo model (character-level, generated, no download).
    pub fn load_demo_model(&mut self) -> Result<(), JsError> {
        let s = crate::model::source::open("webtune-demo", crate::demo::files(), crate::demo::base_checkpoint().map_err(js)?).map_err(js)?;
        self.set_source(s);
        Ok(())
    }

    /// A Hugging Face repo id, `org/name[@revision][:file]`, as `{repo, revision, file}`
    /// (`crate::hub::RepoRef`, the grammar the command line reads), or null.
    pub fn repo_id(source: &str) -> Result<JsValue, JsError> {
        match crate::hub::RepoRef::parse(source) {
            Some(r) => out(&r),
            None => Ok(JsValue::NULL),
        }
    }

    /// The small files a model is read from (`config.json` and `tokenizer.json` are
    /// required), for the page to pick from a folder or fetch.
    pub fn model_file_names() -> Vec<String> {
        crate::model::source::SMALL_FILES.iter().map(|f| f.to_string()).collect()
    }

    /// A Hugging Face model from its small files (`names[i]` holds `bytes[i]`; see
    /// `model_file_names`) and its safetensors files (one, or every shard), through
    /// the loader the command line uses.
    pub fn load_model(&mut self, name: &str, names: Vec<String>, bytes: Vec<js_sys::Uint8Array>, shards: Vec<web_sys::Blob>) -> Result<(), JsError> {
        let files = names.into_iter().zip(bytes.iter().map(|b| b.to_vec())).collect();
        let mut w = Checkpoint::new();
        for (i, blob) in shards.into_iter().enumerate() {
            let file = format!("{name} safetensors file {}", i + 1);
            w.add(&file, Box::new(JsBlob { blob, name: file.clone() })).map_err(js)?;
        }
        let s = crate::model::source::open(name, files, w).map_err(js)?;
        self.set_source(s);
        Ok(())
    }

    /// A GGUF file the page fetched or read, as a Blob (see `JsBlob`): config, tokenizer
    /// and chat template come from its metadata, tensors are dequantized as they load.
    pub fn load_gguf(&mut self, name: &str, blob: web_sys::Blob) -> Result<(), JsError> {
        let s = crate::model::source::open_gguf(name, Box::new(JsBlob { blob, name: name.to_string() })).map_err(js)?;
        self.set_source(s);
        Ok(())
    }

    fn source(&self) -> Result<&Rc<Source>, JsError> {
        self.source.as_ref().ok_or_else(|| JsError::new("load a model first"))
    }

    fn tok(&self) -> Result<&Tokenizer, JsError> {
        Ok(&self.source()?.tokenizer)
    }

    /// Where the model's chat template came from, or a warning that it has none and
    /// the fallback is used (shown in the page's log).
    pub fn chat_template(&self) -> Result<String, JsError> {
        Ok(self.tok()?.template.describe())
    }

    /// The text of the data called `name` (`crate::data::text`, as the CLI reads it):
    /// a built-in set by its name (`demo`, `demo-dpo`), else the uploaded `bytes`, which
    /// must be UTF-8 (an error names the line).
    pub fn data_text(name: &str, bytes: Option<Vec<u8>>) -> Result<String, JsError> {
        crate::data::text(name, || bytes.ok_or_else(|| crate::error::Error::Data(format!("{name}: no such built-in data set, and no file given")))).map_err(js)
    }

    /// Parse, validate and tokenize training data; returns `{records, sequences,
    /// skipped, tokens, trained_tokens}`.
    pub fn load_data(&mut self, text: &str, name: &str, max_seq_len: usize, pack: bool) -> Result<JsValue, JsError> {
        let ds = crate::data::load(self.tok()?, text, name, max_seq_len, pack, false).map_err(js)?;
        let tokens: usize = ds.sequences.iter().map(|s| s.ids.len()).sum();
        let trained: usize = ds.examples.iter().map(|e| e.trained_count()).sum();
        let summary = serde_json::json!({
            "records": ds.records, "sequences": ds.sequences.len(),
            "skipped": ds.skipped.no_trained_tokens, "tokens": tokens, "trained_tokens": trained,
            "pairs": if ds.pairs { Some(ds.items()) } else { None },
        });
        self.data = Some(Rc::new(ds));
        out(&summary)
    }

    /// What will be trained: the first `show` records as runs of [text, trained] and
    /// the summary of the whole file (as `webtune data inspect --json`).
    pub fn inspect(&self, text: &str, name: &str, max_seq_len: usize, pack: bool, show: usize) -> Result<JsValue, JsError> {
        let tok = self.tok()?;
        let records = parse_records(text, name).map_err(js)?;
        let (_, summary) = crate::data::inspect::summarize(tok, &records, max_seq_len, pack, false).map_err(js)?;
        let mut shown = Vec::new();
        for r in records.iter().take(show) {
            // A preference pair shows as its chosen and rejected sequences, side by side.
            let sides: Vec<serde_json::Value> = crate::data::inspect::record_examples(tok, r, max_seq_len, false)
                .map_err(js)?
                .into_iter()
                .map(|(side, e)| {
                    let runs = crate::data::inspect::runs(tok, &e, false);
                    serde_json::json!({"side": side, "place": e.place, "format": e.format.name(), "tokens": e.ids.len(), "trained": e.trained_count(), "truncated": e.truncated, "runs": runs})
                })
                .collect();
            shown.push(if sides.len() == 1 { sides[0].clone() } else { serde_json::json!({"place": r.place, "format": r.format.name(), "pair": sides}) });
        }
        out(&serde_json::json!({"records": shown, "summary": summary}))
    }

    /// Start a run (`RunOptions`): load the model with its adapter and plan the
    /// steps; returns how many. Step 3 and every 25th are timed kernel by kernel.
    pub async fn start(&mut self, options: JsValue) -> Result<f64, JsError> {
        let o = run_options(options)?;
        let source = self.source()?.clone();
        let data = self.data.clone().ok_or_else(|| JsError::new("load data first"))?;
        (self.run, self.frozen) = (None, None);
        self.gpu.trim();
        let mut run = Run::new_async(&self.gpu, source, data, None, o).await.map_err(js)?;
        run.profile_every = Some(25);
        let total = run.total_steps();
        self.run = Some(run);
        Ok(total as f64)
    }

    /// Start a run (`RunOptions`, e.g. DPO) from the adapter the current run trained,
    /// keeping its LoRA shape; returns the planned steps.
    pub async fn start_continued(&mut self, options: JsValue) -> Result<f64, JsError> {
        let o = run_options(options)?;
        let data = self.data.clone().ok_or_else(|| JsError::new("load data first"))?;
        let prev = self.run.as_ref().ok_or_else(|| JsError::new("train a run first: there is no adapter to continue from"))?;
        let mut run = prev.continued(&self.gpu, data, o).await.map_err(js)?;
        self.run = None;
        self.gpu.trim();
        run.profile_every = Some(25);
        let total = run.total_steps();
        self.run = Some(run);
        Ok(total as f64)
    }

    fn run(&self) -> Result<&Run, JsError> {
        self.run.as_ref().ok_or_else(|| JsError::new("start a run first"))
    }

    /// What the run's adapter changed, per layer and projection (`model::change`):
    /// `[{layer, projection, delta, weight, relative}]`, relative = ‖s·B·A‖ / ‖W‖.
    pub async fn lora_change(&self) -> Result<JsValue, JsError> {
        let run = self.run()?;
        let changes = crate::model::change::lora_change(&self.gpu, &run.model, &run.source.weights).await.map_err(js)?;
        out(&changes)
    }

    /// For `prompt` (a user turn with the chat template) and the tuned model's greedy
    /// answer (up to 24 tokens), the base's and the tuned model's top `k` next tokens at
    /// each answer token: `[{token, text, base: [[text, p]…], tuned: [[text, p]…]}]`.
    pub async fn next_token_top(&mut self, prompt: &str, k: usize) -> Result<JsValue, JsError> {
        let run = self.run.as_mut().ok_or_else(|| JsError::new("start a run first"))?;
        let tok = &run.source.tokenizer;
        let (ids, from) = crate::model::change::prompt_and_answer(&self.gpu, &run.model, tok, prompt, None).await.map_err(js)?;
        let positions = crate::model::change::next_token_top(&self.gpu, &mut run.model, &ids, from, k).await.map_err(js)?;
        let text = |t: u32| tok.decode_with_special(&[t]);
        let list = |c: &[(u32, f32)]| c.iter().map(|&(t, p)| serde_json::json!([text(t), p])).collect::<Vec<_>>();
        let rows: Vec<serde_json::Value> =
            positions.iter().map(|c| serde_json::json!({"token": c.token, "text": text(c.token), "base": list(&c.base), "tuned": list(&c.tuned)})).collect();
        out(&rows)
    }

    /// Why the GPU device was lost, once it is (the page then starts a new `Session`
    /// and continues from the last checkpoint).
    pub fn device_lost(&self) -> Option<String> {
        self.gpu.lost()
    }

    /// Test hook (`?test-lose-device-at=N`): lose the GPU device now.
    pub fn lose_device(&self) {
        self.gpu.lose_device();
    }

    /// Test hook (`?test-oom-at=N`): the next GPU allocation fails as out-of-memory.
    pub fn fail_next_allocation(&self) {
        self.gpu.fail_next_allocation();
    }

    // Counts are f64 on the JS side (a u64 would arrive as a BigInt).
    pub fn step_count(&self) -> f64 {
        self.run.as_ref().map_or(0, |r| r.trainer.step) as f64
    }

    pub fn total_steps(&self) -> f64 {
        self.run.as_ref().map_or(0, |r| r.total_steps()) as f64
    }

    /// What the run's plan changed from the options given (micro-batches, gradient
    /// checkpointing), and why; None when it runs them as given.
    pub fn plan_note(&self) -> Option<String> {
        self.run.as_ref().and_then(|r| r.plan_note.clone())
    }

    /// The run's next step: its `Event` (stats, kernels where profiled, whether a
    /// checkpoint is due, whether the run is done). A loss that is not finite throws.
    pub async fn step(&mut self) -> Result<JsValue, JsError> {
        let run = self.run.as_mut().ok_or_else(|| JsError::new("start a run first"))?;
        let e = run.next(&self.gpu).await.map_err(js)?;
        out(&e)
    }

    /// The run's files (`Export`): `output` (the PEFT adapter, or the fully tuned
    /// model), `checkpoint` (all a resume needs), `merged` (the base with the adapter
    /// merged in, in the base's dtype), `merged-gguf-{f16,q8_0,f32}` (the same as one
    /// GGUF) or `lora-gguf` (a llama.cpp LoRA adapter), as `[name, Uint8Array]` pairs.
    ///
    /// `run-trl`: the run handed over to TRL + accelerate (`webtune export-run`'s files,
    /// `train::handover`) as one ZIP archive.
    pub async fn files(&self, what: &str) -> Result<js_sys::Array, JsError> {
        if what == "run-trl" {
            let zip = crate::train::export::zip(&self.run()?.handover().map_err(js)?).map_err(js)?;
            return Ok(file_array(&[("webtune-run.zip".to_string(), zip)]));
        }
        let what: Export = what.parse().map_err(|e: String| JsError::new(&e))?;
        let files = self.run()?.files(&self.gpu, what).await.map_err(js)?;
        Ok(file_array(&files))
    }

    /// The page kept a checkpoint of the current step at `place`.
    pub fn saved(&mut self, place: String) {
        if let Some(r) = self.run.as_mut() {
            r.saved(place);
        }
    }

    /// Continue from a `files('checkpoint')` of a run started with the same options
    /// (more steps allowed; `names[i]` holds `bytes[i]`): `{step, total, note}`.
    pub fn resume(&mut self, names: Vec<String>, bytes: Vec<js_sys::Uint8Array>) -> Result<JsValue, JsError> {
        let run = self.run.as_mut().ok_or_else(|| JsError::new("start the run first"))?;
        let get = |f: &str| -> crate::error::Result<Vec<u8>> {
            let i = names.iter().position(|n| n == f).ok_or_else(|| Error::Io(format!("the saved checkpoint has no {f}")))?;
            Ok(bytes[i].to_vec())
        };
        out(&run.resume(&self.gpu, &get, "the saved checkpoint").map_err(js)?)
    }

    /// The GPU memory a training step of this run needs, estimated from the config
    /// (MiB), to show before training and to warn when it will not fit. `continued`: the
    /// run continues the adapter just trained (`start_continued`), which DPO keeps as
    /// its reference (`Plan::reference_adapter`).
    pub fn memory_estimate(&self, options: JsValue, continued: bool) -> Result<JsValue, JsError> {
        let o = run_options(options)?;
        let source = self.source()?;
        let cfg = &source.cfg;
        let seq = self.data.as_ref().map_or(512 * o.row_sides(), |d| d.longest_row());
        let mut plan = o.memory_plan(cfg, &source.weights, seq, self.gpu.caps.shader_f16, self.gpu.caps.max_binding, self.gpu.caps.variant == crate::gpu::Variant::Tiled).map_err(js)?;
        plan.reference_adapter = continued && o.references_its_adapter();
        let m = crate::model::memory::estimate(cfg, &plan);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        out(&serde_json::json!({"weights": mib(m.weights), "training_state": mib(m.training_state), "activations": mib(m.activations), "total": mib(m.total())}))
    }

    /// Answer `prompt` as a user turn (chat template), greedily, with or without the adapter.
    pub async fn generate(&mut self, prompt: &str, max_new: usize, adapter: bool) -> Result<String, JsError> {
        let mut out = self.answers(&[(prompt.to_string(), String::new())], max_new, adapter).await?;
        Ok(out.remove(0))
    }

    /// Whether the run keeps the adapter it started from (a DPO run continuing a trained
    /// adapter, resumed too), so `answers_start` can answer with it.
    pub fn keeps_starting_adapter(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.keeps_starting_adapter())
    }

    /// Answer each of `prompts` greedily (one at a time, as `generate` does) with the
    /// adapter the run started from (`keeps_starting_adapter`), swapped in for the
    /// trained one once and back: after a reload, the answers "before" a continued DPO run.
    pub async fn answers_start(&mut self, prompts: Vec<String>, max_new: usize) -> Result<Vec<String>, JsError> {
        let run = self.run.as_mut().ok_or_else(|| JsError::new("start the run first"))?;
        run.swap_starting_adapter(&self.gpu).map_err(js)?;
        let (gpu, model, tok) = (&self.gpu, &run.model, &run.source.tokenizer);
        let answers = async {
            let mut out = Vec::with_capacity(prompts.len());
            for p in prompts {
                out.push(crate::demo::answers(gpu, model, tok, &[(p, String::new())], max_new).await?.remove(0));
            }
            Ok::<_, Error>(out)
        }
        .await;
        run.swap_starting_adapter(&self.gpu).map_err(js)?;
        answers.map_err(js)
    }

    /// A demo's held-out test, the first `n` of the requests `webtune` asks: for `task`
    /// `demo`, the built-in demo's (phrasings and words never trained on, exact
    /// answers); for `tools`, the real-model demo's (`webtune demo --model`: phrasings
    /// and arguments never trained on, tool calls checked field by field). Greedy
    /// answers with or without the adapter, as `{accuracy, answers: [{question,
    /// expected, answer, right}]}`.
    /// After a DPO run, `dpo` holds the DPO stage's held-out measures too
    /// (`demo::DpoTest`: pairs preferring the chosen answer, brief requests answered with
    /// the bare result, on `n` of them).
    pub async fn demo_test(&mut self, task: &str, n: usize, adapter: bool) -> Result<JsValue, JsError> {
        let test = crate::demo::HeldOutTest::named(task, n).map_err(js)?;
        let answers = self.answers(&test.pairs, test.answer_tokens, adapter).await?;
        let marks = test.marks(&answers);
        let rows: Vec<_> = test.pairs.iter().zip(&answers).zip(&marks).map(|(((q, e), a), right)| serde_json::json!({"question": q, "expected": e, "answer": a, "right": right})).collect();
        let mut result = serde_json::json!({"accuracy": crate::demo::share(&marks), "answers": rows});
        if let Some(run) = self.run.as_mut().filter(|r| task == "demo" && r.opts.train.method == "dpo") {
            run.model.adapter_enabled = adapter;
            let test = crate::demo::dpo_test(&self.gpu, &run.model, &run.source.tokenizer, n).await;
            run.model.adapter_enabled = true;
            result["dpo"] = serde_json::to_value(test.map_err(js)?).map_err(|e| JsError::new(&e.to_string()))?;
        }
        out(&result)
    }

    /// Teaching view: one training record's tokens with the loss of each trained one,
    /// as `[[text, loss or null], ...]` (null: masked, not trained).
    pub async fn token_losses(&mut self, index: usize) -> Result<JsValue, JsError> {
        let data = self.data.clone().ok_or_else(|| JsError::new("load data first"))?;
        let e = data.examples.get(index).ok_or_else(|| JsError::new("no such record"))?;
        let tok = self.tok()?;
        let b = crate::data::batch::Batch::new(&[&crate::data::batch::Sequence::from_example(e)], tok.pad_id);
        let inp = crate::model::Inputs::new(&self.gpu, crate::model::Shape { b: 1, t: b.t }, &b.ids, &b.pos, &b.seg).map_err(js)?;
        self.model()?;
        let losses = self.loaded().token_losses(&self.gpu, &inp, &b.targets).await.map_err(js)?;
        // The loss at row i is that of predicting token i + 1.
        let runs = crate::data::inspect::runs(self.tok()?, e, true);
        let rows: Vec<(String, Option<f32>)> = runs.into_iter().enumerate().map(|(i, (text, _))| (text, if i == 0 { None } else { losses[i - 1] })).collect();
        out(&rows)
    }

    /// Teaching view: attention probabilities of `layer`/`head` on `prompt` (as a user
    /// turn), as `{tokens: [...], weights: [T×T], layers, heads}`.
    pub async fn attention_map(&mut self, prompt: &str, layer: usize, head: usize) -> Result<JsValue, JsError> {
        let tok = self.tok()?;
        let ids = tok.prompt_ids(prompt, true).map_err(js)?;
        let inp = crate::model::Inputs::sequences(&self.gpu, crate::model::Shape { b: 1, t: ids.len() }, &ids).map_err(js)?;
        self.model()?;
        let model = self.loaded();
        let w = model.attention_map(&self.gpu, &inp, layer, head).await.map_err(js)?;
        let tokens: Vec<String> = ids.iter().map(|&i| self.tok().expect("loaded").decode_with_special(&[i])).collect();
        out(&serde_json::json!({"tokens": tokens, "weights": w, "layers": model.cfg.layers, "heads": model.cfg.heads}))
    }

    /// Teaching view: the gradient norm of each layer after the last step.
    pub async fn layer_grad_norms(&self) -> Result<JsValue, JsError> {
        out(&self.run()?.model.layer_grad_norms(&self.gpu).await.map_err(js)?)
    }

    /// Bytes the model holds on the GPU (weights, trainable state).
    pub fn resident_bytes(&self) -> f64 {
        self.run.as_ref().map(|r| &r.model).or(self.frozen.as_ref()).map_or(0.0, |m| m.resident_bytes() as f64)
    }

    /// The run's model, or the base without an adapter before a run (loaded once).
    fn model(&mut self) -> Result<&Model, JsError> {
        if self.run.is_none() && self.frozen.is_none() {
            let s = self.source()?;
            self.frozen = Some(Model::load(&self.gpu, s.cfg.clone(), &s.weights, Tuning::Frozen, 0).map_err(js)?);
        }
        Ok(self.loaded())
    }

    /// The model `model()` made sure of.
    fn loaded(&self) -> &Model {
        self.run.as_ref().map(|r| &r.model).or(self.frozen.as_ref()).expect("loaded by model()")
    }

    /// Greedy answers to `questions` (user turns), with or without the adapter; the
    /// adapter is on again afterwards.
    async fn answers(&mut self, questions: &[(String, String)], max_new: usize, adapter: bool) -> Result<Vec<String>, JsError> {
        self.model()?;
        let tok = &self.source.as_ref().expect("a model").tokenizer;
        let model = match self.run.as_mut() {
            Some(r) => &mut r.model,
            None => self.frozen.as_mut().expect("loaded by model()"),
        };
        model.adapter_enabled = adapter;
        let answers = crate::demo::answers(&self.gpu, model, tok, questions, max_new).await;
        model.adapter_enabled = true;
        answers.map_err(js)
    }
}
