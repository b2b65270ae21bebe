//! One training run, whoever drives it: `webtune train`, the demo and the page's
//! worker all build a `Run` and call `next` until it says `done`. The run owns the
//! model, the data, the trainer (plan, schedule), evaluation with sample replies, the
//! checkpoint cadence, the NaN stop and kernel profiling; the front end only shows
//! the event and saves the files it is told are due.

use std::rc::Rc;

use super::checkpoint::{self, TrainerState};
use super::export::{self, Export, Files};
use super::fit;
use super::{evaluate, evaluate_pairs, pair_logps, Options, StepStats, Trainer};
use crate::data::batch::Dataset;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, KernelTime, Tensor};
use crate::model::generate::Sampling;
use crate::model::source::Source;
use crate::model::weights::TensorMap;
use crate::model::{Frozen, LoraConfig, Model, Tuning};

/// What a run trains and how: the adapter (or full tuning), the data's shape, the
/// cadence of evaluation and checkpoints, and the step options. Defaults are written
/// once, in `Default`; `webtune train` flattens this into its flags and the page gets
/// the defaults and the demo's preset from `Session::presets`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::Args))]
#[serde(default)]
pub struct RunOptions {
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = RunOptions::default().lora_rank))]
    pub lora_rank: usize,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = RunOptions::default().lora_alpha))]
    pub lora_alpha: f32,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = RunOptions::default().lora_dropout))]
    pub lora_dropout: f32,
    /// Comma-separated projections, or all-linear.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = RunOptions::default().lora_targets))]
    pub lora_targets: String,
    /// Scale LoRA by alpha/√r (rsLoRA).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub rslora: bool,
    /// Train every weight (f32) instead of LoRA pairs.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub full: bool,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = RunOptions::default().max_seq_len))]
    pub max_seq_len: usize,
    /// Pack several examples into each sequence (attention stays within each).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub pack: bool,
    /// Recompute activations in the backward instead of keeping them.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub grad_checkpoint: bool,
    /// Train on every token, prompts included.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub train_on_prompt: bool,
    /// Evaluate on the validation data (and show sample replies) every this many steps.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint every this many steps (and always at the end).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub save_every: Option<u64>,
    /// Frozen weights packed on the GPU (QLoRA): q8 (Q8_0), q4 (Q4_0) or nf4
    /// (bitsandbytes' NormalFloat4); a GGUF's Q8_0/Q4_0/Q4_1/Q4_K blocks stay as they
    /// are. f16 dequantizes everything (to f32 where the adapter has no shader-f16),
    /// f32 to f32. Default: a GGUF's blocks packed, everything else f16 (or f32).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub quantize: Option<String>,
    /// The memory a step may use (512MiB, 2GiB): the run picks its micro-batch, and
    /// gradient checkpointing where needed, to fit. Default: the host's available
    /// memory on CPU adapters; on GPUs, whose free memory wgpu does not report, only
    /// the largest storage binding bounds the plan.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub memory_budget: Option<String>,
    #[cfg_attr(not(target_arch = "wasm32"), command(flatten))]
    #[serde(flatten)]
    pub train: Options,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_targets: "all-linear".into(),
            rslora: false,
            full: false,
            max_seq_len: 512,
            pack: false,
            grad_checkpoint: false,
            train_on_prompt: false,
            eval_every: None,
            save_every: None,
            quantize: None,
            memory_budget: None,
            train: Options::default(),
        }
    }
}

impl RunOptions {
    /// Refuses options no run can use, by name, before anything is read: the
    /// optimizer's (`Options::check`), a --max-seq-len, --eval-every or --save-every of 0,
    /// and LoRA's rank, alpha, dropout and targets (unless --full).
    pub fn check(&self) -> Result<()> {
        self.train.check()?;
        if self.max_seq_len == 0 {
            return Err(Error::Options("--max-seq-len 0: expected at least 1".into()));
        }
        for (name, every) in [("--eval-every", self.eval_every), ("--save-every", self.save_every)] {
            if every == Some(0) {
                return Err(Error::Options(format!("{name} 0: expected at least 1 step (leave it out for none)")));
            }
        }
        if !self.full {
            LoraConfig { r: self.lora_rank, alpha: self.lora_alpha, dropout: self.lora_dropout, targets: self.targets(), use_rslora: self.rslora }.check()?;
        }
        Ok(())
    }

