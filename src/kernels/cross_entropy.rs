//! Launchers for `kernels/cross_entropy.wgsl`, chunked over tokens so that logits
//! larger than one storage binding still work.

use super::{check, groups, reducing, CROSS_ENTROPY};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Recorder, Tensor, Variant};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    v: u32,
    row0: u32,
    _p1: u32,
    scale: f32,
    /// The global row of the logits' first row (the scaled backward's sequences).
    g0: u32,
    _p2: u32,
    _p3: u32,
}

/// Vocabularies below this size get one invocation per row in the forward on GPUs.
pub const ROW_PER_INVOCATION_BELOW: usize = 4096;

/// Row ranges of `[n, v]` logits that each fit one binding, start at an offset the
/// device can bind, and have at most 65,535 rows (one workgroup per row).
pub fn chunks(gpu: &Gpu, n: usize, v: usize) -> Result<Vec<(usize, usize)>> {
    let row_bytes = (v * 4) as u64;
    let align_rows = (gpu.caps.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
    let fit = (gpu.caps.max_binding / row_bytes) as usize;
    let fit = fit.min(65535);
    let per = if fit >= n { n } else { fit / align_rows * align_rows };
    if per == 0 {
        return Err(Error::TooLarge(format!(
            "cross_entropy: {align_rows} rows of {v} logits exceed the largest storage binding ({} bytes)",
            gpu.caps.max_binding
        )));
    }
    Ok((0..n).step_by(per).map(|r0| (r0, per.min(n - r0))).collect())
}

fn check_args(op: &str, n: usize, v: usize, logits: &Tensor, targets: &Tensor, lse: &Tensor) -> Result<()> {
    check(n > 0 && v > 0, op, || format!("empty shape [{n}, {v}]"))?;
    logits.expect(op, "logits", DType::F32, n * v)?;
    targets.expect(op, "targets", DType::I32, n)?;
    lse.expect(op, "lse", DType::F32, n)
}

fn chunk_bind(logits: &Tensor, r0: usize, rows: usize, v: usize) -> Bind<'_> {
    Bind { buffer: &logits.buffer, offset: logits.offset + (r0 * v * 4) as u64, size: Some((rows * v * 4) as u64) }
}

/// Per-row losses `[n]` (0 where the target is negative, e.g. −100), the saved
/// log-sum-exp `[n]`, and, given `loss`, `loss[0] += scale · Σ losses` (scale = 1 /
/// tokens counted; the chunks of a batch add into one loss).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    losses: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
) -> Result<()> {
    forward(gpu, rec, "cross_entropy_forward", n, v, scale, logits, targets, losses, lse, loss)
}

/// `cross_entropy_forward` and then `cross_entropy_backward` (the logits overwritten
/// with `(softmax − onehot) · scale`) in one kernel per row (training).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    losses: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
) -> Result<()> {
    forward(gpu, rec, "cross_entropy_forward_backward", n, v, scale, logits, targets, losses, lse, loss)
}

#[allow(clippy::too_many_arguments)]
fn forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    op: &'static str,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    losses: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
) -> Result<()> {
    check_args(op, n, v, logits, targets, lse)?;
    losses.expect(op, "losses", DType::F32, n)?;
    if let Some(loss) = loss {
        loss.expect(op, "loss", DType::F32, 1)?;
    }
    // A workgroup per row, whose invocations loop over every 256th logit, suits GPUs
    // and any vocabulary past the loop budget; an invocation per row is as fast or
    // faster on CPU drivers, and on GPUs for small vocabularies (the demo's). The sum
    // loops over every 256th row.
    check(v.max(n).div_ceil(256) + 16 <= gpu.caps.max_loop as usize, op, || {
        format!("{n} rows of {v} logits exceed this driver's loop budget of {} iterations per invocation", gpu.caps.max_loop)
    })?;
    let per_row = (v < ROW_PER_INVOCATION_BELOW || gpu.caps.variant == Variant::Register) && v + 16 <= gpu.caps.max_loop as usize;
    let entry = match (per_row, op) {
        (true, "cross_entropy_forward") => "cross_entropy_forward_row",
        (true, _) => "cross_entropy_forward_backward_row",
        (false, _) => op,
    };
    // The backward overwrites the logits: they bind as dlogits.
    let logits_at = if op == "cross_entropy_forward" { 1 } else { 5 };
    let pipeline = gpu.pipeline(reducing(gpu, &CROSS_ENTROPY), entry, &[]);
    for (r0, rows) in chunks(gpu, n, v)? {
        let p = Params { rows: rows as u32, v: v as u32, row0: r0 as u32, _p1: 0, scale, g0: 0, _p2: 0, _p3: 0 };
        gpu.dispatch(
            rec,
            &pipeline,
            entry,
            &p,
            &[(logits_at, chunk_bind(logits, r0, rows, v)), (2, targets.into()), (3, losses.into()), (4, lse.into())],
            if per_row { [groups(rows, 64), 1, 1] } else { [rows as u32, 1, 1] },
        )?;
    }
    let Some(loss) = loss else { return Ok(()) };
    let p = Params { rows: n as u32, v: v as u32, row0: 0, _p1: 0, scale, g0: 0, _p2: 0, _p3: 0 };
    let pipeline = gpu.pipeline(reducing(gpu, &CROSS_ENTROPY), "cross_entropy_sum", &[]);
    gpu.dispatch(rec, &pipeline, "cross_entropy_sum", &p, &[(7, losses.into()), (8, loss.into())], [1, 1, 1])
}

