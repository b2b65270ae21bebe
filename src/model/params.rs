//! Weights on the GPU: `Param` (a named tensor, with a gradient and AdamW moments when
//! trained) and `Weight` (a matrix in row-parts that each fit one binding), uploaded
//! from any `Tensors` a chunk of rows at a time.

use super::Tensors;
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels as k;
use crate::quant::{self, QType};

/// How frozen matrices are held on the GPU (trained ones are always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Frozen {
    /// A GGUF's Q8_0, Q4_0, Q4_1 and Q4_K blocks packed as they are read; everything
    /// else f16 where the adapter has `shader-f16`, else f32.
    #[default]
    Auto,
    /// Everything dequantized: f16 where the adapter has `shader-f16`, else f32.
    Float,
    /// Everything dequantized to f32.
    F32,
    /// Packed: a GGUF's blocks as they are, every other matrix quantized to this type
    /// (QLoRA's frozen base). Matrices whose rows are not whole blocks stay float.
    Quantize(QType),
}

impl Frozen {
    /// The packed type `name` (`[rows, cols]`, frozen) is held in, if any, and whether
    /// those are `w`'s own blocks.
    pub fn packed(self, w: &dyn Tensors, name: &str, cols: usize) -> Option<(QType, bool)> {
        self.packed_as(w.packed_type(name), cols)
    }

    /// `packed` for a matrix of `cols` columns stored in `stored` blocks (or not).
    pub fn packed_as(self, stored: Option<QType>, cols: usize) -> Option<(QType, bool)> {
        let kept = stored.filter(|q| q.fits(cols));
        match self {
            Frozen::Float | Frozen::F32 => None,
            Frozen::Auto => kept.map(|q| (q, true)),
            Frozen::Quantize(q) => kept.map(|k| (k, true)).or(Some((q, false)).filter(|_| q.fits(cols))),
        }
    }

    /// Replace each matrix of `w` (the base's weights as `src` holds them) that this
    /// quantizes on load by its dequantized values: what the adapter was trained
    /// against, and what PEFT advises merging a QLoRA adapter into.
    pub fn dequantize_into(self, w: &mut super::TensorMap, src: &dyn Tensors) -> Result<()> {
        for (name, t) in w.iter_mut() {
            if t.shape.len() != 2 {
                continue;
            }
            if let Some((q, false)) = self.packed(src, name, t.shape[1]) {
                t.data = quant::dequantize(q, &quant::quantize(q, &t.data)?);
            }
        }
        Ok(())
    }
}

/// A packed tensor `[rows, cols]` from rows `r0..` of `name` in `w`: its blocks as `w`
/// stores them (`kept`), or its values quantized to `q`, a chunk of rows at a time.
#[allow(clippy::too_many_arguments)]
fn upload_packed(gpu: &Gpu, label: &str, w: &dyn Tensors, name: &str, r0: usize, rows: usize, cols: usize, q: QType, kept: bool) -> Result<Tensor> {
    let t = gpu.zeros(label, DType::Q(q), &[rows, cols])?;
    let row_bytes = q.bytes(cols);
    // An even number of rows keeps every chunk's byte offset a multiple of 4.
    let per = (UPLOAD_CHUNK / 4 / cols.max(1)).max(2) & !1;
    for (a, b) in k::spans(rows, per) {
        let bytes = if kept { w.packed_rows(name, r0 + a, r0 + b)? } else { quant::quantize(q, &w.rows(name, r0 + a, r0 + b)?)? };
        gpu.write_bytes_at(&t, a * row_bytes, &bytes)?;
    }
    gpu.flush_writes();
    Ok(t)
}

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

/// Move the frozen matrices `ws` (one part each, all f16 or all f32) into one buffer,
/// each at the adapter's storage offset alignment, so the products of the projections
/// that read one input (q/k/v, gate/up) bind it once and run as one dispatch
/// (`linear::forwards`). Anything else (packed, trained, split in row parts, or too
/// large for one binding together) stays as it is.
pub(crate) fn colocate(gpu: &Gpu, ws: &mut [&mut Weight]) -> Result<()> {
    let Some(dtype) = ws.first().and_then(|w| w.parts.first()).map(|p| p.value.dtype) else { return Ok(()) };
    let alike = |w: &Weight| w.parts.len() == 1 && w.parts[0].train.is_none() && w.parts[0].value.dtype == dtype;
    if ws.len() < 2 || !matches!(dtype, DType::F16 | DType::F32) || !ws.iter().all(|w| alike(w)) {
        return Ok(());
    }
    let align = (gpu.caps.limits.min_storage_buffer_offset_alignment as u64).max(16);
    let mut starts = Vec::with_capacity(ws.len());
    let mut end = 0u64;
    for w in ws.iter() {
        let start = end.div_ceil(align) * align;
        starts.push(start);
        end = start + w.parts[0].value.padded_bytes();
    }
    if end > gpu.caps.max_binding {
        return Ok(());
    }
    let label = ws.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", ");
    let whole = gpu.zeros(&label, dtype, &[(end / dtype.size() as u64) as usize])?;
    let mut rec = gpu.recorder("colocate");
    for (w, &start) in ws.iter_mut().zip(&starts) {
        let v = &w.parts[0].value;
        rec.encoder().copy_buffer_to_buffer(&v.buffer, v.offset, &whole.buffer, start, v.padded_bytes());
        w.parts[0].value = whole.view(&v.label.clone(), start, &v.shape.clone());
    }
    gpu.submit(rec);
    Ok(())
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

    /// `value` as a param; when `trainable`, its gradient and moments are empty until
    /// [`pack`] lays them out (every kernel refuses an empty one).
    pub(crate) fn holding(gpu: &Gpu, name: String, value: Tensor, shape: &[usize], trainable: bool) -> Result<Param> {
        let train = if trainable {
            let empty = |what: &str| gpu.zeros(&format!("{name} {what} (not packed)"), DType::F32, &[0]);
            Some(Train { grad: empty("grad")?, m: empty("m")?, v: empty("v")? })
        } else {
            None
        };
        Ok(Param { value, train, shape: shape.to_vec(), name })
    }

    /// A param named `label` holding rows `r0..r0 + shape[0]` of `name` in `w`; frozen
    /// matrices are f16 where the adapter has `shader-f16` and `allow_f16`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read(gpu: &Gpu, label: String, w: &dyn Tensors, name: &str, r0: usize, shape: &[usize], trainable: bool, allow_f16: bool) -> Result<Param> {
        let f16 = !trainable && shape.len() == 2 && gpu.caps.shader_f16 && allow_f16;
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

