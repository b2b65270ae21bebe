//! Every GPU kernel against its CPU reference (`webtune::reference`) on seeded random
//! inputs, at odd shapes and with large magnitudes (±30).

mod common;

use common::*;
use webtune::check::Rng;
use webtune::gpu::{Variant, WideMatmul};
use webtune::kernels::{self as k, AdamW, Attention, DropOn, Dropout, Glu, GluOn, Lora, Matmul, Second, SwigluBack};
use webtune::quant::{self, QType};
use webtune::reference as cpu;

/// A product (with its second product's operands, if any) against the CPU's; returns C.
fn matmul_case(g: &webtune::gpu::Gpu, mm: &Matmul, seed: u64, mag: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let (ea, eb, ec) = mm.extents();
    let a = rng.vec(ea, mag);
    let b = rng.vec(eb, mag);
    let c0 = rng.vec(ec, 1.0);
    let (ea2, eb2) = mm.second.map_or((0, 0), |s| s.extents(mm));
    let (a2, b2) = (rng.vec(ea2, mag), rng.vec(eb2, mag));
    let (ta, tb, tc, ta2, tb2) = (up(g, &a), up(g, &b), up(g, &c0), up(g, &a2), up(g, &b2));
    let second = mm.second.map(|_| (&ta2, &tb2));
    run(g, |r| k::matmul_with(g, r, mm, &ta, &tb, &tc, second));
    let mut want = c0.clone();
    cpu::matmul_with(mm, &a, &b, &mut want, mm.second.map(|_| (a2.as_slice(), b2.as_slice())));
    let scale = mag * mag * ((mm.k + mm.second.map_or(0, |s| s.k)) as f32).sqrt() * mm.dropout.map_or(1.0, |d| 1.0 / (1.0 - d.p));
    let got = read(g, &tc);
    close(&format!("matmul {mm:?} on {}", kernels_of(g)), &got, &want, 1e-5 * scale, 1e-4);
    got
}

#[test]
fn matmul_matches_reference_for_both_variants_and_all_transposes() {
    for g in matmul_gpus() {
        let mut seed = 1;
        for (m, n, kk) in [(1, 1, 1), (7, 13, 5), (33, 65, 17), (64, 64, 64), (100, 37, 129), (5, 70, 300), (130, 257, 41)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut mm = Matmul::new(m, n, kk);
                mm.trans_a = ta;
                mm.trans_b = tb;
                matmul_case(g, &mm, seed, 1.0);
                seed += 1;
            }
        }
        // Large magnitudes, accumulate with alpha, and a batch that broadcasts B.
        matmul_case(g, &Matmul::linear(19, 23, 31).accumulate().alpha(0.5), 100, 30.0);
        matmul_case(g, &Matmul::new(9, 11, 13).trans_a().batched(3, 9 * 13, 0, 9 * 11), 101, 1.0);
        let mut mm = Matmul::new(4, 6, 8).batched(2, 40, 50, 30);
        mm.a_off = 3;
        mm.b_off = 5;
        mm.c_off = 7;
        matmul_case(g, &mm, 102, 2.0);
        // Column blocks of wider matrices (row strides): a weight part, a logits chunk.
        let mut mm = Matmul::linear(6, 10, 7);
        (mm.lda, mm.ldb, mm.ldc, mm.c_off) = (12, 11, 20, 9);
        matmul_case(g, &mm, 103, 1.0);
        let mut mm = Matmul::new(5, 9, 7).trans_a();
        (mm.lda, mm.ldb, mm.ldc) = (8, 13, 9);
        matmul_case(g, &mm, 104, 1.0);
    }
}

/// With the CPU drivers' kernels, the products that fill the wide kernel's 128×128
/// tiles run it (SmolLM2's projections over 2,048 tokens, q/k/v's group as a whole);
/// LoRA's narrow products, the demo's 64-wide ones and any with more than 30% of
/// padding keep 32×32 tiles.
#[test]
fn the_wide_matmul_takes_the_products_that_fill_its_tiles() {
    for (m, n, fills) in [(2048, 576, true), (2048, 1536, true), (576, 2048, true), (341, 576, true), (1408, 192, false), (1408, 64, false), (2048, 16, false), (130, 130, false), (640, 600, true), (128, 128, true), (127, 4096, false)] {
        assert_eq!(k::fills_wide([(m, n)]), fills, "{m}×{n}");
    }
    // A group as a whole: q/k/v's on SmolLM2 (1.2 computed per output kept), not one with
    // a narrow product, nor none.
    assert!(k::fills_wide([(2048, 576), (2048, 192), (2048, 192)]));
    assert!(!k::fills_wide([(2048, 576), (2048, 16)]));
    assert!(!k::fills_wide([(1408, 192), (1408, 192)]));
    assert!(!k::fills_wide([]));
    assert_eq!(variant(Variant::Register).caps.wide_matmul, WideMatmul::Large);
    assert_eq!(variant(Variant::Tiled).caps.wide_matmul, WideMatmul::Off);
}

/// Where the adapter has subgroups (lavapipe has), the GPU kernels' row reductions add
/// within them by default, the CPU drivers' kernels keep theirs, and forcing them off
/// keeps the trees; the tests run all three (`row_gpus`).
#[test]
fn subgroup_sums_are_the_gpu_kernels_default_where_the_adapter_has_subgroups() {
    let [reg, tiled, trees] = row_gpus();
    assert!(tiled.caps.subgroups, "lavapipe offers subgroups: {}", tiled.describe());
    assert!(tiled.caps.subgroup_sums && !reg.caps.subgroup_sums && !trees.caps.subgroup_sums);
    assert!(tiled.describe().contains("subgroup sums") && !trees.describe().contains("subgroup sums"));
}

/// Matmul on cooperative matrices is chosen from what the adapter offers: square f16
/// blocks with f32 sums, 16×16 before 8×8, and a fixed subgroup size that shares a
/// 64×64 tile's blocks out at 1 to 4 a subgroup (NVIDIA: 16×16, 32 wide, 2 each;
/// Mesa 26's lavapipe: 8×8, 8 wide, 2 each). Debian 12's lavapipe offers none, so
/// forcing it on changes nothing there (tests/coop.rs runs it where offered).
#[test]
fn cooperative_matrices_are_chosen_by_shape_and_subgroup_size() {
    use webtune::gpu::{coop_blocks, coop_choice, Coop};
    use wgpu::{CooperativeMatrixProperties as P, CooperativeScalarType as T};
    let shape = |s: u32, ab: T, cr: T| P { m_size: s, n_size: s, k_size: s, ab_type: ab, cr_type: cr, saturating_accumulation: false };
    let nvidia = [shape(16, T::F16, T::F16), shape(16, T::F16, T::F32), shape(8, T::F32, T::F32)];
    let lavapipe = [shape(8, T::F16, T::F16), shape(8, T::F16, T::F32)];
    assert_eq!(coop_choice(&nvidia, 32, 32), Some(Coop { size: 16, blocks: 2 }));
    assert_eq!(coop_choice(&nvidia, 64, 64), Some(Coop { size: 16, blocks: 4 }));
    assert_eq!(coop_choice(&lavapipe, 8, 8), Some(Coop { size: 8, blocks: 2 }));
    assert_eq!(coop_choice(&lavapipe, 4, 4), Some(Coop { size: 8, blocks: 1 }));
    // Subgroups too wide for 8×8 blocks, sizes that vary, no f16 → f32 shape, none.
    assert_eq!(coop_choice(&lavapipe, 32, 32), None);
    assert_eq!(coop_choice(&nvidia, 32, 64), None);
    assert_eq!(coop_choice(&[shape(16, T::F16, T::F16), shape(8, T::F32, T::F32)], 32, 32), None);
    assert_eq!(coop_choice(&[], 32, 32), None);
    assert_eq!((coop_blocks(16, 8), coop_blocks(16, 16), coop_blocks(16, 128), coop_blocks(8, 2)), (None, Some(1), None, None));
    let g = make(webtune::gpu::GpuOptions { variant: Some(Variant::Tiled), coop_matrix: Some(true), ..Default::default() });
    assert_eq!(g.caps.coop_matrix, coop_choice(&g.caps.coop_shapes, g.caps.adapter.subgroup_min_size, g.caps.adapter.subgroup_max_size).filter(|_| g.caps.shader_f16));
    assert_eq!(g.describe().contains("cooperative matrices"), g.caps.coop_matrix.is_some());
}

/// LoRA's fusions: a second product summed into C (every transpose, offsets, row
/// strides, a K2 past one tile), and dropout on A, on B or on the second product.
#[test]
fn fused_products_match_reference_for_both_variants() {
    for g in matmul_gpus() {
        let mut seed = 300;
        for (m, n, kk, k2) in [(7, 13, 5, 3), (33, 65, 17, 16), (70, 68, 40, 33), (140, 131, 20, 9)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut mm = Matmul::new(m, n, kk).accumulate().plus(Second::new(k2, 0.75));
                (mm.trans_a, mm.trans_b) = (ta, tb);
                matmul_case(g, &mm, seed, 1.0);
                for on in [DropOn::A, DropOn::B, DropOn::Second] {
                    let d = Dropout { p: 0.3, seed: seed as u32, on };
                    matmul_case(g, &mm.clone().dropout(d), seed + 1, 2.0);
                }
                seed += 2;
            }
        }
        // A column block of a wider C with its second product's B from row 4 (a
        // weight's row part), and dropout counted from offsets.
        let mut mm = Matmul::linear(6, 10, 7).plus(Second { b_off: 4 * 3, ..Second::new(3, 2.0) });
        (mm.lda, mm.ldb, mm.ldc, mm.c_off, mm.a_off) = (12, 11, 20, 9, 2);
        matmul_case(g, &mm.clone().dropout(Dropout { p: 0.5, seed: 9, on: DropOn::A }), 330, 1.0);
        matmul_case(g, &mm.dropout(Dropout { p: 0.5, seed: 9, on: DropOn::Second }), 331, 1.0);
    }
    // The second product beside the last of several k-ranges.
    let mut mm = Matmul::new(9, 11, 301).accumulate().plus(Second::new(20, 1.0));
    mm.dropout = Some(Dropout { p: 0.2, seed: 4, on: DropOn::B });
    matmul_case(small_loops(), &mm, 340, 1.0);
    let wide = make(webtune::gpu::GpuOptions { max_loop: Some(100), variant: Some(Variant::Tiled), wide_matmul: Some(webtune::gpu::WideMatmul::All), ..Default::default() });
    matmul_case(&wide, &mm, 341, 1.0);
}

