//! Every backward in `webtune::reference` against central finite differences of its
//! CPU forward (no GPU needed). The GPU backward kernels are checked against these
//! same references in tests/kernels.rs, so together they check the GPU gradients.
//! Loss L = Σ r·y for a fixed random r, so dy = r.

use webtune::check::{compare, Rng};
use webtune::kernels::{Attention, Lora, Matmul};
use webtune::reference as cpu;

/// dL/dx by central differences, L evaluated in f64 from the f32 forward.
fn numeric(x: &[f32], eps: f32, f: impl Fn(&[f32]) -> f64) -> Vec<f32> {
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            xp[i] = x[i] + eps;
            let lp = f(&xp);
            xp[i] = x[i] - eps;
            let lm = f(&xp);
            ((lp - lm) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

fn dot(r: &[f32], y: &[f32]) -> f64 {
    r.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn fd(what: &str, analytic: &[f32], x: &[f32], f: impl Fn(&[f32]) -> f64) {
    let num = numeric(x, 1e-2, f);
    let err = compare(what, analytic, &num, 2e-3, 1e-2).unwrap_or_else(|m| panic!("{m}"));
    eprintln!("{what}: max abs error vs finite differences {err:e}");
}

#[test]
fn linear_gradients_match_finite_differences() {
    let (n, din, dout) = (5, 7, 6);
    let mut rng = Rng::new(1);
    let (x, w, r) = (rng.vec(n * din, 1.0), rng.vec(dout * din, 1.0), rng.vec(n * dout, 1.0));
    let fwd = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; n * dout];
        cpu::matmul(&Matmul::linear(n, din, dout), x, w, &mut y);
        dot(&r, &y)
    };
    let mut dx = vec![0.0; n * din];
    cpu::matmul(&Matmul::new(n, din, dout), &r, &w, &mut dx);
    let mut dw = vec![0.0; dout * din];
    cpu::matmul(&Matmul::new(dout, din, n).trans_a(), &r, &x, &mut dw);
    fd("linear dx", &dx, &x, |x| fwd(x, &w));
    fd("linear dW", &dw, &w, |w| fwd(&x, w));
}

#[test]
fn attention_gradients_match_finite_differences() {
    let at = Attention::new(2, 6, 4, 2, 4);
    let seg: Vec<u32> = (0..12).map(|i| (3..6).contains(&i) as u32).collect();
    let mut rng = Rng::new(2);
    let (q, k, v, r) = (rng.vec(at.q_len(), 1.0), rng.vec(at.kv_len(), 1.0), rng.vec(at.kv_len(), 1.0), rng.vec(at.q_len(), 1.0));
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut o, mut lse) = (vec![0.0; at.q_len()], vec![0.0; at.rows()]);
        cpu::attention_forward(&at, q, k, v, &seg, &mut o, &mut lse);
        dot(&r, &o)
    };
    let (mut o, mut lse) = (vec![0.0; at.q_len()], vec![0.0; at.rows()]);
    cpu::attention_forward(&at, &q, &k, &v, &seg, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; at.q_len()], vec![0.0; at.kv_len()], vec![0.0; at.kv_len()]);
    cpu::attention_backward(&at, &q, &k, &v, &seg, &o, &lse, &r, &mut dq, &mut dk, &mut dv);
    fd("attention dq", &dq, &q, |q| fwd(q, &k, &v));
    fd("attention dk", &dk, &k, |k| fwd(&q, k, &v));
    fd("attention dv", &dv, &v, |v| fwd(&q, &k, v));
}

#[test]
fn rmsnorm_gradients_match_finite_differences() {
    let (rows, c) = (3, 8);
    let mut rng = Rng::new(3);
    let (x, w, r) = (rng.vec(rows * c, 2.0), rng.vec(c, 1.5), rng.vec(rows * c, 1.0));
    let fwd = |x: &[f32], w: &[f32]| {
        let (mut y, mut rs) = (vec![0.0; rows * c], vec![0.0; rows]);
        cpu::rmsnorm_forward(rows, c, 1e-5, x, w, &mut y, &mut rs);
        dot(&r, &y)
    };
    let (mut y, mut rs) = (vec![0.0; rows * c], vec![0.0; rows]);
    cpu::rmsnorm_forward(rows, c, 1e-5, &x, &w, &mut y, &mut rs);
    let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
    cpu::rmsnorm_backward(rows, c, &x, &w, &rs, &r, &mut dx, Some(&mut dw));
    fd("rmsnorm dx", &dx, &x, |x| fwd(x, &w));
    fd("rmsnorm dw", &dw, &w, |w| fwd(&x, w));
}