/// Overwrites `logits` `[n, v]` in place with `(softmax − onehot(target)) · scale`,
/// zero on ignored rows, using the `lse` saved by the forward.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    backward(gpu, rec, "cross_entropy_backward", n, v, scale, logits, targets, lse, None)
}

/// `cross_entropy_backward` with every row also scaled by its sequence's factor: global
/// row g (the logits' first row being global row `row0`) by `seq_scale[row_seq[g]]`
/// (`row_seq` `[N]` u32, `seq_scale` `[S]`).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward_scaled(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    row0: usize,
    (row_seq, seq_scale): (&Tensor, &Tensor),
) -> Result<()> {
    let op = "cross_entropy_backward_scaled";
    row_seq.expect_min(op, "row_seq", DType::U32, row0 + n)?;
    check(seq_scale.dtype == DType::F32, op, || format!("`seq_scale` is {}, expected f32", seq_scale.dtype))?;
    backward(gpu, rec, op, n, v, scale, logits, targets, lse, Some((row0, row_seq, seq_scale)))
}

#[allow(clippy::too_many_arguments)]
fn backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    op: &'static str,
    n: usize,
    v: usize,
    scale: f32,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    seq: Option<(usize, &Tensor, &Tensor)>,
) -> Result<()> {
    check_args(op, n, v, logits, targets, lse)?;
    let pipeline = gpu.pipeline(reducing(gpu, &CROSS_ENTROPY), op, &[]);
    for (r0, rows) in chunks(gpu, n, v)? {
        // Targets and lse are indexed from the logits' first row; the sequence of a
        // row counts from the global row `g0`.
        let g0 = seq.map_or(0, |(g0, _, _)| g0);
        let mut binds = vec![(2, targets.into()), (5, chunk_bind(logits, r0, rows, v)), (6, lse.into())];
        if let Some((_, row_seq, s)) = seq {
            binds.extend([(9, s.into()), (11, row_seq.into())]);
        }
        let p = Params { rows: rows as u32, v: v as u32, row0: r0 as u32, _p1: 0, scale, g0: g0 as u32, _p2: 0, _p3: 0 };
        gpu.dispatch(rec, &pipeline, op, &p, &binds, [groups(v, 256), rows as u32, 1])?;
    }
    Ok(())
}

/// `seq_logps[s] −= Σ losses` over the rows of sequence s among global rows `row0 ..
/// row0 + rows` (`row_seq` `[N]` u32 names each global row's sequence; `losses`
/// `[rows]` holds the chunk's rows from 0): per-sequence sums of log p(target),
/// accumulated chunk by chunk.
pub fn cross_entropy_sequence_logps(gpu: &Gpu, rec: &mut Recorder, row0: usize, rows: usize, row_seq: &Tensor, losses: &Tensor, seq_logps: &Tensor) -> Result<()> {
    let op = "cross_entropy_sequence_logps";
    check(rows > 0, op, || "no rows".into())?;
    losses.expect(op, "losses", DType::F32, rows)?;
    row_seq.expect_min(op, "row_seq", DType::U32, row0 + rows)?;
    check(rows.div_ceil(256) + 16 <= gpu.caps.max_loop as usize, op, || format!("a chunk of {rows} rows exceeds this driver's loop budget"))?;
    let s = seq_logps.numel();
    let p = Params { rows: rows as u32, v: 1, row0: row0 as u32, _p1: 0, scale: 1.0, g0: 0, _p2: 0, _p3: 0 };
    let pipeline = gpu.pipeline(reducing(gpu, &CROSS_ENTROPY), op, &[]);
    gpu.dispatch(rec, &pipeline, op, &p, &[(7, losses.into()), (10, seq_logps.into()), (11, row_seq.into())], [s as u32, 1, 1])
}