/// Split-K (`Caps::split_k`), forced on with a small aim (64 tiles, ranges of at least
/// 16) for each kernel (register, tiled, wide): products with few tiles and a long k
/// run their k-ranges at once into slices that `matmul_split_sum` adds into C, against
/// the CPU reference: every transpose, alpha and beta, offsets and row strides, more
/// ranges than a group holds, LoRA's second product with dropout on it (its mask
/// counted from the slice as from C), dropout on A and on B, SwiGLU on A and on B, f16 and
/// Q8_0 weights, a Llama 3 vocabulary's k, and ranges within a loop budget of 100;
/// products that must not split (batched, enough tiles, a short k, SwiGLU's backward)
/// run as before.
#[test]
fn split_k_matches_reference() {
    use webtune::gpu::{GpuOptions, SplitK};
    let aim = Some(SplitK { tiles: 64, min_k: 16 });
    let gpus = [
        make(GpuOptions { variant: Some(Variant::Register), wide_matmul: Some(WideMatmul::Off), split_k: aim, ..Default::default() }),
        make(GpuOptions { variant: Some(Variant::Tiled), wide_matmul: Some(WideMatmul::Off), split_k: aim, ..Default::default() }),
        make(GpuOptions { variant: Some(Variant::Tiled), wide_matmul: Some(WideMatmul::All), split_k: aim, ..Default::default() }),
        make(GpuOptions { variant: Some(Variant::Tiled), max_loop: Some(100), split_k: aim, ..Default::default() }),
    ];
    let sums = |g: &webtune::gpu::Gpu| dispatches_of(g, "matmul_split_sum");
    // One product, asserting whether it split (one sum dispatch).
    let case = |g: &webtune::gpu::Gpu, mm: &Matmul, seed: u64, splits: bool| {
        let before = sums(g);
        matmul_case(g, mm, seed, 1.0);
        assert_eq!(sums(g) - before, splits as u64, "{mm} on {}: split-K {}", kernels_of(g), if splits { "expected" } else { "unexpected" });
    };
    for g in &gpus {
        let mut seed = 1500;
        for (m, n, kk) in [(7, 13, 100), (33, 65, 300), (1, 1, 64)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut mm = Matmul::new(m, n, kk);
                (mm.trans_a, mm.trans_b) = (ta, tb);
                case(g, &mm, seed, true);
                case(g, &mm.accumulate().alpha(0.5), seed + 1, true);
                seed += 2;
            }
        }
        let mut mm = Matmul::linear(6, 300, 7);
        (mm.lda, mm.ldb, mm.ldc, mm.c_off) = (310, 305, 20, 9);
        case(g, &mm, 1530, true);
        // LoRA's dx inside the base dx: the second product beside the last range, its
        // dropout mask counted as in C (a column block at an offset).
        let mut lora = Matmul::new(20, 30, 200).accumulate().plus(Second::new(9, 0.75));
        (lora.ldc, lora.c_off) = (35, 4);
        case(g, &lora, 1531, true);
        for on in [DropOn::A, DropOn::B, DropOn::Second] {
            case(g, &lora.clone().dropout(Dropout { p: 0.3, seed: 7, on }), 1532, true);
        }
        case(g, &Matmul { glu: Some(Glu { on: GluOn::A, up: 9 * 120 + 8 }), ..Matmul::new(9, 11, 120) }, 1535, true);
        // SwiGLU on B with dropout on it, as a trained down's dW = dyᵀ·h reads h.
        let dw = Matmul { glu: Some(Glu { on: GluOn::B, up: 120 * 13 + 8 }), ..Matmul::new(11, 13, 120).trans_a().accumulate() };
        case(g, &dw.dropout(Dropout { p: 0.2, seed: 3, on: DropOn::B }), 1536, true);
        // Not split: batched, enough tiles, a short k, SwiGLU's backward.
        case(g, &Matmul::new(9, 11, 200).batched(2, 9 * 200, 0, 99), 1540, false);
        case(g, &Matmul::new(1030, 1030, 40), 1541, false);
        case(g, &Matmul::new(9, 11, 31), 1542, false);
        // Frozen weights, f16 and packed, through the grouped launch.
        let mut rng = Rng::new(1550);
        let (rows, cols) = (37, 32 * 8);
        let w = rng.vec(rows * cols, 2.0);
        let f16 = g.upload_f16("w f16", &w, &[rows, cols]).unwrap();
        let raw = quant::quantize(QType::Q8_0, &w).unwrap();
        let q8 = g.upload_packed("w q8", QType::Q8_0, &raw, &[rows, cols]).unwrap();
        let weights = [(&f16, w.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<f32>>()), (&q8, quant::dequantize(QType::Q8_0, &raw))];
        for (tw, wv) in weights {
            for mm in [Matmul::linear(5, cols, rows).accumulate(), Matmul::new(5, cols, rows)] {
                let (ea, _, ec) = mm.extents();
                let (a, c0) = (rng.vec(ea, 1.0), rng.vec(ec, 1.0));
                let (ta, tc) = (up(g, &a), up(g, &c0));
                let before = sums(g);
                run(g, |r| k::matmul(g, r, &mm, &ta, tw, &tc));
                let mut want = c0.clone();
                cpu::matmul(&mm, &a, &wv, &mut want);
                close(&format!("{mm} over {} on {}", tw.dtype, kernels_of(g)), &read(g, &tc), &want, 1e-4, 1e-4);
                assert_eq!(sums(g) - before, 1, "{mm} over {} on {}", tw.dtype, kernels_of(g));
            }
        }
    }
    // dx = dlogits·W over a Llama 3 vocabulary: 64 ranges of 2,016 (a loop budget of 100
    // would need thousands of ranges, so that context sums it one range after another).
    for g in &gpus[..3] {
        case(g, &Matmul::new(3, 16, 128256), 1560, true);
    }
    let mm = Matmul { swiglu_back: Some(SwigluBack { g: 0, up: 9 * 11, du: 9 * 11 }), ..Matmul::new(9, 11, 301) };
    assert!(k::split_ranges(&gpus[1], &mm, 64, 1 << 20).is_none(), "SwiGLU's backward is not split");
    // The ranges: as many as bring 1 tile to the aim of 64 (k / 16 = 18 here), each a
    // multiple of 32, and within a loop budget where one binds.
    let ranges = k::split_ranges(&gpus[1], &Matmul::new(9, 11, 300), 64, 1 << 20).unwrap();
    assert_eq!(ranges, (0..10).map(|i| (32 * i, (32 * i + 32).min(300))).collect::<Vec<_>>());
    assert_eq!(k::split_ranges(&gpus[1], &Matmul::new(9, 11, 300), 64, 16).unwrap().len(), 19);
    assert_eq!(k::split_ranges(&gpus[1], &Matmul::new(100, 100, 3000), 64, 1 << 20).unwrap().len(), 16);
    assert!(gpu().caps.split_k.is_none() && variant(Variant::Tiled).caps.split_k.is_none(), "split-K is off by default");
    assert!(gpus[0].describe().contains("split-K below 64 tiles"));
}

/// SwiGLU on an operand as loaded (`Glu`: silu(gate)·up, up stored `up` elements past
/// the gate): on A (down's forward, LoRA's down) or on B (LoRA's dA, a trained down's
/// dW), every transpose, with dropout on that operand, a second product, and in a
/// group over two operand sets (dA beside dB), against the CPU reference.
#[test]
fn swiglu_on_an_operand_as_loaded_matches_reference_for_both_variants() {
    for g in matmul_gpus() {
        let mut seed = 900;
        for (m, n, kk) in [(7, 13, 5), (33, 65, 17), (20, 8, 36)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for on in [GluOn::A, GluOn::B] {
                    let mut mm = Matmul::new(m, n, kk).accumulate();
                    (mm.trans_a, mm.trans_b) = (ta, tb);
                    mm.glu = Some(Glu { on, up: m * kk + 8 });
                    matmul_case(g, &mm, seed, 2.0);
                    let drop_on = if on == GluOn::A { DropOn::A } else { DropOn::B };
                    let dropped = mm.clone().dropout(Dropout { p: 0.3, seed: seed as u32, on: drop_on });
                    matmul_case(g, &dropped, seed + 1, 2.0);
                    matmul_case(g, &mm.plus(Second::new(4, 0.5)), seed + 2, 2.0);
                    seed += 3;
                }
            }
        }
        // LoRA's dA (SwiGLU and dropout on B) beside dB (the second operands, plain).
        let da = Matmul { glu: Some(Glu { on: GluOn::B, up: 40 * 24 + 4 }), ..Matmul::new(4, 24, 40).trans_a().accumulate() }.dropout(Dropout { p: 0.2, seed: 3, on: DropOn::B });
        let db = Matmul { alt: true, c_off: 200, ..Matmul::new(12, 4, 40).trans_a().accumulate().alpha(2.0) }.dropout(Dropout { p: 0.0, seed: 0, on: DropOn::B });
        group_case(g, &[da, db], 950);
    }
}

/// SwiGLU's backward in a product's store (`SwigluBack`: down's dx product adds dgate
/// and dup, never storing dh), against the product then `swiglu_backward` on the CPU:
/// with LoRA's dx inside (dropout on it), f16 weights, row strides, and k split into
/// ranges for the loop budget.
#[test]
fn swiglu_backward_in_the_store_matches_reference() {
    let case = |g: &webtune::gpu::Gpu, mm: &Matmul, seed: u64, f16: bool| {
        let mut rng = Rng::new(seed);
        let e = mm.swiglu_back.unwrap();
        let (ea, eb, ec) = mm.extents();
        let (_, _, ldc) = mm.strides();
        let (ea2, eb2) = mm.second.map_or((1, 1), |s| s.extents(mm));
        let round = |v: Vec<f32>| if f16 { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() } else { v };
        let (a, b, c0, a2, b2) = (rng.vec(ea, 1.0), round(rng.vec(eb, 1.0)), rng.vec(ec, 1.0), rng.vec(ea2, 1.0), rng.vec(eb2, 1.0));
        let aux = rng.vec(e.g + e.up + (mm.m - 1) * ldc + mm.n, 3.0);
        let tb = if f16 { g.upload_f16("w", &b, &[eb]).unwrap() } else { up(g, &b) };
        let (ta, tc, ta2, tb2, taux) = (up(g, &a), up(g, &c0), up(g, &a2), up(g, &b2), up(g, &aux));
        run(g, |r| k::matmul_swiglu_back(g, r, mm, &ta, &tb, &tc, mm.second.map(|_| (&ta2, &tb2)), &taux));
        let mut want = c0.clone();
        cpu::matmul_swiglu_back(mm, &a, &b, &mut want, mm.second.map(|_| (a2.as_slice(), b2.as_slice())), &aux);
        close(&format!("{mm:?} (f16 {f16}) on {:?}", g.caps.variant), &read(g, &tc), &want, 1e-4, 1e-4);
    };
    for g in matmul_gpus() {
        for (i, (m, n, kk)) in [(7, 13, 5), (33, 65, 17), (20, 8, 36)].into_iter().enumerate() {
            let mm = Matmul { swiglu_back: Some(SwigluBack { g: 3, up: m * n + 5, du: m * n + 2 }), ..Matmul::new(m, n, kk) };
            case(g, &mm, 960 + i as u64, false);
            case(g, &mm, 970 + i as u64, true);
            let lora = mm.clone().plus(Second::new(4, 1.0)).dropout(Dropout { p: 0.25, seed: 5, on: DropOn::Second });
            case(g, &lora, 980 + i as u64, false);
            let mut wide = mm.clone();
            (wide.ldc, wide.c_off) = (n + 3, 2);
            wide.swiglu_back = Some(SwigluBack { g: 0, up: m * (n + 3), du: m * (n + 3) + 1 });
            case(g, &wide, 990 + i as u64, false);
        }
    }
    let mm = Matmul { swiglu_back: Some(SwigluBack { g: 0, up: 9 * 11, du: 9 * 11 }), ..Matmul::new(9, 11, 301) }.plus(Second::new(6, 1.0));
    case(small_loops(), &mm, 999, false);
}

/// One group's products (`matmul_group`) over shared operands at their own offsets,
/// against the CPU's products in turn; returns C.
fn group_case(g: &webtune::gpu::Gpu, mms: &[Matmul], seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let most = |f: &dyn Fn(&Matmul) -> usize| mms.iter().map(f).max().unwrap();
    let (ea, eb, ec) = (most(&|m| m.extents().0), most(&|m| m.extents().1), most(&|m| m.extents().2));
    // The second operands: the second products', or an `alt` product's A and B.
    let second_of = |m: &Matmul| if m.alt { Some((m.extents().0, m.extents().1)) } else { m.second.map(|s| s.extents(m)) };
    let (ea2, eb2) = (most(&|m| second_of(m).map_or(1, |e| e.0)), most(&|m| second_of(m).map_or(1, |e| e.1)));
    let (a, b, c0, a2, b2) = (rng.vec(ea, 1.0), rng.vec(eb, 1.0), rng.vec(ec, 1.0), rng.vec(ea2, 1.0), rng.vec(eb2, 1.0));
    let (ta, tb, tc, ta2, tb2) = (up(g, &a), up(g, &b), up(g, &c0), up(g, &a2), up(g, &b2));
    let bound = mms.iter().any(|m| m.alt || m.second.is_some());
    run(g, |r| k::matmul_group(g, r, mms, &ta, &tb, &tc, bound.then_some((&ta2, &tb2))));
    let mut want = c0.clone();
    cpu::matmul_group(mms, &a, &b, &mut want, bound.then_some((a2.as_slice(), b2.as_slice())));
    let got = read(g, &tc);
    close(&format!("group of {} on {:?}: {mms:?}", mms.len(), g.caps.variant), &got, &want, 2e-5 * (most(&|m| m.k) as f32).sqrt() * 2.0, 1e-4);
    got
}

