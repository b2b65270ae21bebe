//! Llama, Qwen2 and Qwen3 on the GPU: weights, LoRA, and the forward and backward
//! written out layer by layer (no autodiff graph). `backward` mirrors `forward`.
//!
//! Shapes: N = B·T token rows, C hidden, Q = NH·HS, KV = NKV·HS, I intermediate.

pub mod config;
pub mod generate;
pub mod memory;
pub mod source;
pub mod weights;

use crate::rng::Rng;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::kernels::{self as k, Attention, Lora, Matmul};

pub use config::{Arch, Config};
pub use weights::{Checkpoint, HostTensor, TensorMap, Tensors};

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
    fn new(gpu: &Gpu, name: String, data: &[f32], shape: &[usize], trainable: bool) -> Result<Param> {
        let value = gpu.upload(&name, data, shape)?;
        Self::holding(gpu, name, value, shape, trainable)
    }

    /// `value` as a param, with a gradient and moments when `trainable`.
    fn holding(gpu: &Gpu, name: String, value: Tensor, shape: &[usize], trainable: bool) -> Result<Param> {
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
    fn read(gpu: &Gpu, label: String, w: &dyn Tensors, name: &str, r0: usize, shape: &[usize], trainable: bool) -> Result<Param> {
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
    fn row_parts(&self) -> impl Iterator<Item = (usize, &Param)> {
        self.parts.iter().scan(0, |r0, p| {
            let start = *r0;
            *r0 += p.shape[0];
            Some((start, p))
        })
    }

    fn values(&self) -> Vec<&Tensor> {
        self.parts.iter().map(|p| &p.value).collect()
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

/// What a LoRA pair's forward saves: `h = x'·Aᵀ` and, with dropout, x' = dropout(x).
struct LoraSaved {
    h: Tensor,
    xd: Option<Tensor>,
}

impl Linear {
    fn lora_shape(&self, n: usize, l: &LoraPair) -> Lora {
        Lora { n, din: self.din, dout: self.dout, r: l.r, s: l.scale }
    }

    /// `y = x·Wᵀ (+ b) (+ s·(x'·Aᵀ)·Bᵀ)`, x `[n, din]`, y `[n, dout]`, where x' is x
    /// after LoRA dropout when `dropout_seed` is given (training).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        n: usize,
        x: &Tensor,
        y: &Tensor,
        dropout_seed: Option<u32>,
        use_lora: bool,
    ) -> Result<Option<LoraSaved>> {
        for (r0, part) in self.w.row_parts() {
            let mut mm = Matmul::linear(n, self.din, part.shape[0]);
            mm.ldc = self.dout;
            mm.c_off = r0;
            k::matmul(gpu, rec, &mm, x, &part.value, y)?;
        }
        if let Some(b) = &self.bias {
            k::add_bias(gpu, rec, n, self.dout, &b.value, y)?;
        }
        let Some(l) = self.lora.as_ref().filter(|_| use_lora) else { return Ok(None) };
        let xd = match dropout_seed {
            Some(seed) if l.dropout > 0.0 => {
                let xd = gpu.temp(rec, "lora dropout x", DType::F32, &[n, self.din])?;
                k::dropout(gpu, rec, n * self.din, l.dropout, seed, x, &xd)?;
                Some(xd)
            }
            _ => None,
        };
        let h = gpu.temp(rec, &format!("{} lora h", self.name), DType::F32, &[n, l.r])?;
        k::lora_forward(gpu, rec, &self.lora_shape(n, l), xd.as_ref().unwrap_or(x), &l.a.value, &l.b.value, &h, y)?;
        Ok(Some(LoraSaved { h, xd }))
    }

    /// Adds `dy·W` (and LoRA's share) into dx, and the gradients of whatever is
    /// trainable (W, bias, LoRA A and B) into their params.
    #[allow(clippy::too_many_arguments)]
    fn backward(
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
        for (r0, part) in self.w.row_parts() {
            let rows = part.shape[0];
            let mut mm = Matmul::new(n, self.din, rows).accumulate();
            (mm.lda, mm.a_off) = (self.dout, r0);
            k::matmul(gpu, rec, &mm, dy, &part.value, dx)?;
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
        if let (Some(l), Some(saved)) = (&self.lora, saved) {
            let (da, db) = (l.a.grad().expect("LoRA A trains"), l.b.grad().expect("LoRA B trains"));
            let dh = gpu.temp(rec, "lora dh", DType::F32, &[n, l.r])?;
            let shape = self.lora_shape(n, l);
            match (&saved.xd, dropout_seed) {
                (Some(xd), Some(seed)) => {
                    // Through the dropout: dx += dropout(dx') with the forward's mask.
                    let dxd = gpu.temp(rec, "lora dropout dx", DType::F32, &[n, self.din])?;
                    k::lora_backward(gpu, rec, &shape, xd, &l.a.value, &l.b.value, &saved.h, dy, &dh, da, db, &dxd)?;
                    k::dropout(gpu, rec, n * self.din, l.dropout, seed, &dxd, dx)?;
                }
                _ => k::lora_backward(gpu, rec, &shape, x, &l.a.value, &l.b.value, &saved.h, dy, &dh, da, db, dx)?,
            }
        }
        Ok(())
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        self.w.parts.iter().chain(&self.bias).chain(self.lora.iter().flat_map(|l| [&l.a, &l.b]))
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
    pub ln1: Param,
    pub ln2: Param,
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
    /// q, k, v, o, gate, up, down
    pub linears: Vec<Linear>,
}

/// The shape of one pass: `b` sequences of `t` tokens.
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
    lora: Vec<Option<LoraSaved>>,
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
    /// Training: the seed of this pass's LoRA dropout masks. None: no dropout.
    pub dropout_seed: Option<u32>,
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
            ids: gpu.upload_temp("ids", ids, &[n])?,
            pos: gpu.upload_temp("positions", pos, &[n])?,
            seg: gpu.upload_temp("segments", seg, &[n])?,
            dropout_seed: None,
        })
    }

    /// Unpacked sequences: positions 0..T, one segment each.
    pub fn sequences(gpu: &Gpu, shape: Shape, ids: &[u32]) -> Result<Inputs> {
        let pos: Vec<u32> = (0..shape.n()).map(|i| (i % shape.t) as u32).collect();
        Self::new(gpu, shape, ids, &pos, &vec![0; shape.n()])
    }

    /// The dropout seed of projection `idx` of layer `li`.
    fn seed(&self, li: usize, idx: usize) -> Option<u32> {
        self.dropout_seed.map(|s| crate::rng::hash(s ^ crate::rng::hash((li * 7 + idx) as u32)))
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
    pub norm: Param,
    /// None when tied to the embedding.
    pub lm_head: Option<Weight>,
    pub inv_freq: Tensor,
    pub tuning: Tuning,
    /// Save only each layer's input and recompute the rest in the backward.
    pub grad_checkpoint: bool,
    /// False runs the base model alone (LoRA pairs skipped), for side-by-side answers.
    pub adapter_enabled: bool,
}

/// Check that `w` has `name` with the shape the config implies.
fn expect(w: &dyn Tensors, name: &str, shape: &[usize]) -> Result<()> {
    let got = w.shape(name).ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))?;
    if got != shape {
        return Err(Error::Weights(format!("tensor `{name}` has shape {got:?}, config.json implies {shape:?}")));
    }
    Ok(())
}

