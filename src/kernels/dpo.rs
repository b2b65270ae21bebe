//! Launchers for `kernels/dpo.wgsl`: the DPO loss and its metrics from per-sequence
//! log-probabilities, and each sequence's factor for the cross-entropy backward.

use super::{check, groups, DPO};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Recorder, Tensor};

/// Which preference loss (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLoss {
    /// −log σ(βh); with label smoothing ε, conservative DPO.
    Sigmoid,
    /// (hc/nc − hr/nr − 1/(2β))², per completion token.
    Ipo,
    /// Robust DPO: the label flipped with probability ε, unbiased.
    Robust,
}

/// The loss by its option name (`--loss sigmoid`).
impl std::fmt::Display for DpoLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Ipo => "ipo",
            DpoLoss::Robust => "robust",
        })
    }
}

impl std::str::FromStr for DpoLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DpoLoss, String> {
        match s {
            "sigmoid" => Ok(DpoLoss::Sigmoid),
            "ipo" => Ok(DpoLoss::Ipo),
            "robust" => Ok(DpoLoss::Robust),
            other => Err(format!("unknown DPO loss `{other}`: expected sigmoid, ipo or robust")),
        }
    }
}

/// The loss and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dpo {
    pub loss: DpoLoss,
    pub beta: f32,
    /// Label smoothing ε (sigmoid: cDPO; robust: the flip probability).
    pub eps: f32,
    /// RPO's weight α of the NLL on the chosen completions (TRL's `loss_type` "sft"
    /// with this `loss_weights` entry; older TRL's `rpo_alpha`); 0: none.
    pub rpo_alpha: f32,
}

impl Dpo {
    pub fn new(loss: DpoLoss, beta: f32, eps: f32) -> Result<Dpo> {
        if !(beta > 0.0 && beta.is_finite()) {
            return Err(Error::Options(format!("--beta must be positive, got {beta}")));
        }
        let ok = match loss {
            DpoLoss::Sigmoid => (0.0..=0.5).contains(&eps),
            DpoLoss::Robust => (0.0..0.5).contains(&eps),
            DpoLoss::Ipo => eps == 0.0,
        };
        if !ok {
            return Err(Error::Options(format!(
                "--label-smoothing {eps} does not fit --loss {loss}: sigmoid takes [0, 0.5], robust [0, 0.5), ipo none"
            )));
        }
        Ok(Dpo { loss, beta, eps, rpo_alpha: 0.0 })
    }

    /// With RPO's NLL term on the chosen completions, weighted `alpha` (≥ 0).
    pub fn with_rpo(self, alpha: f32) -> Result<Dpo> {
        if !(alpha >= 0.0 && alpha.is_finite()) {
            return Err(Error::Options(format!("--rpo-alpha must be 0 or more, got {alpha}")));
        }
        Ok(Dpo { rpo_alpha: alpha, ..self })
    }

    /// The NLL term's factor for a step of `chosen_tokens` chosen completion tokens: α /
    /// chosen_tokens (their mean NLL, as TRL takes it over the batch), 0 without RPO.
    pub fn sft_scale(&self, chosen_tokens: usize) -> f32 {
        if self.rpo_alpha == 0.0 { 0.0 } else { self.rpo_alpha / chosen_tokens.max(1) as f32 }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    pairs: u32,
    loss: u32,
    _p0: u32,
    _p1: u32,
    beta: f32,
    eps: f32,
    scale: f32,
    sft: f32,
}

fn params(d: &Dpo, pairs: usize, scale: f32, sft: f32) -> Params {
    let loss = match d.loss {
        DpoLoss::Sigmoid => 0,
        DpoLoss::Ipo => 1,
        DpoLoss::Robust => 2,
    };
    Params { pairs: pairs as u32, loss, _p0: 0, _p1: 0, beta: d.beta, eps: d.eps, scale, sft }
}

fn check_args(op: &str, pairs: usize, logps: &Tensor, ref_logps: &Tensor, counts: &Tensor) -> Result<()> {
    check(pairs > 0, op, || "no pairs".into())?;
    logps.expect(op, "logps", DType::F32, 2 * pairs)?;
    ref_logps.expect(op, "ref_logps", DType::F32, 2 * pairs)?;
    counts.expect(op, "counts", DType::F32, 2 * pairs)
}

/// `stats` `[8]` += scale · Σ over the pairs of (loss, rewards/chosen, rewards/rejected,
/// rewards/accuracies, rewards/margins, logps/chosen, logps/rejected), the last slot 0;
/// the loss also += sft · Σ −logps/chosen (RPO's NLL term, `Dpo::sft_scale`).
#[allow(clippy::too_many_arguments)]
pub fn dpo_forward(gpu: &Gpu, rec: &mut Recorder, d: &Dpo, pairs: usize, scale: f32, sft: f32, logps: &Tensor, ref_logps: &Tensor, counts: &Tensor, stats: &Tensor) -> Result<()> {
    let op = "dpo_forward";
    check_args(op, pairs, logps, ref_logps, counts)?;
    stats.expect(op, "stats", DType::F32, 8)?;
    check(pairs + 16 <= gpu.caps.max_loop as usize, op, || format!("{pairs} pairs exceed this driver's loop budget"))?;
    let pipeline = gpu.pipeline(&DPO, op, &[]);
    gpu.dispatch(rec, &pipeline, op, &params(d, pairs, scale, sft), &[(1, logps.into()), (2, ref_logps.into()), (3, counts.into()), (4, stats.into())], [1, 1, 1])
}

/// `coef` `[2P]` = −d(loss · scale + sft · Σ −logps/chosen)/d(logps).
#[allow(clippy::too_many_arguments)]
pub fn dpo_backward(gpu: &Gpu, rec: &mut Recorder, d: &Dpo, pairs: usize, scale: f32, sft: f32, logps: &Tensor, ref_logps: &Tensor, counts: &Tensor, coef: &Tensor) -> Result<()> {
    let op = "dpo_backward";
    check_args(op, pairs, logps, ref_logps, counts)?;
    coef.expect(op, "coef", DType::F32, 2 * pairs)?;
    let pipeline = gpu.pipeline(&DPO, op, &[]);
    gpu.dispatch(rec, &pipeline, op, &params(d, pairs, scale, sft), &[(1, logps.into()), (2, ref_logps.into()), (3, counts.into()), (5, coef.into())], [groups(pairs, 64), 1, 1])
}
