//! What a run is made of: `Options`, the step plan (shuffle, batches, gradient
//! accumulation), `Trainer::step` (one optimizer step on the GPU) and `evaluate`. The
//! loop every front end drives is `run::Run`; the learning-rate schedule, checkpoints
//! and the files a run exports are submodules.

pub mod checkpoint;
pub mod export;
pub mod fit;
pub mod handover;
pub mod run;
pub mod schedule;

pub use run::{Event, Resumed, Run, RunOptions};

use crate::rng::Rng;
use crate::data::batch::{Batch, Dataset, PairBatch, Sequence};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::{AdamW, Dpo, DpoLoss};
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
    /// sft (instruction tuning) or dpo (preference tuning on chosen/rejected pairs;
    /// the reference is the model as the run starts).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().method))]
    pub method: String,
    /// DPO: how far the model may move from the reference (TRL's beta; IPO's τ).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().beta))]
    pub beta: f64,
    /// DPO loss: sigmoid, ipo or robust (TRL's loss_type).
    #[cfg_attr(not(target_arch = "wasm32"), arg(long = "loss", default_value_t = Options::default().dpo_loss))]
    pub dpo_loss: String,
    /// DPO label smoothing ε: conservative DPO with sigmoid, the flip rate with robust.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().label_smoothing))]
    pub label_smoothing: f64,
    /// DPO: weight of an NLL term on the chosen completions (RPO; TRL's rpo_alpha, or
    /// loss_type [.., "sft"] with this loss weight), which keeps the chosen answers
    /// likely while the preference moves. 0: none.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long, default_value_t = Options::default().rpo_alpha))]
    pub rpo_alpha: f64,
    /// DPO: keep LoRA dropout (`--lora-dropout`, or the adapter's) in the policy's
    /// passes (TRL's disable_dropout=False). Without it DPO runs with dropout off, as
    /// TRL's DPOTrainer does by default, so the log-ratios compare like with like.
    #[cfg_attr(not(target_arch = "wasm32"), arg(long))]
    pub dpo_dropout: bool,
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
            method: "sft".into(),
            beta: 0.1,
            dpo_loss: "sigmoid".into(),
            label_smoothing: 0.0,
            rpo_alpha: 0.0,
            dpo_dropout: false,
        }
    }
}

impl Options {
    /// The options of `new` that differ from these and would change what a resumed
    /// run computes, one line each with the option's flag and both values
    /// (`--lr: was 0.0002, now 0.001`). `--steps` and `--epochs` may change: they only
    /// set how many steps the run has.
    pub fn changes(&self, new: &Options) -> Vec<String> {
        let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(now))) = (serde_json::to_value(self), serde_json::to_value(new)) else {
            return vec!["the options could not be compared".into()];
        };
        let show = |v: Option<&serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "unset".into(),
        };
        old.iter()
            .filter(|(k, v)| !matches!(k.as_str(), "steps" | "epochs") && now.get(*k) != Some(*v))
            .map(|(k, v)| match k.as_str() {
                // Flags: --no-shuffle is given as false, --dpo-dropout as true.
                "shuffle" | "dpo_dropout" => {
                    let (flag, on) = if k == "shuffle" { ("no-shuffle", false) } else { ("dpo-dropout", true) };
                    let given = |v: Option<&serde_json::Value>| if v == Some(&serde_json::Value::Bool(on)) { "given" } else { "not given" };
                    format!("--{flag}: was {}, now {}", given(Some(v)), given(now.get(k)))
                }
                _ => {
                    let flag = if k == "dpo_loss" { "loss".to_string() } else { k.replace('_', "-") };
                    format!("--{flag}: was {}, now {}", show(Some(v)), show(now.get(k)))
                }
            })
            .collect()
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
    o.check()?;
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
    /// DPO: the step's means, under TRL's names (`dpo_forward`'s stats).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<Preference>,
}

/// What TRL's DPOTrainer logs, as means over a step's pairs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preference {
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

impl Preference {
    /// From `dpo_forward`'s stats `[8]` (loss first).
    fn from_stats(s: &[f32]) -> Preference {
        let f = |i: usize| s[i] as f64;
        Preference { rewards_chosen: f(1), rewards_rejected: f(2), rewards_accuracies: f(3), rewards_margins: f(4), logps_chosen: f(5), logps_rejected: f(6) }
    }
}