/// The trainable params' values, gradients and AdamW moments in flat buffers, one
/// group of them per binding's worth: each param is a view into its group, so the
/// gradient norm and AdamW run a dispatch per group, not one per param.
pub struct Flat {
    pub value: Tensor,
    pub grad: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

/// Lay out `params` (trainable, f32) in [`Flat`] groups of at most one binding each,
/// moving each value into its group and giving it a zeroed gradient and moments there.
/// Each param starts at a multiple of the adapter's storage offset alignment; the gaps
/// stay zero (zero gradients leave zero values where AdamW runs over them).
pub(crate) fn pack(gpu: &Gpu, params: Vec<&mut Param>) -> Result<Vec<Flat>> {
    let align = (gpu.caps.limits.min_storage_buffer_offset_alignment as u64).max(16);
    let cap = gpu.caps.max_binding.min(gpu.caps.limits.max_buffer_size);
    // The bytes a param takes in its group.
    let region = |p: &Param| p.value.padded_bytes().div_ceil(align) * align;
    let mut groups: Vec<Vec<&mut Param>> = Vec::new();
    let mut used = cap;
    for p in params {
        let bytes = region(p);
        if used + bytes > cap {
            groups.push(Vec::new());
            used = 0;
        }
        used += bytes;
        groups.last_mut().expect("a group").push(p);
    }
    let mut out = Vec::new();
    for group in groups {
        let n = group.iter().map(|p| region(p)).sum::<u64>() as usize / 4;
        let flat = |what: &str| gpu.zeros(&format!("trainable {what}"), DType::F32, &[n]);
        let f = Flat { value: flat("values")?, grad: flat("gradients")?, m: flat("AdamW m")?, v: flat("AdamW v")? };
        let mut rec = gpu.recorder("pack trainable params");
        let mut at = 0;
        for p in group {
            check_packable(p)?;
            rec.encoder().copy_buffer_to_buffer(&p.value.buffer, p.value.offset, &f.value.buffer, at, p.value.bytes());
            let (name, shape) = (p.name.clone(), p.shape.clone());
            let view = |t: &Tensor, what: &str| t.view(&format!("{name} {what}"), at, &shape);
            p.train = Some(Train { grad: view(&f.grad, "grad"), m: view(&f.m, "m"), v: view(&f.v, "v") });
            p.value = f.value.view(&name, at, &shape);
            at += region(p);
        }
        gpu.submit(rec);
        out.push(f);
    }
    Ok(out)
}

fn check_packable(p: &Param) -> Result<()> {
    if p.value.dtype != DType::F32 || p.train.is_none() {
        return Err(crate::Error::Shape(format!("{}: only trainable f32 params are packed", p.name)));
    }
    Ok(())
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
    /// The matrix `name` of `w`, `[rows, cols]`, uploaded part by part; frozen, it is
    /// held as `frozen` says.
    pub fn upload(gpu: &Gpu, name: &str, w: &dyn Tensors, rows: usize, cols: usize, trainable: bool, frozen: Frozen) -> Result<Weight> {
        let packed = if trainable { None } else { frozen.packed(w, name, cols) };
        // Frozen float matrices are f16 where the adapter can read f16, halving their memory.
        let f16 = !trainable && gpu.caps.shader_f16 && frozen != Frozen::F32;
        let row_bytes = match packed {
            Some((q, _)) => q.bytes(cols) as u64,
            None if f16 => 2 * cols as u64,
            None => 4 * cols as u64,
        };
        let per = ((gpu.caps.max_binding / row_bytes) as usize).clamp(1, rows);
        let parts = (0..rows)
            .step_by(per)
            .map(|r0| {
                let r1 = (r0 + per).min(rows);
                let label = if per >= rows { name.to_string() } else { format!("{name}[{r0}..{r1}]") };
                match packed {
                    Some((q, kept)) => {
                        let value = upload_packed(gpu, &label, w, name, r0, r1 - r0, cols, q, kept)?;
                        Param::holding(gpu, label, value, &[r1 - r0, cols], false)
                    }
                    None => Param::read(gpu, label, w, name, r0, &[r1 - r0, cols], trainable, f16),
                }
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

