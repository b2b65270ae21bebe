//! Launchers for `kernels/swiglu.wgsl`.

use super::{check, check_binding, grid_1d, SWIGLU};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _p: [u32; 3],
}

/// `h = silu(gate) · up`, all `[n]`.
pub fn swiglu_forward(gpu: &Gpu, rec: &mut Recorder, n: usize, gate: &Tensor, up: &Tensor, h: &Tensor) -> Result<()> {
    let op = "swiglu_forward";
    check(n > 0, op, || "empty".into())?;
    for (t, name) in [(gate, "gate"), (up, "up"), (h, "h")] {
        t.expect(op, name, DType::F32, n)?;
    }
    check_binding(gpu, op, &[gate, up, h])?;
    let pipeline = gpu.pipeline(&SWIGLU, op, &[]);
    let p = Params { n: n as u32, _p: [0; 3] };
    gpu.dispatch(rec, &pipeline, op, &p, &[(1, gate.into()), (2, up.into()), (3, h.into())], grid_1d(n))
}

/// Adds into `dgate` and `dup` given gate, up and dh, all `[n]`.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    gate: &Tensor,
    up: &Tensor,
    dh: &Tensor,
    dgate: &Tensor,
    dup: &Tensor,
) -> Result<()> {
    let op = "swiglu_backward";
    check(n > 0, op, || "empty".into())?;
    for (t, name) in [(gate, "gate"), (up, "up"), (dh, "dh"), (dgate, "dgate"), (dup, "dup")] {
        t.expect(op, name, DType::F32, n)?;
    }
    check_binding(gpu, op, &[gate, up, dh, dgate, dup])?;
    let pipeline = gpu.pipeline(&SWIGLU, op, &[]);
    let p = Params { n: n as u32, _p: [0; 3] };
    gpu.dispatch(
        rec,
        &pipeline,
        op,
        &p,
        &[(1, gate.into()), (2, up.into()), (4, dh.into()), (5, dgate.into()), (6, dup.into())],
        grid_1d(n),
    )
}
