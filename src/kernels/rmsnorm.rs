//! Launchers for `kernels/rmsnorm.wgsl`.

use super::{check, check_binding, groups, loop_span, spans, RMSNORM};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    r0: u32,
}

fn params(gpu: &Gpu, op: &str, rows: usize, c: usize, eps: f32) -> Result<Params> {
    check(rows > 0 && c > 0, op, || format!("empty shape [{rows}, {c}]"))?;
    // A row's invocation loops over it twice.
    check(2 * c + 16 <= gpu.caps.max_loop as usize, op, || {
        format!("rows of {c} exceed this driver's loop budget of {} iterations per invocation", gpu.caps.max_loop)
    })?;
    Ok(Params { rows: rows as u32, c: c as u32, eps, r0: 0 })
}

/// `y = w · x · rstd` row by row; x, y `[rows, c]`, w `[c]`, saves rstd `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    rows: usize,
    c: usize,
    eps: f32,
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let op = "rmsnorm_forward";
    let p = params(gpu, op, rows, c, eps)?;
    x.expect(op, "x", DType::F32, rows * c)?;
    w.expect(op, "w", DType::F32, c)?;
    y.expect(op, "y", DType::F32, rows * c)?;
    rstd.expect(op, "rstd", DType::F32, rows)?;
    check_binding(gpu, op, &[x, y])?;
    let pipeline = gpu.pipeline(&RMSNORM, op, &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        op,
        &p,
        &[(1, x.into()), (2, w.into()), (3, y.into()), (4, rstd.into())],
        [groups(rows, 64), 1, 1],
    )
}

/// Adds into `dx` `[rows, c]` and `dw` `[c]` given x, w, the saved rstd and dy.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    rows: usize,
    c: usize,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    dw: &Tensor,
) -> Result<()> {
    let op = "rmsnorm_backward";
    let p = params(gpu, op, rows, c, 0.0)?;
    x.expect(op, "x", DType::F32, rows * c)?;
    w.expect(op, "w", DType::F32, c)?;
    rstd.expect(op, "rstd", DType::F32, rows)?;
    dy.expect(op, "dy", DType::F32, rows * c)?;
    dx.expect(op, "dx", DType::F32, rows * c)?;
    dw.expect(op, "dw", DType::F32, c)?;
    check_binding(gpu, op, &[x, dy, dx])?;
    let pipeline = gpu.pipeline(&RMSNORM, "rmsnorm_backward_dx", &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        "rmsnorm_backward_dx",
        &p,
        &[(1, x.into()), (2, w.into()), (5, rstd.into()), (6, dy.into()), (7, dx.into())],
        [groups(rows, 64), 1, 1],
    )?;
    // Each column sums its rows in ranges that fit the loop budget (rows r0..r1).
    let pipeline = gpu.pipeline(&RMSNORM, "rmsnorm_backward_dw", &[]);
    for (r0, r1) in spans(rows, loop_span(gpu, 1, 16)) {
        gpu.dispatch(
            rec,
            &pipeline,
            "rmsnorm_backward_dw",
            &Params { rows: r1 as u32, r0: r0 as u32, ..p },
            &[(1, x.into()), (5, rstd.into()), (6, dy.into()), (8, dw.into())],
            [groups(c, 64), 1, 1],
        )?;
    }
    Ok(())
}