/// Where a run stands: its options, its plan and the steps done. The model, the data
/// and the GPU are passed to each step, so one trainer serves the CLI and the page.
pub struct Trainer {
    pub opts: Options,
    pub pad_id: u32,
    pub plan: Plan,
    /// Steps completed.
    pub step: u64,
    /// DPO: the loss, and the reference's log-probabilities of each pair's (chosen,
    /// rejected) completion: with full tuning all of them before the first step
    /// (`Run::reference`), with LoRA each pair's as a step first uses it
    /// (`reference_for_step`; NaN until then).
    pub dpo: Option<Dpo>,
    pub reference: Vec<[f32; 2]>,
}

fn inputs(gpu: &Gpu, b: &Batch) -> Result<Inputs> {
    Inputs::new(gpu, Shape { b: b.b, t: b.t }, &b.ids, &b.pos, &b.seg)
}

/// The token rows of a batch of the sequences `idx` (as `Batch` pads them: each to
/// the longest).
fn batch_rows(data: &Dataset, idx: &[usize]) -> usize {
    idx.len() * idx.iter().map(|&i| data.sequences[i].ids.len()).max().unwrap_or(1)
}

/// The token rows of `pair_batch` of the pairs `idx`: a row a pair, its prompt once.
fn pair_rows(data: &Dataset, idx: &[usize]) -> usize {
    idx.len() * idx.iter().map(|&i| PairBatch::row_len(&data.sequences[2 * i], &data.sequences[2 * i + 1])).max().unwrap_or(1)
}

/// Temporaries sized for the largest of `batches` (`Gpu::sizing`), each's token rows
/// counted by `rows`.
fn sizing_for<'a, 'b>(gpu: &'a Gpu, data: &Dataset, batches: impl Iterator<Item = &'b [usize]>, rows: fn(&Dataset, &[usize]) -> usize) -> crate::gpu::Sizing<'a> {
    gpu.sizing(batches.map(|b| rows(data, b)).max().unwrap_or(1))
}

/// The pairs `idx` of a preference dataset as one batch (`PairBatch`: a row a pair,
/// the prompt once; sequences in the order chosen sides, then rejected).
pub fn pair_batch(data: &Dataset, idx: &[usize], pad_id: u32) -> PairBatch {
    let pairs: Vec<(&Sequence, &Sequence)> = idx.iter().map(|&i| (&data.sequences[2 * i], &data.sequences[2 * i + 1])).collect();
    PairBatch::new(&pairs, pad_id)
}

/// A pair batch's rows' sequences on the GPU (`Model::sequence_logps`).
fn row_seq(gpu: &Gpu, pb: &PairBatch) -> Result<Tensor> {
    gpu.upload_temp("row sequences", &pb.row_seq, &[pb.row_seq.len()])
}

/// The pairs `idx` as `pair_batch`, with the GPU inputs `dpo_forward` reads beside the
/// policy's log-probabilities: the rows' sequences, the reference's `[2P]` and the
/// completion tokens `[2P]`, in the batch's order.
fn pair_inputs(gpu: &Gpu, data: &Dataset, idx: &[usize], reference: &[[f32; 2]], pad_id: u32) -> Result<(Tensor, PairBatch, Tensor, Tensor)> {
    let pb = pair_batch(data, idx, pad_id);
    let refs: Vec<f32> = [0, 1].iter().flat_map(|&side| idx.iter().map(move |&i| reference[i][side])).collect();
    let r = gpu.upload_temp("reference logps", &refs, &[refs.len()])?;
    let c = gpu.upload_temp("completion tokens", &pb.counts, &[pb.counts.len()])?;
    Ok((row_seq(gpu, &pb)?, pb, r, c))
}

/// A zeroed `[8]` for `dpo_forward` to accumulate into.
fn dpo_stats(gpu: &Gpu) -> Result<Tensor> {
    let mut rec = gpu.recorder("dpo stats");
    let stats = gpu.temp(&mut rec, "dpo stats", crate::gpu::DType::F32, &[8])?;
    gpu.submit(rec);
    Ok(stats)
}

