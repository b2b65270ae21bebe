//! Llama, Qwen2 and Qwen3 on the GPU: weights, LoRA, and the forward and backward
//! written out layer by layer (no autodiff graph). `backward` mirrors `forward`.
//!
//! Shapes: N = B·T token rows, C hidden, Q = NH·HS, KV = NKV·HS, I intermediate.

pub mod config;
pub mod generate;
pub mod weights;

use crate::check::Rng;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::kernels::{self as k, Attention, Lora, Matmul};

pub use config::{Arch, Config};
pub use weights::{HostTensor, TensorMap};

/// A trainable f32 tensor with its gradient and AdamW moments.
pub struct Param {
    /// The PEFT / Hugging Face name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Tensor,
    pub grad: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl Param {
    fn new(gpu: &Gpu, name: String, data: &[f32], shape: &[usize]) -> Result<Param> {
        Ok(Param {
            value: gpu.upload(&name, data, shape)?,
            grad: gpu.zeros(&format!("{name} grad"), DType::F32, shape)?,
            m: gpu.zeros(&format!("{name} m"), DType::F32, shape)?,
            v: gpu.zeros(&format!("{name} v"), DType::F32, shape)?,
            shape: shape.to_vec(),
            name,
        })
    }
}

/// A frozen matrix `[rows, cols]`, split by rows into parts that each fit one storage
/// binding (Qwen's 151,936 × 896 embedding does not on most adapters).
pub struct Weight {
    pub parts: Vec<Tensor>,
    pub rows: usize,
    pub cols: usize,
}

impl Weight {
    pub fn upload(gpu: &Gpu, name: &str, t: &HostTensor) -> Result<Weight> {
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            _ => return Err(Error::Weights(format!("`{name}` has shape {:?}, expected a matrix", t.shape))),
        };
        let per = ((gpu.caps.max_binding / (cols as u64 * 4)) as usize).clamp(1, rows);
        let parts = (0..rows)
            .step_by(per)
            .map(|r0| {
                let r1 = (r0 + per).min(rows);
                gpu.upload(&format!("{name}[{r0}..{r1}]"), &t.data[r0 * cols..r1 * cols], &[r1 - r0, cols])
            })
            .collect::<Result<_>>()?;
        Ok(Weight { parts, rows, cols })
    }

    /// (first row, part) pairs.
    fn row_parts(&self) -> impl Iterator<Item = (usize, &Tensor)> {
        self.parts.iter().scan(0, |r0, p| {
            let start = *r0;
            *r0 += p.shape[0];
            Some((start, p))
        })
    }

    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes()).sum()
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

pub struct LoraPair {
    pub a: Param,
    pub b: Param,
    pub r: usize,
    pub scale: f32,
}

/// A frozen linear layer `y = x·Wᵀ (+ bias)`, with an optional LoRA pair.
pub struct Linear {
    /// e.g. `model.layers.0.self_attn.q_proj`
    pub name: String,
    pub w: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
    pub din: usize,
    pub dout: usize,
}

impl Linear {
    fn lora_shape(&self, n: usize) -> Option<Lora> {
        self.lora.as_ref().map(|l| Lora { n, din: self.din, dout: self.dout, r: l.r, s: l.scale })
    }

    /// `y = x·Wᵀ (+ b) (+ s·(x·Aᵀ)·Bᵀ)`, x `[n, din]`, y `[n, dout]`; returns LoRA's
    /// `h = x·Aᵀ` `[n, r]`, saved for the backward.
    fn forward(&self, gpu: &Gpu, rec: &mut Recorder, n: usize, x: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
        for (r0, part) in self.w.row_parts() {
            let mut mm = Matmul::linear(n, self.din, part.shape[0]);
            mm.ldc = self.dout;
            mm.c_off = r0;
            k::matmul(gpu, rec, &mm, x, part, y)?;
        }
        if let Some(b) = &self.bias {
            k::add_bias(gpu, rec, n, self.dout, b, y)?;
        }
        match (&self.lora, self.lora_shape(n)) {
            (Some(l), Some(shape)) => {
                let h = gpu.zeros(&format!("{} lora h", self.name), DType::F32, &[n, l.r])?;
                k::lora_forward(gpu, rec, &shape, x, &l.a.value, &l.b.value, &h, y)?;
                Ok(Some(h))
            }
            _ => Ok(None),
        }
    }

