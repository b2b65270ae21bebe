//! What a run is made of: `Options`, the step plan (shuffle, batches, gradient
//! accumulation), `Trainer::step` (one optimizer step on the GPU) and `evaluate`. The
//! loop every front end drives is `run::Run`; the learning-rate schedule, checkpoints
//! and the files a run exports are submodules.

pub mod checkpoint;
pub mod export;
pub mod run;
pub mod schedule;

pub use run::{Event, Run, RunOptions};

use crate::rng::Rng;
use crate::data::batch::{Batch, Dataset, Sequence};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::AdamW;
use crate::model::{Inputs, Model, Shape};
use schedule::Schedule;

/// Everything that decides what a step computes (saved with checkpoints; a resume
/// must use the same). Its defaults are written once, in `Default`: clap shows them
/// and the page receives them (`Session::presets`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::Args))]
#[serde(default)]
pub struct Options {
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().lr))]
    pub lr: f64,
    /// constant, linear or cosine (with warmup).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().schedule))]
    pub schedule: String,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().warmup))]
    pub warmup: u64,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().weight_decay))]
    pub weight_decay: f64,
    /// 0 disables clipping.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().max_grad_norm))]
    pub max_grad_norm: f64,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().batch_size))]
    pub batch_size: usize,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().grad_accum))]
    pub grad_accum: usize,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().epochs, conflicts_with = "steps"))]
    pub epochs: usize,
    /// Optimizer steps (instead of epochs).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub steps: Option<u64>,
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().seed))]
    pub seed: u64,
    /// `--no-shuffle`: keep the data's order.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long = "no-shuffle", action = clap::ArgAction::SetFalse))]
    pub shuffle: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lr: 2e-4,
            schedule: "cosine".into(),
            warmup: 10,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            steps: None,
            seed: 42,
            shuffle: true,
        }
    }
}

/// For each optimizer step, its micro-batches, each a list of sequence indices.
pub type Plan = Vec<Vec<Vec<usize>>>;

/// The micro-batches of every step: each epoch walks a (seeded) permutation of the
/// sequences in batches of `batch_size`; `grad_accum` consecutive batches make a step.
/// With `steps`, epochs repeat until that many steps are planned.
pub fn plan(n: usize, o: &Options) -> Result<Plan> {
    if n == 0 {
        return Err(Error::Data("no training sequences left (every record was skipped)".into()));
    }
    if o.batch_size == 0 || o.grad_accum == 0 {
        return Err(Error::Data("batch size and gradient accumulation must be at least 1".into()));
    }
    let mut steps: Plan = Vec::new();
    let mut epoch = 0u64;
    loop {
        let mut order: Vec<usize> = (0..n).collect();
        if o.shuffle {
            let mut rng = Rng::new(o.seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9));
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let micro: Vec<Vec<usize>> = order.chunks(o.batch_size).map(|c| c.to_vec()).collect();
        for group in micro.chunks(o.grad_accum) {
            steps.push(group.to_vec());
            if o.steps.is_some_and(|s| steps.len() as u64 >= s) {
                return Ok(steps);
            }
        }
        epoch += 1;
        if o.steps.is_none() && epoch as usize >= o.epochs.max(1) {
            return Ok(steps);
        }
    }
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens in the step's batches (padding excluded).
    pub tokens: usize,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
}

/// Where a run stands: its options, its plan and the steps done. The model, the data
/// and the GPU are passed to each step, so one trainer serves the CLI and the page.
pub struct Trainer {
    pub opts: Options,
    pub pad_id: u32,
    pub plan: Plan,
    /// Steps completed.
    pub step: u64,
}

fn inputs(gpu: &Gpu, b: &Batch) -> Result<Inputs> {
    Inputs::new(gpu, Shape { b: b.b, t: b.t }, &b.ids, &b.pos, &b.seg)
}

impl Trainer {
    pub fn new(opts: Options, train: &Dataset, pad_id: u32) -> Result<Trainer> {
        opts.schedule.parse::<Schedule>().map_err(Error::Config)?;
        let plan = plan(train.sequences.len(), &opts)?;
        Ok(Trainer { opts, pad_id, plan, step: 0 })
    }

    pub fn total_steps(&self) -> u64 {
        self.plan.len() as u64
    }

    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        let s = self.opts.schedule.parse::<Schedule>().expect("checked in new");
        self.opts.lr * schedule::factor(s, self.step, self.opts.warmup, self.total_steps())
    }

    /// One optimizer step: zero the gradients, forward and backward every micro-batch
    /// (the loss normalised by the trained tokens of the whole step), clip, AdamW.
    pub async fn step(&mut self, gpu: &Gpu, model: &Model, train: &Dataset) -> Result<StepStats> {
        let started = crate::clock::now();
        let micro = &self.plan[self.step as usize];
        let batches: Vec<Batch> = micro
            .iter()
            .map(|idx| Batch::new(&idx.iter().map(|&i| &train.sequences[i]).collect::<Vec<&Sequence>>(), self.pad_id))
            .collect();
        let count: usize = batches.iter().map(|b| b.trained_tokens()).sum();
        let tokens: usize = batches.iter().map(|b| b.seg.iter().filter(|&&s| s != u32::MAX).count()).sum();
        let scale = 1.0 / count.max(1) as f32;
        model.zero_grads(gpu);
        let mut losses = Vec::new();
        for (j, b) in batches.iter().enumerate() {
            let mut inp = inputs(gpu, b)?;
            inp.dropout_seed = Some(crate::rng::hash((self.opts.seed as u32) ^ crate::rng::hash((self.step * 64 + j as u64) as u32)));
            losses.push(model.forward_backward(gpu, &inp, &b.targets, scale)?);
        }
        let lr = self.lr();
        let opt = AdamW { lr: lr as f32, weight_decay: self.opts.weight_decay as f32, ..AdamW::default() };
        let norm = model.optimizer_step(gpu, &opt, self.step + 1, self.opts.max_grad_norm as f32)?;
        let mut loss = 0.0;
        for l in &losses {
            loss += gpu.read::<f32>(l).await?[0] as f64;
        }
        let grad_norm = gpu.read::<f32>(&norm).await?[0] as f64;
        self.step += 1;
        let secs = crate::clock::now() - started;
        Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens, tokens_per_s: tokens as f64 / secs.max(1e-9), valid_loss: None })
    }
}

/// Mean loss per trained token over a dataset (no gradients), in batches of `batch_size`.
pub async fn evaluate(gpu: &Gpu, model: &Model, data: &Dataset, batch_size: usize, pad_id: u32) -> Result<(f64, usize)> {
    let mut total = 0.0;
    let mut count = 0;
    for chunk in data.sequences.chunks(batch_size.max(1)) {
        let b = Batch::new(&chunk.iter().collect::<Vec<_>>(), pad_id);
        let loss = model.loss(gpu, &inputs(gpu, &b)?, &b.targets, 1.0)?;
        total += gpu.read::<f32>(&loss).await?[0] as f64;
        count += b.trained_tokens();
    }
    if count == 0 {
        return Err(Error::Data("nothing to evaluate: no trained tokens".into()));
    }
    Ok((total / count as f64, count))
}