/// A group of products of one kind in one dispatch, each with its own shape, offsets,
/// scale and dropout seed (LoRA's q/k/v and gate/up): every transpose and dropout
/// operand, products of different sizes (each launches its own tiles), more than
/// `GROUP_MAX` (two dispatches), tiles past 65,535 workgroups, and a k past the loop
/// budget (each alone).
#[test]
fn grouped_products_match_reference_for_both_variants() {
    // Three products side by side in A, B and C (C's column blocks of one wide matrix).
    let three = |ta: bool, tb: bool, drop: Option<DropOn>, second: bool| -> Vec<Matmul> {
        [(7, 13, 5, 0usize), (70, 6, 40, 1), (33, 65, 17, 2)]
            .iter()
            .map(|&(m, n, kk, i)| {
                let mut mm = Matmul::new(m, n, kk).alpha(0.5 + i as f32);
                (mm.trans_a, mm.trans_b) = (ta, tb);
                (mm.a_off, mm.b_off, mm.c_off, mm.ldc) = (3000 * i + 1, 3000 * i + 2, 70 * i, 300);
                mm.beta = (i % 2) as f32;
                if second {
                    mm.second = Some(Second { a_off: 1000 * i, b_off: 2000 * i, ..Second::new(3 + i, 0.75) });
                }
                mm.dropout = drop.map(|on| Dropout { p: 0.3, seed: 10 + i as u32, on });
                mm
            })
            .collect()
    };
    for g in matmul_gpus() {
        let mut seed = 500;
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            group_case(g, &three(ta, tb, None, false), seed);
            for on in [DropOn::A, DropOn::B, DropOn::Second] {
                group_case(g, &three(ta, tb, Some(on), true), seed + 1);
            }
            seed += 2;
        }
        // Over two operand sets: the second product of the three reads A and B from
        // the second pair (LoRA's dA and dB), with and without dropout, each transpose.
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for drop in [None, Some(DropOn::A), Some(DropOn::B)] {
                let mut mms = three(ta, tb, drop, false);
                mms[1].alt = true;
                group_case(g, &mms, seed);
                seed += 1;
            }
        }
        // Ten products: a full group of eight, then two; then the same, every third
        // on the second operands.
        let mut ten: Vec<Matmul> = (0..10).map(|i| Matmul { c_off: 40 * i, ldc: 400, a_off: 100 * i, ..Matmul::linear(5 + i, 4 + i, 9) }).collect();
        group_case(g, &ten, 520);
        ten.iter_mut().step_by(3).for_each(|m| m.alt = true);
        group_case(g, &ten, 521);
    }
    // Tall, thin products whose tiles together pass 65,535 workgroups: the flat grid
    // spills into y.
    let rows = 8200 * 32;
    let tall: Vec<Matmul> = (0..8).map(|i| Matmul { c_off: i * rows, a_off: i * rows, b_off: i, ..Matmul::new(rows, 1, 1) }).collect();
    group_case(gpu(), &tall, 525);
    // k past the loop budget: each product runs alone, in k-ranges (one of them on
    // the second operands).
    let mut long: Vec<Matmul> = (0..2).map(|i| Matmul { c_off: 90 * i, a_off: 9 * 301 * i, ..Matmul::new(9, 10, 301).accumulate() }).collect();
    group_case(small_loops(), &long, 530);
    long[1].alt = true;
    group_case(small_loops(), &long, 531);
    // Products of different kinds are refused.
    let g = gpu();
    let (a, c) = (zeros(g, 64), zeros(g, 64));
    let mut rec = g.recorder("mixed");
    let err = k::matmul_group(g, &mut rec, &[Matmul::new(2, 2, 2), Matmul::new(2, 2, 2).trans_a()], &a, &a, &c, None).unwrap_err().to_string();
    assert!(err.contains("different kinds"), "{err}");
}

/// LoRA pairs on projections that read one x (q/k/v at different widths), with every
/// role's tensors as views into one buffer: the grouped down product and backward
/// (one dispatch each of down, dh, dB, dA) against the CPU's pair by pair, with
/// dropout and without; and with the tensors apart (a dispatch each) the same.
#[test]
fn grouped_lora_matches_reference_pair_by_pair() {
    // Views at the adapter's storage alignment into one uploaded buffer.
    fn packed(g: &webtune::gpu::Gpu, parts: &[Vec<f32>]) -> Vec<webtune::gpu::Tensor> {
        let align = (g.caps.limits.min_storage_buffer_offset_alignment as usize / 4).max(4);
        let mut flat = Vec::new();
        let mut starts = Vec::new();
        for p in parts {
            flat.resize(flat.len().div_ceil(align) * align, 0.0);
            starts.push(flat.len());
            flat.extend_from_slice(p);
        }
        let whole = up(g, &flat);
        parts.iter().zip(starts).map(|(p, s)| whole.view("part", (s * 4) as u64, &[p.len()])).collect()
    }
    fn refs(t: &[webtune::gpu::Tensor]) -> Vec<&webtune::gpu::Tensor> {
        t.iter().collect()
    }
    for (v, wide) in [(Variant::Register, false), (Variant::Tiled, false), (Variant::Tiled, true)] {
        let g = &own_matmul_kernels(v, wide);
        for (p, seed) in [(0.0, 1u64), (0.2, 2)] {
            let (n, din, r) = (19, 24, 4);
            let ls: Vec<Lora> = [12, 8, 8].iter().enumerate().map(|(i, &dout)| Lora::new(n, din, dout, r, 2.0).with_dropout(p, 70 + i as u32)).collect();
            let mut rng = Rng::new(seed);
            let x = rng.vec(n * din, 2.0);
            let a: Vec<_> = ls.iter().map(|l| rng.vec(l.r * din, 0.5)).collect();
            let b: Vec<_> = ls.iter().map(|l| rng.vec(l.dout * l.r, 0.5)).collect();
            let dy: Vec<_> = ls.iter().map(|l| rng.vec(n * l.dout, 1.0)).collect();
            let da0: Vec<_> = ls.iter().map(|l| rng.vec(l.r * din, 0.1)).collect();
            let db0: Vec<_> = ls.iter().map(|l| rng.vec(l.dout * l.r, 0.1)).collect();
            let hz: Vec<_> = ls.iter().map(|l| vec![0.0; n * l.r]).collect();
            let mut outs = Vec::new();
            for together in [true, false] {
                let pack = |parts: &[Vec<f32>]| if together { packed(g, parts) } else { parts.iter().map(|p| up(g, p)).collect() };
                // The A and B gradients in one buffer, as `params::pack` lays them out.
                let mut grads = pack(&da0.iter().chain(&db0).cloned().collect::<Vec<_>>());
                let tdb = grads.split_off(da0.len());
                let (tx, ta, tb, tdy, tda, th, tdh) = (up(g, &x), pack(&a), pack(&b), pack(&dy), grads, pack(&hz), pack(&hz));
                let before = g.counters().dispatches;
                run(g, |rec| {
                    k::lora_down_group(g, rec, &ls, &tx, &refs(&ta), &refs(&th))?;
                    k::lora_backward_group(g, rec, &ls, &tx, &refs(&tb), &refs(&th), &refs(&tdy), &refs(&tdh), false, &refs(&tda), &refs(&tdb))
                });
                // Together: h; dh; dA and dB (with the GPU kernels as one product over
                // two operand sets).
                let dispatches = if !together { 12 } else if v == Variant::Tiled { 3 } else { 4 };
                assert_eq!(g.counters().dispatches - before, dispatches, "dispatches, together: {together}");
                let got: Vec<Vec<Vec<f32>>> = [&th, &tdh, &tda, &tdb].iter().map(|ts| ts.iter().map(|t| read(g, t)).collect()).collect();
                for (i, l) in ls.iter().enumerate() {
                    let (mut h, mut dh, mut da, mut db) = (hz[i].clone(), hz[i].clone(), da0[i].clone(), db0[i].clone());
                    cpu::lora_down(l, &x, &a[i], &mut h);
                    cpu::lora_backward(l, &x, &b[i], &h, &dy[i], &mut dh, &mut da, &mut db);
                    for (what, got, want) in [("h", &got[0][i], &h), ("dh", &got[1][i], &dh), ("dA", &got[2][i], &da), ("dB", &got[3][i], &db)] {
                        close(&format!("pair {i} {what} (p {p}, together {together}) on {}", kernels_of(g)), &got[..want.len()], want, 1e-4, 1e-4);
                    }
                }
                outs.push(got);
            }
            assert_eq!(outs[0], outs[1], "grouped and apart differ");
        }
    }
}