#[test]
fn rope_gradient_matches_finite_differences() {
    // q with 2 heads and k with 1: the loss is r·[rope(q), rope(k)].
    let (n, h, hk, hs) = (4, 2, 1, 8);
    let mut rng = Rng::new(4);
    let (x, r) = (rng.vec(n * (h + hk) * hs, 1.0), rng.vec(n * (h + hk) * hs, 1.0));
    let pos = [0u32, 3, 1, 17];
    let inv = webtune::kernels::rope::inv_freq(hs, 10000.0);
    let mut dx = r.clone();
    let (dq, dk) = dx.split_at_mut(n * h * hs);
    cpu::rope_backward(n, (h, hk), hs, dq, dk, &pos, &inv);
    fd("rope dx", &dx, &x, |x| {
        let mut y = x.to_vec();
        let (q, k) = y.split_at_mut(n * h * hs);
        cpu::rope_forward(n, (h, hk), hs, q, k, &pos, &inv);
        dot(&r, &y)
    });
}

#[test]
fn swiglu_gradients_match_finite_differences() {
    let n = 40;
    let mut rng = Rng::new(5);
    let (gate, up, r) = (rng.vec(n, 6.0), rng.vec(n, 2.0), rng.vec(n, 1.0));
    let fwd = |g: &[f32], u: &[f32]| {
        let mut h = vec![0.0; n];
        cpu::swiglu_forward(n, g, u, &mut h);
        dot(&r, &h)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    cpu::swiglu_backward(n, &gate, &up, &r, &mut dg, &mut du);
    fd("swiglu dgate", &dg, &gate, |g| fwd(g, &up));
    fd("swiglu dup", &du, &up, |u| fwd(&gate, u));
}

#[test]
fn embedding_and_bias_gradients_match_finite_differences() {
    let (n, c, v) = (9, 3, 5);
    let mut rng = Rng::new(6);
    let ids = [0u32, 4, 4, 1, 0, 4, 2, 2, 0];
    let (w, r) = (rng.vec(v * c, 1.0), rng.vec(n * c, 1.0));
    let mut dw = vec![0.0; v * c];
    cpu::embedding_backward(n, c, 0, v, &ids, &r, &mut dw);
    fd("embedding dw", &dw, &w, |w| {
        let mut out = vec![0.0; n * c];
        cpu::embedding_forward(n, c, v, &ids, w, &mut out);
        dot(&r, &out)
    });
    let bias = rng.vec(c, 1.0);
    let mut db = vec![0.0; c];
    cpu::bias_backward(n, c, &r, &mut db);
    fd("bias db", &db, &bias, |b| {
        let mut y = vec![0.0; n * c];
        cpu::add_bias(n, c, b, &mut y);
        dot(&r, &y)
    });
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let (n, v) = (5, 11);
    let mut rng = Rng::new(7);
    let logits = rng.vec(n * v, 3.0);
    let targets = [3, -100, 0, 10, 7];
    let scale = 1.0 / 4.0;
    let loss_of = |z: &[f32]| {
        let (mut losses, mut lse, mut loss) = (vec![0.0; n], vec![0.0; n], vec![0.0; 1]);
        cpu::cross_entropy_forward(n, v, scale, z, &targets, &mut losses, &mut lse, &mut loss);
        // Sum the per-row losses in f64 so the finite difference is not rounded to f32.
        losses.iter().map(|&l| l as f64).sum::<f64>() * scale as f64
    };
    let (mut losses, mut lse, mut loss) = (vec![0.0; n], vec![0.0; n], vec![0.0; 1]);
    cpu::cross_entropy_forward(n, v, scale, &logits, &targets, &mut losses, &mut lse, &mut loss);
    let mut dl = logits.clone();
    cpu::cross_entropy_backward(n, v, scale, &mut dl, &targets, &lse);
    fd("cross-entropy dlogits", &dl, &logits, loss_of);
    assert!(dl[v..2 * v].iter().all(|&g| g == 0.0), "ignored row has gradient");
}

/// A linear layer with a LoRA pair and its dropout (a fixed mask), fused as the
/// engine runs it: dx, dA and dB against finite differences.
#[test]
fn lora_gradients_match_finite_differences() {
    use webtune::kernels::Matmul;
    let l = Lora::new(4, 6, 5, 2, 1.5).with_dropout(0.3, 11);
    let mut rng = Rng::new(8);
    let (x, w, a, b, r) = (rng.vec(l.n * l.din, 1.0), rng.vec(l.dout * l.din, 1.0), rng.vec(l.r * l.din, 1.0), rng.vec(l.dout * l.r, 1.0), rng.vec(l.n * l.dout, 1.0));
    let forward = |x: &[f32], a: &[f32], b: &[f32], h: &mut [f32]| {
        let mut y = vec![0.0; l.n * l.dout];
        cpu::lora_down(&l, x, a, h);
        cpu::matmul_with(&Matmul::linear(l.n, l.din, l.dout).plus(l.up(0)), x, &w, &mut y, Some((h, b)));
        y
    };
    let fwd = |x: &[f32], a: &[f32], b: &[f32]| dot(&r, &forward(x, a, b, &mut vec![0.0; l.n * l.r]));
    let mut h = vec![0.0; l.n * l.r];
    forward(&x, &a, &b, &mut h);
    let (mut dh, mut da, mut db, mut dx) = (vec![0.0; l.n * l.r], vec![0.0; l.r * l.din], vec![0.0; l.dout * l.r], vec![0.0; l.n * l.din]);
    cpu::lora_backward(&l, &x, &b, &h, &r, &mut dh, &mut da, &mut db);
    cpu::matmul_with(&l.dx(Matmul::new(l.n, l.din, l.dout).accumulate()), &r, &w, &mut dx, Some((&dh, &a)));
    assert!(dx.iter().any(|&g| g != 0.0) && da.iter().filter(|&&g| g == 0.0).count() < da.len() / 2, "{dx:?} {da:?}");
    fd("lora dx", &dx, &x, |x| fwd(x, &a, &b));
    fd("lora dA", &da, &a, |a| fwd(&x, a, &b));
    fd("lora dB", &db, &b, |b| fwd(&x, &a, b));
}

fn dpo_losses() -> Vec<webtune::kernels::Dpo> {
    use webtune::kernels::{Dpo, DpoLoss};
    vec![
        Dpo::new(DpoLoss::Sigmoid, 0.1, 0.0).unwrap(),
        Dpo::new(DpoLoss::Sigmoid, 0.5, 0.2).unwrap(),
        Dpo::new(DpoLoss::Ipo, 0.1, 0.0).unwrap(),
        Dpo::new(DpoLoss::Robust, 0.3, 0.1).unwrap(),
        Dpo::new(DpoLoss::Sigmoid, 0.1, 0.0).unwrap().with_rpo(0.7).unwrap(),
    ]
}

/// The DPO loss's derivative by each sequence's log-probability, for every loss.
#[test]
fn dpo_gradient_matches_finite_differences() {
    let pairs = 3;
    let mut rng = Rng::new(17);
    let logps: Vec<f32> = rng.vec(2 * pairs, 4.0).iter().map(|x| x - 20.0).collect();
    let refs: Vec<f32> = rng.vec(2 * pairs, 4.0).iter().map(|x| x - 20.0).collect();
    let counts = [3.0, 7.0, 1.0, 5.0, 2.0, 9.0];
    let scale = 1.0 / pairs as f32;
    for d in dpo_losses() {
        let sft = d.sft_scale(counts[..pairs].iter().sum::<f32>() as usize);
        let loss_of = |l: &[f32]| {
            let mut stats = vec![0.0; 8];
            cpu::dpo_forward(&d, pairs, scale, sft, l, &refs, &counts, &mut stats);
            stats[0] as f64
        };
        let mut coef = vec![0.0; 2 * pairs];
        cpu::dpo_backward(&d, pairs, scale, sft, &logps, &refs, &counts, &mut coef);
        let grad: Vec<f32> = coef.iter().map(|c| -c).collect();
        assert!(grad.iter().any(|g| g.abs() > 1e-3), "{d:?}: {grad:?}");
        fd(&format!("dpo {d:?} d/dlogps"), &grad, &logps, loss_of);
    }
}

/// The whole per-sequence path: logits → cross-entropy → per-sequence log p → DPO loss,
/// differentiated through the scaled cross-entropy backward with the DPO factors.
#[test]
fn dpo_loss_gradient_by_the_logits_matches_finite_differences() {
    let (pairs, t, v) = (2, 3, 5);
    let n = 2 * pairs * t;
    let mut rng = Rng::new(18);
    let logits = rng.vec(n * v, 2.0);
    // Prompt rows are ignored; completions differ in length.
    let targets: Vec<i32> = (0..n).map(|r| if r % t == 0 && r / t != 1 { -100 } else { (r * 3 % v) as i32 }).collect();
    let counts: Vec<f32> = (0..2 * pairs).map(|s| targets[s * t..(s + 1) * t].iter().filter(|&&x| x >= 0).count() as f32).collect();
    let refs: Vec<f32> = rng.vec(2 * pairs, 1.0).iter().map(|x| x - 5.0).collect();
    let row_seq: Vec<u32> = (0..n).map(|r| (r / t) as u32).collect();
    let seq_logps = |z: &[f32]| {
        let (mut losses, mut lse, mut loss) = (vec![0.0; n], vec![0.0; n], vec![0.0; 1]);
        cpu::cross_entropy_forward(n, v, 1.0, z, &targets, &mut losses, &mut lse, &mut loss);
        let mut lp = vec![0.0; 2 * pairs];
        cpu::cross_entropy_sequence_logps(0, n, &row_seq, &losses, &mut lp);
        (lp, lse)
    };
    for d in dpo_losses() {
        let sft = d.sft_scale(counts[..pairs].iter().sum::<f32>() as usize);
        let loss_of = |z: &[f32]| {
            let mut stats = vec![0.0; 8];
            cpu::dpo_forward(&d, pairs, 0.5, sft, &seq_logps(z).0, &refs, &counts, &mut stats);
            stats[0] as f64
        };
        let (lp, lse) = seq_logps(&logits);
        let mut coef = vec![0.0; 2 * pairs];
        cpu::dpo_backward(&d, pairs, 0.5, sft, &lp, &refs, &counts, &mut coef);
        let mut dl = logits.clone();
        cpu::cross_entropy_backward_scaled(n, v, 1.0, &mut dl, &targets, &lse, 0, &row_seq, &coef);
        fd(&format!("dpo {d:?} d/dlogits"), &dl, &logits, loss_of);
    }
}