    /// Adds `dy·W` (and LoRA's share) into dx, and LoRA's gradients into its params.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        n: usize,
        x: &Tensor,
        h: Option<&Tensor>,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<()> {
        for (r0, part) in self.w.row_parts() {
            let mut mm = Matmul::new(n, self.din, part.shape[0]).accumulate();
            mm.lda = self.dout;
            mm.a_off = r0;
            k::matmul(gpu, rec, &mm, dy, part, dx)?;
        }
        if let (Some(l), Some(shape), Some(h)) = (&self.lora, self.lora_shape(n), h) {
            let dh = gpu.zeros("lora dh", DType::F32, &[n, l.r])?;
            k::lora_backward(gpu, rec, &shape, x, &l.a.value, &l.b.value, h, dy, &dh, &l.a.grad, &l.b.grad, dx)?;
        }
        Ok(())
    }
}

/// The seven projections in a fixed order, so saved LoRA activations can be indexed.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

pub struct Layer {
    pub ln1: Tensor,
    pub ln2: Tensor,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// q, k, v, o, gate, up, down
    pub linears: Vec<Linear>,
}

/// The shape of one pass: `b` sequences of `t` new tokens, attending to `tk` keys.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub b: usize,
    pub t: usize,
}

impl Shape {
    pub fn n(&self) -> usize {
        self.b * self.t
    }
}

/// What one layer's forward saves for its backward.
struct Acts {
    x: Tensor,
    h1: Tensor,
    rstd1: Tensor,
    /// Qwen3: q and k before their per-head norm, and the norms' rstd.
    q_pre: Option<(Tensor, Tensor, Tensor, Tensor)>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    lse: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    rstd2: Tensor,
    g: Tensor,
    u: Tensor,
    m: Tensor,
    out: Tensor,
    lora_h: Vec<Option<Tensor>>,
}

/// The inputs of a pass, on the GPU.
pub struct Inputs {
    pub shape: Shape,
    /// token ids `[N]`, as on the host (the embedding backward groups them)
    pub ids_host: Vec<u32>,
    pub ids: Tensor,
    /// positions `[N]` (restart at each packed example)
    pub pos: Tensor,
    /// segment ids `[N]`: tokens attend only within their segment
    pub seg: Tensor,
}

impl Inputs {
    pub fn new(gpu: &Gpu, shape: Shape, ids: &[u32], pos: &[u32], seg: &[u32]) -> Result<Inputs> {
        let n = shape.n();
        if ids.len() != n || pos.len() != n || seg.len() != n {
            return Err(Error::Shape(format!("inputs: {} ids, {} positions, {} segments for {n} tokens", ids.len(), pos.len(), seg.len())));
        }
        Ok(Inputs {
            shape,
            ids_host: ids.to_vec(),
            ids: gpu.upload("ids", ids, &[n])?,
            pos: gpu.upload("positions", pos, &[n])?,
            seg: gpu.upload("segments", seg, &[n])?,
        })
    }

    /// Unpacked sequences: positions 0..T, one segment each.
    pub fn sequences(gpu: &Gpu, shape: Shape, ids: &[u32]) -> Result<Inputs> {
        let pos: Vec<u32> = (0..shape.n()).map(|i| (i % shape.t) as u32).collect();
        Self::new(gpu, shape, ids, &pos, &vec![0; shape.n()])
    }
}

/// A KV cache for decoding one sequence: per layer `[max_t, KV]` keys and values.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub seg: Tensor,
    pub len: usize,
    pub max_t: usize,
}

pub struct Model {
    pub cfg: Config,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when tied to the embedding.
    pub lm_head: Option<Weight>,
    pub inv_freq: Tensor,
    pub lora: Option<LoraConfig>,
    /// Save only each layer's input and recompute the rest in the backward.
    pub grad_checkpoint: bool,
}

