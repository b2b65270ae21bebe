//! Launchers for `kernels/rmsnorm.wgsl`.

use super::{check, check_binding, groups, lora_down_group, loop_span, spans, Lora, reducing, RMSNORM};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor, Variant};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    r0: u32,
    rank: u32,
    s: f32,
    pairs: u32,
    drop_p: f32,
    a_off: [u32; 4],
    h_off: [u32; 4],
    key: [u32; 4],
}

fn params(gpu: &Gpu, op: &str, rows: usize, c: usize, eps: f32) -> Result<Params> {
    check(rows > 0 && c > 0, op, || format!("empty shape [{rows}, {c}]"))?;
    // A row's invocation loops over it twice; in the tiled variant over a 64th of it,
    // and sums the dw of DW_ROWS rows.
    let loops = if gpu.caps.variant == Variant::Tiled { (2 * c.div_ceil(64)).max(DW_ROWS) } else { 2 * c };
    check(loops + 16 <= gpu.caps.max_loop as usize, op, || {
        format!("rows of {c} exceed this driver's loop budget of {} iterations per invocation", gpu.caps.max_loop)
    })?;
    Ok(Params { rows: rows as u32, c: c as u32, eps, r0: 0, rank: 0, s: 0.0, pairs: 0, drop_p: 0.0, a_off: [0; 4], h_off: [0; 4], key: [0; 4] })
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
    let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), name, &[]);
    gpu.dispatch(rec, &pipeline, name, &p, &[(1, x.into()), (2, w.into()), (3, y.into()), (4, rstd.into())], grid)
}

/// `rmsnorm_forward`, then the LoRA down products `h = dropout(y)·Aᵀ` of the pairs `ls`
/// on the layers that read y (`lora_down_group`'s, which it is where it cannot be one
/// dispatch): the row kernels make each pair's h from the finished row, where the
/// pairs are of one rank and dropout, at most 4, their A's and h's each in one binding,
/// within the driver's loop budget.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_lora_down(
    gpu: &Gpu,
    rec: &mut Recorder,
    rows: usize,
    c: usize,
    eps: f32,
    (x, w, y, rstd): (&Tensor, &Tensor, &Tensor, &Tensor),
    ls: &[Lora],
    a: &[&Tensor],
    h: &[&Tensor],
) -> Result<()> {
    let op = "rmsnorm_forward_lora_down";
    check(a.len() == ls.len() && h.len() == ls.len(), op, || format!("{} pairs, {} A's and {} h's", ls.len(), a.len(), h.len()))?;
    let alike = ls.iter().all(|l| l.r == ls[0].r && l.dropout == ls[0].dropout && l.n == rows && l.din == c && l.glu.is_none());
    let rank = ls.first().map_or(0, |l| l.r);
    let fused = alike && (1..=4).contains(&ls.len()) && LoraDh::fits(gpu, c, ls.len() * rank);
    let spans = (Tensor::span("LoRA A", a, gpu.caps.max_binding), Tensor::span("LoRA h", h, gpu.caps.max_binding));
    let (true, Some((ta, oa)), Some((th, oh))) = (fused, spans.0, spans.1) else {
        rmsnorm_forward(gpu, rec, rows, c, eps, x, w, y, rstd)?;
        return lora_down_group(gpu, rec, ls, y, a, h);
    };
    let mut p = params(gpu, op, rows, c, eps)?;
    x.expect(op, "x", DType::F32, rows * c)?;
    w.expect(op, "w", DType::F32, c)?;
    y.expect(op, "y", DType::F32, rows * c)?;
    rstd.expect(op, "rstd", DType::F32, rows)?;
    for (i, l) in ls.iter().enumerate() {
        a[i].expect(op, "a", DType::F32, l.r * c)?;
        h[i].expect(op, "h", DType::F32, rows * l.r)?;
        p.a_off[i] = oa[i] as u32;
        p.h_off[i] = oh[i] as u32;
        p.key[i] = crate::rng::hash(l.seed);
    }
    (p.rank, p.pairs, p.drop_p) = (rank as u32, ls.len() as u32, ls[0].dropout);
    check_binding(gpu, op, &[x, y, &ta, &th])?;
    let (name, grid) = match gpu.caps.variant {
        Variant::Register => ("rmsnorm_forward_down_row", [groups(rows, 64), 1, 1]),
        Variant::Tiled => ("rmsnorm_forward_down_tiled", row_grid(rows)),
    };
    let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), name, &[]);
    let binds = [(1, x.into()), (2, w.into()), (3, y.into()), (4, rstd.into()), (13, (&ta).into()), (14, (&th).into())];
    gpu.dispatch(rec, &pipeline, name, &p, &binds, grid)
}

