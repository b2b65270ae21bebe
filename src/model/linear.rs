//! A linear layer with its optional LoRA pair: `LoraConfig` (PEFT's), `Tuning` (what
//! is trained), and the forward and backward of `y = x·Wᵀ (+ bias) + s·(x'·Aᵀ)·Bᵀ`.

use super::params::{Param, Weight};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::kernels::{self as k, Glu, GluOn, Lora, Matmul, SwigluBack};

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

    /// Refuses a config no adapter can have: rank 0, dropout outside [0, 1), an alpha
    /// that is not a number, no target, a target that is no projection.
    pub fn check(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Options("LoRA rank (--lora-rank) must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Options(format!("LoRA dropout (--lora-dropout) {} must be in [0, 1)", self.dropout)));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Options(format!("LoRA alpha (--lora-alpha) {} must be a finite number", self.alpha)));
        }
        if self.targets.is_empty() {
            return Err(Error::Options(format!("LoRA targets (--lora-targets, or an adapter's target_modules) name no projection of this model ({})", Self::ALL_TARGETS.join(", "))));
        }
        if let Some(t) = self.targets.iter().find(|t| !Self::ALL_TARGETS.contains(&t.as_str())) {
            return Err(Error::Options(format!("LoRA target `{t}` (--lora-targets) is not a projection of this model ({})", Self::ALL_TARGETS.join(", "))));
        }
        Ok(())
    }

    /// Refuses, for training, a rank above the full rank (the smaller of inputs and
    /// outputs) of every adapted projection of `cfg`: B·A is already of full rank there,
    /// and a larger rank adds only memory. (A rank of 100,000 on the demo asked for 7 GiB
    /// of LoRA values, more in activations, and the process was killed.) PEFT takes any
    /// rank; an adapter made elsewhere still loads for inference and merging.
    pub fn check_rank(&self, cfg: &super::Config) -> Result<()> {
        let full = cfg.projections().iter().filter(|(n, ..)| self.targets.iter().any(|t| t == n)).map(|&(_, _, i, o)| i.min(o)).max().unwrap_or(0);
        if self.r > full {
            return Err(Error::Options(format!(
                "LoRA rank {} (--lora-rank, or an adapter's r) is more than {full}, the largest full rank (the smaller of inputs and outputs) of any adapted projection: a larger rank adds memory and nothing B·A can express; choose at most {full}, or train every weight (--full)",
                self.r
            )));
        }
        Ok(())
    }

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
    /// The pair's shape on `n` rows, with dropout where a seed is given (training), its
    /// input through SwiGLU where `x_glu` says (`Lora::glu`).
    fn lora_shape(&self, n: usize, l: &LoraPair, dropout_seed: Option<u32>, x_glu: Option<usize>) -> Lora {
        let shape = Lora::new(n, self.din, self.dout, l.r, l.scale).with_glu(x_glu);
        match dropout_seed {
            Some(seed) if l.dropout > 0.0 => shape.with_dropout(l.dropout, seed),
            _ => shape,
        }
    }

    /// `y = x·Wᵀ (+ b) (+ s·h·Bᵀ)`, x `[n, din]`, y `[n, dout]`, with the LoRA up
    /// product summed inside the base product (`Lora::up`) from the h that `downs`
    /// saved (None: no pair in use). With `accumulate` the product adds into y
    /// (`y += …`: a residual connection inside the product). `x_glu`: x is SwiGLU's
    /// of the gate outputs x holds and the up outputs that many elements on (`Glu`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(&self, gpu: &Gpu, rec: &mut Recorder, n: usize, x: &Tensor, x_glu: Option<usize>, y: &Tensor, saved: Option<&LoraSaved>, accumulate: bool) -> Result<()> {
        let lora = self.lora.as_ref().zip(saved).map(|(l, saved)| (self.lora_shape(n, l, None, None), &l.b.value, &saved.h));
        for (r0, part) in self.w.row_parts() {
            let mut mm = Matmul::linear(n, self.din, part.shape[0]);
            mm.glu = x_glu.map(|up| Glu { on: GluOn::A, up });
            mm.ldc = self.dout;
            mm.c_off = r0;
            mm.beta = if accumulate { 1.0 } else { 0.0 };
            let second = lora.map(|(shape, b, h)| {
                mm.second = Some(shape.up(r0));
                (h, b)
            });
            k::matmul_with(gpu, rec, &mm, x, &part.value, y, second)?;
        }
        if let Some(b) = &self.bias {
            k::add_bias(gpu, rec, n, self.dout, &b.value, y)?;
        }
        Ok(())
    }

    /// Adds `dy·W` (and LoRA's share, inside the same product: `Lora::dx`, from the dh
    /// that `backwards` made) into dx, and the gradients of a trainable W and bias.
    /// With `swiglu_back` (one row part only) that sum is SwiGLU's dh: the product adds
    /// SwiGLU's backward of it into dx, which holds dgate and dup (`SwigluBack`, gate
    /// and up read from the tensor given).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        n: usize,
        x: &Tensor,
        x_glu: Option<usize>,
        dy: &Tensor,
        dx: &Tensor,
        lora: Option<(Lora, &Tensor)>,
        swiglu_back: Option<(SwigluBack, &Tensor)>,
    ) -> Result<()> {
        let swiglu_back = swiglu_back.filter(|_| self.w.parts.len() == 1);
        let mut lora = lora.zip(self.lora.as_ref()).map(|((shape, dh), l)| (shape, dh, &l.a.value));
        for (r0, part) in self.w.row_parts() {
            let rows = part.shape[0];
            let mut mm = Matmul::new(n, self.din, rows).accumulate();
            (mm.lda, mm.a_off) = (self.dout, r0);
            // The first part's product carries LoRA's dx.
            let second = lora.take().map(|(shape, dh, a)| {
                mm = shape.dx(mm.clone());
                (dh, a)
            });
            match swiglu_back {
                Some((e, gate_up)) => {
                    let mm = Matmul { swiglu_back: Some(e), beta: 0.0, ..mm };
                    k::matmul_swiglu_back(gpu, rec, &mm, dy, &part.value, dx, second, gate_up)?;
                }
                None => k::matmul_with(gpu, rec, &mm, dy, &part.value, dx, second)?,
            }
            if let Some(g) = part.grad() {
                // dW[r0..r0+rows] += dy[:, r0..r0+rows]ᵀ · x
                let mut mm = Matmul::new(rows, self.din, n).trans_a().accumulate();
                mm.glu = x_glu.map(|up| Glu { on: GluOn::B, up });
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

/// LoRA's down products `h = x'·Aᵀ` for the layers in `lins`, which read the same x
/// `[n, din]` (q/k/v, or gate/up), as one grouped dispatch (`k::lora_down_group`); x'
/// is x after each pair's dropout where `seeds` gives one (training), x through SwiGLU
/// where `x_glu` says. None for a layer without a pair, or all when `use_lora` is off.
#[allow(clippy::too_many_arguments)]
pub(crate) fn downs(gpu: &Gpu, rec: &mut Recorder, lins: &[&Linear], n: usize, x: &Tensor, x_glu: Option<usize>, seeds: &[Option<u32>], use_lora: bool) -> Result<Vec<Option<LoraSaved>>> {
    let pairs: Vec<(usize, &LoraPair)> = lins.iter().enumerate().filter_map(|(i, lin)| lin.lora.as_ref().filter(|_| use_lora).map(|l| (i, l))).collect();
    let shapes: Vec<Lora> = pairs.iter().map(|&(i, l)| lins[i].lora_shape(n, l, seeds[i], x_glu)).collect();
    let hs = gpu.temps(rec, &format!("{} lora h", lins[0].name), &shapes.iter().map(|s| vec![n, s.r]).collect::<Vec<_>>())?;
    let a: Vec<&Tensor> = pairs.iter().map(|(_, l)| &l.a.value).collect();
    k::lora_down_group(gpu, rec, &shapes, x, &a, &hs.iter().collect::<Vec<_>>())?;
    let mut saved: Vec<Option<LoraSaved>> = lins.iter().map(|_| None).collect();
    for ((i, _), h) in pairs.iter().zip(hs) {
        saved[*i] = Some(LoraSaved { h });
    }
    Ok(saved)
}

/// An RMSNorm's forward `y = norm(x)` and the LoRA down products of the layers in
/// `lins`, which read y (`downs`), in one row kernel where it can
/// (`k::rmsnorm_forward_lora_down`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_downs(
    gpu: &Gpu,
    rec: &mut Recorder,
    (n, c, eps): (usize, usize, f32),
    (x, w, y, rstd): (&Tensor, &Tensor, &Tensor, &Tensor),
    lins: &[&Linear],
    seeds: &[Option<u32>],
    use_lora: bool,
) -> Result<Vec<Option<LoraSaved>>> {
    let pairs: Vec<(usize, &LoraPair)> = lins.iter().enumerate().filter_map(|(i, lin)| lin.lora.as_ref().filter(|_| use_lora).map(|l| (i, l))).collect();
    let shapes: Vec<Lora> = pairs.iter().map(|&(i, l)| lins[i].lora_shape(n, l, seeds[i], None)).collect();
    let hs = gpu.temps(rec, &format!("{} lora h", lins[0].name), &shapes.iter().map(|s| vec![n, s.r]).collect::<Vec<_>>())?;
    let a: Vec<&Tensor> = pairs.iter().map(|(_, l)| &l.a.value).collect();
    k::rmsnorm_forward_lora_down(gpu, rec, n, c, eps, (x, w, y, rstd), &shapes, &a, &hs.iter().collect::<Vec<_>>())?;
    let mut saved: Vec<Option<LoraSaved>> = lins.iter().map(|_| None).collect();
    for ((i, _), h) in pairs.iter().zip(hs) {
        saved[*i] = Some(LoraSaved { h });
    }
    Ok(saved)
}

/// The forward of layers that read the same x `[n, din]` (q/k/v, gate/up) into `ys`,
/// with LoRA's up products (from the h's `downs` saved) inside: one grouped dispatch
/// (`k::matmul_group`) where their weights lie in one buffer (`params::colocate`), their
/// outputs in one temporary, and their pairs' h's and B's likewise; else `forward` each.
pub(crate) fn forwards(gpu: &Gpu, rec: &mut Recorder, lins: &[&Linear], n: usize, x: &Tensor, ys: &[&Tensor], saved: &[Option<&LoraSaved>]) -> Result<()> {
    if let Some((mms, w, y, second)) = group_forward(lins, n, ys, saved, gpu.caps.max_binding) {
        k::matmul_group(gpu, rec, &mms, x, &w, &y, second.as_ref().map(|(h, b)| (h, b)))?;
        for (lin, y) in lins.iter().zip(ys) {
            if let Some(b) = &lin.bias {
                k::add_bias(gpu, rec, n, lin.dout, &b.value, y)?;
            }
        }
        return Ok(());
    }
    for ((lin, y), s) in lins.iter().zip(ys).zip(saved) {
        lin.forward(gpu, rec, n, x, None, y, *s, false)?;
    }
    Ok(())
}

/// The grouped products of `forwards`, and the spans they bind (weights, outputs, and
/// LoRA's h's and B's), where the tensors allow one dispatch (each span within a
/// binding of `max_binding` bytes).
#[allow(clippy::type_complexity)]
fn group_forward(lins: &[&Linear], n: usize, ys: &[&Tensor], saved: &[Option<&LoraSaved>], max_binding: u64) -> Option<(Vec<Matmul>, Tensor, Tensor, Option<(Tensor, Tensor)>)> {
    if lins.len() < 2 || lins.iter().any(|l| l.w.parts.len() != 1) {
        return None;
    }
    let pairs: Vec<Option<(&LoraPair, &LoraSaved)>> = lins.iter().zip(saved).map(|(l, s)| l.lora.as_ref().zip(*s)).collect();
    let with_lora = pairs[0].is_some();
    if pairs.iter().any(|p| p.is_some() != with_lora) {
        return None;
    }
    let (w, ow) = Tensor::span("weights", &lins.iter().map(|l| &l.w.parts[0].value).collect::<Vec<_>>(), max_binding)?;
    let (y, oy) = Tensor::span("outputs", ys, max_binding)?;
    let second = if with_lora {
        let (h, oh) = Tensor::span("LoRA h", &pairs.iter().flatten().map(|(_, s)| &s.h).collect::<Vec<_>>(), max_binding)?;
        let (b, ob) = Tensor::span("LoRA B", &pairs.iter().flatten().map(|(l, _)| &l.b.value).collect::<Vec<_>>(), max_binding)?;
        Some(((h, oh), (b, ob)))
    } else {
        None
    };
    let mms = lins
        .iter()
        .enumerate()
        .map(|(i, lin)| {
            let mut mm = Matmul { b_off: ow[i], c_off: oy[i], ..Matmul::linear(n, lin.din, lin.dout) };
            if let (Some(((_, oh), (_, ob))), Some((l, _))) = (&second, pairs[i]) {
                let up = lin.lora_shape(n, l, None, None).up(0);
                mm.second = Some(crate::kernels::Second { a_off: oh[i], b_off: ob[i] + up.b_off, ..up });
            }
            mm
        })
        .collect();
    Some((mms, w, y, second.map(|((h, _), (b, _))| (h, b))))
}

/// The backward of layers that read the same x, in the order given: their LoRA pairs'
/// dh (unless `dh_made` holds a lone pair's: `made_dh`), dB and dA as grouped dispatches
/// (`k::lora_backward_group`), then each layer's
/// `dx += dy·W` (with LoRA's dx inside; with SwiGLU's backward in the store where
/// `swiglu_back` is given and the weight is whole, `Linear::backward`) and its W and
/// bias gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backwards(
    gpu: &Gpu,
    rec: &mut Recorder,
    lins: &[&Linear],
    n: usize,
    (x, x_glu): (&Tensor, Option<usize>),
    saved: &[Option<&LoraSaved>],
    dys: &[&Tensor],
    dx: &Tensor,
    seeds: &[Option<u32>],
    swiglu_back: Option<(SwigluBack, &Tensor)>,
    dh_made: Option<Tensor>,
) -> Result<()> {
    let pairs: Vec<(usize, &LoraPair, &LoraSaved)> =
        lins.iter().enumerate().filter_map(|(i, lin)| lin.lora.as_ref().zip(saved[i]).map(|(l, s)| (i, l, s))).collect();
    let shapes: Vec<Lora> = pairs.iter().map(|&(i, l, _)| lins[i].lora_shape(n, l, seeds[i], x_glu)).collect();
    // A lone pair's dh made by the norm whose dx is its output gradient (`made_dh`).
    let dh_made = dh_made.filter(|_| pairs.len() == 1);
    let dhs = match &dh_made {
        Some(dh) => vec![dh.clone()],
        None => gpu.temps(rec, "lora dh", &shapes.iter().map(|s| vec![n, s.r]).collect::<Vec<_>>())?,
    };
    if !pairs.is_empty() {
        let grads = |f: fn(&LoraPair) -> &Param| -> Vec<&Tensor> { pairs.iter().map(|(_, l, _)| f(l).grad().expect("LoRA trains")).collect() };
        let (da, db) = (grads(|l| &l.a), grads(|l| &l.b));
        let b: Vec<&Tensor> = pairs.iter().map(|(_, l, _)| &l.b.value).collect();
        let h: Vec<&Tensor> = pairs.iter().map(|(_, _, s)| &s.h).collect();
        let dy: Vec<&Tensor> = pairs.iter().map(|&(i, _, _)| dys[i]).collect();
        k::lora_backward_group(gpu, rec, &shapes, x, &b, &h, &dy, &dhs.iter().collect::<Vec<_>>(), dh_made.is_some(), &da, &db)?;
    }
    let mut lora = pairs.iter().map(|(i, _, _)| *i).zip(shapes.into_iter().zip(&dhs)).peekable();
    for (i, lin) in lins.iter().enumerate() {
        let pair = lora.next_if(|(j, _)| *j == i).map(|(_, p)| p);
        lin.backward(gpu, rec, n, x, x_glu, dys[i], dx, pair, swiglu_back)?;
    }
    Ok(())
}


/// The LoRA dh of `lin`'s pair, made by the RMSNorm backward whose dx is `lin`'s output
/// gradient (`k::rmsnorm_backward` with a `LoraDh`): after a layer's post-attention norm o_proj's,
/// after its input norm (or the final norm) the previous layer's down_proj's. Adds the
/// norm's gradients as `k::rmsnorm_backward` does; returns the dh where `lin` has a
/// pair in use (`in_use`) that the row kernels can make within the loop budget.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward_made_dh(
    gpu: &Gpu,
    rec: &mut Recorder,
    (n, c): (usize, usize),
    (x, w, rstd): (&Tensor, &Param, &Tensor),
    dy: &Tensor,
    dx: &Tensor,
    lin: Option<&Linear>,
) -> Result<Option<Tensor>> {
    let pair = lin.and_then(|l| l.lora.as_ref()).filter(|l| lin.is_some_and(|lin| lin.dout == c) && k::LoraDh::fits(gpu, c, l.r));
    let Some(l) = pair else {
        k::rmsnorm_backward(gpu, rec, n, c, x, &w.value, rstd, dy, dx, w.grad(), None)?;
        return Ok(None);
    };
    let [dh] = gpu.temps(rec, "lora dh", &[vec![n, l.r]])?.try_into().ok().expect("one");
    k::rmsnorm_backward(gpu, rec, n, c, x, &w.value, rstd, dy, dx, w.grad(), Some(k::LoraDh { s: l.scale, rank: l.r, b: &l.b.value, dh: &dh }))?;
    Ok(Some(dh))
}