/// Dropout in a product keeps 1 − p of the elements, each scaled by 1 / (1 − p), with
/// a mask fixed by the seed: h = dropout(x)·I.
#[test]
fn dropout_in_a_product_keeps_the_right_fraction() {
    let g = gpu();
    let (rows, cols) = (200, 100);
    let mut rng = Rng::new(12);
    let x: Vec<f32> = rng.vec(rows * cols, 2.0).iter().map(|v| v + 3.0).collect();
    let eye: Vec<f32> = (0..cols * cols).map(|i| (i / cols == i % cols) as u32 as f32).collect();
    for (p, seed) in [(0.1f32, 7u32), (0.5, 8)] {
        let mm = Matmul::new(rows, cols, cols).dropout(Dropout { p, seed, on: DropOn::A });
        let (tx, te, ty) = (up(g, &x), up(g, &eye), zeros(g, rows * cols));
        run(g, |r| k::matmul(g, r, &mm, &tx, &te, &ty));
        let y = read(g, &ty);
        for (i, (&yi, &xi)) in y.iter().zip(&x).enumerate() {
            let want = if mm.dropout.unwrap().keeps(i) { xi / (1.0 - p) } else { 0.0 };
            assert!((yi - want).abs() <= 1e-6 * want.abs(), "element {i}: {yi} vs {want}");
        }
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f32 / y.len() as f32;
        assert!((kept - (1.0 - p)).abs() < 0.02, "kept {kept} at p {p}");
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let g = gpu();
    let a = zeros(g, 6);
    let b = zeros(g, 6);
    let c = zeros(g, 3);
    let mut rec = g.recorder("bad");
    let err = k::matmul(g, &mut rec, &Matmul::new(2, 2, 3), &a, &b, &c).unwrap_err().to_string();
    assert!(err.contains("`c`") && err.contains("needs 4"), "{err}");
}

/// Both variants: a row per invocation (CPU drivers) and FlashAttention-2 tiles (GPUs).
fn attention_case(at: &Attention, seg: &[u32], seed: u64, mag: f32) {
    for v in [Variant::Register, Variant::Tiled] {
        attention_case_on(variant(v), at, seg, seed, mag)
    }
}

/// With segments whose examples are sorted (`Inputs::sorted`), both without and with
/// the kernels' skip over a row's other examples (`Attention::sorted`).
fn attention_case_on(g: &webtune::gpu::Gpu, at: &Attention, seg: &[u32], seed: u64, mag: f32) {
    for at in sortings(at, seg) {
        attention_case_as(g, &at, seg, seed, mag);
    }
}

/// `at` unsorted, and sorted too where the segments allow it.
fn sortings(at: &Attention, seg: &[u32]) -> Vec<Attention> {
    let sorted = at.tk == at.t && webtune::model::sorted_rows(seg, at.t);
    [false, true].into_iter().filter(|&s| !s || sorted).map(|s| at.sorted(s)).collect()
}

fn attention_case_as(g: &webtune::gpu::Gpu, at: &Attention, seg: &[u32], seed: u64, mag: f32) {
    let mut rng = Rng::new(seed);
    let (q, kk, v) = (rng.vec(at.q_len(), mag), rng.vec(at.kv_len(), mag), rng.vec(at.kv_len(), mag));
    let dout = rng.vec(at.q_len(), 1.0);
    let (dq0, dk0, dv0) = (rng.vec(at.q_len(), 0.1), rng.vec(at.kv_len(), 0.1), rng.vec(at.kv_len(), 0.1));
    let (tq, tk, tv, ts, tdo) = (up(g, &q), up(g, &kk), up(g, &v), up(g, seg), up(g, &dout));
    let (to, tl) = (zeros(g, at.q_len()), zeros(g, at.rows()));
    let (tdq, tdk, tdv) = (up(g, &dq0), up(g, &dk0), up(g, &dv0));
    run(g, |r| {
        k::attention_forward(g, r, at, None, &tq, &tk, &tv, &ts, &to, &tl)?;
        k::attention_backward(g, r, at, None, &tq, &tk, &tv, &ts, &to, &tl, &tdo, &tdq, &tdk, &tdv)
    });
    let (mut o, mut lse) = (vec![0.0; at.q_len()], vec![0.0; at.rows()]);
    cpu::attention_forward(at, &q, &kk, &v, seg, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (dq0, dk0, dv0);
    cpu::attention_backward(at, &q, &kk, &v, seg, &o, &lse, &dout, &mut dq, &mut dk, &mut dv);
    let tol = 1e-4 * mag.max(1.0);
    close(&format!("attention o {at:?} on {:?}", g.caps.variant), &read(g, &to), &o, tol, 1e-4);
    close("attention lse", &read(g, &tl), &lse, tol * mag.max(1.0), 1e-4);
    // Scores of ±30² saturate the softmax; gradients then scale with mag².
    let gtol = 1e-4 * mag.max(1.0).powi(3);
    close("attention dq", &read(g, &tdq), &dq, gtol, 1e-3);
    close("attention dk", &read(g, &tdk), &dk, gtol, 1e-3);
    close("attention dv", &read(g, &tdv), &dv, gtol, 1e-3);
}

#[test]
fn attention_matches_reference() {
    let at = Attention::new(2, 13, 4, 2, 8);
    attention_case(&at, &[0; 26], 1, 1.0);
    // Two packed examples in the first sequence: no attention across the boundary.
    let seg: Vec<u32> = (0..26).map(|i| if i < 5 { 0 } else if i < 13 { 1 } else { 0 }).collect();
    attention_case(&at, &seg, 2, 1.0);
    attention_case(&Attention::new(1, 37, 3, 1, 64), &[0; 37], 3, 1.0);
    attention_case(&Attention::new(1, 9, 2, 2, 12), &[0; 9], 4, 30.0);
    attention_case(&Attention::new(1, 5, 2, 1, 128), &[0; 5], 5, 0.5);
}

/// FlashAttention-2 tiles at the edges of a 64-row workgroup and of a key tile (32 keys
/// at HS 64), at SmolLM2's T = 512 and past it, for GQA groups of 1, 3 and 4, with
/// packed segments, against the CPU; and the tiled kernels split into key and query
/// ranges as on a driver with a loop budget.
#[test]
fn flash_attention_tiles_match_reference() {
    for (i, t) in [1usize, 63, 64, 65, 512].into_iter().enumerate() {
        attention_case(&Attention::new(1, t, 3, 1, 64), &vec![0; t], 200 + i as u64, 1.0);
    }
    // GQA groups 1 and 4, two sequences of three packed examples each.
    let seg: Vec<u32> = (0..2 * 130).map(|i| [0, 1, 2][(i % 130 > 40) as usize + (i % 130 > 97) as usize]).collect();
    attention_case(&Attention::new(2, 130, 4, 4, 32), &seg, 210, 1.0);
    attention_case(&Attention::new(2, 130, 8, 2, 16), &seg, 211, 2.0);
    let seg: Vec<u32> = (0..2 * 41).map(|i| u32::from(i % 41 >= 17)).collect();
    attention_case_on(tiled_small_loops(), &Attention::new(2, 41, 4, 2, 8), &seg, 212, 1.0);
    attention_case_on(tiled_small_loops(), &Attention::new(1, 70, 3, 1, 16), &vec![0; 70], 213, 1.0);
    // DPO pairs a row each: the shared prompt, the chosen side, the rejected side that
    // sees the prompt and itself only, padding.
    let seg = pair_rows(130, &[(40, 90, 125), (3, 64, 130)]);
    attention_case(&Attention::new(2, 130, 4, 4, 32), &seg, 214, 1.0);
    attention_case(&Attention::new(2, 130, 8, 2, 16), &seg, 215, 2.0);
    attention_case_on(tiled_small_loops(), &Attention::new(2, 130, 4, 2, 8), &seg, 216, 1.0);
    // Many packed examples of 1 to 40 tokens across workgroups and key tiles, padding
    // after them in one row, one example filling the other: where sorted segments skip
    // a row's other examples, each query must still start at its example's first key
    // and each key end at its example's last query; in loop-budget ranges too.
    let seg = packed_rows(&[300, 261], 217);
    attention_case(&Attention::new(2, 300, 4, 2, 16), &seg, 218, 1.0);
    attention_case_on(tiled_small_loops(), &Attention::new(2, 300, 4, 2, 8), &seg, 219, 1.0);
    attention_case_on(small_loops(), &Attention::new(2, 300, 4, 2, 8), &seg, 220, 1.0);
}

/// Rows of packed examples of 1 to 40 tokens (random lengths, ids ascending) filling
/// the first `fill[i]` tokens of row i, then padding, rows of `fill[0]` tokens.
fn packed_rows(fill: &[usize], seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let t = fill[0];
    fill.iter()
        .flat_map(|&n| {
            let (mut seg, mut id) = (Vec::new(), 0u32);
            while seg.len() < n {
                let len = (1 + rng.below(40) as usize).min(n - seg.len());
                seg.extend(std::iter::repeat_n(id, len));
                id += 1;
            }
            seg.extend(std::iter::repeat_n(u32::MAX, t - n));
            seg
        })
        .collect()
}

/// The segments of DPO pair rows of `t` tokens (`PairBatch`), each (chosen from,
/// rejected from, padding from).
fn pair_rows(t: usize, rows: &[(usize, usize, usize)]) -> Vec<u32> {
    use webtune::data::batch::{CHOSEN, REJECTED};
    rows.iter().flat_map(|&(c, r, p)| (0..t).map(move |i| if i < c { 0 } else if i < r { CHOSEN } else if i < p { REJECTED } else { u32::MAX })).collect()
}

/// What a pair row's segments let each token see: the prompt both sides, each side
/// itself, never the other side; padding only padding; packed examples apart.
#[test]
fn pair_segments_see_the_prompt_and_their_own_side() {
    use webtune::data::{batch::{CHOSEN, REJECTED}, sees};
    for side in [0, CHOSEN, REJECTED] {
        assert!(sees(side, 0), "{side:#x} sees the prompt");
        assert!(sees(side | 1, 1) && !sees(side | 1, 0), "{side:#x}: examples apart");
    }
    assert!(sees(CHOSEN, CHOSEN) && sees(REJECTED, REJECTED));
    assert!(!sees(CHOSEN, REJECTED) && !sees(REJECTED, CHOSEN) && !sees(0, CHOSEN) && !sees(0, REJECTED));
    assert!(sees(u32::MAX, u32::MAX) && !sees(u32::MAX, 0) && !sees(0, u32::MAX) && !sees(REJECTED, u32::MAX));
}

/// Which segments let attention skip a row's other examples: each row's examples in
/// ascending order (a DPO pair's sides and padding included), not an example that
/// comes back, nor rows out of order within a row.
#[test]
fn sorted_segments_are_each_rows_examples_in_order() {
    use webtune::data::batch::{CHOSEN, REJECTED};
    use webtune::model::sorted_rows;
    assert!(sorted_rows(&pair_rows(130, &[(40, 90, 125), (3, 64, 130)]), 130));
    assert!(sorted_rows(&packed_rows(&[300, 261], 217), 300));
    // Each row restarts its ids; a DPO row's sides keep its example's.
    assert!(sorted_rows(&[0, 1, 1, 0, 0, 2], 3));
    assert!(sorted_rows(&[5, 5 | CHOSEN, 5 | REJECTED, u32::MAX], 4));
    assert!(!sorted_rows(&[0, 1, 0, 0, 0, 0], 3));
    assert!(!sorted_rows(&[u32::MAX, 0, 0], 3));
    assert!(!sorted_rows(&[6, 5 | CHOSEN], 2));
}

/// Attention with RoPE on load (the tiled kernels; q and k as stored are before the
/// rotation) against RoPE then attention on the CPU, for q, k and v's gradients too.
fn roped_attention_case(g: &webtune::gpu::Gpu, at: &Attention, seg: &[u32], seed: u64) {
    for at in sortings(at, seg) {
        roped_attention_case_as(g, &at, seg, seed);
    }
}

fn roped_attention_case_as(g: &webtune::gpu::Gpu, at: &Attention, seg: &[u32], seed: u64) {
    let mut rng = Rng::new(seed);
    let n = at.b * at.t;
    // Positions restart at each packed example, as a packed batch's do.
    let mut pos = vec![0u32; n];
    for i in 1..n {
        if i % at.t != 0 && seg[i] == seg[i - 1] {
            pos[i] = pos[i - 1] + 1;
        }
    }
    let seg_pos = [seg, &pos].concat();
    let inv_freq = k::rope::inv_freq(at.hs, 10000.0);
    let (q, kk, v) = (rng.vec(at.q_len(), 1.0), rng.vec(at.kv_len(), 1.0), rng.vec(at.kv_len(), 1.0));
    let dout = rng.vec(at.q_len(), 1.0);
    let (dq0, dk0, dv0) = (rng.vec(at.q_len(), 0.1), rng.vec(at.kv_len(), 0.1), rng.vec(at.kv_len(), 0.1));
    let (tq, tk, tv, ts, tdo) = (up(g, &q), up(g, &kk), up(g, &v), up(g, &seg_pos), up(g, &dout));
    let (to, tl) = (zeros(g, at.q_len()), zeros(g, at.rows()));
    let (tdq, tdk, tdv) = (up(g, &dq0), up(g, &dk0), up(g, &dv0));
    let rope = k::RopeOnLoad { inv_freq: &inv_freq };
    run(g, |r| {
        k::attention_forward(g, r, at, Some(rope), &tq, &tk, &tv, &ts, &to, &tl)?;
        k::attention_backward(g, r, at, Some(rope), &tq, &tk, &tv, &ts, &to, &tl, &tdo, &tdq, &tdk, &tdv)
    });
    let (mut o, mut lse) = (vec![0.0; at.q_len()], vec![0.0; at.rows()]);
    cpu::attention_forward_roped(at, &inv_freq, &q, &kk, &v, &seg_pos, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (dq0, dk0, dv0);
    cpu::attention_backward_roped(at, &inv_freq, &q, &kk, &v, &seg_pos, &o, &lse, &dout, &mut dq, &mut dk, &mut dv);
    close(&format!("roped attention o {at:?}"), &read(g, &to), &o, 1e-4, 1e-4);
    close("roped attention lse", &read(g, &tl), &lse, 1e-4, 1e-4);
    close("roped attention dq", &read(g, &tdq), &dq, 1e-4, 1e-3);
    close("roped attention dk", &read(g, &tdk), &dk, 1e-4, 1e-3);
    close("roped attention dv", &read(g, &tdv), &dv, 1e-4, 1e-3);
    // RoPE on load changes nothing but where the rotation happens: the rope pass, then
    // attention, on the GPU, agree with it.
    let (rq, rk, ro, rl) = (up(g, &q), up(g, &kk), zeros(g, at.q_len()), zeros(g, at.rows()));
    let (tpos, tinv, tseg) = (up(g, &pos), up(g, &inv_freq), up(g, seg));
    run(g, |r| {
        k::rope_forward(g, r, n, (at.nh, at.nkv), at.hs, &rq, &rk, &tpos, &tinv)?;
        k::attention_forward(g, r, at, None, &rq, &rk, &tv, &tseg, &ro, &rl)
    });
    close("roped attention o against the rope pass", &read(g, &to), &read(g, &ro), 1e-5, 1e-5);
}

/// RoPE on load at the tiles' edges (T = 1, 63, 64, 65, 512, 2,049), GQA groups 1, 3
/// and 4, head sizes 8 to 128, packed examples whose positions restart, and split into
/// loop-budget ranges; the row kernels refuse it.
#[test]
fn roped_attention_matches_reference() {
    let g = variant(Variant::Tiled);
    for (i, t) in [1usize, 63, 64, 65, 512, 2049].into_iter().enumerate() {
        roped_attention_case(g, &Attention::new(1, t, 3, 1, 64), &vec![0; t], 300 + i as u64);
    }
    let seg: Vec<u32> = (0..2 * 130).map(|i| [0, 1, 2][(i % 130 > 40) as usize + (i % 130 > 97) as usize]).collect();
    roped_attention_case(g, &Attention::new(2, 130, 4, 4, 32), &seg, 310);
    roped_attention_case(g, &Attention::new(2, 130, 8, 2, 16), &seg, 311);
    roped_attention_case(g, &Attention::new(1, 20, 2, 1, 8), &[0; 20], 312);
    roped_attention_case(g, &Attention::new(1, 33, 2, 2, 128), &[0; 33], 313);
    let seg: Vec<u32> = (0..2 * 41).map(|i| u32::from(i % 41 >= 17)).collect();
    roped_attention_case(tiled_small_loops(), &Attention::new(2, 41, 4, 2, 8), &seg, 314);
    roped_attention_case(tiled_small_loops(), &Attention::new(1, 70, 3, 1, 16), &vec![0; 70], 315);
    roped_attention_case(g, &Attention::new(2, 130, 4, 2, 32), &pair_rows(130, &[(40, 90, 125), (3, 64, 130)]), 316);
    roped_attention_case(tiled_small_loops(), &Attention::new(2, 300, 4, 2, 16), &packed_rows(&[300, 261], 217), 317);
    // The row kernels (CPU drivers) have no RoPE on load, and say so.
    let row = variant(Variant::Register);
    let at = Attention::new(1, 2, 2, 2, 8);
    let (t, sp, l) = (zeros(row, at.q_len()), up(row, &[0u32, 0, 0, 1]), zeros(row, at.rows()));
    let mut rec = row.recorder("row");
    let err = k::attention_forward(row, &mut rec, &at, Some(k::RopeOnLoad { inv_freq: &[1.0; 4] }), &t, &t, &t, &sp, &t, &l).unwrap_err().to_string();
    assert!(err.contains("RoPE on load is the tiled kernels'"), "{err}");
}

#[test]
fn cached_attention_matches_reference() {
    // Decoding: 3 new queries against 11 cached positions, one of 2 batches; one query
    // against 100 (more than a key tile), with two packed examples cached.
    let seg100: Vec<u32> = (0..100).map(|i| u32::from(i >= 30)).collect();
    for (at, seg) in [(Attention::new(2, 3, 4, 2, 8).cached(11), vec![0u32; 22]), (Attention::new(1, 1, 9, 3, 64).cached(100), seg100)] {
        for v in [Variant::Register, Variant::Tiled] {
            let g = variant(v);
            let mut rng = Rng::new(9);
            let (q, kk, vv) = (rng.vec(at.q_len(), 1.0), rng.vec(at.kv_len(), 1.0), rng.vec(at.kv_len(), 1.0));
            let (tq, tk, tv, ts) = (up(g, &q), up(g, &kk), up(g, &vv), up(g, &seg));
            let (to, tl) = (zeros(g, at.q_len()), zeros(g, at.rows()));
            run(g, |r| k::attention_forward(g, r, &at, None, &tq, &tk, &tv, &ts, &to, &tl));
            let (mut o, mut lse) = (vec![0.0; at.q_len()], vec![0.0; at.rows()]);
            cpu::attention_forward(&at, &q, &kk, &vv, &seg, &mut o, &mut lse);
            close(&format!("cached attention o {at:?} on {v:?}"), &read(g, &to), &o, 1e-5, 1e-4);
            close("cached attention lse", &read(g, &tl), &lse, 1e-5, 1e-4);
        }
    }
}

#[test]
fn attention_rejects_bad_heads() {
    let g = gpu();
    let t = zeros(g, 64);
    let mut rec = g.recorder("bad");
    let at = Attention::new(1, 2, 3, 2, 8);
    let err = k::attention_forward(g, &mut rec, &at, None, &t, &t, &t, &t, &t, &t).unwrap_err().to_string();
    assert!(err.contains("must divide"), "{err}");
}

/// The norm's forward with the LoRA down products of the layers that read its output
/// (q/k/v: three pairs, each with its own dropout mask), both variants, against the
/// CPU; and the fallbacks (pairs of different ranks, more than four) give the same.
#[test]
fn rmsnorm_forward_makes_lora_downs() {
    // (rows, c, ranks, dropout)
    let cases: [(usize, usize, &[usize], f32); 5] =
        [(7, 33, &[16, 16, 16], 0.0), (64, 576, &[16, 16, 16], 0.1), (130, 130, &[20, 20], 0.05), (5, 64, &[8, 4], 0.2), (3, 8, &[1, 1, 1, 1, 1], 0.0)];
    for (g, (rows, c, ranks, p)) in row_gpus().into_iter().flat_map(|g| cases.map(|c| (g, c))) {
        let mut rng = Rng::new(rows as u64);
        let (x, w) = (rng.vec(rows * c, 3.0), rng.vec(c, 2.0));
        let ls: Vec<Lora> = ranks.iter().enumerate().map(|(i, &r)| Lora::new(rows, c, 7, r, 2.0).with_dropout(p, 40 + i as u32)).collect();
        let a: Vec<Vec<f32>> = ls.iter().map(|l| rng.vec(l.r * c, 1.0)).collect();
        // The A's in one buffer and the h's in one temporary, as a model's lie.
        let ta = up(g, &a.concat());
        let mut off = 0;
        let ta_parts: Vec<_> = ls.iter().map(|l| { let t = ta.view("a", (off * 4) as u64, &[l.r, c]); off += l.r * c; t }).collect();
        let (tx, tw, ty, trs) = (up(g, &x), up(g, &w), zeros(g, rows * c), zeros(g, rows));
        let mut rec = g.recorder("h");
        let th = g.temps(&mut rec, "h", &ls.iter().map(|l| vec![rows, l.r]).collect::<Vec<_>>()).unwrap();
        drop(rec);
        run(g, |r| {
            let (ap, hp): (Vec<_>, Vec<_>) = (ta_parts.iter().collect(), th.iter().collect());
            k::rmsnorm_forward_lora_down(g, r, rows, c, 1e-5, (&tx, &tw, &ty, &trs), &ls, &ap, &hp)
        });
        let (mut y, mut rs) = (vec![0.0; rows * c], vec![0.0; rows]);
        let mut h: Vec<Vec<f32>> = ls.iter().map(|l| vec![0.0; rows * l.r]).collect();
        cpu::rmsnorm_forward_lora_down(rows, c, 1e-5, &x, &w, &mut y, &mut rs, &ls, &a.iter().map(Vec::as_slice).collect::<Vec<_>>(), &mut h);
        let what = format!("[{rows}, {c}] ranks {ranks:?} dropout {p} on {}", reductions_of(g));
        close(&format!("rmsnorm y {what}"), &read(g, &ty), &y, 1e-5, 1e-4);
        for (i, want) in h.iter().enumerate() {
            close(&format!("LoRA h {i} {what}"), &read(g, &th[i]), want, 1e-4 * (c as f32).sqrt(), 1e-3);
        }
    }
}

/// The norm's backward with a LoRA pair's dh = s·dx·B made from each finished row of dx
/// (o_proj's pair after the post-attention norm), both variants, ranks below, at and
/// past the kernels' 16 columns at a time, against the CPU.
#[test]
fn rmsnorm_backward_makes_lora_dh() {
    let cases = [(7, 33, 16, 1), (64, 576, 16, 2), (130, 130, 20, 3), (5, 576, 64, 4), (3, 8, 1, 5)];
    for (g, (rows, c, rank, seed)) in row_gpus().into_iter().flat_map(|g| cases.map(|c| (g, c))) {
        let mut rng = Rng::new(seed);
        let (x, w, dy, b) = (rng.vec(rows * c, 1.0), rng.vec(c, 2.0), rng.vec(rows * c, 1.0), rng.vec(c * rank, 1.0));
        let (dx0, rs) = (rng.vec(rows * c, 0.5), rng.vec(rows, 1.0).iter().map(|v| 1.0 + v.abs()).collect::<Vec<f32>>());
        let (tx, tw, tdy, tdx, tb, trs, tdh) = (up(g, &x), up(g, &w), up(g, &dy), up(g, &dx0), up(g, &b), up(g, &rs), zeros(g, rows * rank));
        let lora = k::LoraDh { s: 0.75, rank, b: &tb, dh: &tdh };
        run(g, |r| k::rmsnorm_backward(g, r, rows, c, &tx, &tw, &trs, &tdy, &tdx, None, Some(lora)));
        let (mut dx, mut dh) = (dx0, vec![0.0; rows * rank]);
        cpu::rmsnorm_backward_dh(rows, c, &x, &w, &rs, &dy, &mut dx, None, (0.75, rank, &b), &mut dh);
        close(&format!("rmsnorm dx [{rows}, {c}] with dh on {}", reductions_of(g)), &read(g, &tdx), &dx, 1e-4, 1e-3);
        close(&format!("rmsnorm's LoRA dh rank {rank}"), &read(g, &tdh), &dh, 1e-4 * (c as f32).sqrt(), 1e-3);
    }
}

#[test]
fn rmsnorm_matches_reference() {
    // Both variants; 1,000 rows make several dw blocks of the tiled variant, one a part;
    // 70,001 rows (Qwen3's q norm over 7,778 tokens) spill its grid past 65,535 into y.
    let cases = [(7, 33, 1.0, 1), (64, 576, 30.0, 2), (3, 5, 0.01, 3), (1000, 130, 1.0, 4), (70001, 8, 1.0, 5)];
    for (g, (rows, c, mag, seed)) in row_gpus().into_iter().chain([tiled_small_loops()]).flat_map(|g| cases.map(|c| (g, c))) {
        let mut rng = Rng::new(seed);
        let (x, w, dy) = (rng.vec(rows * c, mag), rng.vec(c, 2.0), rng.vec(rows * c, 1.0));
        let (dx0, dw0) = (rng.vec(rows * c, 0.1), rng.vec(c, 0.1));
        let (tx, tw, tdy, tdx, tdw) = (up(g, &x), up(g, &w), up(g, &dy), up(g, &dx0), up(g, &dw0));
        let (ty, trs) = (zeros(g, rows * c), zeros(g, rows));
        run(g, |r| {
            k::rmsnorm_forward(g, r, rows, c, 1e-5, &tx, &tw, &ty, &trs)?;
            k::rmsnorm_backward(g, r, rows, c, &tx, &tw, &trs, &tdy, &tdx, Some(&tdw), None)
        });
        let (mut y, mut rs, mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; rows], dx0, dw0);
        cpu::rmsnorm_forward(rows, c, 1e-5, &x, &w, &mut y, &mut rs);
        cpu::rmsnorm_backward(rows, c, &x, &w, &rs, &dy, &mut dx, Some(&mut dw));
        close(&format!("rmsnorm y [{rows}, {c}] on {}", reductions_of(g)), &read(g, &ty), &y, 1e-5, 1e-4);
        close("rmsnorm rstd", &read(g, &trs), &rs, 0.0, 1e-4);
        close("rmsnorm dx", &read(g, &tdx), &dx, 1e-4 / mag, 1e-3);
        close("rmsnorm dw", &read(g, &tdw), &dw, 1e-4, 1e-3);
    }
}

/// q and k (of different head counts, GQA) rotated in one dispatch.
fn rope_case(g: &webtune::gpu::Gpu, n: usize, (h, hk): (usize, usize), hs: usize, mag: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    let (q, kk) = (rng.vec(n * h * hs, mag), rng.vec(n * hk * hs, mag));
    let pos: Vec<u32> = (0..n as u32).map(|i| (i * 37) % 4096).collect();
    let inv = k::rope::inv_freq(hs, 10000.0);
    let (tq, tk, tp, ti) = (up(g, &q), up(g, &kk), up(g, &pos), up(g, &inv));
    run(g, |r| k::rope_forward(g, r, n, (h, hk), hs, &tq, &tk, &tp, &ti));
    let (mut wq, mut wk) = (q.clone(), kk.clone());
    cpu::rope_forward(n, (h, hk), hs, &mut wq, &mut wk, &pos, &inv);
    close(&format!("rope forward q, {n} tokens"), &read(g, &tq), &wq, 1e-3, 1e-4);
    close(&format!("rope forward k, {n} tokens"), &read(g, &tk), &wk, 1e-3, 1e-4);
    run(g, |r| k::rope_backward(g, r, n, (h, hk), hs, &tq, &tk, &tp, &ti));
    cpu::rope_backward(n, (h, hk), hs, &mut wq, &mut wk, &pos, &inv);
    close("rope backward q", &read(g, &tq), &wq, 1e-3, 1e-4);
    close("rope backward k", &read(g, &tk), &wk, 1e-3, 1e-4);
    close("rope round trip q", &read(g, &tq), &q, 1e-3, 1e-4);
    close("rope round trip k", &read(g, &tk), &kk, 1e-3, 1e-4);
}

#[test]
fn rope_matches_reference_and_backward_inverts_forward() {
    rope_case(gpu(), 11, (3, 1), 64, 30.0, 7);
    rope_case(gpu(), 9, (4, 4), 16, 3.0, 8);
    // More than 65,535 tokens in one batch (the grid once had a dimension per token).
    rope_case(gpu(), 70_001, (2, 1), 8, 3.0, 9);
}

#[test]
fn swiglu_matches_reference_at_large_magnitudes() {
    let g = gpu();
    for (n, mag) in [(1000, 3.0), (517, 30.0), (64, 100.0)] {
        let mut rng = Rng::new(n as u64);
        let (gate, upv, dh) = (rng.vec(n, mag), rng.vec(n, 2.0), rng.vec(n, 1.0));
        let (dg0, du0) = (rng.vec(n, 0.1), rng.vec(n, 0.1));
        let (tg, tu, tdh, tdg, tdu, th) = (up(g, &gate), up(g, &upv), up(g, &dh), up(g, &dg0), up(g, &du0), zeros(g, n));
        run(g, |r| {
            k::swiglu_forward(g, r, n, &tg, &tu, &th)?;
            k::swiglu_backward(g, r, n, &tg, &tu, &tdh, &tdg, &tdu)
        });
        let (mut h, mut dg, mut du) = (vec![0.0; n], dg0, du0);
        cpu::swiglu_forward(n, &gate, &upv, &mut h);
        cpu::swiglu_backward(n, &gate, &upv, &dh, &mut dg, &mut du);
        close("swiglu h", &read(g, &th), &h, 1e-5, 1e-5);
        close("swiglu dgate", &read(g, &tdg), &dg, 1e-5, 1e-4);
        close("swiglu dup", &read(g, &tdu), &du, 1e-5, 1e-5);
    }
}

#[test]
fn embedding_matches_reference_with_repeated_ids() {
    let g = gpu();
    let (n, c, v) = (41, 19, 23);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..n).map(|_| rng.below(7) as u32 * 3).collect();
    let (w, dout, dw0) = (rng.vec(v * c, 30.0), rng.vec(n * c, 1.0), rng.vec(v * c, 0.1));
    let (tids, tw, tdo, tdw, tout) = (up(g, &ids), up(g, &w), up(g, &dout), up(g, &dw0), zeros(g, n * c));
    run(g, |r| {
        k::embedding_forward(g, r, n, c, v, &tids, &[&tw], &tout)?;
        k::embedding_backward(g, r, n, c, 0, v, &ids, &tdo, &tdw)
    });
    let (mut out, mut dw) = (vec![0.0; n * c], dw0);
    cpu::embedding_forward(n, c, v, &ids, &w, &mut out);
    cpu::embedding_backward(n, c, 0, v, &ids, &dout, &mut dw);
    close("embedding out", &read(g, &tout), &out, 0.0, 0.0);
    // The same table split into row-parts of 10 + 13 rows.
    let (p1, p2) = (up(g, &w[..10 * c]), up(g, &w[10 * c..]));
    run(g, |r| k::embedding_forward(g, r, n, c, v, &tids, &[&p1, &p2], &tout));
    close("embedding out from parts", &read(g, &tout), &out, 0.0, 0.0);
    close("embedding dw", &read(g, &tdw), &dw, 1e-5, 1e-5);
    // The backward into the second part only (rows 10..23).
    let dw2 = rng.vec(13 * c, 0.1);
    let tdw2 = up(g, &dw2);
    run(g, |r| k::embedding_backward(g, r, n, c, 10, 13, &ids, &tdo, &tdw2));
    let mut want2 = dw2.clone();
    cpu::embedding_backward(n, c, 10, 13, &ids, &dout, &mut want2);
    close("embedding dw part", &read(g, &tdw2), &want2, 1e-5, 1e-5);
    assert_ne!(want2, dw2);
}

#[test]
fn elementwise_ops_match_reference() {
    let g = gpu();
    let (rows, c) = (13, 37);
    let n = rows * c;
    let mut rng = Rng::new(11);
    let (a, b, bias) = (rng.vec(n, 30.0), rng.vec(n, 30.0), rng.vec(c, 1.0));
    let (ta, tb, tbias, tout, tdb) = (up(g, &a), up(g, &b), up(g, &bias), zeros(g, n), up(g, &bias));
    run(g, |r| {
        k::add(g, r, n, &ta, &tb, &tout)?;
        k::axpy(g, r, n, -0.25, &ta, &tb)?;
        k::scale(g, r, n, 3.0, &ta)?;
        k::add_bias(g, r, rows, c, &tbias, &tout)?;
        k::bias_backward(g, r, rows, c, &tb, &tdb)
    });
    let (mut out, mut bb, mut aa, mut db) = (vec![0.0; n], b.clone(), a.clone(), bias.clone());
    cpu::add(n, &a, &b, &mut out);
    cpu::axpy(n, -0.25, &a, &mut bb);
    cpu::scale(n, 3.0, &mut aa);
    cpu::add_bias(rows, c, &bias, &mut out);
    cpu::bias_backward(rows, c, &bb, &mut db);
    close("add + add_bias", &read(g, &tout), &out, 1e-5, 1e-6);
    close("axpy", &read(g, &tb), &bb, 1e-5, 1e-6);
    close("scale", &read(g, &ta), &aa, 1e-5, 1e-6);
    close("bias_backward", &read(g, &tdb), &db, 1e-3, 1e-5);
}

fn cross_entropy_case(g: &webtune::gpu::Gpu, n: usize, v: usize, mag: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    let logits = rng.vec(n * v, mag);
    let targets: Vec<i32> = (0..n).map(|i| if i % 4 == 1 { -100 } else { rng.below(v as u64) as i32 }).collect();
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let scale = 1.0 / count as f32;
    let (tl, tt, tlosses, tlse, tloss) = (up(g, &logits), up(g, &targets), zeros(g, n), zeros(g, n), zeros(g, 1));
    run(g, |r| k::cross_entropy_forward(g, r, n, v, scale, &tl, &tt, &tlosses, &tlse, Some(&tloss)));
    let (mut losses, mut lse, mut loss) = (vec![0.0; n], vec![0.0; n], vec![0.0; 1]);
    cpu::cross_entropy_forward(n, v, scale, &logits, &targets, &mut losses, &mut lse, &mut loss);
    close("ce losses", &read(g, &tlosses), &losses, 1e-4 * mag, 1e-5);
    close("ce lse", &read(g, &tlse), &lse, 1e-4 * mag, 1e-5);
    close("ce loss", &read(g, &tloss), &loss, 1e-4 * mag, 1e-5);
    run(g, |r| k::cross_entropy_backward(g, r, n, v, scale, &tl, &tt, &tlse));
    let mut dl = logits.clone();
    cpu::cross_entropy_backward(n, v, scale, &mut dl, &targets, &lse);
    close("ce dlogits", &read(g, &tl), &dl, 1e-6, 1e-3);
    // Forward and backward in one kernel (training), its loss added to what the loss
    // held (a batch's chunks add into one).
    let (tl, tlosses, tlse, tloss) = (up(g, &logits), zeros(g, n), zeros(g, n), up(g, &[0.5f32]));
    run(g, |r| k::cross_entropy_forward_backward(g, r, n, v, scale, &tl, &tt, &tlosses, &tlse, Some(&tloss)));
    let (mut dl, mut losses, mut lse, mut loss) = (logits.clone(), vec![0.0; n], vec![0.0; n], vec![0.5; 1]);
    cpu::cross_entropy_forward_backward(n, v, scale, &mut dl, &targets, &mut losses, &mut lse, &mut loss);
    close("ce forward-backward losses", &read(g, &tlosses), &losses, 1e-4 * mag, 1e-5);
    close("ce forward-backward lse", &read(g, &tlse), &lse, 1e-4 * mag, 1e-5);
    close("ce forward-backward loss, added", &read(g, &tloss), &loss, 1e-4 * mag, 1e-5);
    close("ce forward-backward dlogits", &read(g, &tl), &dl, 1e-6, 1e-3);
}

/// The per-sequence entries on `n` rows, `seqs` · `t`, the rows cut into chunks of
/// `per` that split sequences, as the head's chunks do. A row's sequence alternates
/// between two (`row_seq`), as a DPO pair's row holds both sides.
fn sequence_case(g: &webtune::gpu::Gpu, seqs: usize, t: usize, v: usize, per: usize, seed: u64) {
    let n = seqs * t;
    let mut rng = Rng::new(seed);
    let logits = rng.vec(n * v, 2.0);
    let targets: Vec<i32> = (0..n).map(|r| if r % t < t / 3 { -100 } else { rng.below(v as u64) as i32 }).collect();
    let row_seq: Vec<u32> = (0..n).map(|r| ((r / t + (r % t) % 2 * 3) % seqs) as u32).collect();
    let seq_scale = rng.vec(seqs, 1.0);
    let (tlogps, tscale) = (zeros(g, seqs), up(g, &seq_scale));
    let trs = g.upload("row seq", &row_seq, &[n]).unwrap();
    let mut logps = vec![0.0; seqs];
    for r0 in (0..n).step_by(per) {
        let rows = per.min(n - r0);
        let chunk = &logits[r0 * v..(r0 + rows) * v];
        let tg = &targets[r0..r0 + rows];
        let (tl, tt, tlosses, tlse, tloss) = (up(g, chunk), up(g, tg), zeros(g, rows), zeros(g, rows), zeros(g, 1));
        run(g, |r| {
            k::cross_entropy_forward(g, r, rows, v, 1.0, &tl, &tt, &tlosses, &tlse, Some(&tloss))?;
            k::cross_entropy_sequence_logps(g, r, r0, rows, &trs, &tlosses, &tlogps)?;
            k::cross_entropy_backward_scaled(g, r, rows, v, 0.5, &tl, &tt, &tlse, r0, (&trs, &tscale))
        });
        let (mut losses, mut lse, mut loss) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; 1]);
        cpu::cross_entropy_forward(rows, v, 1.0, chunk, tg, &mut losses, &mut lse, &mut loss);
        cpu::cross_entropy_sequence_logps(r0, rows, &row_seq, &losses, &mut logps);
        let mut dl = chunk.to_vec();
        cpu::cross_entropy_backward_scaled(rows, v, 0.5, &mut dl, tg, &lse, r0, &row_seq, &seq_scale);
        close(&format!("scaled dlogits, rows {r0}.."), &read(g, &tl), &dl, 1e-6, 1e-3);
    }
    assert!(logps.iter().all(|&l| l < 0.0));
    close("sequence log p", &read(g, &tlogps), &logps, 1e-4, 1e-5);
}

