//! LoRA on a linear layer: `y = x·Wᵀ + s · (x'·Aᵀ)·Bᵀ`, with `s = alpha / r` (or
//! `alpha / √r`) and x' = dropout(x) in training.
//!
//! A pair has no kernel of its own: it is products of `kernels/matmul.wgsl`, with the
//! dropout mask made inside them, and two of its products ride on the base layer's.
//! Forward: `lora_down` (h = x'·Aᵀ), then the base product with `Lora::up` as its
//! second product. Backward: `lora_backward` (dh, dA, dB), then the base dx += dy·W
//! with `Lora::dx` (+ dropout(dh·A)) as its second. So a pair costs 1 + 3 dispatches
//! a step, not 6 + 2 dropout passes. Pairs on projections that read the same x
//! (q/k/v, gate/up) run each of these products for all of them as one grouped
//! dispatch (`lora_down_group`, `lora_backward_group`: `matmul_group`).

use super::{check, matmul, matmul_group, DropOn, Dropout, Glu, GluOn, Matmul, Second};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor, Variant};

/// A LoRA pair on a linear layer `din → dout` applied to `n` rows, rank `r`, scale `s`,
/// LoRA dropout `dropout` (0 = none) with the mask of `seed`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lora {
    pub n: usize,
    pub din: usize,
    pub dout: usize,
    pub r: usize,
    pub s: f32,
    pub dropout: f32,
    pub seed: u32,
    /// x is SwiGLU's `silu(gate)·up` of the gate outputs x holds and the up outputs
    /// this many elements further on, made as the products load it (`Glu`).
    pub glu: Option<usize>,
}

impl Lora {
    /// No dropout.
    pub fn new(n: usize, din: usize, dout: usize, r: usize, s: f32) -> Lora {
        Lora { n, din, dout, r, s, dropout: 0.0, seed: 0, glu: None }
    }

    pub fn with_dropout(self, dropout: f32, seed: u32) -> Lora {
        Lora { dropout, seed, ..self }
    }

    /// x through SwiGLU, its up outputs `up` elements past the gate's.
    pub fn with_glu(self, up: Option<usize>) -> Lora {
        Lora { glu: up, ..self }
    }

    fn x_glu(&self, on: GluOn) -> Option<Glu> {
        self.glu.map(|up| Glu { on, up })
    }

    fn drop(&self, on: DropOn) -> Option<Dropout> {
        (self.dropout > 0.0).then_some(Dropout { p: self.dropout, seed: self.seed, on })
    }

    /// `h = x'·Aᵀ`: x `[n, din]`, A `[r, din]`, h `[n, r]`.
    pub fn down(&self) -> Matmul {
        Matmul { dropout: self.drop(DropOn::A), glu: self.x_glu(GluOn::A), ..Matmul::linear(self.n, self.din, self.r) }
    }

    /// `dh = s·dy·B`: dy `[n, dout]`, B `[dout, r]`.
    pub fn dh(&self) -> Matmul {
        Matmul::new(self.n, self.r, self.dout).alpha(self.s)
    }

    /// `dB += s·dyᵀ·h`: dy `[n, dout]`, h `[n, r]`.
    pub fn db(&self) -> Matmul {
        Matmul::new(self.dout, self.r, self.n).trans_a().alpha(self.s).accumulate()
    }

    /// `dA += dhᵀ·x'`: dh `[n, r]`, x `[n, din]` through the forward's mask.
    pub fn da(&self) -> Matmul {
        Matmul { dropout: self.drop(DropOn::B), glu: self.x_glu(GluOn::B), ..Matmul::new(self.r, self.din, self.n).trans_a().accumulate() }
    }

    /// The up product `+ s·h·Bᵀ` for y's columns from `r0`, as the second product of
    /// the base layer's `x·W[r0..]ᵀ` (operands h `[n, r]` and B `[dout, r]`).
    pub fn up(&self, r0: usize) -> Second {
        Second { b_off: r0 * self.r, ..Second::new(self.r, self.s) }
    }