    /// The built-in demo's preset (`webtune`, the page's demo): LoRA r16 on every
    /// projection with dropout 0.1, lr 1e-2 (cosine, 10 warmup), batches of 16.
    pub fn demo(steps: u64) -> RunOptions {
        RunOptions {
            lora_dropout: 0.1,
            max_seq_len: crate::data::demo::MAX_SEQ_LEN,
            train: Options { lr: 1e-2, batch_size: 16, steps: Some(steps), ..Options::default() },
            ..RunOptions::default()
        }
    }

    /// The real-model demo's preset (`webtune demo --model smollm2`, the page's "Real
    /// model"): LoRA r16 on every projection with dropout 0.05, lr 2e-3 (cosine, no
    /// warm-up: a few dozen steps), batches of 4 requests of up to 96 tokens; frozen
    /// weights in f16 (a GGUF's blocks dequantized: on lavapipe a step is 18% faster
    /// than on the packed Q4_1 blocks).
    pub fn tools(steps: u64) -> RunOptions {
        RunOptions {
            max_seq_len: 96,
            quantize: Some("f16".into()),
            train: Options { lr: 2e-3, warmup: 0, batch_size: 4, steps: Some(steps), ..Options::default() },
            ..RunOptions::default()
        }
    }

    /// The demo's DPO stage (`webtune demo --dpo-steps`, the page's DPO demo): the SFT
    /// preset's adapter continued on preference pairs, sigmoid DPO with β = 0.1, lr
    /// 2e-3 (constant), batches of 16 pairs, sequences of up to 128 characters (a
    /// brief ask makes the prompts longer); no dropout for a fresh adapter, and a
    /// continued one keeps its own LoRA config, dropout 0.1 after the demo's SFT, which
    /// DPO keeps (`--dpo-dropout`; TRL's default turns it off, and the demo's stage then
    /// garbles twice as many held-out answers: README, the demo's DPO stage).
    pub fn demo_dpo(steps: u64) -> RunOptions {
        let sft = RunOptions::demo(steps);
        RunOptions {
            lora_dropout: 0.0,
            max_seq_len: 128,
            train: Options { method: "dpo".into(), lr: 2e-3, schedule: "constant".into(), warmup: 0, dpo_dropout: true, ..sft.train },
            ..sft
        }
    }

    /// The projections LoRA adapts (`all-linear`: every one).
    pub fn targets(&self) -> Vec<String> {
        if self.lora_targets == "all-linear" {
            LoraConfig::ALL_TARGETS.map(String::from).to_vec()
        } else {
            self.lora_targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
        }
    }

    /// The sequences a batch row holds at most: a DPO pair's two sides (`PairBatch`,
    /// their prompt once), else one. A row over sequences of up to `--max-seq-len`
    /// tokens holds at most this many times as many.
    pub fn row_sides(&self) -> usize {
        if self.train.method == "dpo" { 2 } else { 1 }
    }

    /// Whether a run of these options that starts from a trained adapter keeps it on the
    /// GPU as its DPO reference: LoRA DPO (full tuning takes every pair's first).
    pub fn references_its_adapter(&self) -> bool {
        self.train.method == "dpo" && !self.full
    }

    /// Whether a run of these options that starts from `adapter` (PEFT-named tensors)
    /// keeps it as its reference (`references_its_adapter`): one whose B are not all
    /// zero (`Run::init_adapter`).
    pub fn keeps_reference(&self, adapter: &TensorMap) -> bool {
        self.references_its_adapter() && trained(adapter)
    }

    /// Take the adapter's shape from an existing LoRA config (`--init-adapter`).
    pub fn set_lora(&mut self, l: &LoraConfig) {
        (self.lora_rank, self.lora_alpha, self.lora_dropout, self.rslora) = (l.r, l.alpha, l.dropout, l.use_rslora);
        self.lora_targets = l.targets.join(",");
    }