#[test]
fn cross_entropy_per_sequence_entries_match_reference() {
    // Chunks of 7 rows over sequences of 5 and of 300 (more rows than a workgroup).
    sequence_case(gpu(), 6, 5, 33, 7, 60);
    sequence_case(gpu(), 4, 300, 17, 450, 61);
    sequence_case(gpu(), 3, 4, 70000, 5, 62);
}

fn dpo_case(g: &webtune::gpu::Gpu, d: &k::Dpo, pairs: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let logps: Vec<f32> = rng.vec(2 * pairs, 10.0).iter().map(|x| x - 40.0).collect();
    let refs: Vec<f32> = rng.vec(2 * pairs, 10.0).iter().map(|x| x - 40.0).collect();
    let counts: Vec<f32> = (0..2 * pairs).map(|_| rng.below(30) as f32 + 1.0).collect();
    let scale = 1.0 / (pairs + 3) as f32;
    let sft = d.sft_scale(counts[..pairs].iter().sum::<f32>() as usize + 5);
    let (tl, tr, tc) = (up(g, &logps), up(g, &refs), up(g, &counts));
    let init = [0.25f32, -1.0, 2.0, 0.0, 1.0, -3.0, 4.0, 0.0];
    let (tstats, tcoef) = (up(g, &init), zeros(g, 2 * pairs));
    run(g, |r| {
        k::dpo_forward(g, r, d, pairs, scale, sft, &tl, &tr, &tc, &tstats)?;
        k::dpo_backward(g, r, d, pairs, scale, sft, &tl, &tr, &tc, &tcoef)
    });
    let (mut stats, mut coef) = (init.to_vec(), vec![0.0; 2 * pairs]);
    cpu::dpo_forward(d, pairs, scale, sft, &logps, &refs, &counts, &mut stats);
    cpu::dpo_backward(d, pairs, scale, sft, &logps, &refs, &counts, &mut coef);
    close(&format!("dpo stats {d:?}"), &read(g, &tstats), &stats, 1e-5, 1e-4);
    close(&format!("dpo coef {d:?}"), &read(g, &tcoef), &coef, 1e-7, 1e-4);
}

