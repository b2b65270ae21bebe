//! Matmul on cooperative matrices (`matmul_coop`, kernels/coop.wgsl) against its CPU
//! reference (`reference::matmul_coop`: the same f16 operands, summed exactly) and
//! within f16 rounding of the f32 product (`reference::matmul_with`).
//!
//! These need a driver with cooperative matrices, which Debian 12's lavapipe lacks:
//! they are ignored in the plain `cargo test`, and `scripts/test.sh` runs them
//! (`--ignored`) on Mesa 26's lavapipe (8×8 f16 blocks with f32 sums), which
//! `scripts/coop-driver.sh` fetches from Debian. There they fail, never skip, if the
//! adapter offers no cooperative matrices.

mod common;

use common::*;
use webtune::check::Rng;
use webtune::gpu::{Gpu, GpuOptions, Variant};
use webtune::kernels::{self as k, DropOn, Dropout, Glu, GluOn, Matmul, Second, SwigluBack};
use webtune::quant::{self, QType};
use webtune::reference as cpu;

/// Matmul on cooperative matrices forced on, with the GPU kernels for the rest.
fn coop() -> &'static Gpu {
    static G: std::sync::OnceLock<Gpu> = std::sync::OnceLock::new();
    let g = G.get_or_init(|| make(GpuOptions { variant: Some(Variant::Tiled), coop_matrix: Some(true), ..Default::default() }));
    assert!(g.caps.coop_matrix.is_some(), "no cooperative matrices on this adapter (run scripts/coop-driver.sh): {}", g.describe());
    g
}

fn round16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// |op(A)|·|op(B)| of a plain product (no SwiGLU, dropout or second product): the
/// bound of f16 rounding is 2^-11 of it.
fn abs_product(mm: &Matmul, a: &[f32], b: &[f32]) -> Vec<f32> {
    let plain = Matmul { alpha: 1.0, beta: 0.0, c_off: 0, ..mm.clone() };
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
    let mut out = vec![0.0; plain.extents().2];
    cpu::matmul(&plain, &abs(a), &abs(b), &mut out);
    out
}

/// A plain product with f16 weights for B: equal to the reference on the same f16
/// operands, and within f16 rounding of A of the f32 product.
fn plain_case(mm: &Matmul, seed: u64, mag_a: f32) {
    plain_case_on(coop(), mm, seed, mag_a);
}

fn plain_case_on(g: &Gpu, mm: &Matmul, seed: u64, mag_a: f32) {
    let mut rng = Rng::new(seed);
    let (ea, eb, ec) = mm.extents();
    let (a, b, c0) = (rng.vec(ea, mag_a), round16(&rng.vec(eb, 3.0)), rng.vec(ec, 1.0));
    let (ta, tb, tc) = (up(g, &a), g.upload_f16("w", &b, &[eb]).unwrap(), up(g, &c0));
    run(g, |r| k::matmul(g, r, mm, &ta, &tb, &tc));
    let got = read(g, &tc);
    let (mut coop_ref, mut f32_ref) = (c0.clone(), c0.clone());
    cpu::matmul_coop(mm, &a, &b, &mut coop_ref, None);
    cpu::matmul(mm, &a, &b, &mut f32_ref);
    let sums = abs_product(mm, &a, &b);
    let (_, _, ldc) = mm.strides();
    let (mut worst_ref, mut worst_f32) = (0.0f64, 0.0f64);
    for bi in 0..mm.batch {
        for i in 0..mm.m {
            for j in 0..mm.n {
                let idx = mm.c_off + bi * mm.c_stride + i * ldc + j;
                let s = mm.alpha.abs() as f64 * sums[bi * mm.c_stride + i * ldc + j] as f64 + mm.beta.abs() as f64 * c0[idx].abs() as f64;
                let e_ref = (got[idx] as f64 - coop_ref[idx] as f64).abs();
                let e_f32 = (got[idx] as f64 - f32_ref[idx] as f64).abs();
                // Sums in f32 in another order: a few f32 roundings of the sum of magnitudes.
                assert!(e_ref <= 1e-6 * s + 1e-30, "{mm}: C[{idx}] = {} against the coop reference's {} (|A|·|B| {s:e})", got[idx], coop_ref[idx]);
                // A's rounding to f16 (half an ulp, 2^-11 of each term), and as much again.
                assert!(e_f32 <= 2.0f64.powi(-11) * s * 1.01 + 2e-6 * s + 1e-30, "{mm}: C[{idx}] = {} against the f32 product's {}: beyond f16 rounding (|A|·|B| {s:e})", got[idx], f32_ref[idx]);
                if s > 0.0 {
                    worst_ref = worst_ref.max(e_ref / s);
                    worst_f32 = worst_f32.max(e_f32 / s);
                }
            }
        }
    }
    eprintln!("{mm} (|A| ≤ {mag_a:e}): error / (|A|·|B|) {worst_ref:.2e} against the coop reference, {worst_f32:.2e} against f32 (f16 rounding: {:.2e})", 2.0f64.powi(-11));
}

