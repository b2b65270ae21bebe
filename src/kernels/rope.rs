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
    _p0: u32,
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
    h: usize,
    hs: usize,
    x: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    check(n > 0 && h > 0 && hs > 0 && hs % 2 == 0, op, || format!("shape [{n}, {h}, {hs}] needs an even head size"))?;
    x.expect(op, "x", DType::F32, n * h * hs)?;
    pos.expect(op, "pos", DType::U32, n)?;
    inv_freq.expect(op, "inv_freq", DType::F32, hs / 2)?;
    check_binding(gpu, op, &[x])?;
    let p = Params { n: n as u32, h: h as u32, hs: hs as u32, _p0: 0 };
    let pipeline = gpu.pipeline(&ROPE, op, &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        op,
        &p,
        &[(1, x.into()), (2, pos.into()), (3, inv_freq.into())],
        grid_1d(n * h * hs / 2),
    )
}

/// Rotate x `[n, h, hs]` in place by `pos[t] · inv_freq[i]` (rotate_half convention).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    h: usize,
    hs: usize,
    x: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    rotate(gpu, rec, "rope_forward", n, h, hs, x, pos, inv_freq)
}

/// Rotate the gradient dx `[n, h, hs]` back in place (the transpose of the forward).
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    h: usize,
    hs: usize,
    dx: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
) -> Result<()> {
    rotate(gpu, rec, "rope_backward", n, h, hs, dx, pos, inv_freq)
}