/// A LoRA pair's `dh = s·dx·B` that `rmsnorm_backward` makes from the finished dx:
/// B `[c, rank]` (the pair of the linear layer whose output gradient dx is), dh
/// `[rows, rank]` (written).
#[derive(Clone, Copy)]
pub struct LoraDh<'a> {
    pub s: f32,
    pub rank: usize,
    pub b: &'a Tensor,
    pub dh: &'a Tensor,
}

impl LoraDh<'_> {
    /// Whether the row kernels make this dh within the driver's loop budget (a row
    /// invocation of the CPU drivers' kernel sums c · rank products).
    pub fn fits(gpu: &Gpu, c: usize, rank: usize) -> bool {
        let per_row = if gpu.caps.variant == Variant::Tiled { c.div_ceil(64) * DH_COLS + 64 } else { c * DH_COLS };
        rank > 0 && 2 * c + per_row + 16 <= gpu.caps.max_loop as usize
    }
}

/// Columns of dh a row kernel sums at once (`DH_COLS` in the WGSL).
const DH_COLS: usize = 16;

/// Adds into `dx` `[rows, c]` and, where the weight trains, `dw` `[c]`, given x, w,
/// the saved rstd and dy; with `lora`, then makes a LoRA pair's dh from each finished
/// row of dx (`LoraDh`: dx is the output gradient of the linear layer the pair is on).
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
    lora: Option<LoraDh>,
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
    let name = match (tiled, lora.is_some()) {
        (true, false) => "rmsnorm_backward_dx_tiled",
        (true, true) => "rmsnorm_backward_dx_dh_tiled",
        (false, false) => "rmsnorm_backward_dx_row",
        (false, true) => "rmsnorm_backward_dx_dh_row",
    };
    let grid = if tiled { row_grid(rows) } else { [groups(rows, 64), 1, 1] };
    let mut binds = vec![(1, x.into()), (2, w.into()), (5, rstd.into()), (6, dy.into()), (7, dx.into())];
    let p_dx = match lora {
        None => p,
        Some(l) => {
            check(LoraDh::fits(gpu, c, l.rank), op, || format!("LoRA dh of rank {} on rows of {c} exceeds this driver's loop budget of {} iterations", l.rank, gpu.caps.max_loop))?;
            l.b.expect(op, "lora_b", DType::F32, c * l.rank)?;
            l.dh.expect(op, "dh", DType::F32, rows * l.rank)?;
            binds.extend([(11, l.b.into()), (12, l.dh.into())]);
            Params { rank: l.rank as u32, s: l.s, ..p }
        }
    };
    let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), name, &[]);
    gpu.dispatch(rec, &pipeline, name, &p_dx, &binds, grid)?;
    let Some(dw) = dw else { return Ok(()) };
    if tiled {
        // Each block of DW_ROWS rows sums its columns, then the blocks are summed (in
        // ranges of blocks that fit the loop budget).
        let blocks = rows.div_ceil(DW_ROWS);
        let part = gpu.pooled("rmsnorm dw blocks", DType::F32, &[blocks, c])?;
        let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), "rmsnorm_backward_dw_part", &[]);
        let binds = [(1, x.into()), (5, rstd.into()), (6, dy.into()), (9, (&part).into())];
        gpu.dispatch(rec, &pipeline, "rmsnorm_backward_dw_part", &p, &binds, [groups(c, 64), blocks as u32, 1])?;
        let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), "rmsnorm_backward_dw_sum", &[]);
        for (b0, b1) in spans(blocks, loop_span(gpu, 1, 16)) {
            let binds = [(8, dw.into()), (10, (&part).into())];
            gpu.dispatch(rec, &pipeline, "rmsnorm_backward_dw_sum", &Params { rows: b1 as u32, r0: b0 as u32, ..p }, &binds, [groups(c, 64), 1, 1])?;
        }
        return Ok(());
    }
    // Each column sums its rows in ranges that fit the loop budget (rows r0..r1).
    let pipeline = gpu.pipeline(reducing(gpu, &RMSNORM), "rmsnorm_backward_dw_row", &[]);
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
