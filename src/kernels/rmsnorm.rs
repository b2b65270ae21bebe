//! Launchers for `kernels/rmsnorm.wgsl`.

use super::{check, check_binding, groups, loop_span, spans, RMSNORM};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor, Variant};

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
    // A row's invocation loops over it twice; in the tiled variant over a 64th of it,
    // and sums the dw of DW_ROWS rows.
    let loops = if gpu.caps.variant == Variant::Tiled { (2 * c.div_ceil(64)).max(DW_ROWS) } else { 2 * c };
    check(loops + 16 <= gpu.caps.max_loop as usize, op, || {
        format!("rows of {c} exceed this driver's loop budget of {} iterations per invocation", gpu.caps.max_loop)
    })?;
    Ok(Params { rows: rows as u32, c: c as u32, eps, r0: 0 })
}

/// A grid of one workgroup per row, spilling past 65,535 rows into y.
fn row_grid(rows: usize) -> [u32; 3] {
    [rows.min(65535) as u32, rows.div_ceil(65535) as u32, 1]
}

/// Rows one `rmsnorm_backward_dw_part` workgroup sums (`DW_ROWS` in the WGSL).
const DW_ROWS: usize = 64;

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
    let (name, grid) = match gpu.caps.variant {
        Variant::Register => ("rmsnorm_forward_row", [groups(rows, 64), 1, 1]),
        Variant::Tiled => ("rmsnorm_forward_tiled", row_grid(rows)),
    };
    let pipeline = gpu.pipeline(&RMSNORM, name, &[]);
    gpu.dispatch(rec, &pipeline, name, &p, &[(1, x.into()), (2, w.into()), (3, y.into()), (4, rstd.into())], grid)
}

/// Adds into `dx` `[rows, c]` and, where the weight trains, `dw` `[c]`, given x, w,
/// the saved rstd and dy.
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
    dw: Option<&Tensor>,
) -> Result<()> {
    let op = "rmsnorm_backward";
    let p = params(gpu, op, rows, c, 0.0)?;
    x.expect(op, "x", DType::F32, rows * c)?;
    w.expect(op, "w", DType::F32, c)?;
    rstd.expect(op, "rstd", DType::F32, rows)?;
    dy.expect(op, "dy", DType::F32, rows * c)?;
    dx.expect(op, "dx", DType::F32, rows * c)?;
    if let Some(dw) = dw {
        dw.expect(op, "dw", DType::F32, c)?;
    }
    check_binding(gpu, op, &[x, dy, dx])?;
    let tiled = gpu.caps.variant == Variant::Tiled;
    let (name, grid) = if tiled { ("rmsnorm_backward_dx_tiled", row_grid(rows)) } else { ("rmsnorm_backward_dx_row", [groups(rows, 64), 1, 1]) };
    let pipeline = gpu.pipeline(&RMSNORM, name, &[]);
    gpu.dispatch(rec, &pipeline, name, &p, &[(1, x.into()), (2, w.into()), (5, rstd.into()), (6, dy.into()), (7, dx.into())], grid)?;
    let Some(dw) = dw else { return Ok(()) };
    if tiled {
        // Each block of DW_ROWS rows sums its columns, then the blocks are summed (in
        // ranges of blocks that fit the loop budget).
        let blocks = rows.div_ceil(DW_ROWS);
        let part = gpu.pooled("rmsnorm dw blocks", DType::F32, &[blocks, c])?;
        let pipeline = gpu.pipeline(&RMSNORM, "rmsnorm_backward_dw_part", &[]);
        let binds = [(1, x.into()), (5, rstd.into()), (6, dy.into()), (9, (&part).into())];
        gpu.dispatch(rec, &pipeline, "rmsnorm_backward_dw_part", &p, &binds, [groups(c, 64), blocks as u32, 1])?;
        let pipeline = gpu.pipeline(&RMSNORM, "rmsnorm_backward_dw_sum", &[]);
        for (b0, b1) in spans(blocks, loop_span(gpu, 1, 16)) {
            let binds = [(8, dw.into()), (10, (&part).into())];
            gpu.dispatch(rec, &pipeline, "rmsnorm_backward_dw_sum", &Params { rows: b1 as u32, r0: b0 as u32, ..p }, &binds, [groups(c, 64), 1, 1])?;
        }
        return Ok(());
    }
    // Each column sums its rows in ranges that fit the loop budget (rows r0..r1).
    let pipeline = gpu.pipeline(&RMSNORM, "rmsnorm_backward_dw_row", &[]);
    for (r0, r1) in spans(rows, loop_span(gpu, 1, 16)) {
        gpu.dispatch(
            rec,
            &pipeline,
            "rmsnorm_backward_dw_row",
            &Params { rows: r1 as u32, r0: r0 as u32, ..p },
            &[(1, x.into()), (5, rstd.into()), (6, dy.into()), (8, dw.into())],
            [groups(c, 64), 1, 1],
        )?;
    }
    Ok(())
}