fn zeros(gpu: &Gpu, rec: &mut Recorder, label: &str, shape: &[usize]) -> Result<Tensor> {
    gpu.temp(rec, label, DType::F32, shape)
}

impl Model {
    /// Upload the weights. With LoRA, fresh pairs are initialised as PEFT does (A
    /// Kaiming-uniform with a = √5, B zero) from `seed`; with full tuning every weight
    /// gets a gradient and moments. Each weight is read from `w`, converted and
    /// uploaded a chunk at a time (see `UPLOAD_CHUNK`).
    pub fn load(gpu: &Gpu, cfg: Config, w: &dyn Tensors, tuning: Tuning, seed: u64) -> Result<Model> {
        let c = cfg.hidden;
        if let Tuning::Lora(l) = &tuning {
            if l.r == 0 {
                return Err(Error::Config("LoRA rank must be at least 1".into()));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(Error::Config(format!("LoRA dropout {} must be in [0, 1)", l.dropout)));
            }
            if let Some(t) = l.targets.iter().find(|t| !LoraConfig::ALL_TARGETS.contains(&t.as_str())) {
                return Err(Error::Config(format!(
                    "LoRA target `{t}` is not a projection of this model ({})",
                    LoraConfig::ALL_TARGETS.join(", ")
                )));
            }
        }
        let full = tuning == Tuning::Full;
        let mut rng = Rng::new(seed);
        let vec = |name: &str, n: usize| -> Result<Param> {
            expect(w, name, &[n])?;
            Param::read(gpu, name.to_string(), w, name, 0, &[n], full)
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Weight> {
            expect(w, name, &[rows, cols])?;
            Weight::upload(gpu, name, w, rows, cols, full)
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(7);
            for (short, module, din, dout) in cfg.projections() {
                let name = format!("{p}.{module}.{short}");
                let wname = format!("{name}.weight");
                let weight = matrix(&wname, dout, din)?;
                let bias = if cfg.qkv_bias && matches!(short, "q_proj" | "k_proj" | "v_proj") {
                    Some(vec(&format!("{name}.bias"), dout)?)
                } else {
                    None
                };
                let lora = match &tuning {
                    Tuning::Lora(l) if l.targets.iter().any(|t| t == short) => {
                        let bound = 1.0 / (din as f32).sqrt();
                        let a = rng.vec(l.r * din, bound);
                        let peft = format!("base_model.model.{name}");
                        Some(LoraPair {
                            a: Param::new(gpu, format!("{peft}.lora_A.weight"), &a, &[l.r, din], true)?,
                            b: Param::new(gpu, format!("{peft}.lora_B.weight"), &vec![0.0; dout * l.r], &[dout, l.r], true)?,
                            r: l.r,
                            scale: l.scale(),
                            dropout: l.dropout,
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
        let embed = matrix("model.embed_tokens.weight", cfg.vocab, c)?;
        let lm_head = if cfg.tie_embeddings { None } else { Some(matrix("lm_head.weight", cfg.vocab, c)?) };
        let inv_freq = gpu.upload("rope inv_freq", &cfg.inv_freq(), &[cfg.head_dim / 2])?;
        Ok(Model { norm: vec("model.norm.weight", c)?, embed, layers, lm_head, inv_freq, tuning, grad_checkpoint: false, adapter_enabled: true, cfg })
    }

    /// Every tensor the model holds, frozen or not.
    pub fn all_params(&self) -> Vec<&Param> {
        let mut out: Vec<&Param> = self.embed.parts.iter().collect();
        for l in &self.layers {
            out.push(&l.ln1);
            out.push(&l.ln2);
            out.extend(l.q_norm.iter().chain(&l.k_norm));
            out.extend(l.linears.iter().flat_map(|x| x.params()));
        }
        out.push(&self.norm);
        out.extend(self.lm_head.iter().flat_map(|w| &w.parts));
        out
    }

    /// Every base weight by its Hugging Face name, with the params that hold it (the
    /// row-parts of a split matrix, in order).
    pub fn weights_by_name(&self) -> Vec<(String, Vec<&Param>)> {
        fn one(p: &Param) -> (String, Vec<&Param>) {
            (p.name.clone(), vec![p])
        }
        fn matrix(w: &Weight) -> (String, Vec<&Param>) {
            (w.name.clone(), w.parts.iter().collect())
        }
        let mut out = vec![matrix(&self.embed)];
        for l in &self.layers {
            out.push(one(&l.ln1));
            out.push(one(&l.ln2));
            out.extend(l.q_norm.iter().chain(&l.k_norm).map(one));
            for lin in &l.linears {
                out.push(matrix(&lin.w));
                out.extend(lin.bias.iter().map(one));
            }
        }
        out.push(one(&self.norm));
        out.extend(self.lm_head.iter().map(matrix));
        out
    }

    /// Every trainable parameter: the LoRA pairs, or every weight in full tuning.
    pub fn params(&self) -> Vec<&Param> {
        self.all_params().into_iter().filter(|p| p.train.is_some()).collect()
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

    /// One decoder layer. With `cache`, the new keys and values are appended to it
    /// and the queries attend to everything cached (decoding, B = 1). LoRA dropout
    /// applies only when `train`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        li: usize,
        inp: &Inputs,
        x: Tensor,
        cache: Option<&KvCache>,
        train: bool,
    ) -> Result<Acts> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let shape = inp.shape;
        let n = shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        let seed = |i: usize| if train { inp.seed(li, i) } else { None };
        let h1 = zeros(gpu, rec, "h1", &[n, c])?;
        let rstd1 = zeros(gpu, rec, "rstd1", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x, &layer.ln1.value, &h1, &rstd1)?;
        let (q, kk, v) = (zeros(gpu, rec, "q", &[n, qd])?, zeros(gpu, rec, "k", &[n, kvd])?, zeros(gpu, rec, "v", &[n, kvd])?);
        let mut lora: Vec<Option<LoraSaved>> = (0..7).map(|_| None).collect();
        let q_pre = if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (q_pre, k_pre) = (zeros(gpu, rec, "q_pre", &[n, qd])?, zeros(gpu, rec, "k_pre", &[n, kvd])?);
            let (rq, rk) = (zeros(gpu, rec, "q_rstd", &[n * cfg.heads])?, zeros(gpu, rec, "k_rstd", &[n * cfg.kv_heads])?);
            lora[Q] = lin[Q].forward(gpu, rec, n, &h1, &q_pre, seed(Q), self.adapter_enabled)?;
            lora[K] = lin[K].forward(gpu, rec, n, &h1, &k_pre, seed(K), self.adapter_enabled)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.heads, hs, cfg.eps, &q_pre, &qn.value, &q, &rq)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.kv_heads, hs, cfg.eps, &k_pre, &kn.value, &kk, &rk)?;
            Some((q_pre, rq, k_pre, rk))
        } else {
            lora[Q] = lin[Q].forward(gpu, rec, n, &h1, &q, seed(Q), self.adapter_enabled)?;
            lora[K] = lin[K].forward(gpu, rec, n, &h1, &kk, seed(K), self.adapter_enabled)?;
            None
        };
        lora[V] = lin[V].forward(gpu, rec, n, &h1, &v, seed(V), self.adapter_enabled)?;
        k::rope_forward(gpu, rec, n, cfg.heads, hs, &q, &inp.pos, &self.inv_freq)?;
        k::rope_forward(gpu, rec, n, cfg.kv_heads, hs, &kk, &inp.pos, &self.inv_freq)?;
        let att = zeros(gpu, rec, "attention out", &[n, qd])?;
        let lse = zeros(gpu, rec, "lse", &[shape.b * cfg.heads * shape.t])?;
        match cache {
            None => k::attention_forward(gpu, rec, &self.attention(shape), &q, &kk, &v, &inp.seg, &att, &lse)?,
            Some(cache) => {
                let at = self.attention(shape).cached(cache.len + shape.t);
                let offset = (cache.len * kvd * 4) as u64;
                rec.encoder().copy_buffer_to_buffer(&kk.buffer, 0, &cache.k[li].buffer, offset, kk.bytes());
                rec.encoder().copy_buffer_to_buffer(&v.buffer, 0, &cache.v[li].buffer, offset, v.bytes());
                k::attention_forward(gpu, rec, &at, &q, &cache.k[li], &cache.v[li], &cache.seg, &att, &lse)?;
            }
        }
        let a = zeros(gpu, rec, "o_proj out", &[n, c])?;
        lora[O] = lin[O].forward(gpu, rec, n, &att, &a, seed(O), self.adapter_enabled)?;
        let x_mid = zeros(gpu, rec, "x_mid", &[n, c])?;
        k::add(gpu, rec, n * c, &x, &a, &x_mid)?;
        let (h2, rstd2) = (zeros(gpu, rec, "h2", &[n, c])?, zeros(gpu, rec, "rstd2", &[n])?);
        k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x_mid, &layer.ln2.value, &h2, &rstd2)?;
        let (g, u, m) = (zeros(gpu, rec, "gate", &[n, inter])?, zeros(gpu, rec, "up", &[n, inter])?, zeros(gpu, rec, "swiglu", &[n, inter])?);
        lora[GATE] = lin[GATE].forward(gpu, rec, n, &h2, &g, seed(GATE), self.adapter_enabled)?;
        lora[UP] = lin[UP].forward(gpu, rec, n, &h2, &u, seed(UP), self.adapter_enabled)?;
        k::swiglu_forward(gpu, rec, n * inter, &g, &u, &m)?;
        let d = zeros(gpu, rec, "down out", &[n, c])?;
        lora[DOWN] = lin[DOWN].forward(gpu, rec, n, &m, &d, seed(DOWN), self.adapter_enabled)?;
        let out = zeros(gpu, rec, "layer out", &[n, c])?;
        k::add(gpu, rec, n * c, &x_mid, &d, &out)?;
        Ok(Acts { x, h1, rstd1, q_pre, q, k: kk, v, att, lse, x_mid, h2, rstd2, g, u, m, out, lora })
    }

    /// Where a norm's weight gradient goes: its param's grad, or a scratch buffer.
    fn norm_grad<'a>(p: &'a Param, scratch: &'a Tensor) -> &'a Tensor {
        p.grad().unwrap_or(scratch)
    }

    /// The gradient of one layer, in the reverse order of `layer_forward`: `dres`
    /// holds d(loss)/d(layer output) and becomes d(loss)/d(layer input).
    fn layer_backward(&self, gpu: &Gpu, rec: &mut Recorder, li: usize, inp: &Inputs, a: &Acts, dres: &Tensor) -> Result<()> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let n = inp.shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        let back = |rec: &mut Recorder, i: usize, x: &Tensor, dy: &Tensor, dx: &Tensor| {
            lin[i].backward(gpu, rec, n, x, a.lora[i].as_ref(), dy, dx, inp.seed(li, i))
        };
        let scratch_c = zeros(gpu, rec, "norm dw scratch", &[c])?;
        // MLP: out = x_mid + down(silu(gate(h2)) · up(h2)), h2 = norm(x_mid)
        let dm = zeros(gpu, rec, "dswiglu", &[n, inter])?;
        back(rec, DOWN, &a.m, dres, &dm)?;
        let (dg, du) = (zeros(gpu, rec, "dgate", &[n, inter])?, zeros(gpu, rec, "dup", &[n, inter])?);
        k::swiglu_backward(gpu, rec, n * inter, &a.g, &a.u, &dm, &dg, &du)?;
        let dh2 = zeros(gpu, rec, "dh2", &[n, c])?;
        back(rec, GATE, &a.h2, &dg, &dh2)?;
        back(rec, UP, &a.h2, &du, &dh2)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x_mid, &layer.ln2.value, &a.rstd2, &dh2, dres, Self::norm_grad(&layer.ln2, &scratch_c))?;
        // Attention: x_mid = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
        let datt = zeros(gpu, rec, "datt", &[n, qd])?;
        back(rec, O, &a.att, dres, &datt)?;
        let (dq, dk, dv) = (zeros(gpu, rec, "dq", &[n, qd])?, zeros(gpu, rec, "dk", &[n, kvd])?, zeros(gpu, rec, "dv", &[n, kvd])?);
        k::attention_backward(gpu, rec, &self.attention(inp.shape), &a.q, &a.k, &a.v, &inp.seg, &a.att, &a.lse, &datt, &dq, &dk, &dv)?;
        k::rope_backward(gpu, rec, n, cfg.heads, hs, &dq, &inp.pos, &self.inv_freq)?;
        k::rope_backward(gpu, rec, n, cfg.kv_heads, hs, &dk, &inp.pos, &self.inv_freq)?;
        let dh1 = zeros(gpu, rec, "dh1", &[n, c])?;
        if let (Some((q_pre, rq, k_pre, rk)), Some(qn), Some(kn)) = (&a.q_pre, &layer.q_norm, &layer.k_norm) {
            let scratch_hs = zeros(gpu, rec, "qk norm dw scratch", &[hs])?;
            let (dq_pre, dk_pre) = (zeros(gpu, rec, "dq_pre", &[n, qd])?, zeros(gpu, rec, "dk_pre", &[n, kvd])?);
            k::rmsnorm_backward(gpu, rec, n * cfg.heads, hs, q_pre, &qn.value, rq, &dq, &dq_pre, Self::norm_grad(qn, &scratch_hs))?;
            k::rmsnorm_backward(gpu, rec, n * cfg.kv_heads, hs, k_pre, &kn.value, rk, &dk, &dk_pre, Self::norm_grad(kn, &scratch_hs))?;
            back(rec, Q, &a.h1, &dq_pre, &dh1)?;
            back(rec, K, &a.h1, &dk_pre, &dh1)?;
        } else {
            back(rec, Q, &a.h1, &dq, &dh1)?;
            back(rec, K, &a.h1, &dk, &dh1)?;
        }
        back(rec, V, &a.h1, &dv, &dh1)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x, &layer.ln1.value, &a.rstd1, &dh1, dres, Self::norm_grad(&layer.ln1, &scratch_c))
    }

    fn embed(&self, gpu: &Gpu, rec: &mut Recorder, inp: &Inputs) -> Result<Tensor> {
        let n = inp.shape.n();
        if let Some(bad) = inp.ids_host.iter().find(|&&id| id as usize >= self.cfg.vocab) {
            return Err(Error::Shape(format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab)));
        }
        let x = zeros(gpu, rec, "embeddings", &[n, self.cfg.hidden])?;
        k::embedding_forward(gpu, rec, n, self.cfg.hidden, self.cfg.vocab, &inp.ids, &self.embed.values(), &x)?;
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
        let logits = zeros(gpu, rec, "logits", &[rows, vocab])?;
        for (p0, part) in self.head().row_parts() {
            let mut mm = Matmul::linear(rows, c, part.shape[0]);
            (mm.a_off, mm.ldc, mm.c_off) = (r0 * c, vocab, p0);
            k::matmul(gpu, rec, &mm, hf, &part.value, &logits)?;
        }
        Ok(logits)
    }

    /// Final norm of the last layer's output: (hf, rstd).
    fn final_norm(&self, gpu: &Gpu, rec: &mut Recorder, n: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let hf = zeros(gpu, rec, "final norm", &[n, self.cfg.hidden])?;
        let rstd = zeros(gpu, rec, "final rstd", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, self.cfg.hidden, self.cfg.eps, x, &self.norm.value, &hf, &rstd)?;
        Ok((hf, rstd))
    }

    /// All logits `[N, V]` of a batch, read back (evaluation and tests).
    pub async fn logits(&self, gpu: &Gpu, inp: &Inputs) -> Result<Vec<f32>> {
        let n = inp.shape.n();
        let mut rec = gpu.recorder("forward");
        let mut x = self.embed(gpu, &mut rec, inp)?;
        for li in 0..self.layers.len() {
            x = self.layer_forward(gpu, &mut rec, li, inp, x, None, false)?.out;
        }
        let (hf, _) = self.final_norm(gpu, &mut rec, n, &x)?;
        let per = self.head_chunk_rows(gpu);
        let chunks = (0..n).step_by(per).map(|r0| self.head_forward(gpu, &mut rec, &hf, r0, per.min(n - r0))).collect::<Result<Vec<_>>>()?;
        gpu.submit(rec);
        let mut out = Vec::with_capacity(n * self.cfg.vocab);
        for c in &chunks {
            out.extend(gpu.read::<f32>(c).await?);
        }
        Ok(out)
    }

    /// Forward and backward of the cross-entropy: `targets[i]` is the token row i
    /// should predict (negative: not trained), and the loss is Σ losses · `scale`
    /// (scale = 1 / trained tokens in the effective batch). Gradients are added into
    /// the trainable params; returns the loss tensor `[1]` (read it back with
    /// `Gpu::read`). The work is recorded and submitted; nothing is read back.
    pub fn forward_backward(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32) -> Result<Tensor> {
        self.pass(gpu, inp, targets, scale, true)
    }

    /// The loss alone (`[1]`, Σ losses · scale), as `forward_backward` computes it.
    pub fn loss(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32) -> Result<Tensor> {
        self.pass(gpu, inp, targets, scale, false)
    }

    fn pass(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32, backward: bool) -> Result<Tensor> {
        let n = inp.shape.n();
        if backward && !self.adapter_enabled {
            return Err(Error::Config("cannot train with the adapter disabled".into()));
        }
        let (c, vocab) = (self.cfg.hidden, self.cfg.vocab);
        if targets.len() != n {
            return Err(Error::Shape(format!("{} targets for {n} tokens", targets.len())));
        }
        let mut rec = gpu.recorder("forward");
        let mut x = self.embed(gpu, &mut rec, inp)?;
        let mut saved: Vec<Acts> = Vec::new();
        let mut inputs: Vec<Tensor> = Vec::new();
        for li in 0..self.layers.len() {
            let acts = self.layer_forward(gpu, &mut rec, li, inp, x, None, backward)?;
            x = acts.out.clone();
            if !backward {
                continue;
            }
            if self.grad_checkpoint {
                // Keep the layer's input; the backward recomputes the rest.
                inputs.push(acts.x);
                gpu.submit(std::mem::replace(&mut rec, gpu.recorder("forward")));
            } else {
                saved.push(acts);
            }
        }
        let (hf, rstd_f) = self.final_norm(gpu, &mut rec, n, &x)?;
        // Head and loss in chunks of tokens: the logits never exist whole.
        let loss = zeros(gpu, &mut rec, "loss", &[1])?;
        let dhf = zeros(gpu, &mut rec, "dhf", &[n, c])?;
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            let rows = per.min(n - r0);
            let logits = self.head_forward(gpu, &mut rec, &hf, r0, rows)?;
            let t = gpu.upload_in(&mut rec, "targets", &targets[r0..r0 + rows], &[rows])?;
            let (losses, lse, part) = (zeros(gpu, &mut rec, "losses", &[rows])?, zeros(gpu, &mut rec, "lse", &[rows])?, zeros(gpu, &mut rec, "loss part", &[1])?);
            k::cross_entropy_forward(gpu, &mut rec, rows, vocab, scale, &logits, &t, &losses, &lse, &part)?;
            k::axpy(gpu, &mut rec, 1, 1.0, &part, &loss)?;
            if backward {
                k::cross_entropy_backward(gpu, &mut rec, rows, vocab, scale, &logits, &t, &lse)?;
                for (p0, w) in self.head().row_parts() {
                    let wrows = w.shape[0];
                    let mut mm = Matmul::new(rows, c, wrows).accumulate();
                    (mm.lda, mm.a_off, mm.c_off) = (vocab, p0, r0 * c);
                    k::matmul(gpu, &mut rec, &mm, &logits, &w.value, &dhf)?;
                    if let Some(g) = w.grad() {
                        // dW[p0..p0+wrows] += dlogits[:, p0..]ᵀ · hf[r0..r0+rows]
                        let mut mm = Matmul::new(wrows, c, rows).trans_a().accumulate();
                        (mm.lda, mm.a_off, mm.b_off) = (vocab, p0, r0 * c);
                        k::matmul(gpu, &mut rec, &mm, &logits, &hf, g)?;
                    }
                }
            }
            // Keep the command buffer (and its logits) small.
            gpu.submit(std::mem::replace(&mut rec, gpu.recorder("head")));
        }
        if !backward {
            gpu.submit(rec);
            return Ok(loss);
        }
        let dres = zeros(gpu, &mut rec, "dres", &[n, c])?;
        let scratch_c = zeros(gpu, &mut rec, "norm dw scratch", &[c])?;
        k::rmsnorm_backward(gpu, &mut rec, n, c, &x, &self.norm.value, &rstd_f, &dhf, &dres, Self::norm_grad(&self.norm, &scratch_c))?;
        for li in (0..self.layers.len()).rev() {
            if self.grad_checkpoint {
                let x_in = inputs.pop().expect("one saved input per layer");
                let acts = self.layer_forward(gpu, &mut rec, li, inp, x_in, None, true)?;
                self.layer_backward(gpu, &mut rec, li, inp, &acts, &dres)?;
                gpu.submit(std::mem::replace(&mut rec, gpu.recorder("backward")));
            } else {
                let acts = saved.pop().expect("one saved layer per layer");
                self.layer_backward(gpu, &mut rec, li, inp, &acts, &dres)?;
            }
        }
        if self.embed.parts.iter().any(|p| p.train.is_some()) {
            let mut v0 = 0;
            for part in &self.embed.parts {
                let rows = part.shape[0];
                let g = part.grad().expect("every part trains");
                k::embedding_backward(gpu, &mut rec, n, c, v0, rows, &inp.ids_host, &dres, g)?;
                v0 += rows;
            }
        }
        gpu.submit(rec);
        Ok(loss)
    }

    /// Per-token cross-entropy (nats) of predicting `targets[i]` at row i; None where
    /// the target is negative (not trained). From the logits, on the host.
    pub async fn token_losses(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32]) -> Result<Vec<Option<f32>>> {
        let logits = self.logits(gpu, inp).await?;
        let v = self.cfg.vocab;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                (t >= 0).then(|| {
                    let row = &logits[i * v..(i + 1) * v];
                    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let lse = mx + row.iter().map(|z| (*z as f64 - mx).exp()).sum::<f64>().ln();
                    (lse - row[t as usize] as f64) as f32
                })
            })
            .collect())
    }

    /// Attention probabilities `[T, T]` of query head `head` in layer `layer` for the
    /// first sequence of `inp` (row t: how much token t attends to each earlier one).
    pub async fn attention_map(&self, gpu: &Gpu, inp: &Inputs, layer: usize, head: usize) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        if layer >= cfg.layers || head >= cfg.heads {
            return Err(Error::Shape(format!("layer {layer}, head {head}: the model has {} layers of {} heads", cfg.layers, cfg.heads)));
        }
        let mut rec = gpu.recorder("attention map");
        let mut x = self.embed(gpu, &mut rec, inp)?;
        for li in 0..layer {
            x = self.layer_forward(gpu, &mut rec, li, inp, x, None, false)?.out;
        }
        let acts = self.layer_forward(gpu, &mut rec, layer, inp, x, None, false)?;
        gpu.submit(rec);
        let (q, k) = (gpu.read::<f32>(&acts.q).await?, gpu.read::<f32>(&acts.k).await?);
        let (t, hs, g) = (inp.shape.t, cfg.head_dim, head / (cfg.heads / cfg.kv_heads));
        let seg = gpu.read::<u32>(&inp.seg).await?;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut out = vec![0f32; t * t];
        for i in 0..t {
            let qi = &q[(i * cfg.heads + head) * hs..][..hs];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = &k[(j * cfg.kv_heads + g) * hs..][..hs];
                    if seg[j] != seg[i] { f64::NEG_INFINITY } else { scale * qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() }
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                out[i * t + j] = ((s - mx).exp() / z) as f32;
            }
        }
        Ok(out)
    }

    /// The gradient norm of each layer's trainable parameters (after a backward).
    pub async fn layer_grad_norms(&self, gpu: &Gpu) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut ss = 0f64;
            let params = [&l.ln1, &l.ln2].into_iter().chain(&l.q_norm).chain(&l.k_norm).chain(l.linears.iter().flat_map(|x| x.params()));
            for g in params.filter_map(|p| p.grad()) {
                ss += gpu.read::<f32>(g).await?.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            }
            out.push(ss.sqrt());
        }
        Ok(out)
    }

    /// Zero every parameter gradient.
    pub fn zero_grads(&self, gpu: &Gpu) {
        let mut rec = gpu.recorder("zero grads");
        for g in self.params().iter().filter_map(|p| p.grad()) {
            rec.encoder().clear_buffer(&g.buffer, 0, None);
        }
        gpu.submit(rec);
    }

    /// Clip by the global gradient norm and take one AdamW step (1-based `step`).
    /// Returns the `[2]` tensor holding (norm before clipping, clip factor).
    pub fn optimizer_step(&self, gpu: &Gpu, opt: &k::AdamW, step: u64, max_grad_norm: f32) -> Result<Tensor> {
        let params = self.params();
        let mut rec = gpu.recorder("optimizer");
        let norm = gpu.temp(&mut rec, "grad norm", DType::F32, &[2])?;
        let grads: Vec<&Tensor> = params.iter().filter_map(|p| p.grad()).collect();
        k::grad_norm(gpu, &mut rec, &grads, max_grad_norm, &norm)?;
        for p in &params {
            let t = p.train.as_ref().expect("params() are trainable");
            k::adamw_step(gpu, &mut rec, opt, step, &p.value, &t.grad, &t.m, &t.v, &norm)?;
        }
        gpu.submit(rec);
        Ok(norm)
    }

    /// Bytes the model holds on the GPU between steps: every weight, and for each
    /// trainable one its gradient and two moments.
    pub fn resident_bytes(&self) -> u64 {
        self.all_params().iter().map(|p| p.bytes()).sum::<u64>() + self.inv_freq.bytes()
    }

    /// A KV cache for one sequence of up to `max_t` tokens.
    pub fn kv_cache(&self, gpu: &Gpu, max_t: usize) -> Result<KvCache> {
        let kvd = self.cfg.kv_dim();
        let mk = |l: &str| -> Result<Vec<Tensor>> { (0..self.cfg.layers).map(|_| gpu.zeros(l, DType::F32, &[max_t, kvd])).collect() };
        Ok(KvCache { k: mk("k cache")?, v: mk("v cache")?, seg: gpu.zeros("cache segments", DType::U32, &[max_t])?, len: 0, max_t })
    }

    /// Run `ids` (one sequence, continuing the cache) and return the logits `[V]` of
    /// the last token.
    pub async fn decode(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len();
        if t == 0 || cache.len + t > cache.max_t {
            return Err(Error::Shape(format!("decoding {t} tokens into a KV cache holding {} of {}", cache.len, cache.max_t)));
        }
        let shape = Shape { b: 1, t };
        let pos: Vec<u32> = (cache.len..cache.len + t).map(|p| p as u32).collect();
        let inp = Inputs::new(gpu, shape, ids, &pos, &vec![0; t])?;
        let mut rec = gpu.recorder("decode");
        let mut x = self.embed(gpu, &mut rec, &inp)?;
        for li in 0..self.layers.len() {
            x = self.layer_forward(gpu, &mut rec, li, &inp, x, Some(cache), false)?.out;
        }
        let (hf, _) = self.final_norm(gpu, &mut rec, t, &x)?;
        let logits = self.head_forward(gpu, &mut rec, &hf, t - 1, 1)?;
        gpu.submit(rec);
        cache.len += t;
        gpu.read::<f32>(&logits).await
    }
}