    /// The memory plan of a step of this run on `cfg` (its weights in `w`, which say
    /// what a GGUF keeps packed) over sequences of `seq` tokens (DPO: pairs, a row each
    /// of `seq` tokens, `Dataset::longest_row`), on an adapter with (or
    /// without) f16 weights, this largest binding and (or not) the GPU kernels, which
    /// never store SwiGLU's hidden. Refuses a LoRA rank no adapted projection can use
    /// (`LoraConfig::check_rank`), before anything is loaded.
    #[allow(clippy::too_many_arguments)]
    pub fn memory_plan(&self, cfg: &crate::model::Config, w: &dyn crate::model::Tensors, seq: usize, f16_weights: bool, max_binding: u64, gpu_kernels: bool) -> Result<crate::model::memory::Plan> {
        let frozen = self.frozen()?;
        if let Tuning::Lora(l) = self.tuning() {
            l.check_rank(cfg)?;
        }
        let f16_weights = f16_weights && frozen != Frozen::F32;
        let stored = crate::model::memory::Plan::stored(cfg, w);
        // DPO runs a pair in one row (`PairBatch`): `seq` is a pair's row.
        let batch = self.train.batch_size;
        // A run that keeps a reference adapter says so (`Run::fit`).
        Ok(crate::model::memory::Plan { tuning: self.tuning(), batch, seq, grad_checkpoint: self.grad_checkpoint, f16_weights, frozen, stored, max_binding, swiglu_in_loads: gpu_kernels, reference_adapter: false })
    }

    /// Before the model is loaded: where the memory budget needs a smaller frozen-weight
    /// format (`fit::lower_frozen`), `--quantize` becomes it, and the line saying so is
    /// returned. `reference_adapter`: the run will keep a DPO reference adapter
    /// (`keeps_reference`), counted too.
    pub fn lower_frozen(&mut self, gpu: &Gpu, source: &Source, data: &Dataset, valid: Option<&Dataset>, reference_adapter: bool) -> Result<Option<String>> {
        let longest = longest(data, valid);
        let mut base = self.memory_plan(&source.cfg, &source.weights, longest, gpu.caps.shader_f16, gpu.caps.max_binding, gpu.caps.variant == crate::gpu::Variant::Tiled)?;
        base.reference_adapter = reference_adapter;
        let budget = fit::budget(self, gpu.caps.memory())?;
        Ok(fit::lower_frozen(&source.cfg, self, &base, longest, budget).map(|(q, note)| {
            self.quantize = Some(q.into());
            note
        }))
    }

    /// How frozen matrices are held (`--quantize`).
    pub fn frozen(&self) -> Result<Frozen> {
        Ok(match self.quantize.as_deref() {
            None | Some("") | Some("auto") => Frozen::Auto,
            Some("none" | "f16") => Frozen::Float,
            Some("f32") => Frozen::F32,
            Some(q) => Frozen::Quantize(crate::quant::QType::parse_quantize(q)?),
        })
    }

    pub fn tuning(&self) -> Tuning {
        if self.full {
            Tuning::Full
        } else {
            Tuning::Lora(LoraConfig { r: self.lora_rank, alpha: self.lora_alpha, dropout: self.lora_dropout, targets: self.targets(), use_rslora: self.rslora })
        }
    }
}

/// A sample reply at an evaluation: the prompt and what the model answered.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    pub prompt: String,
    pub reply: String,
}

/// What one call of `Run::next` did, for the front end to show.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    pub stats: StepStats,
    pub total: u64,
    /// Replies to the first prompts of the validation data, at evaluations.
    pub samples: Vec<Sample>,
    /// GPU time per kernel of this step, where it was profiled.
    pub kernels: Vec<KernelTime>,
    /// A checkpoint is due (every `save_every` steps, and at the end).
    pub save: bool,
    pub done: bool,
    /// What the run changed on its own during the step (out of memory: smaller
    /// micro-batches), for the front end to say.
    pub note: Option<String>,
}

pub struct Run {
    pub source: Rc<Source>,
    pub opts: RunOptions,
    pub model: Model,
    pub data: Rc<Dataset>,
    pub valid: Option<Dataset>,
    pub trainer: Trainer,
    /// Time each kernel of step 3 (past pipeline compilation) and of every nth step,
    /// where the adapter has timestamp queries (`Some(u64::MAX)`: step 3 only).
    pub profile_every: Option<u64>,
    /// Where the last checkpoint went, as the front end said (`saved`): the NaN stop names it.
    last_saved: Option<String>,
    prompts: Vec<Vec<u32>>,
    /// DPO: the validation pairs' reference log-probabilities.
    valid_reference: Option<Vec<[f32; 2]>>,
    /// Sequences (DPO: pairs) per micro-batch, as the plan chose (`fit`).
    pub micro: usize,
    /// What the plan changed from the options given, and why.
    pub plan_note: Option<String>,
    /// The frozen weights packed to fit the budget (`RunOptions::lower_frozen`): the
    /// first line of `plan_note`.
    lowered_note: Option<String>,
    /// The adapter the run started from (`init_adapter`), kept for `handover`.
    initial_adapter: Option<TensorMap>,
    /// DPO: what the reference is (SFT: unused).
    reference: Reference,
}

