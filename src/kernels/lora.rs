//! LoRA on a linear layer: `y += s · (x·Aᵀ)·Bᵀ`, with `s = alpha / r` (or `alpha / √r`).
//!
//! Forward and backward are six products of `kernels/matmul.wgsl` (no kernel of their
//! own): a LoRA product is a matmul with a short side R, and the matmul kernel already
//! has the right variant for each adapter (register blocks on CPU drivers, workgroup
//! tiles on GPUs), the scale `alpha` and accumulation `beta`. The one-output-per-
//! invocation `lora.wgsl` it replaces took 58% of a demo step on lavapipe.

use super::{check, matmul, Matmul};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};

/// A LoRA pair on a linear layer `din → dout` applied to `n` rows, rank `r`, scale `s`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lora {
    pub n: usize,
    pub din: usize,
    pub dout: usize,
    pub r: usize,
    pub s: f32,
}

impl Lora {
    fn check_common(&self, op: &str, x: &Tensor, a: &Tensor, b: &Tensor, h: &Tensor) -> Result<()> {
        check(self.n > 0 && self.din > 0 && self.dout > 0 && self.r > 0, op, || format!("empty shape {self:?}"))?;
        x.expect(op, "x", DType::F32, self.n * self.din)?;
        a.expect(op, "a", DType::F32, self.r * self.din)?;
        b.expect(op, "b", DType::F32, self.dout * self.r)?;
        h.expect(op, "h", DType::F32, self.n * self.r)
    }
}

/// `h = x·Aᵀ` (saved), then `y += s · h·Bᵀ`. x `[n, din]`, A `[r, din]`, B `[dout, r]`,
/// h `[n, r]`, y `[n, dout]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    l: &Lora,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    h: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let op = "lora_forward";
    l.check_common(op, x, a, b, h)?;
    y.expect(op, "y", DType::F32, l.n * l.dout)?;
    matmul(gpu, rec, &Matmul::linear(l.n, l.din, l.r), x, a, h)?;
    matmul(gpu, rec, &Matmul::linear(l.n, l.r, l.dout).alpha(l.s).accumulate(), h, b, y)
}

/// Adds the gradients of `lora_forward` into `da`, `db` and `dx`, given x, A, B, the
/// saved h and dy; `dh` `[n, r]` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    l: &Lora,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    h: &Tensor,
    dy: &Tensor,
    dh: &Tensor,
    da: &Tensor,
    db: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let op = "lora_backward";
    l.check_common(op, x, a, b, h)?;
    dy.expect(op, "dy", DType::F32, l.n * l.dout)?;
    dh.expect(op, "dh", DType::F32, l.n * l.r)?;
    da.expect(op, "da", DType::F32, l.r * l.din)?;
    db.expect(op, "db", DType::F32, l.dout * l.r)?;
    dx.expect(op, "dx", DType::F32, l.n * l.din)?;
    // dh = s·dy·B;  dB += s·dyᵀ·h;  dA += dhᵀ·x;  dx += dh·A
    matmul(gpu, rec, &Matmul::new(l.n, l.r, l.dout).alpha(l.s), dy, b, dh)?;
    matmul(gpu, rec, &Matmul::new(l.dout, l.r, l.n).trans_a().alpha(l.s).accumulate(), dy, h, db)?;
    matmul(gpu, rec, &Matmul::new(l.r, l.din, l.n).trans_a().accumulate(), dh, x, da)?;
    matmul(gpu, rec, &Matmul::new(l.n, l.din, l.r).accumulate(), dh, a, dx)
}
