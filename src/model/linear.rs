//! A linear layer with its optional LoRA pair: `LoraConfig` (PEFT's), `Tuning` (what
//! is trained), and the forward and backward of `y = x·Wᵀ (+ bias) + s·(x'·Aᵀ)·Bᵀ`.

use super::params::{Param, Weight};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::kernels::{self as k, Lora, Matmul};

impl std::fmt::Display for Tuning {
    /// e.g. `LoRA r16, alpha 32, dropout 0.05 on q_proj, v_proj`, `full`, `frozen`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tuning::Frozen => write!(f, "frozen"),
            Tuning::Full => write!(f, "full tuning"),
            Tuning::Lora(l) => {
                write!(f, "LoRA r{}, alpha {}, dropout {} on {}", l.r, l.alpha, l.dropout, l.targets.join(", "))?;
                if l.use_rslora {
                    write!(f, " (rsLoRA)")?;
                }
                Ok(())
            }
        }
    }
}

/// LoRA hyper-parameters (PEFT's `LoraConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub const ALL_TARGETS: [&'static str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// What is trained.
#[derive(Clone, Debug, PartialEq)]
pub enum Tuning {
    /// Nothing (inference).
    Frozen,
    /// LoRA pairs on the targeted projections; the base stays frozen.
    Lora(LoraConfig),
    /// Every weight, in f32.
    Full,
}

pub struct LoraPair {
    pub a: Param,
    pub b: Param,
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
}

/// A linear layer `y = x·Wᵀ (+ bias)`, with an optional LoRA pair.
pub struct Linear {
    /// e.g. `model.layers.0.self_attn.q_proj`
    pub name: String,
    pub w: Weight,
    pub bias: Option<Param>,
    pub lora: Option<LoraPair>,
    pub din: usize,
    pub dout: usize,
}

/// What a LoRA pair's forward saves: `h = x'·Aᵀ`, x' = dropout(x) (the mask is made
/// again from its seed in the backward).
pub(crate) struct LoraSaved {
    pub(crate) h: Tensor,
}

impl Linear {
    /// The pair's shape on `n` rows, with dropout where a seed is given (training).
    fn lora_shape(&self, n: usize, l: &LoraPair, dropout_seed: Option<u32>) -> Lora {
        let shape = Lora::new(n, self.din, self.dout, l.r, l.scale);
        match dropout_seed {
            Some(seed) if l.dropout > 0.0 => shape.with_dropout(l.dropout, seed),
            _ => shape,
        }
    }

    /// `y = x·Wᵀ (+ b) (+ s·(x'·Aᵀ)·Bᵀ)`, x `[n, din]`, y `[n, dout]`, where x' is x
    /// after LoRA dropout when `dropout_seed` is given (training). The LoRA up product
    /// is summed inside the base product (`Lora::up`). With `accumulate` the product
    /// adds into y (`y += …`: a residual connection inside the product).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        n: usize,
        x: &Tensor,
        y: &Tensor,
        dropout_seed: Option<u32>,
        use_lora: bool,
        accumulate: bool,
    ) -> Result<Option<LoraSaved>> {
        let lora = match self.lora.as_ref().filter(|_| use_lora) {
            Some(l) => {
                let shape = self.lora_shape(n, l, dropout_seed);
                let h = gpu.temp(rec, &format!("{} lora h", self.name), DType::F32, &[n, l.r])?;
                k::lora_down(gpu, rec, &shape, x, &l.a.value, &h)?;
                Some((shape, &l.b.value, h))
            }
            None => None,
        };
        for (r0, part) in self.w.row_parts() {
            let mut mm = Matmul::linear(n, self.din, part.shape[0]);
            mm.ldc = self.dout;
            mm.c_off = r0;
            mm.beta = if accumulate { 1.0 } else { 0.0 };
            let second = lora.as_ref().map(|(shape, b, h)| {
                mm.second = Some(shape.up(r0));
                (h, *b)
            });
            k::matmul_with(gpu, rec, &mm, x, &part.value, y, second)?;
        }
        if let Some(b) = &self.bias {
            k::add_bias(gpu, rec, n, self.dout, &b.value, y)?;
        }
        Ok(lora.map(|(_, _, h)| LoraSaved { h }))
    }

    /// Adds `dy·W` (and LoRA's share, inside the same product: `Lora::dx`) into dx, and
    /// the gradients of whatever is trainable (W, bias, LoRA A and B) into their params.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        n: usize,
        x: &Tensor,
        saved: Option<&LoraSaved>,
        dy: &Tensor,
        dx: &Tensor,
        dropout_seed: Option<u32>,
    ) -> Result<()> {
        let mut lora = match (&self.lora, saved) {
            (Some(l), Some(saved)) => {
                let (da, db) = (l.a.grad().expect("LoRA A trains"), l.b.grad().expect("LoRA B trains"));
                let shape = self.lora_shape(n, l, dropout_seed);
                let dh = gpu.temp(rec, "lora dh", DType::F32, &[n, l.r])?;
                k::lora_backward(gpu, rec, &shape, x, &l.b.value, &saved.h, dy, &dh, da, db)?;
                Some((shape, dh, &l.a.value))
            }
            _ => None,
        };
        for (r0, part) in self.w.row_parts() {
            let rows = part.shape[0];
            let mut mm = Matmul::new(n, self.din, rows).accumulate();
            (mm.lda, mm.a_off) = (self.dout, r0);
            // The first part's product carries LoRA's dx.
            let second = lora.take().map(|(shape, dh, a)| {
                mm = shape.dx(mm.clone());
                (dh, a)
            });
            k::matmul_with(gpu, rec, &mm, dy, &part.value, dx, second.as_ref().map(|(dh, a)| (dh, *a)))?;
            if let Some(g) = part.grad() {
                // dW[r0..r0+rows] += dy[:, r0..r0+rows]ᵀ · x
                let mut mm = Matmul::new(rows, self.din, n).trans_a().accumulate();
                (mm.lda, mm.a_off) = (self.dout, r0);
                k::matmul(gpu, rec, &mm, dy, x, g)?;
            }
        }
        if let Some(g) = self.bias.as_ref().and_then(|b| b.grad()) {
            k::bias_backward(gpu, rec, n, self.dout, dy, g)?;
        }
        Ok(())
    }

    pub(crate) fn params(&self) -> impl Iterator<Item = &Param> {
        self.w.parts.iter().chain(&self.bias).chain(self.lora.iter().flat_map(|l| [&l.a, &l.b]))
    }
}