/// A DPO run's reference model, the model as the run starts, and so when each pair's
/// reference log-probabilities are taken.
enum Reference {
    /// LoRA from a fresh adapter (every B zero): the base, the adapter off. Each pair's
    /// as a step first uses it; a checkpoint need not hold them.
    Base,
    /// LoRA from a trained adapter (`init_adapter`): its values, kept on the GPU (one
    /// copy per flat group, `Model::copy_values`) and swapped in, through the scratch
    /// copies beside them, while a step's new pairs are computed. Each pair's as a step
    /// first uses it; a checkpoint holds the adapter (`reference_adapter.safetensors`).
    Adapter { values: Vec<Tensor>, scratch: Vec<Tensor> },
    /// Full tuning: every pair's before step 1, kept with the run and in checkpoints,
    /// so no second copy of the weights exists.
    Precomputed,
}

/// The reference adapter's file in a checkpoint (`Reference::Adapter`).
const REFERENCE_ADAPTER: &str = "reference_adapter.safetensors";

/// Make `model` the reference (`on`), or the trained model again: its adapter off, or
/// the reference adapter's values swapped in (a swap: the second one restores both).
fn as_reference(gpu: &Gpu, model: &mut Model, reference: &Reference, on: bool) -> Result<()> {
    match reference {
        Reference::Base => model.adapter_enabled = !on,
        Reference::Adapter { values, scratch } => model.swap_values(gpu, values, scratch)?,
        Reference::Precomputed => {}
    }
    Ok(())
}

/// Whether an adapter (PEFT-named tensors) was trained: some B is not zero (a fresh
/// adapter's are, so it changes nothing).
fn trained(adapter: &TensorMap) -> bool {
    adapter.iter().any(|(name, t)| name.ends_with("lora_B.weight") && t.data.iter().any(|&v| v != 0.0))
}

/// The prompts of the first two examples (pairs): their tokens before the first trained one.
fn sample_prompts(data: &Dataset) -> Vec<Vec<u32>> {
    data.examples.iter().step_by(if data.pairs { 2 } else { 1 }).filter_map(|e| e.trained.iter().position(|&t| t).filter(|&p| p > 0).map(|p| e.ids[..p].to_vec())).take(2).collect()
}

/// The longest row of the training and validation data (DPO: a pair's).
fn longest(data: &Dataset, valid: Option<&Dataset>) -> usize {
    data.longest_row().max(valid.map_or(1, Dataset::longest_row))
}

/// Where a resumed run continues, and a line that says so.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resumed {
    pub step: u64,
    pub total: u64,
    pub note: String,
}

impl Run {
    /// Load the model with the adapter (or for full tuning) and plan the steps.
    pub fn new(gpu: &Gpu, source: Rc<Source>, data: Rc<Dataset>, valid: Option<Dataset>, opts: RunOptions) -> Result<Run> {
        use futures::FutureExt;
        Self::create(gpu, source, data, valid, opts, false, false).now_or_never().expect("a load that does not settle never waits")
    }

    /// `new`, the load waiting for the queue after each layer (`Model::load_settled`;
    /// the page: the uploads' transfer memory goes back layer by layer).
    pub async fn new_async(gpu: &Gpu, source: Rc<Source>, data: Rc<Dataset>, valid: Option<Dataset>, opts: RunOptions) -> Result<Run> {
        Self::create(gpu, source, data, valid, opts, true, false).await
    }

    /// `reference_adapter`: the run will keep a DPO reference adapter, which the
    /// frozen weights' format must leave room for (`lower_frozen`).
    async fn create(gpu: &Gpu, source: Rc<Source>, data: Rc<Dataset>, valid: Option<Dataset>, opts: RunOptions, settle: bool, reference_adapter: bool) -> Result<Run> {
        // Plan first: bad options fail before the model is loaded.
        Trainer::new(opts.train.clone(), &data, source.tokenizer.pad_id)?;
        let mut opts = opts;
        let lowered = opts.lower_frozen(gpu, &source, &data, valid.as_ref(), reference_adapter)?;
        let model = Model::load_settled(gpu, source.cfg.clone(), &source.weights, opts.tuning(), opts.train.seed, opts.frozen()?, settle).await?;
        Run::with_model_lowered(gpu, source, model, data, valid, opts, lowered)
    }