/// Each pair's (chosen, rejected) log-probability under `model` as it is now, in
/// batches of up to `batch_size` pairs (dropout off): the DPO reference. A batch
/// holds fewer where its widest activation would overfill a storage binding
/// (`fit_binding`), so any size a caller asks for runs.
pub async fn pair_logps(gpu: &Gpu, model: &Model, data: &Dataset, batch_size: usize, pad_id: u32) -> Result<Vec<[f32; 2]>> {
    let idx: Vec<usize> = (0..data.items()).collect();
    let batches = fit_binding(gpu, model, data, idx.chunks(batch_size.max(1)), pair_rows);
    let sizing = sizing_for(gpu, data, batches.iter().map(Vec::as_slice), pair_rows);
    logps_in(gpu, model, data, batches.iter().map(Vec::as_slice), &sizing, pad_id).await
}

/// `batches` split, in order, where a batch's token rows (counted by `rows`) would be
/// more than one storage binding holds at the model's widest activation
/// (`memory::binding_rows`; a batch of one is kept whole: the plan refuses a run whose
/// one sequence does not fit, `fit::fit`).
fn fit_binding<'a>(gpu: &Gpu, model: &Model, data: &Dataset, batches: impl Iterator<Item = &'a [usize]>, rows: fn(&Dataset, &[usize]) -> usize) -> Vec<Vec<usize>> {
    let most = crate::model::memory::binding_rows(&model.cfg, gpu.caps.max_binding);
    let fits = |b: &[usize]| rows(data, b) <= most;
    let mut out: Vec<Vec<usize>> = Vec::new();
    for batch in batches {
        let mut cur: Vec<usize> = Vec::new();
        for &i in batch {
            cur.push(i);
            if cur.len() > 1 && !fits(&cur) {
                cur.pop();
                out.push(std::mem::replace(&mut cur, vec![i]));
            }
        }
        out.extend((!cur.is_empty()).then_some(cur));
    }
    out
}

/// The (chosen, rejected) log-probabilities of the pairs of `batches`, a batch at a
/// time, in their order, with temporaries sized by `sizing`; an out-of-memory is
/// `Error::OutOfMemory` (`Gpu::scoped`).
async fn logps_in<'a>(gpu: &Gpu, model: &Model, data: &Dataset, batches: impl Iterator<Item = &'a [usize]>, sizing: &crate::gpu::Sizing<'_>, pad_id: u32) -> Result<Vec<[f32; 2]>> {
    let mut out = Vec::new();
    for chunk in batches {
        let pb = pair_batch(data, chunk, pad_id);
        let b = &pb.batch;
        sizing.batch(b.b * b.t);
        let lp = gpu.scoped(|| model.sequence_logps(gpu, &inputs(gpu, b)?, &b.targets, &row_seq(gpu, &pb)?)).await?;
        let lp = gpu.read::<f32>(&lp).await?;
        out.extend((0..chunk.len()).map(|i| [lp[i], lp[chunk.len() + i]]));
    }
    Ok(out)
}

/// The DPO loss of `opts`, checked.
pub fn dpo_of(opts: &Options) -> Result<Dpo> {
    Dpo::new(opts.dpo_loss.parse::<DpoLoss>().map_err(Error::Options)?, opts.beta as f32, opts.label_smoothing as f32)?.with_rpo(opts.rpo_alpha as f32)
}

impl Options {
    /// Refuses values no run can use, naming the option: a learning rate, weight decay
    /// or clipping norm that is negative or not a number, a batch, accumulation, epoch
    /// or step count of 0 (a run of `--steps 0` would still take a step), an unknown
    /// schedule or method, DPO's loss settings (`dpo_of`).
    pub fn check(&self) -> Result<()> {
        for (name, v) in [("--lr", self.lr), ("--weight-decay", self.weight_decay), ("--max-grad-norm", self.max_grad_norm)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Options(format!("{name} {v}: expected a number of at least 0")));
            }
        }
        let counts = [("--batch-size", Some(self.batch_size as u64)), ("--grad-accum", Some(self.grad_accum as u64)), ("--epochs", Some(self.epochs as u64)), ("--steps", self.steps)];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == Some(0)) {
            return Err(Error::Options(format!("{name} 0: expected at least 1")));
        }
        self.schedule.parse::<Schedule>().map_err(Error::Options)?;
        match self.method.as_str() {
            "sft" if self.dpo_dropout => Err(Error::Options("--dpo-dropout is for --method dpo (SFT applies --lora-dropout as given)".into())),
            "sft" => Ok(()),
            "dpo" => dpo_of(self).map(|_| ()),
            m => Err(Error::Options(format!("unknown --method `{m}`: expected sft or dpo"))),
        }
    }
}

