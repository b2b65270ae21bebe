//! A storage buffer with a shape and an element type.

use crate::error::{Error, Result};


use super::Gpu;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U32,
    I32,
    /// Frozen weights on adapters with `shader-f16`.
    F16,
    /// Frozen weights packed in blocks (`crate::quant`); the shape counts elements.
    Q(crate::quant::QType),
}

/// As errors name it: `f32`, `f16`, `u32`, `i32`, or a packed type (`q4_0`).
impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::U32 => f.write_str("u32"),
            DType::I32 => f.write_str("i32"),
            DType::F16 => f.write_str("f16"),
            DType::Q(q) => f.write_str(q.name()),
        }
    }
}

/// A shape as errors print it: `[4, 512]`.
pub fn dims(shape: &[usize]) -> String {
    format!("[{}]", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

impl DType {
    pub fn of<T: 'static>() -> DType {
        let id = std::any::TypeId::of::<T>();
        if id == std::any::TypeId::of::<u32>() {
            DType::U32
        } else if id == std::any::TypeId::of::<i32>() {
            DType::I32
        } else if id == std::any::TypeId::of::<half::f16>() {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// Bytes of one element (packed types: see `bytes`).
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::Q(_) => 0,
            _ => 4,
        }
    }

    /// Bytes of `numel` elements.
    pub fn bytes(self, numel: usize) -> usize {
        match self {
            DType::Q(q) => q.bytes(numel),
            _ => numel * self.size(),
        }
    }
}

/// Row-major tensor on the GPU. `clone` shares the buffer. A temporary's buffer is on
/// loan from the pool (`gpu::reuse`) and goes back when the last clone drops.
#[derive(Clone)]
pub struct Tensor {
    pub buffer: wgpu::Buffer,
    /// Where the tensor starts in `buffer`, in bytes: 0, or a multiple of the adapter's
    /// storage offset alignment for a view into a larger buffer (`Tensor::view`).
    pub offset: u64,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub label: String,
    pub(crate) lease: Option<std::sync::Arc<super::reuse::Lease>>,
    /// A temporary as the pool handed it out (not a view into one): a binding of it may
    /// cover its whole pooled buffer (`bind_size`). A view binds its own bytes only, so
    /// views of one buffer never overlap as writable bindings (WebGPU refuses that).
    pub(crate) whole: bool,
    /// Bytes a binding of this view covers where that is more than its own: its region
    /// of `Gpu::temps` (sized for the largest batch) or of a span of such regions, so
    /// that batches of other lengths bind the same bytes and reuse their bind groups.
    pub(crate) reserved: u64,
}

impl Tensor {
    /// A zero-filled tensor in a buffer of its own (wgpu zero-initialises new buffers).
    pub fn new(gpu: &Gpu, label: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let buffer = gpu.create_storage(label, Tensor::padded(dtype, shape))?;
        Ok(Tensor { buffer, offset: 0, shape: shape.to_vec(), dtype, label: label.to_string(), lease: None, whole: true, reserved: 0 })
    }

    /// A tensor of `shape` over this one's buffer from byte `offset` on (of this
    /// tensor); the caller keeps it within the buffer and aligned for binding.
    pub fn view(&self, label: &str, offset: u64, shape: &[usize]) -> Tensor {
        Tensor { buffer: self.buffer.clone(), offset: self.offset + offset, shape: shape.to_vec(), dtype: self.dtype, label: label.to_string(), lease: self.lease.clone(), whole: false, reserved: 0 }
    }

    /// One tensor over the bytes of `parts` (f32 or f16 alike) that lie in one buffer
    /// (views into a flat group of params, into one temporary, `Gpu::temps`, or into
    /// one buffer of frozen weights, `model::params::colocate`), from the first one's
    /// start to the last one's end, with each part's offset in it in elements; None
    /// where they do not, or where it would be wider than `max_binding` bytes. A group
    /// of products binds it once (`kernels::matmul_group`).
    pub fn span(label: &str, parts: &[&Tensor], max_binding: u64) -> Option<(Tensor, Vec<usize>)> {
        let first = parts.first()?;
        let size = match first.dtype {
            DType::F32 | DType::F16 => first.dtype.size() as u64,
            _ => return None,
        };
        if parts.iter().any(|t| t.dtype != first.dtype || t.buffer != first.buffer || t.offset % size != 0) {
            return None;
        }
        let lo = parts.iter().map(|t| t.offset).min()?;
        let hi = parts.iter().map(|t| t.offset + t.padded_bytes().max(t.reserved)).max()?;
        if hi - lo > max_binding {
            return None;
        }
        let offsets = parts.iter().map(|t| ((t.offset - lo) / size) as usize).collect();
        let whole = Tensor { offset: lo, shape: vec![((hi - lo) / size) as usize], label: label.to_string(), whole: false, reserved: hi - lo, ..(*first).clone() };
        Some((whole, offsets))
    }

    /// The bytes a tensor of `shape` occupies: bindings want a non-zero size that is a
    /// multiple of 4; vec4 views want 16.
    pub fn padded(dtype: DType, shape: &[usize]) -> u64 {
        let numel: usize = shape.iter().product();
        (dtype.bytes(numel).max(1) as u64).div_ceil(16) * 16
    }

    pub fn padded_bytes(&self) -> u64 {
        Tensor::padded(self.dtype, &self.shape)
    }

    /// Bytes a whole-tensor binding covers (see `reuse::Lease::bind`).
    pub fn bind_size(&self) -> u64 {
        match &self.lease {
            Some(l) if self.offset == 0 && self.whole => l.bind,
            _ => self.padded_bytes().max(self.reserved),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes holding the elements (the buffer may be padded beyond this).
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.numel()) as u64
    }

    /// Check that this tensor has `numel` elements of `dtype`, naming the op and argument.
    pub fn expect(&self, op: &str, arg: &str, dtype: DType, numel: usize) -> Result<()> {
        if self.dtype != dtype || self.numel() != numel {
            return Err(Error::Shape(format!(
                "{op}: `{arg}` ({}) is {} {} ({} elements), expected {dtype} with {numel} elements",
                self.label,
                self.dtype,
                dims(&self.shape),
                self.numel()
            )));
        }
        Ok(())
    }

    /// Like [`Tensor::expect`], but the tensor may hold more (a cache filled up to `numel`).
    pub fn expect_min(&self, op: &str, arg: &str, dtype: DType, numel: usize) -> Result<()> {
        if self.numel() > numel && self.dtype == dtype {
            return Ok(());
        }
        self.expect(op, arg, dtype, numel)
    }
}
