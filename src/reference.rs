//! Plain-loop CPU versions of every kernel launcher in `crate::kernels`: same names,
//! same argument order (less the GPU and recorder), slices for tensors. Sums are
//! accumulated in f64, so these are the ground truth the GPU is checked against.

use crate::kernels::{AdamW, Attention, DropOn, Dpo, DpoLoss, GluOn, Lora, Matmul};

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

/// SwiGLU's `silu(g) · u`.
fn silu_mul(g: f32, u: f32) -> f32 {
    let g = g as f64;
    (g * sigmoid(g) * u as f64) as f32
}

pub fn matmul(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32]) {
    matmul_with(mm, a, b, c, None)
}

pub fn matmul_with(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>) {
    matmul_rounding(mm, a, b, c, second, false);
}

/// `matmul_with` as `matmul_coop` (kernels/coop.wgsl) computes it on cooperative
/// matrices: each row of op(A) scaled by the power of two that brings its largest
/// magnitude to [2^13, 2^14) and rounded to f16, op(B) rounded to f16, the products
/// summed exactly, the scale divided out; the second product is not rounded.
pub fn matmul_coop(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>) {
    matmul_rounding(mm, a, b, c, second, true);
}

/// The power of two that brings a row's largest magnitude `big` to [2^13, 2^14)
/// (1 for a row of zeros), as kernels/coop.wgsl's `row_scale`.
pub fn row_scale(big: f32) -> f32 {
    if big > 0.0 && big <= 3.0e38 { (13.0 - big.log2().floor()).exp2() } else { 1.0 }
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// `matmul_with`, its operands rounded as `matmul_coop`'s where `f16_operands`.
fn matmul_rounding(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>, f16_operands: bool) {
    let (lda, ldb, ldc) = mm.strides();
    let drop = |on: DropOn, i: usize, base: usize, v: f32| match mm.dropout {
        Some(d) if d.on == on => d.apply(i - base, v),
        _ => v,
    };
    // An operand's element i, through SwiGLU where the product says so.
    let elem = |on: GluOn, v: &[f32], i: usize| match mm.glu {
        Some(g) if g.on == on => silu_mul(v[i], v[i + g.up]),
        _ => v[i],
    };
    for bi in 0..mm.batch {
        let (ab, bb, cb) = (mm.a_off + bi * mm.a_stride, mm.b_off + bi * mm.b_stride, mm.c_off + bi * mm.c_stride);
        for i in 0..mm.m {
            // Row i of op(A) as the product reads it.
            let mut row: Vec<f32> = (0..mm.k)
                .map(|k| {
                    let ia = if mm.trans_a { ab + k * lda + i } else { ab + i * lda + k };
                    drop(DropOn::A, ia, mm.a_off, elem(GluOn::A, a, ia))
                })
                .collect();
            if f16_operands {
                let s = row_scale(row.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                row.iter_mut().for_each(|v| *v = f16_round(*v * s) / s);
            }
            for j in 0..mm.n {
                let mut acc = 0.0f64;
                for (k, av) in row.iter().enumerate() {
                    let ib = if mm.trans_b { bb + j * ldb + k } else { bb + k * ldb + j };
                    let bv = drop(DropOn::B, ib, mm.b_off, elem(GluOn::B, b, ib));
                    acc += *av as f64 * if f16_operands { f16_round(bv) } else { bv } as f64;
                }
                let idx = cb + i * ldc + j;
                let mut out = mm.alpha as f64 * acc;
                if mm.beta != 0.0 {
                    out += mm.beta as f64 * c[idx] as f64;
                }
                if let (Some(s), Some((a2, b2))) = (mm.second, second) {
                    let (lda2, ldb2) = s.strides(mm);
                    let mut acc2 = 0.0f64;
                    for k in 0..s.k {
                        let av = if mm.trans_a { a2[s.a_off + k * lda2 + i] } else { a2[s.a_off + i * lda2 + k] };
                        let bv = if mm.trans_b { b2[s.b_off + j * ldb2 + k] } else { b2[s.b_off + k * ldb2 + j] };
                        acc2 += av as f64 * bv as f64;
                    }
                    out += drop(DropOn::Second, idx, mm.c_off, (s.alpha as f64 * acc2) as f32) as f64;
                }
                c[idx] = out as f32;
            }
        }
    }
}

/// Keys visible to query t: causal (query t sits at t + TK − T) and in its segment
/// (`crate::data::sees`: a pair's shared prompt and its own side).
fn visible(at: &Attention, seg: &[u32], bi: usize, t: usize) -> Vec<usize> {
    let tpos = t + at.tk - at.t;
    (0..=tpos).filter(|&s| crate::data::sees(seg[bi * at.tk + tpos], seg[bi * at.tk + s])).collect()
}

fn head(x: &[f32], row: usize, hs: usize) -> &[f32] {
    &x[row * hs..(row + 1) * hs]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Scaled scores of query (bi, t, h) against the visible keys, and their log-sum-exp.
fn scores(at: &Attention, q: &[f32], k: &[f32], seg: &[u32], bi: usize, t: usize, h: usize) -> (Vec<usize>, Vec<f64>, f64) {
    let g = h / (at.nh / at.nkv);
    let keys = visible(at, seg, bi, t);
    let qh = head(q, (bi * at.t + t) * at.nh + h, at.hs);
    let sc: Vec<f64> =
        keys.iter().map(|&s| at.scale as f64 * dot(qh, head(k, (bi * at.tk + s) * at.nkv + g, at.hs))).collect();
    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + sc.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
    (keys, sc, lse)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    at: &Attention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: &[u32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    for bi in 0..at.b {
        for h in 0..at.nh {
            let g = h / (at.nh / at.nkv);
            for t in 0..at.t {
                let (keys, sc, l) = scores(at, q, k, seg, bi, t, h);
                let orow = (bi * at.t + t) * at.nh + h;
                for d in 0..at.hs {
                    let mut acc = 0.0f64;
                    for (&s, &x) in keys.iter().zip(&sc) {
                        acc += (x - l).exp() * v[((bi * at.tk + s) * at.nkv + g) * at.hs + d] as f64;
                    }
                    o[orow * at.hs + d] = acc as f32;
                }
                lse[(bi * at.nh + h) * at.t + t] = l as f32;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    at: &Attention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: &[u32],
    _o: &[f32],
    _lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let hs = at.hs;
    let mut dq64 = vec![0f64; dq.len()];
    let mut dk64 = vec![0f64; dk.len()];
    let mut dv64 = vec![0f64; dv.len()];
    for bi in 0..at.b {
        for h in 0..at.nh {
            let g = h / (at.nh / at.nkv);
            for t in 0..at.t {
                let (keys, sc, l) = scores(at, q, k, seg, bi, t, h);
                let qrow = (bi * at.t + t) * at.nh + h;
                let dor = head(dout, qrow, hs);
                let p: Vec<f64> = sc.iter().map(|x| (x - l).exp()).collect();
                let dp: Vec<f64> = keys.iter().map(|&s| dot(dor, head(v, (bi * at.t + s) * at.nkv + g, hs))).collect();
                let dsum: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (j, &s) in keys.iter().enumerate() {
                    let krow = (bi * at.t + s) * at.nkv + g;
                    let ds = p[j] * (dp[j] - dsum) * at.scale as f64;
                    for d in 0..hs {
                        dq64[qrow * hs + d] += ds * k[krow * hs + d] as f64;
                        dk64[krow * hs + d] += ds * q[qrow * hs + d] as f64;
                        dv64[krow * hs + d] += p[j] * dor[d] as f64;
                    }
                }
            }
        }
    }
    for (d, x) in dq.iter_mut().zip(dq64) {
        *d += x as f32;
    }
    for (d, x) in dk.iter_mut().zip(dk64) {
        *d += x as f32;
    }
    for (d, x) in dv.iter_mut().zip(dv64) {
        *d += x as f32;
    }
}

/// `attention_forward_roped`: q and k rotated (`rope_forward`), then attended; `seg_pos`
/// holds the segments, then the positions (`[2, B, T]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_roped(at: &Attention, inv_freq: &[f32], q: &[f32], k: &[f32], v: &[f32], seg_pos: &[u32], o: &mut [f32], lse: &mut [f32]) {
    let (qr, kr) = roped(at, inv_freq, q, k, seg_pos);
    attention_forward(at, &qr, &kr, v, &seg_pos[..at.b * at.t], o, lse)
}

/// `attention_backward_roped`: the attention's gradients of the rotated q and k,
/// rotated back (`rope_backward`) and added into dq and dk.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_roped(
    at: &Attention,
    inv_freq: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg_pos: &[u32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (qr, kr) = roped(at, inv_freq, q, k, seg_pos);
    let (mut dqr, mut dkr) = (vec![0.0; dq.len()], vec![0.0; dk.len()]);
    let n = at.b * at.t;
    attention_backward(at, &qr, &kr, v, &seg_pos[..n], o, lse, dout, &mut dqr, &mut dkr, dv);
    rope_backward(n, (at.nh, at.nkv), at.hs, &mut dqr, &mut dkr, &seg_pos[n..], inv_freq);
    for (d, x) in dq.iter_mut().zip(dqr).chain(dk.iter_mut().zip(dkr)) {
        *d += x;
    }
}

/// q and k rotated by the positions that follow the segments in `seg_pos`.
fn roped(at: &Attention, inv_freq: &[f32], q: &[f32], k: &[f32], seg_pos: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let n = at.b * at.t;
    let (mut qr, mut kr) = (q.to_vec(), k.to_vec());
    rope_forward(n, (at.nh, at.nkv), at.hs, &mut qr, &mut kr, &seg_pos[n..], inv_freq);
    (qr, kr)
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(rows: usize, c: usize, eps: f32, x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32]) {
    for r in 0..rows {
        let xr = &x[r * c..(r + 1) * c];
        let rs = 1.0 / (xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64 + eps as f64).sqrt();
        for i in 0..c {
            y[r * c + i] = (w[i] as f64 * xr[i] as f64 * rs) as f32;
        }
        rstd[r] = rs as f32;
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    rows: usize,
    c: usize,
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) {
    let mut dw64 = vec![0f64; c];
    for r in 0..rows {
        let rs = rstd[r] as f64;
        let n: Vec<f64> = (0..c).map(|i| x[r * c + i] as f64 * rs).collect();
        let g: Vec<f64> = (0..c).map(|i| dy[r * c + i] as f64 * w[i] as f64).collect();
        let mean_gn = g.iter().zip(&n).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for i in 0..c {
            dx[r * c + i] += (rs * (g[i] - n[i] * mean_gn)) as f32;
            dw64[i] += dy[r * c + i] as f64 * n[i];
        }
    }
    for (d, x) in dw.into_iter().flatten().zip(dw64) {
        *d += x as f32;
    }
}

/// `rmsnorm_forward_lora_down`: `rmsnorm_forward`, then each pair's `lora_down` of y.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_lora_down(rows: usize, c: usize, eps: f32, x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32], ls: &[Lora], a: &[&[f32]], h: &mut [Vec<f32>]) {
    rmsnorm_forward(rows, c, eps, x, w, y, rstd);
    for ((l, a), h) in ls.iter().zip(a).zip(h) {
        lora_down(l, y, a, h);
    }
}

/// `rmsnorm_backward_dh`: `rmsnorm_backward`, then `dh = s·dx·B` (B `[c, rank]`) from
/// the finished dx.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_dh(
    rows: usize,
    c: usize,
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    (s, rank, b): (f32, usize, &[f32]),
    dh: &mut [f32],
) {
    rmsnorm_backward(rows, c, x, w, rstd, dy, dx, dw);
    for r in 0..rows {
        for j in 0..rank {
            let acc: f64 = (0..c).map(|i| dx[r * c + i] as f64 * b[i * rank + j] as f64).sum();
            dh[r * rank + j] = (s as f64 * acc) as f32;
        }
    }
}

fn rotate(n: usize, h: usize, hs: usize, x: &mut [f32], pos: &[u32], inv_freq: &[f32], sign: f64) {
    let half = hs / 2;
    for (t, &p) in pos.iter().enumerate().take(n) {
        for hd in 0..h {
            let base = (t * h + hd) * hs;
            for i in 0..half {
                // The angle is formed in f32, as HF does (inv_freq · position in float32).
                let angle = (p as f32 * inv_freq[i]) as f64;
                let (s, c) = (angle.sin() * sign, angle.cos());
                let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                x[base + i] = (x1 * c - x2 * s) as f32;
                x[base + i + half] = (x2 * c + x1 * s) as f32;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rope_forward(n: usize, (h, hk): (usize, usize), hs: usize, q: &mut [f32], k: &mut [f32], pos: &[u32], inv_freq: &[f32]) {
    rotate(n, h, hs, q, pos, inv_freq, 1.0);
    rotate(n, hk, hs, k, pos, inv_freq, 1.0)
}

#[allow(clippy::too_many_arguments)]
pub fn rope_backward(n: usize, (h, hk): (usize, usize), hs: usize, dq: &mut [f32], dk: &mut [f32], pos: &[u32], inv_freq: &[f32]) {
    rotate(n, h, hs, dq, pos, inv_freq, -1.0);
    rotate(n, hk, hs, dk, pos, inv_freq, -1.0)
}

pub fn swiglu_forward(n: usize, gate: &[f32], up: &[f32], h: &mut [f32]) {
    for i in 0..n {
        h[i] = silu_mul(gate[i], up[i]);
    }
}

pub fn swiglu_backward(n: usize, gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for i in 0..n {
        let g = gate[i] as f64;
        let sg = sigmoid(g);
        dgate[i] += (dh[i] as f64 * up[i] as f64 * sg * (1.0 + g * (1.0 - sg))) as f32;
        dup[i] += (dh[i] as f64 * g * sg) as f32;
    }
}

pub fn embedding_forward(n: usize, c: usize, v: usize, ids: &[u32], w: &[f32], out: &mut [f32]) {
    for t in 0..n {
        let id = ids[t] as usize;
        for i in 0..c {
            out[t * c + i] = if id < v { w[id * c + i] } else { 0.0 };
        }
    }
}

pub fn embedding_backward(n: usize, c: usize, v0: usize, v: usize, ids: &[u32], dout: &[f32], dw: &mut [f32]) {
    let mut acc = std::collections::BTreeMap::<usize, Vec<f64>>::new();
    for t in (0..n).filter(|&t| (v0..v0 + v).contains(&(ids[t] as usize))) {
        let row = acc.entry(ids[t] as usize - v0).or_insert_with(|| vec![0.0; c]);
        for i in 0..c {
            row[i] += dout[t * c + i] as f64;
        }
    }
    for (id, row) in acc {
        for i in 0..c {
            dw[id * c + i] += row[i] as f32;
        }
    }
}

pub fn add(n: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in 0..n {
        out[i] = a[i] + b[i];
    }
}

pub fn axpy(n: usize, alpha: f32, x: &[f32], y: &mut [f32]) {
    for i in 0..n {
        y[i] += alpha * x[i];
    }
}

pub fn scale(n: usize, alpha: f32, y: &mut [f32]) {
    for v in &mut y[..n] {
        *v *= alpha;
    }
}

pub fn add_bias(rows: usize, c: usize, bias: &[f32], y: &mut [f32]) {
    for i in 0..rows * c {
        y[i] += bias[i % c];
    }
}

pub fn bias_backward(rows: usize, c: usize, dy: &[f32], dbias: &mut [f32]) {
    for j in 0..c {
        dbias[j] += (0..rows).map(|r| dy[r * c + j] as f64).sum::<f64>() as f32;
    }
}

fn ignored(target: i32, v: usize) -> bool {
    target < 0 || target as usize >= v
}

#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward(
    n: usize,
    v: usize,
    scale: f32,
    logits: &[f32],
    targets: &[i32],
    losses: &mut [f32],
    lse: &mut [f32],
    loss: &mut [f32],
) {
    let mut total = 0.0f64;
    for r in 0..n {
        let row = &logits[r * v..(r + 1) * v];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let l = mx + row.iter().map(|z| (*z as f64 - mx).exp()).sum::<f64>().ln();
        lse[r] = l as f32;
        let t = targets[r];
        let lr = if ignored(t, v) { 0.0 } else { l - row[t as usize] as f64 };
        losses[r] = lr as f32;
        total += lr;
    }
    loss[0] += (total * scale as f64) as f32;
}

/// `cross_entropy_forward_backward`: `cross_entropy_forward`, then
/// `cross_entropy_backward` on the logits in place.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward_backward(n: usize, v: usize, scale: f32, logits: &mut [f32], targets: &[i32], losses: &mut [f32], lse: &mut [f32], loss: &mut [f32]) {
    cross_entropy_forward(n, v, scale, logits, targets, losses, lse, loss);
    cross_entropy_backward(n, v, scale, logits, targets, lse);
}

pub fn cross_entropy_backward(n: usize, v: usize, scale: f32, logits: &mut [f32], targets: &[i32], lse: &[f32]) {
    for r in 0..n {
        let t = targets[r];
        for j in 0..v {
            let idx = r * v + j;
            logits[idx] = if ignored(t, v) {
                0.0
            } else {
                let p = (logits[idx] as f64 - lse[r] as f64).exp();
                ((p - if t as usize == j { 1.0 } else { 0.0 }) * scale as f64) as f32
            };
        }
    }
}

/// `cross_entropy_backward` with each row scaled by its sequence's factor (row r of
/// the logits is global row g = `row0 + r`, scaled by `seq_scale[row_seq[g]]`).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward_scaled(n: usize, v: usize, scale: f32, logits: &mut [f32], targets: &[i32], lse: &[f32], row0: usize, row_seq: &[u32], seq_scale: &[f32]) {
    cross_entropy_backward(n, v, scale, logits, targets, lse);
    for r in 0..n {
        let f = seq_scale[row_seq[row0 + r] as usize];
        logits[r * v..(r + 1) * v].iter_mut().for_each(|x| *x *= f);
    }
}

/// `seq_logps[s] −= Σ losses` over the rows of sequence s (`row_seq[g] == s`) among
/// global rows `row0 .. row0 + rows`.
pub fn cross_entropy_sequence_logps(row0: usize, rows: usize, row_seq: &[u32], losses: &[f32], seq_logps: &mut [f32]) {
    let mut sums = vec![0.0f64; seq_logps.len()];
    for r in 0..rows {
        if let Some(x) = sums.get_mut(row_seq[row0 + r] as usize) {
            *x += losses[r] as f64;
        }
    }
    // Sequences outside the chunk subtract 0, which leaves them as they are.
    for (l, x) in seq_logps.iter_mut().zip(sums) {
        *l = (*l as f64 - x) as f32;
    }
}

fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// Pair i's DPO loss and its derivatives by (πc, πr).
fn dpo_pair(d: &Dpo, pairs: usize, i: usize, logps: &[f32], ref_logps: &[f32], counts: &[f32]) -> (f64, f64, f64) {
    let hc = logps[i] as f64 - ref_logps[i] as f64;
    let hr = logps[pairs + i] as f64 - ref_logps[pairs + i] as f64;
    let (b, e) = (d.beta as f64, d.eps as f64);
    match d.loss {
        DpoLoss::Ipo => {
            let (nc, nr) = ((counts[i] as f64).max(1.0), (counts[pairs + i] as f64).max(1.0));
            let g = hc / nc - hr / nr - 1.0 / (2.0 * b);
            (g * g, 2.0 * g / nc, -2.0 * g / nr)
        }
        DpoLoss::Sigmoid => {
            let x = b * (hc - hr);
            let dh = b * (-(1.0 - e) * sigmoid(-x) + e * sigmoid(x));
            (-(1.0 - e) * log_sigmoid(x) - e * log_sigmoid(-x), dh, -dh)
        }
        DpoLoss::Robust => {
            let x = b * (hc - hr);
            let dh = b * (-(1.0 - e) * sigmoid(-x) - e * sigmoid(x)) / (1.0 - 2.0 * e);
            ((-(1.0 - e) * log_sigmoid(x) + e * log_sigmoid(-x)) / (1.0 - 2.0 * e), dh, -dh)
        }
    }
}

/// `stats[k] += scale · Σ` over pairs of (loss, rewards/chosen, rewards/rejected,
/// rewards/accuracies, rewards/margins, logps/chosen, logps/rejected); the loss also
/// `+= sft · Σ −logps/chosen` (RPO's NLL term: `sft` = α / the step's chosen tokens).
#[allow(clippy::too_many_arguments)]
pub fn dpo_forward(d: &Dpo, pairs: usize, scale: f32, sft: f32, logps: &[f32], ref_logps: &[f32], counts: &[f32], stats: &mut [f32]) {
    let mut s = [0.0f64; 7];
    for i in 0..pairs {
        let rc = d.beta as f64 * (logps[i] as f64 - ref_logps[i] as f64);
        let rr = d.beta as f64 * (logps[pairs + i] as f64 - ref_logps[pairs + i] as f64);
        let terms = [dpo_pair(d, pairs, i, logps, ref_logps, counts).0, rc, rr, if rc > rr { 1.0 } else { 0.0 }, rc - rr, logps[i] as f64, logps[pairs + i] as f64];
        s.iter_mut().zip(terms).for_each(|(a, t)| *a += t);
    }
    let nll: f64 = (0..pairs).map(|i| -(logps[i] as f64)).sum();
    for k in 0..7 {
        let sft_term = if k == 0 { nll * sft as f64 } else { 0.0 };
        stats[k] = (stats[k] as f64 + s[k] * scale as f64 + sft_term) as f32;
    }
}

/// `coef` = −d(loss · scale + sft · Σ −logps/chosen)/d(logps).
#[allow(clippy::too_many_arguments)]
pub fn dpo_backward(d: &Dpo, pairs: usize, scale: f32, sft: f32, logps: &[f32], ref_logps: &[f32], counts: &[f32], coef: &mut [f32]) {
    for i in 0..pairs {
        let (_, dc, dr) = dpo_pair(d, pairs, i, logps, ref_logps, counts);
        coef[i] = (-dc * scale as f64 + sft as f64) as f32;
        coef[pairs + i] = (-dr * scale as f64) as f32;
    }
}

/// `matmul_with` of a product with SwiGLU's backward in its store
/// (`kernels::matmul_swiglu_back`): dh as the product would store it, then
/// `swiglu_backward` of it into dgate (at C) and dup.
pub fn matmul_swiglu_back(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>, aux: &[f32]) {
    swiglu_back_rounding(mm, a, b, c, second, aux, false);
}

/// `matmul_swiglu_back` on cooperative matrices: dh as `matmul_coop` makes it.
pub fn matmul_swiglu_back_coop(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>, aux: &[f32]) {
    swiglu_back_rounding(mm, a, b, c, second, aux, true);
}

fn swiglu_back_rounding(mm: &Matmul, a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>, aux: &[f32], f16_operands: bool) {
    let e = mm.swiglu_back.expect("a product with SwiGLU's backward");
    let (_, _, ldc) = mm.strides();
    let plain = Matmul { swiglu_back: None, c_off: 0, beta: 0.0, ..mm.clone() };
    let mut dh = vec![0.0; plain.extents().2];
    matmul_rounding(&plain, a, b, &mut dh, second, f16_operands);
    for i in 0..mm.m {
        let rows = |base: usize| base + i * ldc..base + i * ldc + mm.n;
        let (mut dg, mut du) = (c[rows(mm.c_off)].to_vec(), c[rows(mm.c_off + e.du)].to_vec());
        swiglu_backward(mm.n, &aux[rows(e.g)], &aux[rows(e.g + e.up)], &dh[rows(0)], &mut dg, &mut du);
        c[rows(mm.c_off)].copy_from_slice(&dg);
        c[rows(mm.c_off + e.du)].copy_from_slice(&du);
    }
}

/// Products of one group over the same operands (`kernels::matmul_group`), in turn:
/// an `alt` product reads `second` as its A and B.
pub fn matmul_group(mms: &[Matmul], a: &[f32], b: &[f32], c: &mut [f32], second: Option<(&[f32], &[f32])>) {
    for mm in mms {
        match (mm.alt, second) {
            (true, Some((a2, b2))) => matmul(&Matmul { alt: false, ..mm.clone() }, a2, b2, c),
            _ => matmul_with(mm, a, b, c, second.filter(|_| mm.second.is_some())),
        }
    }
}

pub fn lora_down(l: &Lora, x: &[f32], a: &[f32], h: &mut [f32]) {
    matmul(&l.down(), x, a, h);
}

#[allow(clippy::too_many_arguments)]
pub fn lora_backward(l: &Lora, x: &[f32], b: &[f32], h: &[f32], dy: &[f32], dh: &mut [f32], da: &mut [f32], db: &mut [f32]) {
    matmul(&l.dh(), dy, b, dh);
    matmul(&l.db(), dy, h, db);
    matmul(&l.da(), dh, x, da);
}

pub fn grad_norm(grads: &[&[f32]], max_norm: f32, norm: &mut [f32]) {
    let total: f64 = grads.iter().flat_map(|g| g.iter()).map(|g| (*g as f64).powi(2)).sum();
    let nrm = total.sqrt();
    let max_norm = if max_norm > 0.0 && max_norm.is_finite() { max_norm as f64 } else { f32::MAX as f64 };
    norm[0] = nrm as f32;
    norm[1] = (max_norm / (nrm + 1e-6)).min(1.0) as f32;
}

#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    opt: &AdamW,
    step: u64,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    norm: &[f32],
) {
    let (step_size, bc2_sqrt, decay) = opt.factors(step);
    for i in 0..param.len() {
        let g = grad[i] * norm[1];
        m[i] += (1.0 - opt.beta1) * (g - m[i]);
        v[i] = opt.beta2 * v[i] + (1.0 - opt.beta2) * g * g;
        param[i] = param[i] * decay - step_size * m[i] / (v[i].sqrt() / bc2_sqrt + opt.eps);
    }
}