impl Trainer {
    /// The options are checked by `plan` (`Options::check`).
    pub fn new(opts: Options, train: &Dataset, pad_id: u32) -> Result<Trainer> {
        let dpo = match (opts.method.as_str(), train.pairs) {
            ("sft", false) => None,
            ("dpo", true) => Some(dpo_of(&opts)?),
            ("sft", true) => return Err(Error::Data("the data holds preference pairs (chosen + rejected): train them with --method dpo".into())),
            ("dpo", false) => {
                let format = train.examples.first().map_or("no", |e| e.format.name());
                return Err(Error::Data(format!(
                    "--method dpo needs preference pairs (`chosen` + `rejected`, with an optional `prompt`); the data holds {format} records"
                )));
            }
            (m, _) => return Err(Error::Options(format!("unknown --method `{m}`: expected sft or dpo"))),
        };
        let plan = plan(train.items(), &opts)?;
        Ok(Trainer { opts, pad_id, plan, step: 0, dpo, reference: Vec::new() })
    }

    pub fn total_steps(&self) -> u64 {
        self.plan.len() as u64
    }

    /// Run each batch as micro-batches of at most `micro` sequences (pairs), in order
    /// (`fit`): a step still trains the same sequences.
    pub fn split(&mut self, micro: usize) {
        for step in &mut self.plan {
            *step = step.iter().flat_map(|m| m.chunks(micro.max(1)).map(<[usize]>::to_vec)).collect();
        }
    }