    /// A run of a model already loaded with `opts.tuning()` (the CLI measures the load),
    /// in micro-batches that fit the adapter's bindings and the memory budget (`fit`).
    pub fn with_model(gpu: &Gpu, source: Rc<Source>, model: Model, data: Rc<Dataset>, valid: Option<Dataset>, opts: RunOptions) -> Result<Run> {
        Run::with_model_lowered(gpu, source, model, data, valid, opts, None)
    }

    /// `with_model`, after `RunOptions::lower_frozen` packed the frozen weights, saying
    /// so in `lowered` (the plan's note begins with it).
    fn with_model_lowered(gpu: &Gpu, source: Rc<Source>, model: Model, data: Rc<Dataset>, valid: Option<Dataset>, opts: RunOptions, lowered: Option<String>) -> Result<Run> {
        if model.tuning != opts.tuning() {
            return Err(Error::Options(format!("the model was loaded for {}, the run wants {}", model.tuning, opts.tuning())));
        }
        let trainer = Trainer::new(opts.train.clone(), &data, source.tokenizer.pad_id)?;
        let prompts = sample_prompts(valid.as_ref().unwrap_or(&data));
        let reference = if opts.full { Reference::Precomputed } else { Reference::Base };
        let mut run = Run {
            source,
            opts,
            model,
            data,
            valid,
            trainer,
            profile_every: None,
            last_saved: None,
            prompts,
            valid_reference: None,
            micro: 1,
            plan_note: None,
            lowered_note: lowered,
            initial_adapter: None,
            reference,
        };
        run.fit(gpu)?;
        Ok(run)
    }

    /// Plan the micro-batches, and gradient checkpointing, that fit the adapter's
    /// bindings and the memory budget (`fit::fit`), counting the reference adapter where
    /// the run keeps one (so again once it does: `init_adapter`, `resume`), and say what
    /// the plan changed from the options given (`plan_note`).
    fn fit(&mut self, gpu: &Gpu) -> Result<()> {
        let longest = longest(&self.data, self.valid.as_ref());
        let mut base = self.opts.memory_plan(&self.source.cfg, &self.source.weights, longest, gpu.caps.shader_f16, gpu.caps.max_binding, gpu.caps.variant == crate::gpu::Variant::Tiled)?;
        base.reference_adapter = self.keeps_starting_adapter();
        let budget = fit::budget(&self.opts, gpu.caps.memory())?;
        let origin = fit::budget_origin(&self.opts, &gpu.caps);
        let plan = fit::fit(&self.source.cfg, &self.opts, &base, longest, budget).map_err(|e| match (e, &origin) {
            (Error::Options(m), Some(origin)) if m.contains("memory budget") => Error::Options(format!("{m} ({origin})")),
            (e, _) => e,
        })?;
        self.trainer.plan = super::plan(self.data.items(), &self.trainer.opts)?;
        self.trainer.split(plan.micro);
        self.micro = plan.micro;
        self.model.grad_checkpoint = plan.grad_checkpoint;
        self.plan_note = [self.lowered_note.clone(), plan.note].into_iter().flatten().reduce(|a, b| format!("{a}\n{b}"));
        // A budget no option set: say whose it is.
        if let (Some(note), Some(origin)) = (self.plan_note.as_mut(), origin) {
            if note.contains("memory budget") {
                note.push_str(&format!("\n{origin}"));
            }
        }
        Ok(())
    }

    /// A run of `opts` on `data` that starts from this run's trained adapter (the page's
    /// DPO after SFT; the CLI's `--init-adapter`): the adapter's shape is kept.
    pub async fn continued(&self, gpu: &Gpu, data: Rc<Dataset>, mut opts: RunOptions) -> Result<Run> {
        let Tuning::Lora(l) = &self.model.tuning else {
            return Err(Error::Options("only a LoRA run can be continued from its adapter".into()));
        };
        opts.set_lora(l);
        let tensors = checkpoint::trained_tensors(gpu, &self.model).await?;
        let keeps = opts.keeps_reference(&tensors);
        let mut run = Run::create(gpu, self.source.clone(), data, None, opts, true, keeps).await?;
        run.init_adapter(gpu, &tensors)?;
        Ok(run)
    }