    /// `+ dropout(dh·A)` with the forward's mask, on the base layer's `dx += dy·W`
    /// (operands dh `[n, r]` and A `[r, din]`).
    pub fn dx(&self, base: Matmul) -> Matmul {
        Matmul { second: Some(Second::new(self.r, 1.0)), dropout: self.drop(DropOn::Second), ..base }
    }

    /// The shape, the dropout, and x `[n, din]`, h `[n, r]` and an `[r, din]` tensor (A
    /// or its gradient) named `a_name`.
    fn check(&self, op: &str, x: &Tensor, (a_name, a): (&str, &Tensor), h: &Tensor) -> Result<()> {
        check(self.n > 0 && self.din > 0 && self.dout > 0 && self.r > 0, op, || format!("empty shape: {} tokens, {} → {}, rank {}", self.n, self.din, self.dout, self.r))?;
        check((0.0..1.0).contains(&self.dropout), op, || format!("dropout {} must be in [0, 1)", self.dropout))?;
        x.expect(op, "x", DType::F32, self.n * self.din + self.glu.unwrap_or(0))?;
        a.expect(op, a_name, DType::F32, self.r * self.din)?;
        h.expect(op, "h", DType::F32, self.n * self.r)
    }
}

/// `h = x'·Aᵀ` (saved for the backward): x `[n, din]`, A `[r, din]`, h `[n, r]`.
pub fn lora_down(gpu: &Gpu, rec: &mut Recorder, l: &Lora, x: &Tensor, a: &Tensor, h: &Tensor) -> Result<()> {
    lora_down_group(gpu, rec, &[*l], x, &[a], &[h])
}

/// The pair's own gradients: `dh = s·dy·B` (into scratch `dh` `[n, r]`, which the
/// base layer's dx product then reads), `dB += s·dyᵀ·h` and `dA += dhᵀ·x'`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    l: &Lora,
    x: &Tensor,
    b: &Tensor,
    h: &Tensor,
    dy: &Tensor,
    dh: &Tensor,
    da: &Tensor,
    db: &Tensor,
) -> Result<()> {
    lora_backward_group(gpu, rec, &[*l], x, &[b], &[h], &[dy], &[dh], false, &[da], &[db])
}

/// `lora_down` for pairs on projections that read the same x (q/k/v, gate/up): one
/// grouped dispatch where their A's lie in one buffer (a flat group of params) and so
/// do their h's (`Gpu::temps`), else a dispatch each.
pub fn lora_down_group(gpu: &Gpu, rec: &mut Recorder, ls: &[Lora], x: &Tensor, a: &[&Tensor], h: &[&Tensor]) -> Result<()> {
    let op = "lora_down";
    check(a.len() == ls.len() && h.len() == ls.len(), op, || format!("{} pairs, {} A's and {} h's", ls.len(), a.len(), h.len()))?;
    for (i, l) in ls.iter().enumerate() {
        l.check(op, x, ("a", a[i]), h[i])?;
    }
    match (alike(ls), Tensor::span("LoRA A", a, gpu.caps.max_binding), Tensor::span("LoRA h", h, gpu.caps.max_binding)) {
        (true, Some((ta, oa)), Some((th, oh))) => {
            let mms: Vec<Matmul> = ls.iter().enumerate().map(|(i, l)| Matmul { b_off: oa[i], c_off: oh[i], ..l.down() }).collect();
            matmul_group(gpu, rec, &mms, x, &ta, &th, None)
        }
        _ => ls.iter().enumerate().try_for_each(|(i, l)| matmul(gpu, rec, &l.down(), x, a[i], h[i])),
    }
}

