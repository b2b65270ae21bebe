//! Launchers for `kernels/lora.wgsl`.

use super::{check, check_binding, groups, LORA};
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
    fn params(&self) -> Params {
        Params {
            n: self.n as u32,
            din: self.din as u32,
            dout: self.dout as u32,
            r: self.r as u32,
            s: self.s,
            _p: [0; 3],
        }
    }

    fn check_common(&self, op: &str, x: &Tensor, a: &Tensor, b: &Tensor, h: &Tensor) -> Result<()> {
        check(self.n > 0 && self.din > 0 && self.dout > 0 && self.r > 0, op, || format!("empty shape {self:?}"))?;
        x.expect(op, "x", DType::F32, self.n * self.din)?;
        a.expect(op, "a", DType::F32, self.r * self.din)?;
        b.expect(op, "b", DType::F32, self.dout * self.r)?;
        h.expect(op, "h", DType::F32, self.n * self.r)
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    din: u32,
    dout: u32,
    r: u32,
    s: f32,
    _p: [u32; 3],
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
    check_binding(gpu, op, &[x, y])?;
    let p = l.params();
    let pipeline = gpu.pipeline(&LORA, "lora_down", &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        "lora_down",
        &p,
        &[(1, x.into()), (2, a.into()), (4, h.into())],
        [groups(l.r, 16), groups(l.n, 16), 1],
    )?;
    let pipeline = gpu.pipeline(&LORA, "lora_up", &[]);
    gpu.dispatch(
        rec,
        &pipeline,
        "lora_up",
        &p,
        &[(3, b.into()), (5, h.into()), (6, y.into())],
        [groups(l.dout, 16), groups(l.n, 16), 1],
    )
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
    check_binding(gpu, op, &[x, dy, dx])?;
    let p = l.params();
    let steps: [(&'static str, Vec<(u32, &Tensor)>, [u32; 3]); 4] = [
        ("lora_backward_dh", vec![(3, b), (7, dy), (8, dh)], [groups(l.r, 16), groups(l.n, 16), 1]),
        ("lora_backward_db", vec![(5, h), (7, dy), (11, db)], [groups(l.r, 16), groups(l.dout, 16), 1]),
        ("lora_backward_da", vec![(1, x), (9, dh), (10, da)], [groups(l.din, 16), groups(l.r, 16), 1]),
        ("lora_backward_dx", vec![(2, a), (9, dh), (12, dx)], [groups(l.din, 16), groups(l.n, 16), 1]),
    ];
    for (entry, binds, grid) in steps {
        let pipeline = gpu.pipeline(&LORA, entry, &[]);
        let binds: Vec<_> = binds.into_iter().map(|(i, t)| (i, t.into())).collect();
        gpu.dispatch(rec, &pipeline, entry, &p, &binds, grid)?;
    }
    Ok(())
}