    /// The reference log-probabilities of the next step's pairs that are not known yet
    /// (NaN), from `model` as the caller leaves it (`Run` makes it the reference: the
    /// adapter off, or the starting adapter swapped in), in the step's micro-batches:
    /// LoRA DPO computes each pair's once, when a step first uses it, as TRL does per
    /// batch, so a run of a few steps over many pairs starts at once.
    pub async fn reference_for_step(&mut self, gpu: &Gpu, model: &Model, train: &Dataset) -> Result<()> {
        if self.reference.len() != train.items() {
            self.reference = vec![[f32::NAN; 2]; train.items()];
        }
        let known = |i: &usize| !self.reference[*i][0].is_nan();
        let missing: Vec<Vec<usize>> = self.plan[self.step as usize]
            .iter()
            .map(|m| m.iter().copied().filter(|i| !known(i)).collect::<Vec<usize>>())
            .filter(|m| !m.is_empty())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // Sized as the steps are, so the pool keeps the buffers they use.
        let sizing = sizing_for(gpu, train, self.plan.iter().flatten().map(Vec::as_slice), pair_rows);
        let logps = logps_in(gpu, model, train, missing.iter().map(Vec::as_slice), &sizing, self.pad_id).await?;
        for (&i, lp) in missing.iter().flatten().zip(logps) {
            self.reference[i] = lp;
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        let s = self.opts.schedule.parse::<Schedule>().expect("checked by plan (Options::check)");
        self.opts.lr * schedule::factor(s, self.step, self.opts.warmup, self.total_steps())
    }

    /// The forward and backward of every micro-batch of the next step, adding into the
    /// gradients: its losses (DPO: its statistics) and real tokens. Its temporaries are
    /// sized for the run's largest micro-batch, so each step finds the same pooled
    /// buffers and the pool holds what the plan estimates.
    fn forward_backward(&self, gpu: &Gpu, model: &Model, train: &Dataset) -> Result<(Vec<Tensor>, usize)> {
        let sizing = sizing_for(gpu, train, self.plan.iter().flatten().map(Vec::as_slice), if self.dpo.is_some() { pair_rows } else { batch_rows });
        let micro = &self.plan[self.step as usize];
        let seed = |j: usize| crate::rng::hash((self.opts.seed as u32) ^ crate::rng::hash((self.step * 64 + j as u64) as u32));
        Ok(if let Some(d) = &self.dpo {
            // The means are over the step's pairs.
            if self.reference.len() != train.items() {
                return Err(Error::Config(format!("DPO needs the reference log-probabilities of all {} pairs first (Trainer::reference)", train.items())));
            }
            let scale = 1.0 / micro.iter().map(|m| m.len()).sum::<usize>().max(1) as f32;
            // RPO's NLL is the mean over the step's chosen completion tokens.
            let sft = d.sft_scale(micro.iter().flatten().map(|&i| train.sequences[2 * i].trained_targets()).sum());
            let stats = dpo_stats(gpu)?;
            let mut tokens = 0;
            for (j, idx) in micro.iter().enumerate() {
                let (rs, pb, r, c) = pair_inputs(gpu, train, idx, &self.reference, self.pad_id)?;
                let b = &pb.batch;
                sizing.batch(b.b * b.t);
                tokens += b.real_tokens();
                let mut inp = inputs(gpu, b)?;
                inp.dropout_seed = self.opts.dpo_dropout.then(|| seed(j));
                model.dpo_forward_backward(gpu, &inp, &b.targets, &rs, d, &r, &c, (scale, sft), &stats)?;
            }
            (vec![stats], tokens)
        } else {
            let batches: Vec<Batch> = micro
                .iter()
                .map(|idx| Batch::new(&idx.iter().map(|&i| &train.sequences[i]).collect::<Vec<&Sequence>>(), self.pad_id))
                .collect();
            let count: usize = batches.iter().map(|b| b.trained_tokens()).sum();
            let tokens: usize = batches.iter().map(Batch::real_tokens).sum();
            let scale = 1.0 / count.max(1) as f32;
            let mut losses = Vec::new();
            for (j, b) in batches.iter().enumerate() {
                sizing.batch(b.b * b.t);
                let mut inp = inputs(gpu, b)?;
                inp.dropout_seed = Some(seed(j));
                losses.push(model.forward_backward(gpu, &inp, &b.targets, scale)?);
            }
            (losses, tokens)
        })
    }

    /// One optimizer step: zero the gradients, forward and backward every micro-batch
    /// (the loss normalised by the trained tokens of the whole step), clip, AdamW.
    pub async fn step(&mut self, gpu: &Gpu, model: &Model, train: &Dataset) -> Result<StepStats> {
        let started = crate::clock::now();
        model.zero_grads(gpu);
        // Forward and backward under the device's error scopes: an out-of-memory returns
        // here, before the optimizer has moved (`Run::next` steps down and runs it again).
        let (losses, tokens) = gpu.scoped(|| self.forward_backward(gpu, model, train)).await?;
        let lr = self.lr();
        let opt = AdamW { lr: lr as f32, weight_decay: self.opts.weight_decay as f32, ..AdamW::default() };
        let norm = model.optimizer_step(gpu, &opt, self.step + 1, self.opts.max_grad_norm as f32)?;
        let mut loss = 0.0;
        let mut metrics = None;
        for l in &losses {
            let v = gpu.read::<f32>(l).await?;
            loss += v[0] as f64;
            if self.dpo.is_some() {
                metrics = Some(Preference::from_stats(&v));
            }
        }
        let grad_norm = gpu.read::<f32>(&norm).await?[0] as f64;
        self.step += 1;
        let secs = crate::clock::now() - started;
        Ok(StepStats { step: self.step, loss, lr, grad_norm, tokens, tokens_per_s: tokens as f64 / secs.max(1e-9), valid_loss: None, dpo: metrics })
    }
}

/// Mean loss per trained token over a dataset (no gradients), in batches of up to
/// `batch_size` (fewer where a binding needs it, `fit_binding`).
pub async fn evaluate(gpu: &Gpu, model: &Model, data: &Dataset, batch_size: usize, pad_id: u32) -> Result<(f64, usize)> {
    let mut total = 0.0;
    let mut count = 0;
    let idx: Vec<usize> = (0..data.sequences.len()).collect();
    let batches = fit_binding(gpu, model, data, idx.chunks(batch_size.max(1)), batch_rows);
    let sizing = sizing_for(gpu, data, batches.iter().map(Vec::as_slice), batch_rows);
    for batch in &batches {
        let b = Batch::new(&batch.iter().map(|&i| &data.sequences[i]).collect::<Vec<_>>(), pad_id);
        sizing.batch(b.b * b.t);
        let loss = model.loss(gpu, &inputs(gpu, &b)?, &b.targets, 1.0)?;
        total += gpu.read::<f32>(&loss).await?[0] as f64;
        count += b.trained_tokens();
    }
    if count == 0 {
        return Err(Error::Data("nothing to evaluate: no trained tokens".into()));
    }
    Ok((total / count as f64, count))
}

/// What `webtune eval` reports of preference pairs under a model (dropout off): each
/// side's loss per completion token, and the share of pairs whose chosen completion
/// has the higher log-probability (the demo's held-out DPO measure).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PairEval {
    pub pairs: usize,
    pub chosen_loss: f64,
    pub chosen_tokens: usize,
    pub rejected_loss: f64,
    pub rejected_tokens: usize,
    pub prefers_chosen: f64,
}