/// `lora_backward` for pairs on projections that read the same x: dh, dB and dA each
/// as one grouped dispatch where each role's tensors lie in one buffer (the dy's and
/// dh's in one temporary each, the B's, A and B gradients and h's in one group), else
/// three dispatches a pair.
/// `dh_made`: each pair's dh is made already (by the norm whose dx is the layer's output
/// gradient, `rmsnorm_backward`'s `LoraDh`), so only dB and dA are computed.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_group(
    gpu: &Gpu,
    rec: &mut Recorder,
    ls: &[Lora],
    x: &Tensor,
    b: &[&Tensor],
    h: &[&Tensor],
    dy: &[&Tensor],
    dh: &[&Tensor],
    dh_made: bool,
    da: &[&Tensor],
    db: &[&Tensor],
) -> Result<()> {
    let op = "lora_backward";
    let n = ls.len();
    check([b.len(), h.len(), dy.len(), dh.len(), da.len(), db.len()].iter().all(|&k| k == n), op, || format!("{n} pairs and a different count of some tensor"))?;
    for (i, l) in ls.iter().enumerate() {
        l.check(op, x, ("da", da[i]), h[i])?;
        b[i].expect(op, "b", DType::F32, l.dout * l.r)?;
        dy[i].expect(op, "dy", DType::F32, l.n * l.dout)?;
        dh[i].expect(op, "dh", DType::F32, l.n * l.r)?;
        db[i].expect(op, "db", DType::F32, l.dout * l.r)?;
    }
    let spans = [("LoRA B", b), ("LoRA h", h), ("LoRA dy", dy), ("LoRA dh", dh), ("LoRA dA", da), ("LoRA dB", db)].map(|(label, t)| Tensor::span(label, t, gpu.caps.max_binding));
    if let (true, [Some((tb, ob)), Some((th, oh)), Some((tdy, ody)), Some((tdh, odh)), Some((tda, oda)), Some((tdb, odb))]) = (alike(ls), spans) {
        let each = |f: &dyn Fn(usize, &Lora) -> Matmul| ls.iter().enumerate().map(|(i, l)| f(i, l)).collect::<Vec<_>>();
        if !dh_made {
            matmul_group(gpu, rec, &each(&|i, l| Matmul { a_off: ody[i], b_off: ob[i], c_off: odh[i], ..l.dh() }), &tdy, &tb, &tdh, None)?;
        }
        let da_mms = each(&|i, l| Matmul { a_off: odh[i], c_off: oda[i], ..l.da() });
        // dB reads dy and h where dA reads dh and x: with the GPU kernels, where the
        // gradients lie in one buffer, both as one dispatch over two operand sets
        // (`Matmul::alt`), dB under dA's dropout kind at p = 0 (which keeps every
        // element as it is). CPU drivers run each load's choice of operand for every
        // lane (both loads): there the two dispatches cost less.
        let grads: Vec<&Tensor> = da.iter().chain(db).copied().collect();
        let two_sets = gpu.caps.variant == Variant::Tiled;
        if let Some((tg, og)) = Tensor::span("LoRA dA, dB", &grads, gpu.caps.max_binding).filter(|_| two_sets) {
            let kind = da_mms[0].dropout.map(|d| Dropout { p: 0.0, ..d });
            let db_mms = each(&|i, l| Matmul { a_off: ody[i], b_off: oh[i], c_off: og[n + i], alt: true, dropout: kind, ..l.db() });
            let mms: Vec<Matmul> = da_mms.into_iter().enumerate().map(|(i, mm)| Matmul { c_off: og[i], ..mm }).chain(db_mms).collect();
            return matmul_group(gpu, rec, &mms, &tdh, x, &tg, Some((&tdy, &th)));
        }
        matmul_group(gpu, rec, &each(&|i, l| Matmul { a_off: ody[i], b_off: oh[i], c_off: odb[i], ..l.db() }), &tdy, &th, &tdb, None)?;
        return matmul_group(gpu, rec, &da_mms, &tdh, x, &tda, None);
    }
    for (i, l) in ls.iter().enumerate() {
        if !dh_made {
            matmul(gpu, rec, &l.dh(), dy[i], b[i], dh[i])?;
        }
        matmul(gpu, rec, &l.db(), dy[i], h[i], db[i])?;
        matmul(gpu, rec, &l.da(), dh[i], x, da[i])?;
    }
    Ok(())
}

/// Whether the pairs' products are of one kind (dropout on all or none), so a group
/// of them is one dispatch.
fn alike(ls: &[Lora]) -> bool {
    ls.iter().all(|l| (l.dropout > 0.0) == (ls[0].dropout > 0.0) && l.glu.is_some() == ls[0].glu.is_some())
}