#[test]
fn dpo_matches_reference() {
    for (i, (loss, beta, eps)) in [(k::DpoLoss::Sigmoid, 0.1, 0.0), (k::DpoLoss::Sigmoid, 0.1, 0.25), (k::DpoLoss::Ipo, 0.5, 0.0), (k::DpoLoss::Robust, 0.2, 0.1)].into_iter().enumerate() {
        let d = k::Dpo::new(loss, beta, eps).unwrap();
        dpo_case(gpu(), &d, 4, 70 + i as u64);
        dpo_case(gpu(), &d, 130, 80 + i as u64);
    }
    // RPO's NLL term on the chosen completions, beside sigmoid and IPO.
    for (i, loss) in [k::DpoLoss::Sigmoid, k::DpoLoss::Ipo].into_iter().enumerate() {
        let d = k::Dpo::new(loss, 0.1, 0.0).unwrap().with_rpo(0.5).unwrap();
        dpo_case(gpu(), &d, 4, 90 + i as u64);
        dpo_case(gpu(), &d, 130, 95 + i as u64);
    }
    assert!(k::Dpo::new(k::DpoLoss::Ipo, 0.1, 0.1).is_err() && k::Dpo::new(k::DpoLoss::Sigmoid, 0.0, 0.0).is_err());
    assert!(k::Dpo::new(k::DpoLoss::Sigmoid, 0.1, 0.0).unwrap().with_rpo(-1.0).is_err());
}

#[test]
fn cross_entropy_matches_reference() {
    cross_entropy_case(gpu(), 13, 1001, 1.0, 1);
    cross_entropy_case(gpu(), 7, 50, 30.0, 2);
}

#[test]
fn cross_entropy_chunks_logits_larger_than_one_binding() {
    // 300 rows × 257 logits × 4 bytes = 308 KB against a 64 KiB binding cap.
    let g = small_bindings();
    let chunks = k::cross_entropy::chunks(g, 300, 257).unwrap();
    assert!(chunks.len() > 1, "{chunks:?}");
    assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), 300);
    cross_entropy_case(g, 300, 257, 5.0, 3);
}