    /// Start from an existing adapter's weights instead of fresh LoRA ones.
    pub fn init_adapter(&mut self, gpu: &Gpu, tensors: &TensorMap) -> Result<()> {
        self.model.set_params(gpu, tensors)?;
        self.initial_adapter = Some(tensors.clone());
        if self.trainer.dpo.is_some() && !self.precomputed() && trained(tensors) {
            self.reference = self.reference_adapter(gpu)?;
            self.fit(gpu)?;
        }
        Ok(())
    }

    /// This run handed over to TRL + accelerate (`handover::files`), from the adapter
    /// it started from, with the base named as the front end opened it.
    pub fn handover(&self) -> Result<super::export::Files> {
        let base = super::handover::Base::of(&self.source, &self.source.name)?;
        let adapter = super::handover::initial_adapter(&self.source.cfg, &self.opts, self.initial_adapter.clone(), &base)?;
        super::handover::files(&self.source, &base, &self.opts, &self.data, self.valid.as_ref(), adapter)
    }

    pub fn total_steps(&self) -> u64 {
        self.trainer.total_steps()
    }

    /// The memory estimate of one step as this run trains it (its micro-batch of its
    /// longest sequences, checkpointing as planned): what `bench train` sets beside the
    /// memory it measures.
    pub fn estimate(&self, gpu: &Gpu) -> Result<crate::model::memory::Memory> {
        let mut plan = self.opts.memory_plan(&self.source.cfg, &self.source.weights, longest(&self.data, self.valid.as_ref()), gpu.caps.shader_f16, gpu.caps.max_binding, gpu.caps.variant == crate::gpu::Variant::Tiled)?;
        plan.batch = self.micro;
        plan.grad_checkpoint = self.model.grad_checkpoint;
        plan.reference_adapter = self.keeps_starting_adapter();
        Ok(crate::model::memory::estimate(&self.source.cfg, &plan))
    }

    pub fn done(&self) -> bool {
        self.trainer.done()
    }

