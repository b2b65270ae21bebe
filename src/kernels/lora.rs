//! LoRA on a linear layer: `y = x·Wᵀ + s · (x'·Aᵀ)·Bᵀ`, with `s = alpha / r` (or
//! `alpha / √r`) and x' = dropout(x) in training.
//!
//! A pair has no kernel of its own: it is products of `kernels/matmul.wgsl`, with the
//! dropout mask made inside them, and two of its products ride on the base layer's.
//! Forward: `lora_down` (h = x'·Aᵀ), then the base product with `Lora::up` as its
//! second product. Backward: `lora_backward` (dh, dA, dB), then the base dx += dy·W
//! with `Lora::dx` (+ dropout(dh·A)) as its second. So a pair costs 1 + 3 dispatches
//! a step, not 6 + 2 dropout passes.

use super::{check, matmul, DropOn, Dropout, Matmul, Second};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

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
}

impl Lora {
    /// No dropout.
    pub fn new(n: usize, din: usize, dout: usize, r: usize, s: f32) -> Lora {
        Lora { n, din, dout, r, s, dropout: 0.0, seed: 0 }
    }

    pub fn with_dropout(self, dropout: f32, seed: u32) -> Lora {
        Lora { dropout, seed, ..self }
    }

    fn drop(&self, on: DropOn) -> Option<Dropout> {
        (self.dropout > 0.0).then_some(Dropout { p: self.dropout, seed: self.seed, on })
    }

    /// `h = x'·Aᵀ`: x `[n, din]`, A `[r, din]`, h `[n, r]`.
    pub fn down(&self) -> Matmul {
        Matmul { dropout: self.drop(DropOn::A), ..Matmul::linear(self.n, self.din, self.r) }
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
        Matmul { dropout: self.drop(DropOn::B), ..Matmul::new(self.r, self.din, self.n).trans_a().accumulate() }
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
        check(self.n > 0 && self.din > 0 && self.dout > 0 && self.r > 0, op, || format!("empty shape {self:?}"))?;
        check((0.0..1.0).contains(&self.dropout), op, || format!("dropout {} must be in [0, 1)", self.dropout))?;
        x.expect(op, "x", DType::F32, self.n * self.din)?;
        a.expect(op, a_name, DType::F32, self.r * self.din)?;
        h.expect(op, "h", DType::F32, self.n * self.r)
    }
}

/// `h = x'·Aᵀ` (saved for the backward): x `[n, din]`, A `[r, din]`, h `[n, r]`.
pub fn lora_down(gpu: &Gpu, rec: &mut Recorder, l: &Lora, x: &Tensor, a: &Tensor, h: &Tensor) -> Result<()> {
    l.check("lora_down", x, ("a", a), h)?;
    matmul(gpu, rec, &l.down(), x, a, h)
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
    let op = "lora_backward";
    l.check(op, x, ("da", da), h)?;
    b.expect(op, "b", DType::F32, l.dout * l.r)?;
    dy.expect(op, "dy", DType::F32, l.n * l.dout)?;
    dh.expect(op, "dh", DType::F32, l.n * l.r)?;
    db.expect(op, "db", DType::F32, l.dout * l.r)?;
    matmul(gpu, rec, &l.dh(), dy, b, dh)?;
    matmul(gpu, rec, &l.db(), dy, h, db)?;
    matmul(gpu, rec, &l.da(), dh, x, da)
}
