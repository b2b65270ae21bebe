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

    pub fn size(self) -> usize {
        if self == DType::F16 {
            2
        } else {
            4
        }
    }
}

/// Row-major tensor on the GPU. `clone` shares the buffer.
#[derive(Clone)]
pub struct Tensor {
    pub buffer: wgpu::Buffer,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub label: String,
}

impl Tensor {
    /// A zero-filled tensor (wgpu zero-initialises new buffers).
    pub fn new(gpu: &Gpu, label: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        // Bindings want a non-zero size that is a multiple of 4; vec4 views want 16.
        let bytes = ((numel.max(1) * dtype.size()) as u64).div_ceil(16) * 16;
        if bytes > gpu.caps.limits.max_buffer_size {
            return Err(Error::TooLarge(format!(
                "{label}: {bytes} bytes exceeds the adapter's max buffer size {}",
                gpu.caps.limits.max_buffer_size
            )));
        }
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Tensor { buffer, shape: shape.to_vec(), dtype, label: label.to_string() })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes holding the elements (the buffer may be padded beyond this).
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// Check that this tensor has `numel` elements of `dtype`, naming the op and argument.
    pub fn expect(&self, op: &str, arg: &str, dtype: DType, numel: usize) -> Result<()> {
        if self.dtype != dtype || self.numel() != numel {
            return Err(Error::Shape(format!(
                "{op}: `{arg}` ({}) is {:?} {:?} ({} elements), expected {:?} with {numel} elements",
                self.label,
                self.dtype,
                self.shape,
                self.numel(),
                dtype
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
