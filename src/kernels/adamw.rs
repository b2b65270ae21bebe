//! Launchers for `kernels/adamw.wgsl`: global gradient norm and the AdamW update.

use super::{check, check_binding, grid_1d, reducing, ADAMW};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

/// torch.optim.AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamW {
    /// (step size lr/bc1, sqrt(bc2), decay factor 1 − lr·wd) for 1-based `step`,
    /// computed in f64 as torch does with Python floats.
    pub fn factors(&self, step: u64) -> (f32, f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(step as i32);
        ((self.lr as f64 / bc1) as f32, bc2.sqrt() as f32, (1.0 - self.lr as f64 * self.weight_decay as f64) as f32)
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
struct Params {
    n: u32,
    slot: u32,
    max_norm: f32,
    _p0: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    _p1: u32,
}

/// `norm[0] = sqrt(Σ over all grads of g²)`, `norm[1] = min(1, max_norm / (norm + 1e-6))`
/// (torch's clip_grad_norm_ factor; max_norm ≤ 0 or infinite disables clipping).
pub fn grad_norm(gpu: &Gpu, rec: &mut Recorder, grads: &[&Tensor], max_norm: f32, norm: &Tensor) -> Result<()> {
    let op = "grad_norm";
    check(!grads.is_empty(), op, || "no gradients".into())?;
    norm.expect(op, "norm", DType::F32, 2)?;
    check_binding(gpu, op, grads)?;
    let wgs: Vec<usize> = grads.iter().map(|g| g.numel().div_ceil(256).clamp(1, 256)).collect();
    let partial = gpu.temp(rec, "grad_norm partial", DType::F32, &[wgs.iter().sum()])?;
    let pipeline = gpu.pipeline(reducing(gpu, &ADAMW), "sumsq_partial", &[]);
    let mut slot = 0;
    for (g, &w) in grads.iter().zip(&wgs) {
        check(g.dtype == DType::F32, op, || format!("`{}` is not f32", g.label))?;
        let p = Params { n: g.numel() as u32, slot: slot as u32, ..Default::default() };
        gpu.dispatch(rec, &pipeline, "sumsq_partial", &p, &[(1, (*g).into()), (2, (&partial).into())], [w as u32, 1, 1])?;
        slot += w;
    }
    let max_norm = if max_norm > 0.0 && max_norm.is_finite() { max_norm } else { f32::MAX };
    let p = Params { n: slot as u32, max_norm, ..Default::default() };
    let pipeline = gpu.pipeline(reducing(gpu, &ADAMW), "grad_norm_finalize", &[]);
    gpu.dispatch(rec, &pipeline, "grad_norm_finalize", &p, &[(3, (&partial).into()), (4, norm.into())], [1, 1, 1])
}

/// One AdamW step (1-based `step`) on `param` with `grad` scaled by the clip factor
/// `norm[1]`; `m` and `v` are the moment estimates. All `[n]` except norm `[2]`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    rec: &mut Recorder,
    opt: &AdamW,
    step: u64,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    norm: &Tensor,
) -> Result<()> {
    let op = "adamw_step";
    let n = param.numel();
    check(n > 0 && step > 0, op, || format!("n {n}, step {step} (steps count from 1)"))?;
    for (t, name) in [(param, "param"), (grad, "grad"), (m, "m"), (v, "v")] {
        t.expect(op, name, DType::F32, n)?;
    }
    norm.expect(op, "norm", DType::F32, 2)?;
    check_binding(gpu, op, &[param, grad, m, v])?;
    let (step_size, bc2_sqrt, decay) = opt.factors(step);
    let p = Params {
        n: n as u32,
        lr: opt.lr,
        beta1: opt.beta1,
        beta2: opt.beta2,
        eps: opt.eps,
        decay,
        step_size,
        bc2_sqrt,
        ..Default::default()
    };
    let pipeline = gpu.pipeline(reducing(gpu, &ADAMW), op, &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        op,
        &p,
        &[(1, grad.into()), (5, norm.into()), (6, param.into()), (7, m.into()), (8, v.into())],
        grid_1d(n),
    )
}