/// `PairEval` of a preference dataset, in batches of up to `batch_size` pairs
/// (`pair_logps`).
pub async fn evaluate_preferences(gpu: &Gpu, model: &Model, data: &Dataset, batch_size: usize, pad_id: u32) -> Result<PairEval> {
    if !data.pairs || data.items() == 0 {
        return Err(Error::Data("nothing to evaluate: no preference pairs".into()));
    }
    let lp = pair_logps(gpu, model, data, batch_size, pad_id).await?;
    let tokens = |side: usize| (0..data.items()).map(|i| data.sequences[2 * i + side].trained_targets()).sum::<usize>();
    let loss = |side: usize| -lp.iter().map(|p| p[side] as f64).sum::<f64>() / tokens(side).max(1) as f64;
    Ok(PairEval {
        pairs: data.items(),
        chosen_loss: loss(0),
        chosen_tokens: tokens(0),
        rejected_loss: loss(1),
        rejected_tokens: tokens(1),
        prefers_chosen: lp.iter().filter(|p| p[0] > p[1]).count() as f64 / lp.len() as f64,
    })
}

/// DPO over a preference dataset (no gradients, dropout off) against its reference
/// log-probabilities, in batches of up to `batch_size` pairs (`fit_binding`): (mean
/// loss, the metrics' means over the pairs).
pub async fn evaluate_pairs(gpu: &Gpu, model: &Model, data: &Dataset, reference: &[[f32; 2]], dpo: &Dpo, batch_size: usize, pad_id: u32) -> Result<(f64, Preference)> {
    if data.items() == 0 || reference.len() != data.items() {
        return Err(Error::Data(format!("nothing to evaluate: {} pairs, {} reference log-probabilities", data.items(), reference.len())));
    }
    let scale = 1.0 / data.items() as f32;
    let sft = dpo.sft_scale((0..data.items()).map(|i| data.sequences[2 * i].trained_targets()).sum());
    let stats = dpo_stats(gpu)?;
    let idx: Vec<usize> = (0..data.items()).collect();
    let batches = fit_binding(gpu, model, data, idx.chunks(batch_size.max(1)), pair_rows);
    let sizing = sizing_for(gpu, data, batches.iter().map(Vec::as_slice), pair_rows);
    for chunk in &batches {
        let (rs, pb, r, c) = pair_inputs(gpu, data, chunk, reference, pad_id)?;
        let b = &pb.batch;
        sizing.batch(b.b * b.t);
        let logps = model.sequence_logps(gpu, &inputs(gpu, b)?, &b.targets, &rs)?;
        let mut rec = gpu.recorder("dpo eval");
        crate::kernels::dpo_forward(gpu, &mut rec, dpo, chunk.len(), scale, sft, &logps, &r, &c, &stats)?;
        gpu.submit(rec);
    }
    let s = gpu.read::<f32>(&stats).await?;
    Ok((s[0] as f64, Preference::from_stats(&s)))
}