/// A linear layer with its LoRA pair as the engine runs it (the down product, the up
/// product inside the base one, the pair's gradients, dx inside the base dx), against
/// the CPU's, and the CPU's against the unfused sum x·Wᵀ + s·(x'·Aᵀ)·Bᵀ on x' masked
/// by hand; with the weight in two row parts, as a weight larger than a binding is.
#[test]
fn lora_matches_reference() {
    for g in matmul_gpus() {
        for (n, din, dout, r, p, seed) in [(13, 20, 24, 4, 0.0, 1), (64, 96, 64, 16, 0.1, 2), (5, 7, 3, 1, 0.5, 3)] {
            let l = Lora::new(n, din, dout, r, 2.0).with_dropout(p, seed as u32 + 40);
            let mut rng = Rng::new(seed);
            let (x, w, a, b, dy) = (rng.vec(n * din, 3.0), rng.vec(dout * din, 0.5), rng.vec(r * din, 0.5), rng.vec(dout * r, 0.5), rng.vec(n * dout, 1.0));
            let (da0, db0, dx0) = (rng.vec(r * din, 0.1), rng.vec(dout * r, 0.1), rng.vec(n * din, 0.1));
            let (tx, ta, tb, tdy) = (up(g, &x), up(g, &a), up(g, &b), up(g, &dy));
            // W's rows 0..split and split..dout, as two parts.
            let split = dout / 2 + 1;
            let parts = [(0, split), (split, dout)];
            let tw: Vec<_> = parts.iter().map(|&(r0, r1)| up(g, &w[r0 * din..r1 * din])).collect();
            let forward = |r0: usize, rows: usize| {
                let mut mm = Matmul::linear(n, din, rows).plus(l.up(r0));
                (mm.ldc, mm.c_off) = (dout, r0);
                mm
            };
            let backward = |r0: usize, rows: usize, first: bool| {
                let mut mm = Matmul::new(n, din, rows).accumulate();
                (mm.lda, mm.a_off) = (dout, r0);
                if first { l.dx(mm) } else { mm }
            };
            let (ty, tda, tdb, tdx, th, tdh) = (zeros(g, n * dout), up(g, &da0), up(g, &db0), up(g, &dx0), zeros(g, n * r), zeros(g, n * r));
            run(g, |rec| {
                k::lora_down(g, rec, &l, &tx, &ta, &th)?;
                for (i, &(r0, r1)) in parts.iter().enumerate() {
                    k::matmul_with(g, rec, &forward(r0, r1 - r0), &tx, &tw[i], &ty, Some((&th, &tb)))?;
                }
                k::lora_backward(g, rec, &l, &tx, &tb, &th, &tdy, &tdh, &tda, &tdb)?;
                for (i, &(r0, r1)) in parts.iter().enumerate() {
                    k::matmul_with(g, rec, &backward(r0, r1 - r0, i == 0), &tdy, &tw[i], &tdx, (i == 0).then_some((&tdh, &ta)))?;
                }
                Ok(())
            });
            let (mut y, mut h, mut dh, mut da, mut db, mut dx) = (vec![0.0; n * dout], vec![0.0; n * r], vec![0.0; n * r], da0.clone(), db0.clone(), dx0.clone());
            cpu::lora_down(&l, &x, &a, &mut h);
            for &(r0, r1) in &parts {
                cpu::matmul_with(&forward(r0, r1 - r0), &x, &w[r0 * din..r1 * din], &mut y, Some((&h, &b)));
            }
            cpu::lora_backward(&l, &x, &b, &h, &dy, &mut dh, &mut da, &mut db);
            for (i, &(r0, r1)) in parts.iter().enumerate() {
                cpu::matmul_with(&backward(r0, r1 - r0, i == 0), &dy, &w[r0 * din..r1 * din], &mut dx, (i == 0).then_some((&dh, &a)));
            }
            let what = format!("lora p {p} on {}", kernels_of(g));
            close(&format!("{what} h"), &read(g, &th), &h, 1e-4, 1e-4);
            close(&format!("{what} y"), &read(g, &ty), &y, 1e-4, 1e-4);
            close(&format!("{what} dh"), &read(g, &tdh), &dh, 1e-4, 1e-4);
            close(&format!("{what} dA"), &read(g, &tda), &da, 1e-3, 1e-4);
            close(&format!("{what} dB"), &read(g, &tdb), &db, 1e-3, 1e-4);
            close(&format!("{what} dx"), &read(g, &tdx), &dx, 1e-4, 1e-4);
            // The fused CPU products against plain ones on a masked x.
            let keep = |i: usize| p == 0.0 || Dropout { p, seed: l.seed, on: DropOn::A }.keeps(i);
            let xd: Vec<f32> = x.iter().enumerate().map(|(i, &v)| if keep(i) { v / (1.0 - p) } else { 0.0 }).collect();
            let (mut h2, mut y2) = (vec![0.0; n * r], vec![0.0; n * dout]);
            cpu::matmul(&Matmul::linear(n, din, r), &xd, &a, &mut h2);
            cpu::matmul(&Matmul::linear(n, din, dout), &x, &w, &mut y2);
            cpu::matmul(&Matmul::linear(n, r, dout).alpha(2.0).accumulate(), &h2, &b, &mut y2);
            close(&format!("{what}: fused y = unfused y"), &y, &y2, 1e-4, 1e-4);
            let (mut dxd, mut dx2) = (vec![0.0; n * din], dx0.clone());
            cpu::matmul(&Matmul::new(n, din, r), &dh, &a, &mut dxd);
            cpu::matmul(&Matmul::new(n, din, dout).accumulate(), &dy, &w, &mut dx2);
            for (i, d) in dx2.iter_mut().enumerate() {
                *d += if keep(i) { dxd[i] / (1.0 - p) } else { 0.0 };
            }
            close(&format!("{what}: fused dx = unfused dx"), &dx, &dx2, 1e-4, 1e-4);
        }
    }
}

#[test]
fn grad_norm_and_adamw_match_reference_over_steps() {
    for g in [gpu(), variant(Variant::Tiled)] {
        grad_norm_and_adamw_case(g);
    }
}

fn grad_norm_and_adamw_case(g: &webtune::gpu::Gpu) {
    let sizes = [1, 300, 70_001];
    let mut rng = Rng::new(5);
    let opt = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let mut ms: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut vs = ms.clone();
    let tp: Vec<_> = params.iter().map(|p| up(g, p)).collect();
    let tm: Vec<_> = ms.iter().map(|m| up(g, m)).collect();
    let tv: Vec<_> = vs.iter().map(|v| up(g, v)).collect();
    let tnorm = zeros(g, 2);
    for step in 1..=4u64 {
        // Large gradients in early steps so clipping engages, small later so it does not.
        let mag = if step <= 2 { 30.0 } else { 1e-4 };
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, mag)).collect();
        let tg: Vec<_> = grads.iter().map(|gr| up(g, gr)).collect();
        run(g, |r| {
            k::grad_norm(g, r, &tg.iter().collect::<Vec<_>>(), 1.0, &tnorm)?;
            for i in 0..sizes.len() {
                k::adamw_step(g, r, &opt, step, &tp[i], &tg[i], &tm[i], &tv[i], &tnorm)?;
            }
            Ok(())
        });
        let mut norm = [0.0f32; 2];
        cpu::grad_norm(&grads.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), 1.0, &mut norm);
        close(&format!("grad norm step {step}"), &read(g, &tnorm), &norm, 0.0, 1e-5);
        for i in 0..sizes.len() {
            cpu::adamw_step(&opt, step, &mut params[i], &grads[i], &mut ms[i], &mut vs[i], &norm);
            close(&format!("adamw param {i} step {step}"), &read(g, &tp[i]), &params[i], 1e-6, 1e-5);
            close(&format!("adamw m {i} step {step}"), &read(g, &tm[i]), &ms[i], 1e-7, 1e-4);
        }
    }
}

#[test]
fn f16_weights_in_matmul_and_embedding() {
    let g = gpu();
    assert!(g.caps.shader_f16, "lavapipe offers shader-f16: {}", g.describe());
    let mut rng = Rng::new(21);
    let round = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<f32>>();
    for g in matmul_gpus() {
        // Odd sizes read one half at a time (`weight`); sizes in fours, four at once from
        // two words (`weight4`), both orientations.
        let linears = [Matmul::linear(13, 37, 29), Matmul::new(13, 29, 37), Matmul::linear(13, 36, 28), Matmul::new(13, 28, 36)];
        // And with SwiGLU on A as loaded (down's forward over f16 weights).
        let glu = linears.clone().map(|mm| Matmul { glu: Some(Glu { on: GluOn::A, up: 13 * mm.k + 6 }), ..mm });
        for mm in linears.into_iter().chain(glu) {
            let (ea, eb, ec) = mm.extents();
            let (a, b) = (rng.vec(ea, 1.0), rng.vec(eb, 3.0));
            let (ta, tb, tc) = (up(g, &a), g.upload_f16("w", &b, &[eb]).unwrap(), zeros(g, ec));
            run(g, |r| k::matmul(g, r, &mm, &ta, &tb, &tc));
            let mut want = vec![0.0; ec];
            cpu::matmul(&mm, &a, &round(&b), &mut want);
            close("matmul with f16 B", &read(g, &tc), &want, 1e-4, 1e-4);
        }
    }
    let (n, c, v) = (9, 7, 11);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 5) % v as u32).collect();
    let w = rng.vec(v * c, 2.0);
    let (tids, tw, tout) = (up(g, &ids), g.upload_f16("table", &w, &[v * c]).unwrap(), zeros(g, n * c));
    run(g, |r| k::embedding_forward(g, r, n, c, v, &tids, &[&tw], &tout));
    let mut want = vec![0.0; n * c];
    cpu::embedding_forward(n, c, v, &ids, &round(&w), &mut want);
    close("embedding from f16", &read(g, &tout), &want, 0.0, 0.0);
}

/// Random blocks of `q` for `n` values: quantized random values, or for Q4_K (which
/// webtune only reads) random bytes under finite f16 scales.
fn packed_blocks(q: QType, n: usize, rng: &mut Rng) -> Vec<u8> {
    if q != QType::Q4K {
        // Blocks of one sign, of zeros and of a single large value, then random ones.
        let mut x = rng.vec(n, 3.0);
        let e = q.block().0;
        x[..e].iter_mut().for_each(|v| *v = v.abs());
        x[e..2 * e].iter_mut().for_each(|v| *v = 0.0);
        x[2 * e] = 30.0;
        return quant::quantize(q, &x).unwrap();
    }
    let mut raw: Vec<u8> = (0..q.bytes(n)).map(|_| (rng.next_u64() & 0xff) as u8).collect();
    for b in raw.chunks_mut(144) {
        b[..2].copy_from_slice(&half::f16::from_f32(0.01 + 0.09 * rng.unit()).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(0.05 * rng.unit()).to_le_bytes());
    }
    raw
}


/// Packed frozen weights (QLoRA): the forward `x·Wᵀ`, the input gradient `dy·W` and
/// the embedding gather read blocks and dequantize in the kernel, as the CPU
/// reference does on the dequantized values; odd rows, an odd number of blocks per row
/// (so blocks start off 4-byte boundaries), both matmul variants.
#[test]
fn packed_weights_in_matmul_and_embedding() {
    let mut rng = Rng::new(31);
    for q in QType::ALL {
        let (e, _) = q.block();
        let (rows, cols) = (37, 3 * e);
        let raw = packed_blocks(q, rows * cols, &mut rng);
        let w = quant::dequantize(q, &raw);
        assert!(w.iter().all(|v| v.is_finite()) && w.iter().any(|&v| v != 0.0), "{q:?}");
        for g in matmul_gpus() {
            let tw = g.upload_packed("packed weight", q, &raw, &[rows, cols]).unwrap();
            // y = x·Wᵀ (accumulating onto C) and dx = dy·W.
            for mm in [Matmul::linear(13, cols, rows).accumulate(), Matmul::new(13, cols, rows)] {
                let (ea, _, ec) = mm.extents();
                let (a, c0) = (rng.vec(ea, 1.0), rng.vec(ec, 1.0));
                let (ta, tc) = (up(g, &a), up(g, &c0));
                run(g, |r| k::matmul(g, r, &mm, &ta, &tw, &tc));
                let mut want = c0.clone();
                cpu::matmul(&mm, &a, &w, &mut want);
                let mag = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                close(&format!("{q:?} matmul {mm:?} on {}", kernels_of(g)), &read(g, &tc), &want, 1e-5 * mag * (mm.k as f32).sqrt(), 1e-4);
            }
        }
        let g = gpu();
        let tw = g.upload_packed("packed weight", q, &raw, &[rows, cols]).unwrap();
        let n = 9;
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 5) % rows as u32).collect();
        let (tids, tout) = (up(g, &ids), zeros(g, n * cols));
        run(g, |r| k::embedding_forward(g, r, n, cols, rows, &tids, &[&tw], &tout));
        let mut want = vec![0.0; n * cols];
        cpu::embedding_forward(n, cols, rows, &ids, &w, &mut want);
        close(&format!("{q:?} embedding"), &read(g, &tout), &want, 0.0, 0.0);
    }
}