/// Every transpose at odd and tile-sized shapes, batches, offsets and row strides, and
/// rows of magnitudes f16 cannot hold as they are: 1e-7 (gradients, subnormal in f16)
/// and 1e6 (past f16's 65,504), which each row's power-of-two scale brings in range.
#[test]
#[ignore = "needs a driver with cooperative matrices: scripts/test.sh runs it on Mesa 26's lavapipe"]
fn coop_matmul_matches_its_reference_and_f16_rounding_of_f32() {
    let mut seed = 1;
    for (m, n, kk) in [(1, 1, 1), (7, 13, 5), (33, 65, 17), (64, 64, 64), (100, 37, 129), (5, 70, 300), (130, 257, 41)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut mm = Matmul::new(m, n, kk);
            (mm.trans_a, mm.trans_b) = (ta, tb);
            plain_case(&mm, seed, 1.0);
            seed += 1;
        }
    }
    for mag in [1e-7, 1e6] {
        plain_case(&Matmul::linear(70, 96, 80), 50, mag);
        plain_case(&Matmul::new(70, 96, 80).trans_a(), 51, mag);
    }
    plain_case(&Matmul::linear(19, 23, 31).accumulate().alpha(0.5), 100, 30.0);
    plain_case(&Matmul::new(9, 11, 13).trans_a().batched(3, 9 * 13, 0, 9 * 11), 101, 1.0);
    let mut mm = Matmul::new(4, 6, 8).batched(2, 40, 50, 30);
    (mm.a_off, mm.b_off, mm.c_off) = (3, 5, 7);
    plain_case(&mm, 102, 2.0);
    let mut mm = Matmul::linear(6, 10, 7);
    (mm.lda, mm.ldb, mm.ldc, mm.c_off) = (12, 11, 20, 9);
    plain_case(&mm, 103, 1.0);
}

/// Split-K on cooperative matrices (forced on: an aim of 64 tiles, ranges of at least
/// 32), each range's tiles scaling their rows by the range's own maxima: the head's dx
/// over a long vocabulary, a forward with few rows, and a column block accumulated,
/// against the reference on the same f16 operands and within f16 rounding of f32.
#[test]
#[ignore = "needs a driver with cooperative matrices: scripts/test.sh runs it on Mesa 26's lavapipe"]
fn coop_split_k_matches_its_reference() {
    let g = make(GpuOptions { variant: Some(Variant::Tiled), coop_matrix: Some(true), split_k: Some(webtune::gpu::SplitK { tiles: 64, min_k: 32 }), ..Default::default() });
    assert!(g.caps.coop_matrix.is_some(), "no cooperative matrices on this adapter (run scripts/coop-driver.sh): {}", g.describe());
    let sums = |g: &Gpu| dispatches_of(g, "matmul_split_sum");
    let mut column = Matmul::linear(9, 700, 40).accumulate().alpha(0.5);
    (column.ldc, column.c_off) = (50, 3);
    for (i, mm) in [Matmul::new(37, 70, 2000), Matmul::linear(5, 1000, 130), column].iter().enumerate() {
        let before = sums(&g);
        plain_case_on(&g, mm, 1600 + i as u64, 1.0);
        assert_eq!(sums(&g) - before, 1, "{mm} did not split");
    }
}

