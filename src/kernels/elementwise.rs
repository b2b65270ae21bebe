//! Launchers for `kernels/elementwise.wgsl`.

use super::{check, check_binding, grid_1d, groups, loop_span, spans, ELEMENTWISE};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    alpha: f32,
    /// bias_backward's first row
    aux: u32,
}

fn run(
    gpu: &Gpu,
    rec: &mut Recorder,
    op: &'static str,
    p: Params,
    binds: &[(u32, Bind<'_>)],
    grid: [u32; 3],
) -> Result<()> {
    let pipeline = gpu.pipeline(&ELEMENTWISE, op, &[]);
    gpu.dispatch(rec, &pipeline, op, &p, binds, grid)
}

fn check_all(gpu: &Gpu, op: &str, n: usize, ts: &[(&Tensor, &str)]) -> Result<()> {
    check(n > 0, op, || "empty".into())?;
    for (t, name) in ts {
        t.expect(op, name, DType::F32, n)?;
    }
    check_binding(gpu, op, &ts.iter().map(|(t, _)| *t).collect::<Vec<_>>())
}

/// `out = a + b`, all `[n]`.
pub fn add(gpu: &Gpu, rec: &mut Recorder, n: usize, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    check_all(gpu, "add", n, &[(a, "a"), (b, "b"), (out, "out")])?;
    let p = Params { n: n as u32, c: 0, alpha: 0.0, aux: 0 };
    run(gpu, rec, "add", p, &[(1, a.into()), (2, b.into()), (3, out.into())], grid_1d(n))
}

/// `y += alpha · x`, both `[n]`.
pub fn axpy(gpu: &Gpu, rec: &mut Recorder, n: usize, alpha: f32, x: &Tensor, y: &Tensor) -> Result<()> {
    check_all(gpu, "axpy", n, &[(x, "x"), (y, "y")])?;
    let p = Params { n: n as u32, c: 0, alpha, aux: 0 };
    run(gpu, rec, "axpy", p, &[(4, x.into()), (5, y.into())], grid_1d(n))
}

/// `y = alpha · y`, `[n]`.
pub fn scale(gpu: &Gpu, rec: &mut Recorder, n: usize, alpha: f32, y: &Tensor) -> Result<()> {
    check_all(gpu, "scale", n, &[(y, "y")])?;
    let p = Params { n: n as u32, c: 0, alpha, aux: 0 };
    run(gpu, rec, "scale", p, &[(5, y.into())], grid_1d(n))
}

/// `y[r, :] += bias` for y `[rows, c]`, bias `[c]`.
pub fn add_bias(gpu: &Gpu, rec: &mut Recorder, rows: usize, c: usize, bias: &Tensor, y: &Tensor) -> Result<()> {
    check_all(gpu, "add_bias", rows * c, &[(y, "y")])?;
    bias.expect("add_bias", "bias", DType::F32, c)?;
    let p = Params { n: (rows * c) as u32, c: c as u32, alpha: 0.0, aux: 0 };
    run(gpu, rec, "add_bias", p, &[(5, y.into()), (6, bias.into())], grid_1d(rows * c))
}

/// `dbias += Σ_r dy[r, :]` for dy `[rows, c]`, dbias `[c]`.
pub fn bias_backward(gpu: &Gpu, rec: &mut Recorder, rows: usize, c: usize, dy: &Tensor, dbias: &Tensor) -> Result<()> {
    check_all(gpu, "bias_backward", rows * c, &[(dy, "dy")])?;
    dbias.expect("bias_backward", "dbias", DType::F32, c)?;
    for (r0, r1) in spans(rows, loop_span(gpu, 1, 16)) {
        let p = Params { n: (r1 * c) as u32, c: c as u32, alpha: 0.0, aux: r0 as u32 };
        run(gpu, rec, "bias_backward", p, &[(7, dbias.into()), (8, dy.into())], [groups(c, 256), 1, 1])?;
    }
    Ok(())
}
