//! Launchers for `kernels/rope.wgsl`.

use super::{check, check_binding, grid_1d, ROPE};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    h: u32,
    hs: u32,
    hk: u32,
}

/// The inverse frequencies `1 / theta^(2i/HS)` for i in 0..HS/2 (no rope scaling).
pub fn inv_freq(hs: usize, theta: f64) -> Vec<f32> {
    (0..hs / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / hs as f64)) as f32).collect()
}

#[allow(clippy::too_many_arguments)]
fn rotate(
    gpu: &Gpu,
    rec: &mut Recorder,
    op: &'static str,
    n: usize,
    (h, hk): (usize, usize),
    hs: usize,
    q: &Tensor,
    k: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    check(n > 0 && h > 0 && hk > 0 && hs > 0 && hs.is_multiple_of(2), op, || format!("shapes [{n}, {h}, {hs}] and [{n}, {hk}, {hs}] need an even head size"))?;
    q.expect(op, "q", DType::F32, n * h * hs)?;
    k.expect(op, "k", DType::F32, n * hk * hs)?;
    pos.expect(op, "pos", DType::U32, n)?;
    inv_freq.expect(op, "inv_freq", DType::F32, hs / 2)?;
    check_binding(gpu, op, &[q, k])?;
    let p = Params { n: n as u32, h: h as u32, hs: hs as u32, hk: hk as u32 };
    let pipeline = gpu.pipeline(&ROPE, op, &[]);
    let binds = [(1, q.into()), (2, pos.into()), (3, inv_freq.into()), (4, k.into())];
    gpu.dispatch(rec, &pipeline, op, &p, &binds, grid_1d(n * (h + hk) * hs / 2))
}

/// Rotate q `[n, h, hs]` and k `[n, hk, hs]` in place by `pos[t] · inv_freq[i]`
/// (rotate_half convention), in one dispatch.
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    (h, hk): (usize, usize),
    hs: usize,
    q: &Tensor,
    k: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    rotate(gpu, rec, "rope_forward", n, (h, hk), hs, q, k, pos, inv_freq)
}

/// Rotate the gradients dq `[n, h, hs]` and dk `[n, hk, hs]` back in place (the
/// transpose of the forward).
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    (h, hk): (usize, usize),
    hs: usize,
    dq: &Tensor,
    dk: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    rotate(gpu, rec, "rope_backward", n, (h, hk), hs, dq, dk, pos, inv_freq)
}
