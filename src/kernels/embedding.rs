//! Launchers for `kernels/embedding.wgsl`.

use super::{check, check_binding, f16_variant, groups, loop_span, packed_variant, EMBEDDING};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    v: u32,
    n_uniq: u32,
    v0: u32,
    skip: u32,
    span: u32,
    _p: u32,
}

/// Columns in x, rows in y spilling past 65,535 into z (the kernels read z·65535 + y).
fn rows_grid(c: usize, rows: usize) -> [u32; 3] {
    [groups(c, 64), rows.min(65535) as u32, rows.div_ceil(65535) as u32]
}

/// `out[t] = w[ids[t]]`; ids `[n]` u32, out `[n, c]`, and the table `[v, c]` given as
/// row-parts (one part unless it exceeds a binding), each `[rows, c]`. Ids outside
/// the table give zeros.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    c: usize,
    v: usize,
    ids: &Tensor,
    parts: &[&Tensor],
    out: &Tensor,
) -> Result<()> {
    let op = "embedding_forward";
    check(n > 0 && c > 0 && v > 0, op, || format!("empty shape n {n} c {c} v {v}"))?;
    ids.expect(op, "ids", DType::U32, n)?;
    out.expect(op, "out", DType::F32, n * c)?;
    let rows: usize = parts.iter().map(|w| w.numel() / c).sum();
    check(rows == v && parts.iter().all(|w| w.numel() % c == 0), op, || format!("table parts hold {rows} rows of {c}, expected {v}"))?;
    check_binding(gpu, op, &[out])?;
    check_binding(gpu, op, parts)?;
    rec.encoder().clear_buffer(&out.buffer, out.offset, Some(out.padded_bytes()));
    let mut v0 = 0;
    for w in parts {
        check(matches!(w.dtype, DType::F32 | DType::Q(_)) || (w.dtype == DType::F16 && gpu.caps.shader_f16), op, || {
            format!("table part `{}` is {}", w.label, w.dtype)
        })?;
        let pipeline = match w.dtype {
            DType::F16 => gpu.pipeline(f16_variant(&EMBEDDING), op, &[]),
            DType::Q(q) => gpu.pipeline(packed_variant(&EMBEDDING), op, &[("QTYPE", q.id() as f64)]),
            _ => gpu.pipeline(&EMBEDDING, op, &[]),
        };
        let rows = w.numel() / c;
        let p = Params { n: n as u32, c: c as u32, v: rows as u32, n_uniq: 0, v0: v0 as u32, skip: 0, span: 0, _p: 0 };
        gpu.dispatch(rec, &pipeline, op, &p, &[(1, ids.into()), (2, (*w).into()), (3, out.into())], rows_grid(c, n))?;
        v0 += rows;
    }
    Ok(())
}

/// Adds `dout` `[n, c]` into the rows `ids` of the table, restricted to the part
/// `dw` `[v, c]` that holds rows `v0..v0 + v` (positions with other ids are skipped).
/// The ids are the host's copy (the batch came from the host): positions are grouped
/// by id here so the kernel needs no atomics and sums in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    n: usize,
    c: usize,
    v0: usize,
    v: usize,
    ids: &[u32],
    dout: &Tensor,
    dw: &Tensor,
) -> Result<()> {
    let op = "embedding_backward";
    check(n > 0 && c > 0 && v > 0 && ids.len() == n, op, || format!("{} ids for n {n}", ids.len()))?;
    dout.expect(op, "dout", DType::F32, n * c)?;
    dw.expect(op, "dw", DType::F32, v * c)?;
    check_binding(gpu, op, &[dout, dw])?;
    let mut order: Vec<u32> = (0..n as u32).filter(|&t| (v0..v0 + v).contains(&(ids[t as usize] as usize))).collect();
    if order.is_empty() {
        return Ok(());
    }
    order.sort_by_key(|&t| (ids[t as usize], t));
    let mut starts = vec![0u32];
    let mut uniq: Vec<u32> = Vec::new();
    for (j, &t) in order.iter().enumerate() {
        let id = ids[t as usize] - v0 as u32;
        if uniq.last() != Some(&id) {
            if j > 0 {
                starts.push(j as u32);
            }
            uniq.push(id);
        }
    }
    starts.push(order.len() as u32);
    let order_t = gpu.upload_in(rec, "embedding order", &order, &[order.len()])?;
    let starts_t = gpu.upload_in(rec, "embedding starts", &starts, &[starts.len()])?;
    let uniq_t = gpu.upload_in(rec, "embedding uniq", &uniq, &[uniq.len()])?;
    // Each dispatch sums one span of every id's run of positions (the loop budget).
    let pipeline = gpu.pipeline(&EMBEDDING, op, &[]);
    let longest = starts.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
    let span = loop_span(gpu, 1, 16).min(longest);
    for skip in (0..longest).step_by(span) {
        let p = Params { n: n as u32, c: c as u32, v: v as u32, n_uniq: uniq.len() as u32, v0: 0, skip: skip as u32, span: span as u32, _p: 0 };
        gpu.dispatch(
            rec,
            &pipeline,
            op,
            &p,
            &[(4, (&order_t).into()), (5, (&starts_t).into()), (6, (&uniq_t).into()), (7, dout.into()), (8, dw.into())],
            rows_grid(c, uniq.len()),
        )?;
    }
    Ok(())
}