    /// What a checkpoint saves about the run.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.trainer.step,
            total_steps: self.total_steps(),
            options: self.opts.train.clone(),
            base_model: self.source.name.clone(),
            tuning: if self.opts.full { "full" } else { "lora" }.into(),
            reference: if self.precomputed() { self.trainer.reference.clone() } else { Vec::new() },
            valid_reference: if self.precomputed() { self.valid_reference.clone().unwrap_or_default() } else { Vec::new() },
            reference_adapter: self.keeps_starting_adapter(),
        }
    }

    /// The files of the adapter (or full model), a checkpoint, or the merged model.
    pub async fn files(&self, gpu: &Gpu, what: Export) -> Result<Files> {
        let state = self.state();
        let mut files = export::files(gpu, &self.source, &self.model, &state, what).await?;
        if let (Export::Checkpoint, true, Some(adapter)) = (what, state.reference_adapter, &self.initial_adapter) {
            files.push((REFERENCE_ADAPTER.into(), crate::model::weights::serialize(adapter, None)?));
        }
        Ok(files)
    }

    /// The model's trainable values as the reference adapter, with scratch for swapping.
    fn reference_adapter(&self, gpu: &Gpu) -> Result<Reference> {
        Ok(Reference::Adapter { values: self.model.copy_values(gpu, "reference adapter")?, scratch: self.model.copy_values(gpu, "reference adapter scratch")? })
    }

    /// Whether the run keeps the adapter it started from on the GPU: a LoRA DPO run from
    /// a trained adapter, its reference (a resume restores it from the checkpoint).
    pub fn keeps_starting_adapter(&self) -> bool {
        matches!(self.reference, Reference::Adapter { .. })
    }

    /// Swap the adapter the run started from in for the trained one, or back (each call
    /// swaps; calls come in pairs), where the run keeps it (`keeps_starting_adapter`).
    /// The page answers with it "before" after a reload.
    pub fn swap_starting_adapter(&mut self, gpu: &Gpu) -> Result<()> {
        if !self.keeps_starting_adapter() {
            return Err(Error::Options("this run keeps no starting adapter: it started from a fresh one, or holds every pair's reference".into()));
        }
        as_reference(gpu, &mut self.model, &self.reference, true)
    }

    /// Whether the run takes every pair's reference before step 1 (`Reference::Precomputed`).
    fn precomputed(&self) -> bool {
        matches!(self.reference, Reference::Precomputed)
    }

    /// The front end saved a checkpoint of the current step at `place`.
    pub fn saved(&mut self, place: String) {
        self.last_saved = Some(place);
    }

    /// Continue from a checkpoint (`files`' `Export::Checkpoint`, read by `get`) of a
    /// run with the same options, except that `--steps` or `--epochs` may plan more
    /// steps (the schedule then spans the new total, as transformers' Trainer does).
    pub fn resume(&mut self, gpu: &Gpu, get: &dyn Fn(&str) -> Result<Vec<u8>>, place: &str) -> Result<Resumed> {
        let state = checkpoint::load_files(get, place, gpu, &self.model)?;
        let changed = state.options.changes(&self.opts.train);
        if !changed.is_empty() {
            return Err(Error::Options(format!(
                "{place}: was trained with other options; resume with the ones it was trained with (or start a new run):\n{}",
                changed.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n")
            )));
        }
        let total = self.total_steps();
        if total < state.step {
            return Err(Error::Options(format!(
                "{place}: is at step {} and --steps/--epochs now plan {total} steps; ask for at least {} to continue it",
                state.step, state.step
            )));
        }
        if self.trainer.dpo.is_some() && !state.reference.is_empty() && state.reference.len() != self.data.items() {
            return Err(Error::Options(format!(
                "{place}: holds the reference log-probabilities of {} pairs, the data has {}; resume a DPO run on its own data",
                state.reference.len(),
                self.data.items()
            )));
        }
        if state.reference_adapter && self.trainer.dpo.is_some() && !self.precomputed() {
            // The adapter the run started from, as the reference: the checkpoint's values
            // copied out, the adapter set in, then the two swapped.
            let mut adapter = TensorMap::new();
            crate::model::weights::parse(&get(REFERENCE_ADAPTER)?, &format!("{place}/{REFERENCE_ADAPTER}"), &mut adapter)?;
            self.reference = self.reference_adapter(gpu)?;
            self.model.set_params(gpu, &adapter)?;
            as_reference(gpu, &mut self.model, &self.reference, false)?;
            self.initial_adapter = Some(adapter);
            self.fit(gpu)?;
        }
        self.trainer.step = state.step;
        if !state.reference.is_empty() {
            // Every pair's, taken before step 1 (full tuning, or a checkpoint of an
            // older webtune): kept, and saved again.
            self.trainer.reference = state.reference;
            self.reference = Reference::Precomputed;
        }
        if !state.valid_reference.is_empty() {
            self.valid_reference = Some(state.valid_reference);
        }
        self.last_saved = Some(place.to_string());
        let note = if total == state.total_steps {
            format!("resumed at step {} of {total}", state.step)
        } else {
            format!(
                "resumed at step {} of {total} (the checkpoint's run planned {}; the learning-rate schedule now spans {total} steps)",
                state.step, state.total_steps
            )
        };
        Ok(Resumed { step: state.step, total, note })
    }

    /// DPO: the reference log-probabilities of the validation pairs, and with full
    /// tuning (`Reference::Precomputed`) of every training pair, from the model as the
    /// run starts, once, before the first step (LoRA: the training pairs' come step by
    /// step, `step_once`). Nothing for SFT.
    pub async fn reference(&mut self, gpu: &Gpu) -> Result<()> {
        if self.trainer.dpo.is_none() {
            return Ok(());
        }
        let (b, pad) = (self.micro, self.source.tokenizer.pad_id);
        if self.trainer.reference.is_empty() && self.precomputed() {
            if self.trainer.step > 0 {
                return Err(Error::Options("a DPO run past its first step needs the reference it started with (resume from its checkpoint)".into()));
            }
            self.trainer.reference = pair_logps(gpu, &self.model, &self.data, b, pad).await?;
        }
        if let (Some(v), None) = (&self.valid, &self.valid_reference) {
            if !v.pairs {
                return Err(Error::Data("--method dpo validates on preference pairs; the validation data holds none".into()));
            }
            if !self.precomputed() {
                as_reference(gpu, &mut self.model, &self.reference, true)?;
                let logps = pair_logps(gpu, &self.model, v, b, pad).await;
                as_reference(gpu, &mut self.model, &self.reference, false)?;
                self.valid_reference = Some(logps?);
                return Ok(());
            }
            // Past step 0 the model has moved: the reference must come from the checkpoint.
            if self.trainer.step > 0 {
                return Err(Error::Options("the checkpoint holds no reference for the validation pairs: resume a DPO run with the validation data it started with (or none)".into()));
            }
            self.valid_reference = Some(pair_logps(gpu, &self.model, v, b, pad).await?);
        }
        Ok(())
    }

    /// The next step, after the reference log-probabilities it still needs (DPO with
    /// LoRA: the model made the reference while they are computed, `as_reference`).
    async fn step_once(&mut self, gpu: &Gpu) -> Result<StepStats> {
        if self.trainer.dpo.is_some() && !self.precomputed() {
            as_reference(gpu, &mut self.model, &self.reference, true)?;
            let known = self.trainer.reference_for_step(gpu, &self.model, &self.data).await;
            as_reference(gpu, &mut self.model, &self.reference, false)?;
            known?;
        }
        self.trainer.step(gpu, &self.model, &self.data).await
    }

    /// One optimizer step, with what is due after it: profiling, evaluation and
    /// sample replies, whether to save. A loss that is not finite stops the run.
    pub async fn next(&mut self, gpu: &Gpu) -> Result<Event> {
        if self.done() {
            return Err(Error::Options("the run is done: every planned step has run".into()));
        }
        let step = self.trainer.step + 1;
        self.reference(gpu).await?;
        let timed = self.profile_every.is_some_and(|every| step == 3 || step.is_multiple_of(every)) && gpu.set_profiling(true);
        // Out of memory: free the step's temporaries, halve the micro-batch (doubling
        // accumulation) and run the step again from its start; the optimizer has not
        // moved. Only at one sequence (pair) per micro-batch does the run stop.
        let mut note = None;
        let mut stats = loop {
            match self.step_once(gpu).await {
                Err(Error::OutOfMemory(e)) if self.micro > 1 => {
                    gpu.trim();
                    let was = self.micro;
                    self.micro = was.div_ceil(2);
                    self.trainer.split(self.micro);
                    let line = format!(
                        "out of GPU memory at step {step} ({e}): micro-batches of up to {was} are now up to {} (gradient accumulation doubled, the same effective batch); step {step} runs again from its start",
                        self.micro
                    );
                    note = Some(note.map_or(line.clone(), |n: String| format!("{n}\n{line}")));
                }
                Err(Error::OutOfMemory(e)) => {
                    return Err(Error::OutOfMemory(format!(
                        "{e}; at step {step} even one sequence per micro-batch does not fit: lower --max-seq-len or quantize the frozen weights (--quantize q4). The last checkpoint is {}",
                        self.last_saved.clone().unwrap_or_else(|| "none (no checkpoint was saved yet)".into())
                    )))
                }
                Err(e) if gpu.lost().is_some() => {
                    return Err(Error::DeviceLost(format!(
                        "the GPU device was lost at step {step} ({}): {e}. The run cannot go on on this device; resume from the last checkpoint ({}) with --resume",
                        gpu.lost().unwrap_or_default(),
                        self.last_saved.clone().unwrap_or_else(|| "none was saved yet".into())
                    )))
                }
                other => break other?,
            }
        };
        let mut kernels = Vec::new();
        if timed {
            gpu.set_profiling(false);
            kernels = gpu.kernel_times().await?;
        }
        if !stats.loss.is_finite() {
            return Err(Error::Options(format!(
                "the loss became {} at step {}; stopping. The last good checkpoint is {}",
                stats.loss,
                stats.step,
                self.last_saved.clone().unwrap_or_else(|| "none (no checkpoint was saved yet)".into())
            )));
        }
        let total = self.total_steps();
        let done = self.done();
        let mut samples = Vec::new();
        if let (Some(every), Some(v)) = (self.opts.eval_every, &self.valid) {
            if step.is_multiple_of(every) || done {
                let tok = &self.source.tokenizer;
                stats.valid_loss = Some(match (&self.trainer.dpo, &self.valid_reference) {
                    (Some(d), Some(r)) => evaluate_pairs(gpu, &self.model, v, r, d, self.micro, tok.pad_id).await?.0,
                    _ => evaluate(gpu, &self.model, v, self.micro, tok.pad_id).await?.0,
                });
                let replies = self.model.generate_batch(gpu, &self.prompts, 48, &Sampling::default()).await?;
                samples.extend(self.prompts.iter().zip(&replies).map(|(p, out)| Sample { prompt: tok.decode(p), reply: tok.decode(out) }));
            }
        }
        let save = done || self.opts.save_every.is_some_and(|e| step.is_multiple_of(e));
        Ok(Event { stats, total, samples, kernels, save, done, note })
    }
}
