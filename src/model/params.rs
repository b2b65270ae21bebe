//! Weights on the GPU: `Param` (a named tensor, with a gradient and AdamW moments when
//! trained) and `Weight` (a matrix in row-parts that each fit one binding), uploaded
//! from any `Tensors` a chunk of rows at a time.

use super::Tensors;
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels as k;

/// Host bytes of f32 one upload converts at most: the loader reads, converts and
/// uploads a weight in chunks of rows this size, and never holds a whole tensor.
const UPLOAD_CHUNK: usize = 16 << 20;

/// A tensor of `shape` filled from rows `r0..` of `name` in `w`, a chunk of rows at a
/// time, stored as f16 when `f16` (frozen weights on shader-f16 adapters).
fn upload_rows(gpu: &Gpu, label: &str, w: &dyn Tensors, name: &str, r0: usize, shape: &[usize], f16: bool) -> Result<Tensor> {
    let t = gpu.zeros(label, if f16 { DType::F16 } else { DType::F32 }, shape)?;
    let row: usize = shape.iter().skip(1).product();
    // An even number of rows keeps every f16 chunk's offset 4-byte aligned.
    let per = (UPLOAD_CHUNK / 4 / row.max(1)).max(2) & !1;
    for (a, b) in k::spans(shape[0], per) {
        let data = w.rows(name, r0 + a, r0 + b)?;
        if f16 {
            let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            gpu.write_at(&t, a * row, &halves)?;
        } else {
            gpu.write_at(&t, a * row, &data)?;
        }
    }
    gpu.flush_writes();
    Ok(t)
}

/// A named f32 tensor; trainable ones carry a gradient and AdamW moments.
pub struct Param {
    /// The Hugging Face or PEFT name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Tensor,
    pub train: Option<Train>,
}

/// Gradient and AdamW moments of a trainable [`Param`].
pub struct Train {
    pub grad: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl Param {
    pub(crate) fn new(gpu: &Gpu, name: String, data: &[f32], shape: &[usize], trainable: bool) -> Result<Param> {
        let value = gpu.upload(&name, data, shape)?;
        Self::holding(gpu, name, value, shape, trainable)
    }

    /// `value` as a param, with a gradient and moments when `trainable`.
    pub(crate) fn holding(gpu: &Gpu, name: String, value: Tensor, shape: &[usize], trainable: bool) -> Result<Param> {
        let train = if trainable {
            Some(Train {
                grad: gpu.zeros(&format!("{name} grad"), DType::F32, shape)?,
                m: gpu.zeros(&format!("{name} m"), DType::F32, shape)?,
                v: gpu.zeros(&format!("{name} v"), DType::F32, shape)?,
            })
        } else {
            None
        };
        Ok(Param { value, train, shape: shape.to_vec(), name })
    }

    /// A param named `label` holding rows `r0..r0 + shape[0]` of `name` in `w`; frozen
    /// matrices are f16 where the adapter has `shader-f16`.
    pub(crate) fn read(gpu: &Gpu, label: String, w: &dyn Tensors, name: &str, r0: usize, shape: &[usize], trainable: bool) -> Result<Param> {
        let f16 = !trainable && shape.len() == 2 && gpu.caps.shader_f16;
        let value = upload_rows(gpu, &label, w, name, r0, shape, f16)?;
        Self::holding(gpu, label, value, shape, trainable)
    }

    pub fn grad(&self) -> Option<&Tensor> {
        self.train.as_ref().map(|t| &t.grad)
    }

    pub fn bytes(&self) -> u64 {
        self.value.bytes() * if self.train.is_some() { 4 } else { 1 }
    }
}

/// A matrix `[rows, cols]` split by rows into parts that each fit one storage
/// binding (Qwen's 151,936 × 896 embedding does not on most adapters).
pub struct Weight {
    pub name: String,
    pub parts: Vec<Param>,
    pub rows: usize,
    pub cols: usize,
}

impl Weight {
    /// The matrix `name` of `w`, `[rows, cols]`, uploaded part by part.
    pub fn upload(gpu: &Gpu, name: &str, w: &dyn Tensors, rows: usize, cols: usize, trainable: bool) -> Result<Weight> {
        // Frozen matrices are f16 where the adapter can read f16, halving their memory.
        let elem = if !trainable && gpu.caps.shader_f16 { 2 } else { 4 };
        let per = ((gpu.caps.max_binding / (cols as u64 * elem)) as usize).clamp(1, rows);
        let parts = (0..rows)
            .step_by(per)
            .map(|r0| {
                let r1 = (r0 + per).min(rows);
                let label = if per >= rows { name.to_string() } else { format!("{name}[{r0}..{r1}]") };
                Param::read(gpu, label, w, name, r0, &[r1 - r0, cols], trainable)
            })
            .collect::<Result<_>>()?;
        Ok(Weight { name: name.to_string(), parts, rows, cols })
    }

    /// (first row, part) pairs.
    pub(crate) fn row_parts(&self) -> impl Iterator<Item = (usize, &Param)> {
        self.parts.iter().scan(0, |r0, p| {
            let start = *r0;
            *r0 += p.shape[0];
            Some((start, p))
        })
    }

    pub(crate) fn values(&self) -> Vec<&Tensor> {
        self.parts.iter().map(|p| &p.value).collect()
    }

    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
}