/// With profiling on, timestamp queries time each dispatch, summed by kernel entry
/// point; with it off nothing is timed.
#[test]
fn kernel_times_come_from_timestamp_queries() {
    // A context of its own: profiling is per context, and other tests share `gpu()`.
    let g = &futures::executor::block_on(webtune::gpu::Gpu::new()).unwrap();
    if !g.caps.timestamps {
        assert!(!g.set_profiling(true), "no timestamp queries, so no profiling");
        return;
    }
    let mm = Matmul::new(64, 64, 64);
    let (a, b, c) = (up(g, &vec![1.0f32; 64 * 64]), up(g, &vec![1.0f32; 64 * 64]), zeros(g, 64 * 64));
    let launch = |rec: &mut webtune::gpu::Recorder| {
        k::matmul(g, rec, &mm, &a, &b, &c)?;
        k::matmul(g, rec, &mm, &a, &b, &c)?;
        k::add(g, rec, 64 * 64, &a, &b, &c)
    };
    assert!(g.set_profiling(true));
    run(g, launch);
    run(g, |rec| k::add(g, rec, 64 * 64, &a, &b, &c));
    let times = futures::executor::block_on(g.kernel_times()).unwrap();
    assert_eq!(times.len(), 2, "{times:?}");
    let by = |p: &str| times.iter().find(|t| t.kernel.starts_with(p)).unwrap_or_else(|| panic!("no {p} in {times:?}"));
    assert_eq!(by("matmul::").calls, 2);
    assert_eq!(by("elementwise::add").calls, 2);
    assert!(times.iter().all(|t| t.ms > 0.0 && t.ms < 10_000.0), "{times:?}");
    assert!(times[0].ms >= times[1].ms);
    // Read once: a second read has nothing; with profiling off nothing is timed.
    assert!(futures::executor::block_on(g.kernel_times()).unwrap().is_empty());
    assert!(!g.set_profiling(false));
    run(g, launch);
    assert!(futures::executor::block_on(g.kernel_times()).unwrap().is_empty());
    assert_eq!(read(g, &c)[0], 2.0);
}

// ---- At the sizes that break things -------------------------------------------
// Real vocabularies (128,256 to 262,144), more than 2^16 and 2^24 elements, more than
// 65,535 workgroups in a dimension, and loops longer than a driver allows: Mesa's
// lavapipe ends an invocation's loops after 65,535 iterations in all, silently.

#[test]
fn the_loop_budget_is_measured() {
    let g = gpu();
    eprintln!("{}", g.describe());
    if g.caps.adapter.name.contains("llvmpipe") {
        assert_eq!(g.caps.max_loop, 65535 / 2, "lavapipe stops an invocation's loops after 65,535 iterations");
    }
    assert_eq!(small_loops().caps.max_loop, g.caps.max_loop.min(100));
}

#[test]
fn cross_entropy_at_real_vocabulary_sizes() {
    // Odd sizes around 2^16 and past the last 256-wide stride; Llama 3, Qwen, Gemma.
    for (i, v) in [65535, 65536, 65537, 128256, 151936, 262144, 262145].into_iter().enumerate() {
        cross_entropy_case(gpu(), 3, v, 1.0, 40 + i as u64);
    }
    // The workgroup-per-row forward at small sizes (GPUs take it from 4,096 logits, any
    // driver past its loop budget), and across the 65,535-row chunk limit.
    cross_entropy_case(small_loops(), 13, 1001, 1.0, 50);
    cross_entropy_case(variant(Variant::Tiled), 5, 5003, 1.0, 51);
    cross_entropy_case(tiled_trees(), 5, 5003, 1.0, 53);
    cross_entropy_case(gpu(), 65537, 3, 1.0, 52);
}

#[test]
fn matmul_sums_inner_dimensions_past_the_loop_budget() {
    for g in matmul_gpus() {
        // dx = dlogits·W over a Llama 3 vocabulary, dW = dyᵀ·x over 70,001 rows, and
        // the LoRA down product with a transposed B; each sums more than 65,535 terms.
        matmul_case(g, &Matmul::new(3, 16, 128256), 200, 1.0);
        matmul_case(g, &Matmul::new(5, 7, 70001).trans_a().accumulate().alpha(0.5), 201, 1.0);
        matmul_case(g, &Matmul::new(4, 6, 65537).trans_b(), 202, 1.0);
    }
    // The k-ranges at small sizes (a budget of 100), with every transpose and offsets.
    let g = small_loops();
    for (i, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
        let mut mm = Matmul::new(9, 11, 301).accumulate();
        (mm.trans_a, mm.trans_b) = (ta, tb);
        matmul_case(g, &mm, 210 + i as u64, 1.0);
    }
    let mut mm = Matmul::linear(6, 300, 7);
    (mm.lda, mm.ldb, mm.ldc, mm.c_off) = (310, 305, 20, 9);
    matmul_case(g, &mm, 220, 1.0);
}

#[test]
fn elementwise_past_2_pow_24_elements_and_65535_workgroups() {
    let g = gpu();
    // 65,538 workgroups of 256: the grid spills into y.
    let n = (1 << 24) + 257;
    let mut rng = Rng::new(13);
    let (a, b) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
    let (ta, tb, tout) = (up(g, &a), up(g, &b), zeros(g, n));
    run(g, |r| {
        k::add(g, r, n, &ta, &tb, &tout)?;
        k::axpy(g, r, n, -0.5, &ta, &tb)
    });
    let (mut out, mut bb) = (vec![0.0; n], b.clone());
    cpu::add(n, &a, &b, &mut out);
    cpu::axpy(n, -0.5, &a, &mut bb);
    close("add past 2^24", &read(g, &tout), &out, 1e-6, 1e-6);
    close("axpy past 2^24", &read(g, &tb), &bb, 1e-6, 1e-6);
}

/// Column sums over many rows: RMSNorm's dw, the bias gradient, and the embedding's
/// scatter-add of one id repeated at every position (with more than 65,535 positions
/// the gather's grid spills too).
fn row_sums_case(g: &webtune::gpu::Gpu, rows: usize, c: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let (x, w, dy) = (rng.vec(rows * c, 2.0), rng.vec(c, 1.0), rng.vec(rows * c, 1.0));
    let (tx, tw, tdy, ty, trstd, tdx, tdw) = (up(g, &x), up(g, &w), up(g, &dy), zeros(g, rows * c), zeros(g, rows), zeros(g, rows * c), zeros(g, c));
    let tdb = zeros(g, c);
    let ids: Vec<u32> = (0..rows).map(|i| if i % 7 == 3 { 1 } else { 0 }).collect();
    let (tids, temb, tout, tdemb) = (up(g, &ids), up(g, &w.repeat(2)), zeros(g, rows * c), zeros(g, 2 * c));
    run(g, |r| {
        k::rmsnorm_forward(g, r, rows, c, 1e-5, &tx, &tw, &ty, &trstd)?;
        k::rmsnorm_backward(g, r, rows, c, &tx, &tw, &trstd, &tdy, &tdx, Some(&tdw), None)?;
        k::bias_backward(g, r, rows, c, &tdy, &tdb)?;
        k::embedding_forward(g, r, rows, c, 2, &tids, &[&temb], &tout)?;
        k::embedding_backward(g, r, rows, c, 0, 2, &ids, &tdy, &tdemb)
    });
    let (mut y, mut rstd, mut dx, mut dw, mut db) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]);
    cpu::rmsnorm_forward(rows, c, 1e-5, &x, &w, &mut y, &mut rstd);
    cpu::rmsnorm_backward(rows, c, &x, &w, &rstd, &dy, &mut dx, Some(&mut dw));
    cpu::bias_backward(rows, c, &dy, &mut db);
    let (mut out, mut demb) = (vec![0.0; rows * c], vec![0.0; 2 * c]);
    cpu::embedding_forward(rows, c, 2, &ids, &w.repeat(2), &mut out);
    cpu::embedding_backward(rows, c, 0, 2, &ids, &dy, &mut demb);
    let sum_tol = 1e-5 * (rows as f32).sqrt();
    close(&format!("rmsnorm dx over {rows} rows"), &read(g, &tdx), &dx, 1e-5, 1e-4);
    close(&format!("rmsnorm dw over {rows} rows"), &read(g, &tdw), &dw, sum_tol, 1e-4);
    close(&format!("bias_backward over {rows} rows"), &read(g, &tdb), &db, sum_tol, 1e-4);
    close(&format!("embedding out over {rows} rows"), &read(g, &tout), &out, 0.0, 0.0);
    close(&format!("embedding dw over {rows} rows"), &read(g, &tdemb), &demb, sum_tol, 1e-4);
}

#[test]
fn row_sums_past_the_loop_budget_and_65535_rows() {
    row_sums_case(gpu(), 70001, 3, 60);
    row_sums_case(small_loops(), 301, 5, 61);
}

#[test]
fn attention_past_the_loop_budget() {
    // 2,049 positions of head size 64: the forward loops 33 times per key, dk/dv 99 times
    // per query (three query heads share each kv head); lavapipe would stop at 65,535.
    attention_case(&Attention::new(1, 2049, 3, 1, 64), &vec![0; 2049], 70, 1.0);
    // Key and query ranges at small sizes, across packed segments.
    let seg: Vec<u32> = (0..2 * 41).map(|i| u32::from(i % 41 >= 17)).collect();
    attention_case_on(small_loops(), &Attention::new(2, 41, 4, 2, 8), &seg, 71, 1.0);
}

/// Qwen2.5-0.5B's embedding, 151,936 × 896 in f32 (544 MB), exceeds lavapipe's 128 MiB
/// binding, so it is split by rows into parts as the model splits it: the gather, the
/// scatter-add into each part, the tied head's logits over the parts and the gradient
/// back through them (whose inner dimension, a part's rows, also exceeds the loop budget)
/// match the CPU at ids on both sides of every part boundary and of 2^16 and 2^17.
#[test]
fn a_qwen_shaped_embedding_split_over_bindings_runs_forward_and_backward() {
    let g = f32_128mib_bindings();
    let (v, c) = (151_936, 896);
    let per = (g.caps.max_binding / (c as u64 * 4)) as usize;
    assert!(per < v, "the table must exceed one binding ({} bytes)", g.caps.max_binding);
    let bounds: Vec<(usize, usize)> = k::spans(v, per).collect();
    let mut rng = Rng::new(80);
    let w = rng.vec(v * c, 0.05);
    let parts: Vec<_> = bounds.iter().map(|&(a, b)| up(g, &w[a * c..b * c])).collect();
    let refs: Vec<_> = parts.iter().collect();
    let mut ids: Vec<u32> = vec![0, 65535, 65536, 131071, 131072, v as u32 - 1];
    for &(a, _) in &bounds[1..] {
        ids.extend([a as u32 - 1, a as u32]);
    }
    ids.push(ids[3]); // a repeated id sums in the backward
    // The head runs on 3 rows of activations (its cost is in the vocabulary).
    let (n, m) = (ids.len(), 3);
    let (dout, x, dlogits) = (rng.vec(n * c, 1.0), rng.vec(m * c, 1.0), rng.vec(m * v, 1.0));
    let (tids, tout, tdout, tx, tlogits, tdl, tdx) = (up(g, &ids), zeros(g, n * c), up(g, &dout), up(g, &x), zeros(g, m * v), up(g, &dlogits), zeros(g, m * c));
    let dws: Vec<_> = bounds.iter().map(|&(a, b)| zeros(g, (b - a) * c)).collect();
    run(g, |r| {
        k::embedding_forward(g, r, n, c, v, &tids, &refs, &tout)?;
        for (&(a, b), (part, dw)) in bounds.iter().zip(parts.iter().zip(&dws)) {
            k::embedding_backward(g, r, n, c, a, b - a, &ids, &tdout, dw)?;
            // The tied head: logits[:, a..b] = x · partᵀ, and dx += dlogits[:, a..b] · part.
            let mut mm = Matmul::linear(m, c, b - a);
            (mm.ldc, mm.c_off) = (v, a);
            k::matmul(g, r, &mm, &tx, part, &tlogits)?;
            let mut mm = Matmul::new(m, c, b - a).accumulate();
            (mm.lda, mm.a_off) = (v, a);
            k::matmul(g, r, &mm, &tdl, part, &tdx)?;
        }
        Ok(())
    });
    let mut out = vec![0.0; n * c];
    cpu::embedding_forward(n, c, v, &ids, &w, &mut out);
    close("qwen embedding gather", &read(g, &tout), &out, 0.0, 0.0);
    let mut dw = vec![0.0; v * c];
    cpu::embedding_backward(n, c, 0, v, &ids, &dout, &mut dw);
    for (&(a, b), t) in bounds.iter().zip(&dws) {
        close(&format!("qwen embedding dw rows {a}..{b}"), &read(g, t), &dw[a * c..b * c], 1e-6, 1e-6);
    }
    let mut logits = vec![0.0; m * v];
    cpu::matmul(&Matmul::linear(m, c, v), &x, &w, &mut logits);
    close("qwen tied head logits", &read(g, &tlogits), &logits, 1e-4, 1e-4);
    let mut dx = vec![0.0; m * c];
    cpu::matmul(&Matmul::new(m, c, v), &dlogits, &w, &mut dx);
    close("qwen tied head dx", &read(g, &tdx), &dx, 1e-3, 1e-4);
}