/// What the frozen products fuse, on cooperative matrices against the reference on
/// the same f16 operands: LoRA's up product inside (its dropout on it), SwiGLU on A
/// as loaded (down's forward), SwiGLU's backward in the store (down's dx), a group
/// (q/k/v's base products with their up products), and packed weights (QLoRA).
#[test]
#[ignore = "needs a driver with cooperative matrices: scripts/test.sh runs it on Mesa 26's lavapipe"]
fn coop_matmul_fusions_match_their_reference() {
    let g = coop();
    let mut rng = Rng::new(7);
    let check = |what: &str, got: &[f32], want: &[f32], k: usize| close(what, got, want, 2e-6 * 3.0 * (k as f32).sqrt() * 4.0, 1e-5);
    // y = x·Wᵀ + s·dropout(h·Bᵀ), and down's forward with silu(gate)·up made as loaded.
    for (m, n, kk, r) in [(37, 70, 45, 4), (130, 64, 96, 16)] {
        let lora = Matmul::linear(m, kk, n).plus(Second::new(r, 2.0)).dropout(Dropout { p: 0.25, seed: 3, on: DropOn::Second });
        let glu = Matmul { glu: Some(Glu { on: GluOn::A, up: m * kk + 3 }), ..Matmul::linear(m, kk, n) };
        for mm in [lora, glu] {
            let (ea, eb, ec) = mm.extents();
            let (ea2, eb2) = mm.second.map_or((1, 1), |s| s.extents(&mm));
            let (a, b, a2, b2) = (rng.vec(ea + m * kk + 3, 1.0), round16(&rng.vec(eb, 1.0)), rng.vec(ea2, 1.0), rng.vec(eb2, 1.0));
            let (ta, tb, tc, ta2, tb2) = (up(g, &a), g.upload_f16("w", &b, &[eb]).unwrap(), zeros(g, ec), up(g, &a2), up(g, &b2));
            run(g, |rec| k::matmul_with(g, rec, &mm, &ta, &tb, &tc, mm.second.map(|_| (&ta2, &tb2))));
            let mut want = vec![0.0; ec];
            cpu::matmul_coop(&mm, &a, &b, &mut want, mm.second.map(|_| (a2.as_slice(), b2.as_slice())));
            // SwiGLU made on the GPU may differ from the CPU's in its last f32 bit, which
            // can round a term of A the other way in f16: 2^-11 of |silu(g)·u·w| ≤ 3.6e-4
            // each. A few such terms are allowed there.
            let flips = if mm.glu.is_some() { 1e-3 } else { 0.0 };
            close(&format!("coop {mm}"), &read(g, &tc), &want, 2e-6 * 3.0 * (kk as f32).sqrt() * 4.0 + flips, 1e-5);
        }
        // dx = dy·W with LoRA's dx inside, SwiGLU's backward into dgate and dup.
        let mm = Matmul { swiglu_back: Some(SwigluBack { g: 3, up: m * n + 5, du: m * n + 2 }), ..Matmul::new(m, n, kk) }.plus(Second::new(r, 1.0));
        let (ea, eb, ec) = mm.extents();
        let (ea2, eb2) = mm.second.unwrap().extents(&mm);
        let (a, b, c0, a2, b2) = (rng.vec(ea, 1e-3), round16(&rng.vec(eb, 1.0)), rng.vec(ec + m * n + 2, 1.0), rng.vec(ea2, 1e-3), rng.vec(eb2, 1.0));
        let aux = rng.vec(3 + m * n + 5 + m * n, 3.0);
        let (ta, tb, tc, ta2, tb2, taux) = (up(g, &a), g.upload_f16("w", &b, &[eb]).unwrap(), up(g, &c0), up(g, &a2), up(g, &b2), up(g, &aux));
        run(g, |rec| k::matmul_swiglu_back(g, rec, &mm, &ta, &tb, &tc, Some((&ta2, &tb2)), &taux));
        let mut want = c0.clone();
        cpu::matmul_swiglu_back_coop(&mm, &a, &b, &mut want, Some((a2.as_slice(), b2.as_slice())), &aux);
        check(&format!("coop {mm}"), &read(g, &tc), &want, kk);
    }
    // q/k/v's base products as one group over a colocated weight, each with its up product.
    let (rows, din, r) = (75, 64, 8);
    let outs = [64, 16, 16];
    let mut mms = Vec::new();
    let (mut w_off, mut c_off, mut b2_off) = (0, 0, 0);
    for &dout in &outs {
        let mut mm = Matmul::linear(rows, din, dout).plus(Second { a_off: 0, b_off: b2_off, ..Second::new(r, 0.5) });
        (mm.b_off, mm.c_off, mm.ldc) = (w_off, c_off, 96);
        mms.push(mm);
        (w_off, c_off, b2_off) = (w_off + dout * din, c_off + dout, b2_off + dout * r);
    }
    let (a, b, a2, b2) = (rng.vec(rows * din, 1.0), round16(&rng.vec(w_off, 1.0)), rng.vec(rows * r, 1.0), rng.vec(b2_off, 1.0));
    let (ta, tb, tc, ta2, tb2) = (up(g, &a), g.upload_f16("w", &b, &[w_off]).unwrap(), zeros(g, rows * 96), up(g, &a2), up(g, &b2));
    run(g, |rec| k::matmul_group(g, rec, &mms, &ta, &tb, &tc, Some((&ta2, &tb2))));
    let mut want = vec![0.0; rows * 96];
    for mm in &mms {
        cpu::matmul_coop(mm, &a, &b, &mut want, Some((a2.as_slice(), b2.as_slice())));
    }
    check("coop group of q/k/v", &read(g, &tc), &want, din);
    // Packed weights: Q8_0 and Q4_0 blocks, dequantized, then rounded to f16 as loaded.
    for q in [QType::Q8_0, QType::Q4_0] {
        let mm = Matmul::linear(33, 64, 40);
        let (ea, eb, ec) = mm.extents();
        let blocks = quant::quantize(q, &rng.vec(eb, 2.0)).unwrap();
        let w = quant::dequantize(q, &blocks);
        let a = rng.vec(ea, 1.0);
        let (ta, tb, tc) = (up(g, &a), g.upload_packed("w", q, &blocks, &[40, 64]).unwrap(), zeros(g, ec));
        run(g, |rec| k::matmul(g, rec, &mm, &ta, &tb, &tc));
        let mut want = vec![0.0; ec];
        cpu::matmul_coop(&mm, &a, &w, &mut want, None);
        check(&format!("coop {mm} over {} blocks", q.name()), &read(g, &tc), &want, 64);
    }
}