fn take<'a>(w: &'a TensorMap, name: &str, shape: &[usize]) -> Result<&'a HostTensor> {
    let t = w.get(name).ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))?;
    if t.shape != shape {
        return Err(Error::Weights(format!("tensor `{name}` has shape {:?}, config.json implies {shape:?}", t.shape)));
    }
    Ok(t)
}

impl Model {
    /// Upload the weights; with `lora`, attach fresh LoRA pairs initialised as PEFT
    /// does (A Kaiming-uniform with a = √5, B zero) from `seed`.
    pub fn load(gpu: &Gpu, cfg: Config, w: &TensorMap, lora: Option<LoraConfig>, seed: u64) -> Result<Model> {
        let (c, q, kv, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
        if let Some(l) = &lora {
            if l.r == 0 {
                return Err(Error::Config("LoRA rank must be at least 1".into()));
            }
            if let Some(t) = l.targets.iter().find(|t| !LoraConfig::ALL_TARGETS.contains(&t.as_str())) {
                return Err(Error::Config(format!(
                    "LoRA target `{t}` is not a projection of this model ({})",
                    LoraConfig::ALL_TARGETS.join(", ")
                )));
            }
        }
        let mut rng = Rng::new(seed);
        let vec = |name: &str, n: usize| -> Result<Tensor> { gpu.upload(name, &take(w, name, &[n])?.data, &[n]) };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(7);
            for (short, module, din, dout) in [
                ("q_proj", "self_attn", c, q),
                ("k_proj", "self_attn", c, kv),
                ("v_proj", "self_attn", c, kv),
                ("o_proj", "self_attn", q, c),
                ("gate_proj", "mlp", c, inter),
                ("up_proj", "mlp", c, inter),
                ("down_proj", "mlp", inter, c),
            ] {
                let name = format!("{p}.{module}.{short}");
                let weight = Weight::upload(gpu, &format!("{name}.weight"), take(w, &format!("{name}.weight"), &[dout, din])?)?;
                let bias = if cfg.qkv_bias && matches!(short, "q_proj" | "k_proj" | "v_proj") {
                    Some(vec(&format!("{name}.bias"), dout)?)
                } else {
                    None
                };
                let lora = match &lora {
                    Some(l) if l.targets.iter().any(|t| t == short) => {
                        let bound = 1.0 / (din as f32).sqrt();
                        let a = rng.vec(l.r * din, bound);
                        let peft = format!("base_model.model.{name}");
                        Some(LoraPair {
                            a: Param::new(gpu, format!("{peft}.lora_A.weight"), &a, &[l.r, din])?,
                            b: Param::new(gpu, format!("{peft}.lora_B.weight"), &vec![0.0; dout * l.r], &[dout, l.r])?,
                            r: l.r,
                            scale: l.scale(),
                        })
                    }
                    _ => None,
                };
                linears.push(Linear { name, w: weight, bias, lora, din, dout });
            }
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(vec(&format!("{p}.self_attn.q_norm.weight"), cfg.head_dim)?),
                    Some(vec(&format!("{p}.self_attn.k_norm.weight"), cfg.head_dim)?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                ln1: vec(&format!("{p}.input_layernorm.weight"), c)?,
                ln2: vec(&format!("{p}.post_attention_layernorm.weight"), c)?,
                q_norm,
                k_norm,
                linears,
            });
        }
        let embed = Weight::upload(gpu, "model.embed_tokens.weight", take(w, "model.embed_tokens.weight", &[cfg.vocab, c])?)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Weight::upload(gpu, "lm_head.weight", take(w, "lm_head.weight", &[cfg.vocab, c])?)?)
        };
        let inv_freq = gpu.upload("rope inv_freq", &cfg.inv_freq(), &[cfg.head_dim / 2])?;
        Ok(Model { norm: vec("model.norm.weight", c)?, embed, layers, lm_head, inv_freq, lora, grad_checkpoint: false, cfg })
    }

    /// Every trainable parameter (LoRA A and B of each targeted projection).
    pub fn params(&self) -> Vec<&Param> {
        self.layers
            .iter()
            .flat_map(|l| l.linears.iter())
            .filter_map(|lin| lin.lora.as_ref())
            .flat_map(|l| [&l.a, &l.b])
            .collect()
    }

    /// Set LoRA weights from PEFT-named tensors (`….lora_A.weight`, `….lora_B.weight`);
    /// every pair the model has must be present with the right shape.
    pub fn set_params(&self, gpu: &Gpu, tensors: &TensorMap) -> Result<()> {
        for p in self.params() {
            let t = tensors.get(&p.name).ok_or_else(|| Error::Weights(format!("adapter tensor `{}` is missing", p.name)))?;
            if t.shape != p.shape {
                return Err(Error::Weights(format!("adapter tensor `{}` has shape {:?}, expected {:?}", p.name, t.shape, p.shape)));
            }
            gpu.write(&p.value, &t.data)?;
        }
        Ok(())
    }

    fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn attention(&self, shape: Shape) -> Attention {
        Attention::new(shape.b, shape.t, self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim)
    }

    fn zeros(gpu: &Gpu, label: &str, shape: &[usize]) -> Result<Tensor> {
        gpu.zeros(label, DType::F32, shape)
    }

    /// One decoder layer. With `cache`, the new keys and values are appended to it
    /// and the queries attend to everything cached (decoding, B = 1).
    fn layer_forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        li: usize,
        inp: &Inputs,
        x: Tensor,
        cache: Option<&KvCache>,
    ) -> Result<Acts> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let shape = inp.shape;
        let n = shape.n();
        let (c, qd, kvd, hs) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let lin = &layer.linears;
        let h1 = Self::zeros(gpu, "h1", &[n, c])?;
        let rstd1 = Self::zeros(gpu, "rstd1", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x, &layer.ln1, &h1, &rstd1)?;
        let q = Self::zeros(gpu, "q", &[n, qd])?;
        let kk = Self::zeros(gpu, "k", &[n, kvd])?;
        let v = Self::zeros(gpu, "v", &[n, kvd])?;
        let mut lora_h = vec![None, None, None, None, None, None, None];
        let q_pre = if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (q_pre, k_pre) = (Self::zeros(gpu, "q_pre", &[n, qd])?, Self::zeros(gpu, "k_pre", &[n, kvd])?);
            let (rq, rk) = (Self::zeros(gpu, "q_rstd", &[n * cfg.heads])?, Self::zeros(gpu, "k_rstd", &[n * cfg.kv_heads])?);
            lora_h[Q] = lin[Q].forward(gpu, rec, n, &h1, &q_pre)?;
            lora_h[K] = lin[K].forward(gpu, rec, n, &h1, &k_pre)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.heads, hs, cfg.eps, &q_pre, qn, &q, &rq)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.kv_heads, hs, cfg.eps, &k_pre, kn, &kk, &rk)?;
            Some((q_pre, rq, k_pre, rk))
        } else {
            lora_h[Q] = lin[Q].forward(gpu, rec, n, &h1, &q)?;
            lora_h[K] = lin[K].forward(gpu, rec, n, &h1, &kk)?;
            None
        };
        lora_h[V] = lin[V].forward(gpu, rec, n, &h1, &v)?;
        k::rope_forward(gpu, rec, n, cfg.heads, hs, &q, &inp.pos, &self.inv_freq)?;
        k::rope_forward(gpu, rec, n, cfg.kv_heads, hs, &kk, &inp.pos, &self.inv_freq)?;
        let att = Self::zeros(gpu, "attention out", &[n, qd])?;
        let lse = Self::zeros(gpu, "lse", &[shape.b * cfg.heads * shape.t])?;
        match cache {
            None => k::attention_forward(gpu, rec, &self.attention(shape), &q, &kk, &v, &inp.seg, &att, &lse)?,
            Some(cache) => {
                let bytes = (kvd * 4) as u64;
                let at = self.attention(shape).cached(cache.len + shape.t);
                rec.encoder.copy_buffer_to_buffer(&kk.buffer, 0, &cache.k[li].buffer, cache.len as u64 * bytes, kk.bytes());
                rec.encoder.copy_buffer_to_buffer(&v.buffer, 0, &cache.v[li].buffer, cache.len as u64 * bytes, v.bytes());
                k::attention_forward(gpu, rec, &at, &q, &cache.k[li], &cache.v[li], &cache.seg, &att, &lse)?;
            }
        }
        let a = Self::zeros(gpu, "o_proj out", &[n, c])?;
        lora_h[O] = lin[O].forward(gpu, rec, n, &att, &a)?;
        let x_mid = Self::zeros(gpu, "x_mid", &[n, c])?;
        k::add(gpu, rec, n * c, &x, &a, &x_mid)?;
        let h2 = Self::zeros(gpu, "h2", &[n, c])?;
        let rstd2 = Self::zeros(gpu, "rstd2", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x_mid, &layer.ln2, &h2, &rstd2)?;
        let inter = cfg.intermediate;
        let (g, u, m) = (Self::zeros(gpu, "gate", &[n, inter])?, Self::zeros(gpu, "up", &[n, inter])?, Self::zeros(gpu, "swiglu", &[n, inter])?);
        lora_h[GATE] = lin[GATE].forward(gpu, rec, n, &h2, &g)?;
        lora_h[UP] = lin[UP].forward(gpu, rec, n, &h2, &u)?;
        k::swiglu_forward(gpu, rec, n * inter, &g, &u, &m)?;
        let d = Self::zeros(gpu, "down out", &[n, c])?;
        lora_h[DOWN] = lin[DOWN].forward(gpu, rec, n, &m, &d)?;
        let out = Self::zeros(gpu, "layer out", &[n, c])?;
        k::add(gpu, rec, n * c, &x_mid, &d, &out)?;
        Ok(Acts { x, h1, rstd1, q_pre, q, k: kk, v, att, lse, x_mid, h2, rstd2, g, u, m, out, lora_h })
    }

    /// The gradient of one layer: `dres` holds d(loss)/d(layer output) and becomes
    /// d(loss)/d(layer input); LoRA gradients are added into the params.
    fn layer_backward(&self, gpu: &Gpu, rec: &mut Recorder, li: usize, inp: &Inputs, a: &Acts, dres: &Tensor) -> Result<()> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let shape = inp.shape;
        let n = shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        let h = |i: usize| a.lora_h[i].as_ref();
        // Frozen norm weights: their gradients go to a scratch buffer.
        let dw_c = Self::zeros(gpu, "norm dw scratch", &[c])?;
        // MLP: out = x_mid + down(silu(gate(h2)) · up(h2)), h2 = norm(x_mid)
        let dm = Self::zeros(gpu, "dswiglu", &[n, inter])?;
        lin[DOWN].backward(gpu, rec, n, &a.m, h(DOWN), dres, &dm)?;
        let (dg, du) = (Self::zeros(gpu, "dgate", &[n, inter])?, Self::zeros(gpu, "dup", &[n, inter])?);
        k::swiglu_backward(gpu, rec, n * inter, &a.g, &a.u, &dm, &dg, &du)?;
        let dh2 = Self::zeros(gpu, "dh2", &[n, c])?;
        lin[GATE].backward(gpu, rec, n, &a.h2, h(GATE), &dg, &dh2)?;
        lin[UP].backward(gpu, rec, n, &a.h2, h(UP), &du, &dh2)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x_mid, &layer.ln2, &a.rstd2, &dh2, dres, &dw_c)?;
        // Attention: x_mid = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
        let datt = Self::zeros(gpu, "datt", &[n, qd])?;
        lin[O].backward(gpu, rec, n, &a.att, h(O), dres, &datt)?;
        let (dq, dk, dv) = (Self::zeros(gpu, "dq", &[n, qd])?, Self::zeros(gpu, "dk", &[n, kvd])?, Self::zeros(gpu, "dv", &[n, kvd])?);
        k::attention_backward(gpu, rec, &self.attention(shape), &a.q, &a.k, &a.v, &inp.seg, &a.att, &a.lse, &datt, &dq, &dk, &dv)?;
        k::rope_backward(gpu, rec, n, cfg.heads, hs, &dq, &inp.pos, &self.inv_freq)?;
        k::rope_backward(gpu, rec, n, cfg.kv_heads, hs, &dk, &inp.pos, &self.inv_freq)?;
        let dh1 = Self::zeros(gpu, "dh1", &[n, c])?;
        if let (Some((q_pre, rq, k_pre, rk)), Some(qn), Some(kn)) = (&a.q_pre, &layer.q_norm, &layer.k_norm) {
            let dw_hs = Self::zeros(gpu, "qk norm dw scratch", &[hs])?;
            let (dq_pre, dk_pre) = (Self::zeros(gpu, "dq_pre", &[n, qd])?, Self::zeros(gpu, "dk_pre", &[n, kvd])?);
            k::rmsnorm_backward(gpu, rec, n * cfg.heads, hs, q_pre, qn, rq, &dq, &dq_pre, &dw_hs)?;
            k::rmsnorm_backward(gpu, rec, n * cfg.kv_heads, hs, k_pre, kn, rk, &dk, &dk_pre, &dw_hs)?;
            lin[Q].backward(gpu, rec, n, &a.h1, h(Q), &dq_pre, &dh1)?;
            lin[K].backward(gpu, rec, n, &a.h1, h(K), &dk_pre, &dh1)?;
        } else {
            lin[Q].backward(gpu, rec, n, &a.h1, h(Q), &dq, &dh1)?;
            lin[K].backward(gpu, rec, n, &a.h1, h(K), &dk, &dh1)?;
        }
        lin[V].backward(gpu, rec, n, &a.h1, h(V), &dv, &dh1)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x, &layer.ln1, &a.rstd1, &dh1, dres, &dw_c)
    }

    fn embed(&self, gpu: &Gpu, rec: &mut Recorder, inp: &Inputs) -> Result<Tensor> {
        let n = inp.shape.n();
        if let Some(bad) = inp.ids_host.iter().find(|&&id| id as usize >= self.cfg.vocab) {
            return Err(Error::Shape(format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab)));
        }
        let x = Self::zeros(gpu, "embeddings", &[n, self.cfg.hidden])?;
        let parts: Vec<&Tensor> = self.embed.parts.iter().collect();
        k::embedding_forward(gpu, rec, n, self.cfg.hidden, self.cfg.vocab, &inp.ids, &parts, &x)?;
        Ok(x)
    }

    /// Rows of logits per chunk: each `[rows, V]` chunk fits one binding and 64 MiB.
    fn head_chunk_rows(&self, gpu: &Gpu) -> usize {
        let row = (self.cfg.vocab * 4) as u64;
        ((gpu.caps.max_binding.min(64 << 20) / row) as usize).max(1)
    }

    /// logits `[rows, V]` = hf[r0..r0+rows] · headᵀ.
    fn head_forward(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, r0: usize, rows: usize) -> Result<Tensor> {
        let (c, vocab) = (self.cfg.hidden, self.cfg.vocab);
        let logits = Self::zeros(gpu, "logits", &[rows, vocab])?;
        for (p0, part) in self.head().row_parts() {
            let mut mm = Matmul::linear(rows, c, part.shape[0]);
            (mm.a_off, mm.ldc, mm.c_off) = (r0 * c, vocab, p0);
            k::matmul(gpu, rec, &mm, hf, part, &logits)?;
        }
        Ok(logits)
    }

    /// Final norm of the last layer's output: (hf, rstd).
    fn final_norm(&self, gpu: &Gpu, rec: &mut Recorder, n: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let hf = Self::zeros(gpu, "final norm", &[n, self.cfg.hidden])?;
        let rstd = Self::zeros(gpu, "final rstd", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, self.cfg.hidden, self.cfg.eps, x, &self.norm, &hf, &rstd)?;
        Ok((hf, rstd))
    }

    /// All logits `[N, V]` of a batch, read back (evaluation and tests).
    pub async fn logits(&self, gpu: &Gpu, inp: &Inputs) -> Result<Vec<f32>> {
        let n = inp.shape.n();
        let mut rec = gpu.recorder("forward");
        let mut x = self.embed(gpu, &mut rec, inp)?;
        for li in 0..self.layers.len() {
            x = self.layer_forward(gpu, &mut rec, li, inp, x, None)?.out;
        }
        let (hf, _) = self.final_norm(gpu, &mut rec, n, &x)?;
        let mut chunks = Vec::new();
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            chunks.push(self.head_forward(gpu, &mut rec, &hf, r0, per.min(n - r0))?);
        }
        gpu.submit(rec);
        let mut out = Vec::with_capacity(n * self.cfg.vocab);
        for c in &chunks {
            out.extend(gpu.read::<f32>(c).await?);
        }
        Ok(out)
    }

    /// Forward and backward of the mean cross-entropy: `targets[i]` is the token
    /// row i should predict (negative: not trained), and the loss is
    /// Σ losses · `scale` (scale = 1 / trained tokens in the effective batch).
    /// Gradients are added into the params' `grad`; returns the loss tensor `[1]`
    /// (read it back with `Gpu::read`). The work is recorded and submitted.
    pub fn forward_backward(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32) -> Result<Tensor> {
        let shape = inp.shape;
        let n = shape.n();
        let (c, vocab) = (self.cfg.hidden, self.cfg.vocab);
        if targets.len() != n {
            return Err(Error::Shape(format!("{} targets for {n} tokens", targets.len())));
        }
        let mut rec = gpu.recorder("forward");
        let mut x = self.embed(gpu, &mut rec, inp)?;
        let mut saved: Vec<Acts> = Vec::new();
        let mut inputs: Vec<Tensor> = Vec::new();
        for li in 0..self.layers.len() {
            let acts = self.layer_forward(gpu, &mut rec, li, inp, x, None)?;
            x = acts.out.clone();
            if self.grad_checkpoint {
                inputs.push(acts.x);
                // Everything else is dropped: the backward recomputes it.
                gpu.submit(std::mem::replace(&mut rec, gpu.recorder("forward")));
            } else {
                saved.push(acts);
            }
        }
        let (hf, rstd_f) = self.final_norm(gpu, &mut rec, n, &x)?;
        // Head and loss in chunks of tokens: logits never exist whole.
        let loss = Self::zeros(gpu, "loss", &[1])?;
        let dhf = Self::zeros(gpu, "dhf", &[n, c])?;
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            let rows = per.min(n - r0);
            let logits = self.head_forward(gpu, &mut rec, &hf, r0, rows)?;
            let t = gpu.upload("targets", &targets[r0..r0 + rows], &[rows])?;
            let (losses, lse, part) = (Self::zeros(gpu, "losses", &[rows])?, Self::zeros(gpu, "lse", &[rows])?, Self::zeros(gpu, "loss part", &[1])?);
            k::cross_entropy_forward(gpu, &mut rec, rows, vocab, scale, &logits, &t, &losses, &lse, &part)?;
            k::axpy(gpu, &mut rec, 1, 1.0, &part, &loss)?;
            k::cross_entropy_backward(gpu, &mut rec, rows, vocab, scale, &logits, &t, &lse)?;
            for (p0, w) in self.head().row_parts() {
                let mut mm = Matmul::new(rows, c, w.shape[0]).accumulate();
                (mm.lda, mm.a_off, mm.c_off) = (vocab, p0, r0 * c);
                k::matmul(gpu, &mut rec, &mm, &logits, w, &dhf)?;
            }
            // Keep the command buffer (and its logits) small.
            gpu.submit(std::mem::replace(&mut rec, gpu.recorder("head")));
        }
        let dres = Self::zeros(gpu, "dres", &[n, c])?;
        let dw_c = Self::zeros(gpu, "norm dw scratch", &[c])?;
        k::rmsnorm_backward(gpu, &mut rec, n, c, &x, &self.norm, &rstd_f, &dhf, &dres, &dw_c)?;
        for li in (0..self.layers.len()).rev() {
            if self.grad_checkpoint {
                let x_in = inputs.pop().expect("one saved input per layer");
                let acts = self.layer_forward(gpu, &mut rec, li, inp, x_in, None)?;
                self.layer_backward(gpu, &mut rec, li, inp, &acts, &dres)?;
                gpu.submit(std::mem::replace(&mut rec, gpu.recorder("backward")));
            } else {
                let acts = saved.pop().expect("one saved layer per layer");
                self.layer_backward(gpu, &mut rec, li, inp, &acts, &dres)?;
            }
        }
        gpu.submit(rec);
        Ok(loss)
    }

    /// Zero every parameter gradient.
    pub fn zero_grads(&self, gpu: &Gpu) {
        let mut rec = gpu.recorder("zero grads");
        for p in self.params() {
            rec.encoder.clear_buffer(&p.grad.buffer, 0, None);
        }
        gpu.submit(rec);
    }

    /// Clip by the global gradient norm and take one AdamW step (1-based `step`).
    /// Returns the `[2]` tensor holding (norm before clipping, clip factor).
    pub fn optimizer_step(&self, gpu: &Gpu, opt: &k::AdamW, step: u64, max_grad_norm: f32) -> Result<Tensor> {
        let params = self.params();
        let norm = gpu.zeros("grad norm", DType::F32, &[2])?;
        let mut rec = gpu.recorder("optimizer");
        let grads: Vec<&Tensor> = params.iter().map(|p| &p.grad).collect();
        k::grad_norm(gpu, &mut rec, &grads, max_grad_norm, &norm)?;
        for p in &params {
            k::adamw_step(gpu, &mut rec, opt, step, &p.value, &p.grad, &p.m, &p.v, &norm)?;
        }
        gpu.submit(rec);
        Ok(norm)
    }

    /// Bytes this model holds on the GPU now (weights, LoRA params with grads and moments).
    pub fn resident_bytes(&self) -> u64 {
        let weights: u64 = self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, |w| w.bytes())
            + self.norm.bytes()
            + self.inv_freq.bytes()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.ln1.bytes()
                        + l.ln2.bytes()
                        + l.q_norm.as_ref().map_or(0, |t| t.bytes())
                        + l.k_norm.as_ref().map_or(0, |t| t.bytes())
                        + l.linears.iter().map(|x| x.w.bytes() + x.bias.as_ref().map_or(0, |b| b.bytes())).sum::<u64>()
                })
                .sum::<u64>();
        weights + self.params().iter().map(|p| 4 * p.value.bytes()).sum::<u64>()
    }

    /// A KV cache for one sequence of up to `max_t` tokens.
    pub fn kv_cache(&self, gpu: &Gpu, max_t: usize) -> Result<KvCache> {
        let kvd = self.cfg.kv_dim();
        let mk = |l: &str| -> Result<Vec<Tensor>> { (0..self.cfg.layers).map(|_| Self::zeros(gpu, l, &[max_t, kvd])).collect() };
        Ok(KvCache { k: mk("k cache")?, v: mk("v cache")?, seg: gpu.zeros("cache segments", DType::U32, &[max_t])?, len: 0, max_t })
    }

    /// Run `ids` (one sequence, continuing the cache) and return the logits `[V]` of
    /// the last token.
    pub async fn decode(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len();
        if cache.len + t > cache.max_t {
            return Err(Error::Shape(format!("KV cache of {} tokens is full ({} + {t})", cache.max_t, cache.len)));
        }
        let shape = Shape { b: 1, t };
        let pos: Vec<u32> = (cache.len..cache.len + t).map(|p| p as u32).collect();
        let inp = Inputs::new(gpu, shape, ids, &pos, &vec![0; t])?;
        let mut rec = gpu.recorder("decode");
        let mut x = self.embed(gpu, &mut rec, &inp)?;
        for li in 0..self.layers.len() {
            x = self.layer_forward(gpu, &mut rec, li, &inp, x, Some(cache))?.out;
        }
        let (hf, _) = self.final_norm(gpu, &mut rec, t, &x)?;
        let logits = self.head_forward(gpu, &mut rec, &hf, t - 1, 1)?;
        gpu.submit(rec);
        cache.len += t;
        gpu.read::<f32>(&logits).await
    }
}

