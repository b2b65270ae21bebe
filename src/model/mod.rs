//! Llama, Qwen2 and Qwen3 on the GPU, written out as llm.c does (no autodiff graph):
//! `forward` (embed → layers → final norm) returns the `Trunk` that `backward` needs,
//! and `backward` runs the layers' backwards in reverse. One trunk serves logits, the
//! loss, training, attention maps and decoding. `params` holds weights on the GPU,
//! `linear` a projection with its LoRA pair, `layer` one decoder layer forward and
//! backward, `inputs` what a pass reads, `views` the teaching views.
//!
//! Shapes: N = B·T token rows, C hidden, Q = NH·HS, KV = NKV·HS, I intermediate.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod change;
mod inputs;
mod layer;
mod linear;
pub mod memory;
mod params;
pub mod source;
mod views;
pub mod weights;

use crate::rng::Rng;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::kernels::{self as k, Attention, Matmul};
use layer::{Acts, Pass};

pub use config::{Arch, Config};
pub use inputs::{sorted_rows, CachedRows, Inputs, KvCache, Shape};
pub use layer::Layer;
pub use linear::{Linear, LoraConfig, LoraPair, Tuning};
pub use params::{Frozen, Param, Train, Weight};
pub use weights::{Checkpoint, HostTensor, TensorMap, Tensors};

pub struct Model {
    pub cfg: Config,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Param,
    /// None when tied to the embedding.
    pub lm_head: Option<Weight>,
    pub inv_freq: Tensor,
    /// `inv_freq` on the host, for attention's RoPE on load (`Model::rope_on_load`).
    pub inv_freq_host: Vec<f32>,
    pub tuning: Tuning,
    /// Save only each layer's input and recompute the rest in the backward.
    pub grad_checkpoint: bool,
    /// False runs the base model alone (LoRA pairs skipped), for side-by-side answers.
    pub adapter_enabled: bool,
    /// How the frozen matrices are held (a merge goes into the values trained against).
    pub frozen: Frozen,
    /// The trainable params' values, gradients and moments, which `params()` view.
    pub(crate) flat: Vec<params::Flat>,
}

/// Check that `w` has `name` with the shape the config implies.
fn expect(w: &dyn Tensors, name: &str, shape: &[usize]) -> Result<()> {
    let got = w.shape(name).ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))?;
    if got != shape {
        return Err(Error::Weights(format!("tensor `{name}` has shape {}, config.json implies {}", crate::gpu::dims(&got), crate::gpu::dims(shape))));
    }
    Ok(())
}

/// What the trunk keeps for `backward`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    /// Every layer's activations.
    Activations,
    /// Each layer's input alone (gradient checkpointing).
    Inputs,
}

/// What the trunk kept of one layer.
enum Saved {
    Acts(Box<Acts>),
    /// Checkpointing: the layer's input, and its LoRA h's (`layer::Pass::Recompute`).
    Input(Tensor, Vec<Option<linear::LoraSaved>>),
}

/// The trunk's output: the final-normed hidden states `hf` `[N, C]`, and for
/// `backward` the last layer's output, the final norm's rstd and what each layer kept.
struct Trunk {
    hf: Tensor,
    x: Tensor,
    rstd: Tensor,
    saved: Vec<Saved>,
}

fn zeros(gpu: &Gpu, rec: &mut Recorder, label: &str, shape: &[usize]) -> Result<Tensor> {
    gpu.temp(rec, label, DType::F32, shape)
}

/// A temporary holding a copy of `x` (copied inside `rec`), for a product to add into:
/// a residual connection without an add pass.
fn residual(gpu: &Gpu, rec: &mut Recorder, label: &str, x: &Tensor) -> Result<Tensor> {
    let t = gpu.pooled(label, DType::F32, &x.shape)?;
    rec.encoder().copy_buffer_to_buffer(&x.buffer, x.offset, &t.buffer, t.offset, x.bytes());
    Ok(t)
}

/// A fresh adapter as PEFT initialises one: each A Kaiming-uniform with a = √5
/// (uniform in ±1/√din), drawn from `seed` layer by layer in the projections' order, each
/// B zero; under PEFT's names. `Model::load` starts LoRA from it, and `export-run` hands
/// it to TRL so both start alike.
pub fn fresh_lora(cfg: &Config, l: &LoraConfig, seed: u64) -> TensorMap {
    let mut rng = Rng::new(seed);
    let mut out = TensorMap::new();
    for i in 0..cfg.layers {
        for (short, module, din, dout) in cfg.projections() {
            if l.targets.iter().any(|t| t == short) {
                let peft = format!("base_model.model.model.layers.{i}.{module}.{short}");
                let a = rng.vec(l.r * din, 1.0 / (din as f32).sqrt());
                out.insert(format!("{peft}.lora_A.weight"), HostTensor { shape: vec![l.r, din], data: a });
                out.insert(format!("{peft}.lora_B.weight"), HostTensor { shape: vec![dout, l.r], data: vec![0.0; dout * l.r] });
            }
        }
    }
    out
}

impl Model {
    /// Upload the weights. With LoRA, fresh pairs are initialised as PEFT does (A
    /// Kaiming-uniform with a = √5, B zero) from `seed`; with full tuning every weight
    /// gets a gradient and moments. Each weight is read from `w`, converted and
    /// uploaded a chunk at a time (see `UPLOAD_CHUNK`).
    pub fn load(gpu: &Gpu, cfg: Config, w: &dyn Tensors, tuning: Tuning, seed: u64) -> Result<Model> {
        Self::load_with(gpu, cfg, w, tuning, seed, Frozen::Auto)
    }

    /// `load`, with frozen matrices held as `frozen` says (packed for QLoRA).
    pub fn load_with(gpu: &Gpu, cfg: Config, w: &dyn Tensors, tuning: Tuning, seed: u64, frozen: Frozen) -> Result<Model> {
        use futures::FutureExt;
        Self::load_settled(gpu, cfg, w, tuning, seed, frozen, false).now_or_never().expect("a load that does not settle never waits")
    }

    /// `load_with`; with `settle`, waiting for the queue after each layer
    /// (`Gpu::settle`): in the browser the uploads' transfer memory goes back as the
    /// load goes, instead of the whole model's at its end (the page's loader).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn load_settled(gpu: &Gpu, cfg: Config, w: &dyn Tensors, tuning: Tuning, seed: u64, frozen: Frozen, settle: bool) -> Result<Model> {
        let c = cfg.hidden;
        if let Tuning::Lora(l) = &tuning {
            l.check()?;
        }
        let full = tuning == Tuning::Full;
        let fresh = match &tuning {
            Tuning::Lora(l) => fresh_lora(&cfg, l, seed),
            _ => TensorMap::new(),
        };
        let vec = |name: &str, n: usize| -> Result<Param> {
            expect(w, name, &[n])?;
            Param::read(gpu, name.to_string(), w, name, 0, &[n], full, false)
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Weight> {
            expect(w, name, &[rows, cols])?;
            Weight::upload(gpu, name, w, rows, cols, full, frozen)
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
                        let peft = format!("base_model.model.{name}");
                        let a = &fresh[&format!("{peft}.lora_A.weight")].data;
                        Some(LoraPair {
                            a: Param::new(gpu, format!("{peft}.lora_A.weight"), a, &[l.r, din], true)?,
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
            // q/k/v and gate/up each in one buffer: their base products run as one dispatch.
            let (qkv, rest) = linears.split_at_mut(3);
            params::colocate(gpu, &mut qkv.iter_mut().map(|l| &mut l.w).collect::<Vec<_>>())?;
            params::colocate(gpu, &mut rest[1..3].iter_mut().map(|l| &mut l.w).collect::<Vec<_>>())?;
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
            if settle {
                gpu.settle().await?;
            }
        }
        let embed = matrix("model.embed_tokens.weight", cfg.vocab, c)?;
        if settle {
            gpu.settle().await?;
        }
        let lm_head = if cfg.tie_embeddings { None } else { Some(matrix("lm_head.weight", cfg.vocab, c)?) };
        let inv_freq_host = cfg.inv_freq();
        let inv_freq = gpu.upload("rope inv_freq", &inv_freq_host, &[cfg.head_dim / 2])?;
        let mut model =
            Model { norm: vec("model.norm.weight", c)?, embed, layers, lm_head, inv_freq, inv_freq_host, tuning, grad_checkpoint: false, adapter_enabled: true, frozen, cfg, flat: Vec::new() };
        let trainable: Vec<&mut Param> = model.all_params_mut().into_iter().filter(|p| p.train.is_some()).collect();
        model.flat = params::pack(gpu, trainable)?;
        Ok(model)
    }

    /// `all_params`, mutable, in the same order.
    fn all_params_mut(&mut self) -> Vec<&mut Param> {
        let mut out: Vec<&mut Param> = self.embed.parts.iter_mut().collect();
        for l in &mut self.layers {
            out.push(&mut l.ln1);
            out.push(&mut l.ln2);
            out.extend(l.q_norm.iter_mut().chain(l.k_norm.iter_mut()));
            for x in &mut l.linears {
                out.extend(x.w.parts.iter_mut().chain(x.bias.iter_mut()).chain(x.lora.iter_mut().flat_map(|l| [&mut l.a, &mut l.b])));
            }
        }
        out.push(&mut self.norm);
        out.extend(self.lm_head.iter_mut().flat_map(|w| w.parts.iter_mut()));
        out
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
                return Err(Error::Weights(format!("adapter tensor `{}` has shape {}, expected {}", p.name, crate::gpu::dims(&t.shape), crate::gpu::dims(&p.shape))));
            }
            gpu.write(&p.value, &t.data)?;
        }
        Ok(())
    }

    /// How many flat groups the trainable params lie in (one per binding's worth,
    /// `params::pack`).
    pub fn flat_groups(&self) -> usize {
        self.flat.len()
    }

    /// GPU copies of the trainable values (each flat group of them): a DPO run's
    /// reference adapter (`swap_values`).
    pub fn copy_values(&self, gpu: &Gpu, what: &str) -> Result<Vec<Tensor>> {
        let copies = self.flat.iter().map(|f| gpu.zeros(what, f.value.dtype, &f.value.shape)).collect::<Result<Vec<Tensor>>>()?;
        let mut rec = gpu.recorder(what);
        for (f, c) in self.flat.iter().zip(&copies) {
            rec.encoder().copy_buffer_to_buffer(&f.value.buffer, f.value.offset, &c.buffer, c.offset, f.value.bytes());
        }
        gpu.submit(rec);
        Ok(copies)
    }

    /// Swap the trainable values with `other` (as `copy_values` made them), on the GPU
    /// through `scratch` (another such copy): twice restores both. Nothing allocates,
    /// so the swap back cannot fail where the swap in succeeded.
    pub fn swap_values(&self, gpu: &Gpu, other: &[Tensor], scratch: &[Tensor]) -> Result<()> {
        let laid_out = |ts: &[Tensor]| ts.len() == self.flat.len() && self.flat.iter().zip(ts).all(|(f, t)| f.value.shape == t.shape);
        if !laid_out(other) || !laid_out(scratch) {
            return Err(Error::Shape("swap_values: the values to swap in are not laid out as the model's".into()));
        }
        let mut rec = gpu.recorder("swap trainable values");
        for ((f, o), t) in self.flat.iter().zip(other).zip(scratch) {
            let (v, bytes) = (&f.value, f.value.bytes());
            let e = rec.encoder();
            e.copy_buffer_to_buffer(&v.buffer, v.offset, &t.buffer, t.offset, bytes);
            e.copy_buffer_to_buffer(&o.buffer, o.offset, &v.buffer, v.offset, bytes);
            e.copy_buffer_to_buffer(&t.buffer, t.offset, &o.buffer, o.offset, bytes);
        }
        gpu.submit(rec);
        Ok(())
    }

    fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Attention's RoPE on load, where the adapter's kernels offer it for this model
    /// (`kernels::RopeOnLoad::offered`): q and k are then kept before the rotation.
    pub(crate) fn rope_on_load(&self, gpu: &Gpu) -> Option<crate::kernels::RopeOnLoad<'_>> {
        crate::kernels::RopeOnLoad::offered(gpu, self.cfg.head_dim).then_some(crate::kernels::RopeOnLoad { inv_freq: &self.inv_freq_host })
    }

    fn attention(&self, shape: Shape) -> Attention {
        Attention::new(shape.b, shape.t, self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim)
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
        ((gpu.caps.chunk_bytes() / row) as usize).max(1)
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

    /// The logits of rows `rows` of `hf`, by `head_forward` in chunks of
    /// `head_chunk_rows` (each within a binding), to read back with `read_chunks`.
    fn head_rows(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, rows: std::ops::Range<usize>) -> Result<Vec<Tensor>> {
        let per = self.head_chunk_rows(gpu);
        k::spans(rows.len(), per).map(|(a, b)| self.head_forward(gpu, rec, hf, rows.start + a, b - a)).collect()
    }

    /// Final norm of the last layer's output: (hf, rstd).
    fn final_norm(&self, gpu: &Gpu, rec: &mut Recorder, n: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let hf = zeros(gpu, rec, "final norm", &[n, self.cfg.hidden])?;
        let rstd = zeros(gpu, rec, "final rstd", &[n])?;
        k::rmsnorm_forward(gpu, rec, n, self.cfg.hidden, self.cfg.eps, x, &self.norm.value, &hf, &rstd)?;
        Ok((hf, rstd))
    }

    /// Rows from which a pass through the KV cache (a prompt, not a decoding step)
    /// submits after each layer, so one layer's temporaries are alive at a time; without
    /// it a 1,000-token prompt of SmolLM2 held every layer's, a gigabyte.
    pub const PREFILL_ROWS: usize = 64;

    /// The trunk: embed → every layer → final norm. One path serves logits, the loss,
    /// training, attention maps and decoding; `keep` says what `backward` will need.
    /// LoRA dropout applies only when `train`. With checkpointing, or keeping nothing
    /// outside decoding, `rec` is submitted and replaced after each layer.
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, gpu: &Gpu, rec: &mut Recorder, inp: &Inputs, cache: Option<&KvCache>, keep: Keep, train: bool) -> Result<Trunk> {
        let mut x = self.embed(gpu, rec, inp)?;
        let mut saved = Vec::new();
        for li in 0..self.layers.len() {
            let mut acts = self.layer_forward(gpu, rec, li, inp, x, cache, train, Pass::Forward)?;
            x = acts.out.clone().expect("a forward's output");
            match keep {
                // A batch's forward alone (evaluation, DPO's reference, logits) or a
                // prompt through the KV cache: the layer's temporaries serve the next
                // layer, as with checkpointing. A decoding step's few rows keep one
                // command buffer.
                Keep::Nothing if cache.is_none() || inp.shape.n() >= Self::PREFILL_ROWS => {
                    drop(acts);
                    gpu.flush(rec, "forward");
                }
                Keep::Nothing => {}
                Keep::Activations => saved.push(Saved::Acts(Box::new(acts))),
                Keep::Inputs => {
                    saved.push(Saved::Input(acts.x.clone(), std::mem::take(&mut acts.lora)));
                    // Freed before the flush, the layer's temporaries serve the next layer.
                    drop(acts);
                    gpu.flush(rec, "forward");
                }
            }
        }
        let (hf, rstd) = self.final_norm(gpu, rec, inp.shape.n(), &x)?;
        Ok(Trunk { hf, x, rstd, saved })
    }

    /// The activations of layer `layer` alone (the attention view): the layers before
    /// it run as a forward alone does, one layer's temporaries at a time, and the ones
    /// after it not at all.
    fn layer_activations(&self, gpu: &Gpu, rec: &mut Recorder, inp: &Inputs, layer: usize) -> Result<Acts> {
        let mut x = self.embed(gpu, rec, inp)?;
        for li in 0..layer {
            let acts = self.layer_forward(gpu, rec, li, inp, x, None, false, Pass::Forward)?;
            x = acts.out.clone().expect("a forward's output");
            drop(acts);
            gpu.flush(rec, "forward");
        }
        self.layer_forward(gpu, rec, layer, inp, x, None, false, Pass::Forward)
    }

    /// The mirror of `forward`: from d(loss)/d(hf), the final norm's backward, then each
    /// layer's backward in reverse order (its forward run again from the saved input
    /// when checkpointing), then the embedding's scatter. Gradients are added into
    /// the trainable params.
    fn backward(&self, gpu: &Gpu, rec: &mut Recorder, inp: &Inputs, mut trunk: Trunk, dhf: &Tensor) -> Result<()> {
        let (n, c) = (inp.shape.n(), self.cfg.hidden);
        let dres = zeros(gpu, rec, "dres", &[n, c])?;
        // The final norm's backward makes the last layer's down_proj LoRA dh, each
        // layer's input norm the previous layer's (`linear::norm_backward_made_dh`).
        let last_down = self.layers.last().map(|l| &l.linears[layer::DOWN]).filter(|_| self.adapter_enabled);
        let mut down_dh = linear::norm_backward_made_dh(gpu, rec, (n, c), (&trunk.x, &self.norm, &trunk.rstd), dhf, &dres, last_down)?;
        for li in (0..self.layers.len()).rev() {
            match trunk.saved.pop().expect("one saved entry per layer") {
                Saved::Acts(acts) => down_dh = self.layer_backward(gpu, rec, li, inp, &acts, &dres, down_dh.take())?,
                Saved::Input(x, lora) => {
                    let acts = self.layer_forward(gpu, rec, li, inp, x, None, true, Pass::Recompute(lora))?;
                    down_dh = self.layer_backward(gpu, rec, li, inp, &acts, &dres, down_dh.take())?;
                    drop(acts);
                    gpu.flush(rec, "backward");
                }
            }
        }
        if self.embed.parts.iter().any(|p| p.train.is_some()) {
            let mut v0 = 0;
            for part in &self.embed.parts {
                let rows = part.shape[0];
                let g = part.grad().expect("every part trains");
                k::embedding_backward(gpu, rec, n, c, v0, rows, &inp.ids_host, &dres, g)?;
                v0 += rows;
            }
        }
        Ok(())
    }

    /// The head and the cross-entropy in chunks of rows (the logits never exist
    /// whole): returns the loss `[1]` = Σ losses · `scale`. With `dhf`, also adds
    /// d(loss)/d(hf) into it (and the head weight's gradient in full tuning).
    #[allow(clippy::too_many_arguments)]
    fn head_loss(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, targets: &[i32], scale: f32, dhf: Option<&Tensor>) -> Result<Tensor> {
        let n = targets.len();
        let loss = zeros(gpu, rec, "loss", &[1])?;
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            self.head_loss_chunk(gpu, rec, hf, targets, scale, dhf, &loss, r0, per.min(n - r0))?;
            // Keep the command buffer (and its logits) small.
            gpu.flush(rec, "head");
        }
        Ok(loss)
    }

    /// One chunk of `head_loss`: rows `r0..r0 + rows` (its temporaries are freed on return).
    #[allow(clippy::too_many_arguments)]
    fn head_loss_chunk(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, targets: &[i32], scale: f32, dhf: Option<&Tensor>, loss: &Tensor, r0: usize, rows: usize) -> Result<()> {
        // With dhf the cross-entropy's backward runs in its forward's kernel, leaving
        // dlogits in place of the logits.
        let [logits, _, _, _] = self.head_chunk(gpu, rec, hf, targets, scale, r0, rows, Some(loss), dhf.is_some())?;
        if let Some(dhf) = dhf {
            self.head_backward(gpu, rec, hf, &logits, r0, rows, dhf)?;
        }
        Ok(())
    }

    /// From dlogits `[rows, V]` (rows `r0..` of the batch): `dhf += dlogits·W`, and the
    /// head weight's gradient in full tuning.
    #[allow(clippy::too_many_arguments)]
    fn head_backward(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, dlogits: &Tensor, r0: usize, rows: usize, dhf: &Tensor) -> Result<()> {
        let (c, vocab) = (self.cfg.hidden, self.cfg.vocab);
        for (p0, w) in self.head().row_parts() {
            let wrows = w.shape[0];
            let mut mm = Matmul::new(rows, c, wrows).accumulate();
            (mm.lda, mm.a_off, mm.c_off) = (vocab, p0, r0 * c);
            k::matmul(gpu, rec, &mm, dlogits, &w.value, dhf)?;
            if let Some(g) = w.grad() {
                // dW[p0..p0+wrows] += dlogits[:, p0..]ᵀ · hf[r0..r0+rows]
                let mut mm = Matmul::new(wrows, c, rows).trans_a().accumulate();
                (mm.lda, mm.a_off, mm.b_off) = (vocab, p0, r0 * c);
                k::matmul(gpu, rec, &mm, dlogits, hf, g)?;
            }
        }
        Ok(())
    }

    /// The logits of rows `r0..r0 + rows` with their cross-entropy forward, which adds
    /// Σ losses · scale into `loss` if given: (logits, targets, per-row losses, lse) of
    /// the chunk.
    /// With `backward`, its backward too, in the same kernel: the logits are dlogits.
    #[allow(clippy::too_many_arguments)]
    fn head_chunk(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, targets: &[i32], scale: f32, r0: usize, rows: usize, loss: Option<&Tensor>, backward: bool) -> Result<[Tensor; 4]> {
        let logits = self.head_forward(gpu, rec, hf, r0, rows)?;
        let t = gpu.upload_in(rec, "targets", &targets[r0..r0 + rows], &[rows])?;
        let (losses, lse) = (zeros(gpu, rec, "losses", &[rows])?, zeros(gpu, rec, "lse", &[rows])?);
        let ce = if backward { k::cross_entropy_forward_backward } else { k::cross_entropy_forward };
        ce(gpu, rec, rows, self.cfg.vocab, scale, &logits, &t, &losses, &lse, loss)?;
        Ok([logits, t, losses, lse])
    }

    /// Per-sequence sums of log p(target) `[seqs]`, each row counted in its sequence
    /// `row_seq[row]`, the head in chunks (targets negative where a row is not counted).
    fn head_logps(&self, gpu: &Gpu, rec: &mut Recorder, hf: &Tensor, targets: &[i32], (row_seq, seqs): (&Tensor, usize)) -> Result<Tensor> {
        let n = targets.len();
        let logps = zeros(gpu, rec, "sequence logps", &[seqs])?;
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            let rows = per.min(n - r0);
            let [_, _, losses, _] = self.head_chunk(gpu, rec, hf, targets, 1.0, r0, rows, None, false)?;
            k::cross_entropy_sequence_logps(gpu, rec, r0, rows, row_seq, &losses, &logps)?;
            gpu.flush(rec, "head");
        }
        Ok(logps)
    }

    /// The cross-entropy of each row `[N]` (0 where the target is negative), the head in
    /// chunks: only N floats come back, not the logits.
    pub(crate) async fn row_losses(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32]) -> Result<Vec<f32>> {
        self.check_targets(inp, targets)?;
        let n = targets.len();
        let mut rec = gpu.recorder("forward");
        let trunk = self.forward(gpu, &mut rec, inp, None, Keep::Nothing, false)?;
        let per = self.head_chunk_rows(gpu);
        let mut chunks = Vec::new();
        for r0 in (0..n).step_by(per) {
            let [_, _, losses, _] = self.head_chunk(gpu, &mut rec, &trunk.hf, targets, 1.0, r0, per.min(n - r0), None, false)?;
            chunks.push(losses);
            gpu.flush(&mut rec, "head");
        }
        gpu.submit(rec);
        read_chunks(gpu, &chunks).await
    }

    /// Each sequence's sum of log p(target) over its rows whose target is not negative
    /// (a completion's tokens), no gradients, dropout off: `[2B]` for a batch of B
    /// pairs (`PairBatch`: `row_seq` `[N]` names each row's sequence).
    pub fn sequence_logps(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], row_seq: &Tensor) -> Result<Tensor> {
        self.check_targets(inp, targets)?;
        let mut rec = gpu.recorder("forward");
        let trunk = self.forward(gpu, &mut rec, inp, None, Keep::Nothing, false)?;
        let logps = self.head_logps(gpu, &mut rec, &trunk.hf, targets, (row_seq, 2 * inp.shape.b))?;
        gpu.submit(rec);
        Ok(logps)
    }

    /// One DPO forward and backward over P pairs, a row each (`PairBatch`: the prompt
    /// once, then the chosen and the rejected side; `row_seq` `[N]` names each row's
    /// sequence, chosen sides 0..P, rejected P..2P). The per-sequence
    /// log-probabilities go to `dpo_forward`, which adds the loss · scale and the
    /// metrics into `stats` `[8]`; `dpo_backward` gives each sequence its factor, and
    /// the head runs again per chunk for the cross-entropy backward scaled by it.
    /// `ref_logps` and `counts` (completion tokens) are `[2P]` in that order.
    #[allow(clippy::too_many_arguments)]
    pub fn dpo_forward_backward(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], row_seq: &Tensor, dpo: &k::Dpo, ref_logps: &Tensor, counts: &Tensor, (scale, sft): (f32, f32), stats: &Tensor) -> Result<()> {
        if !self.adapter_enabled {
            return Err(Error::Config("cannot train with the adapter disabled".into()));
        }
        self.check_targets(inp, targets)?;
        let pairs = inp.shape.b;
        let mut rec = gpu.recorder("forward");
        let keep = if self.grad_checkpoint { Keep::Inputs } else { Keep::Activations };
        let trunk = self.forward(gpu, &mut rec, inp, None, keep, true)?;
        let logps = self.head_logps(gpu, &mut rec, &trunk.hf, targets, (row_seq, 2 * pairs))?;
        let coef = zeros(gpu, &mut rec, "dpo coef", &[2 * pairs])?;
        k::dpo_forward(gpu, &mut rec, dpo, pairs, scale, sft, &logps, ref_logps, counts, stats)?;
        k::dpo_backward(gpu, &mut rec, dpo, pairs, scale, sft, &logps, ref_logps, counts, &coef)?;
        let (n, vocab) = (targets.len(), self.cfg.vocab);
        let dhf = zeros(gpu, &mut rec, "dhf", &[n, self.cfg.hidden])?;
        let per = self.head_chunk_rows(gpu);
        for r0 in (0..n).step_by(per) {
            let rows = per.min(n - r0);
            let [logits, tg, _, lse] = self.head_chunk(gpu, &mut rec, &trunk.hf, targets, 1.0, r0, rows, None, false)?;
            k::cross_entropy_backward_scaled(gpu, &mut rec, rows, vocab, 1.0, &logits, &tg, &lse, r0, (row_seq, &coef))?;
            self.head_backward(gpu, &mut rec, &trunk.hf, &logits, r0, rows, &dhf)?;
            gpu.flush(&mut rec, "head");
        }
        self.backward(gpu, &mut rec, inp, trunk, &dhf)?;
        gpu.submit(rec);
        Ok(())
    }

    /// All logits `[N, V]` of a batch, read back (the checks against PyTorch's logits;
    /// the views and decoding read only the rows they need).
    pub async fn logits(&self, gpu: &Gpu, inp: &Inputs) -> Result<Vec<f32>> {
        let n = inp.shape.n();
        let mut rec = gpu.recorder("forward");
        let trunk = self.forward(gpu, &mut rec, inp, None, Keep::Nothing, false)?;
        let chunks = self.head_rows(gpu, &mut rec, &trunk.hf, 0..n)?;
        gpu.submit(rec);
        read_chunks(gpu, &chunks).await
    }

    fn check_targets(&self, inp: &Inputs, targets: &[i32]) -> Result<()> {
        if targets.len() != inp.shape.n() {
            return Err(Error::Shape(format!("{} targets for {} tokens", targets.len(), inp.shape.n())));
        }
        Ok(())
    }

    /// Forward and backward of the cross-entropy: `targets[i]` is the token row i
    /// should predict (negative: not trained), and the loss is Σ losses · `scale`
    /// (scale = 1 / trained tokens in the effective batch). Gradients are added into
    /// the trainable params; returns the loss tensor `[1]` (read it back with
    /// `Gpu::read`). The work is recorded and submitted; nothing is read back.
    pub fn forward_backward(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32) -> Result<Tensor> {
        if !self.adapter_enabled {
            return Err(Error::Config("cannot train with the adapter disabled".into()));
        }
        self.check_targets(inp, targets)?;
        let mut rec = gpu.recorder("forward");
        let keep = if self.grad_checkpoint { Keep::Inputs } else { Keep::Activations };
        let trunk = self.forward(gpu, &mut rec, inp, None, keep, true)?;
        let dhf = zeros(gpu, &mut rec, "dhf", &[inp.shape.n(), self.cfg.hidden])?;
        let loss = self.head_loss(gpu, &mut rec, &trunk.hf, targets, scale, Some(&dhf))?;
        self.backward(gpu, &mut rec, inp, trunk, &dhf)?;
        gpu.submit(rec);
        Ok(loss)
    }

    /// The loss alone (`[1]`, Σ losses · scale), as `forward_backward` computes it.
    pub fn loss(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32], scale: f32) -> Result<Tensor> {
        self.check_targets(inp, targets)?;
        let mut rec = gpu.recorder("forward");
        let trunk = self.forward(gpu, &mut rec, inp, None, Keep::Nothing, false)?;
        let loss = self.head_loss(gpu, &mut rec, &trunk.hf, targets, scale, None)?;
        gpu.submit(rec);
        Ok(loss)
    }

    /// Zero every parameter gradient.
    pub fn zero_grads(&self, gpu: &Gpu) {
        let mut rec = gpu.recorder("zero grads");
        for f in &self.flat {
            rec.encoder().clear_buffer(&f.grad.buffer, 0, None);
        }
        gpu.submit(rec);
    }

    /// Clip by the global gradient norm and take one AdamW step (1-based `step`).
    /// Returns the `[2]` tensor holding (norm before clipping, clip factor).
    pub fn optimizer_step(&self, gpu: &Gpu, opt: &k::AdamW, step: u64, max_grad_norm: f32) -> Result<Tensor> {
        let mut rec = gpu.recorder("optimizer");
        let norm = gpu.temp(&mut rec, "grad norm", DType::F32, &[2])?;
        // Over the flat groups the params view: a dispatch or two per group.
        let grads: Vec<&Tensor> = self.flat.iter().map(|f| &f.grad).collect();
        k::grad_norm(gpu, &mut rec, &grads, max_grad_norm, &norm)?;
        for f in &self.flat {
            k::adamw_step(gpu, &mut rec, opt, step, &f.value, &f.grad, &f.m, &f.v, &norm)?;
        }
        gpu.submit(rec);
        Ok(norm)
    }

    /// Bytes the model holds on the GPU between steps: every weight, and for each
    /// trainable one its gradient and two moments.
    pub fn resident_bytes(&self) -> u64 {
        self.all_params().iter().map(|p| p.bytes()).sum::<u64>() + self.inv_freq.bytes()
    }

    /// The tokens a KV cache holds: a layer's keys (and values) must fit one storage
    /// binding.
    pub fn cache_tokens(&self, gpu: &Gpu) -> usize {
        (gpu.caps.max_binding / (self.cfg.kv_dim() as u64 * 4)) as usize
    }

    /// A KV cache for one sequence of up to `max_t` tokens (at most `cache_tokens`).
    pub fn kv_cache(&self, gpu: &Gpu, max_t: usize) -> Result<KvCache> {
        let kvd = self.cfg.kv_dim();
        if max_t > self.cache_tokens(gpu) {
            return Err(Error::Options(format!(
                "a KV cache of {max_t} tokens (prompt and answer) takes {} bytes a layer for its keys, more than this adapter's largest storage binding ({} bytes): at most {} tokens; shorten the prompt or ask for fewer new tokens",
                max_t * kvd * 4,
                gpu.caps.max_binding,
                self.cache_tokens(gpu)
            )));
        }
        let mk = |l: &str| -> Result<Vec<Tensor>> { (0..self.cfg.layers).map(|_| gpu.zeros(l, DType::F32, &[max_t, kvd])).collect() };
        Ok(KvCache { k: mk("k cache")?, v: mk("v cache")?, seg: gpu.zeros("cache segments", DType::U32, &[max_t])?, len: 0, max_t })
    }

    /// A copy of the cache's keys and values of rows `r0 .. r0 + rows`, every layer's
    /// (`copy_rows` appends them again as another segment's).
    pub(crate) fn cached_rows(&self, gpu: &Gpu, cache: &KvCache, r0: usize, rows: usize) -> Result<CachedRows> {
        if r0 + rows > cache.len {
            return Err(Error::Shape(format!("rows {r0}..{} of a KV cache holding {}", r0 + rows, cache.len)));
        }
        let kvd = self.cfg.kv_dim();
        let mut rec = gpu.recorder("cached rows");
        let mut copy = |from: &[Tensor], label: &str| -> Result<Vec<Tensor>> {
            from.iter()
                .map(|c| {
                    let t = gpu.zeros(label, DType::F32, &[rows, kvd])?;
                    rec.encoder().copy_buffer_to_buffer(&c.buffer, c.offset + (r0 * kvd * 4) as u64, &t.buffer, t.offset, t.bytes());
                    Ok(t)
                })
                .collect()
        };
        let (k, v) = (copy(&cache.k, "cached keys")?, copy(&cache.v, "cached values")?);
        gpu.submit(rec);
        Ok(CachedRows { k, v, rows })
    }

    /// Append `rows` (from `cached_rows`) to the cache as rows of segment `seg`.
    pub(crate) fn copy_rows(&self, gpu: &Gpu, cache: &mut KvCache, rows: &CachedRows, seg: u32) -> Result<()> {
        let n = rows.rows;
        if cache.len + n > cache.max_t {
            return Err(Error::Shape(format!("copying {n} rows into a KV cache holding {} of {}", cache.len, cache.max_t)));
        }
        let at = (cache.len * self.cfg.kv_dim() * 4) as u64;
        let segs = gpu.upload_temp("cache segments", &vec![seg; n], &[n])?;
        let mut rec = gpu.recorder("copy rows");
        for (from, to) in rows.k.iter().zip(&cache.k).chain(rows.v.iter().zip(&cache.v)) {
            rec.encoder().copy_buffer_to_buffer(&from.buffer, from.offset, &to.buffer, to.offset + at, from.bytes());
        }
        rec.encoder().copy_buffer_to_buffer(&segs.buffer, segs.offset, &cache.seg.buffer, cache.seg.offset + (cache.len * 4) as u64, (n * 4) as u64);
        gpu.submit(rec);
        cache.len += n;
        Ok(())
    }

    /// Run `ids` (one sequence, continuing the cache) and return the logits `[V]` of
    /// the last token.
    pub async fn decode(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let pos: Vec<u32> = (cache.len..cache.len + ids.len()).map(|p| p as u32).collect();
        self.decode_rows(gpu, cache, ids, &pos, &vec![0; ids.len()], ids.len().saturating_sub(1)..ids.len()).await
    }

    /// Append `ids` to the cache at positions `pos`, each attending to the cached
    /// tokens of its own segment `seg` (several sequences share one cache as packed
    /// segments: `generate_batch`), and return the logits `[rows, V]` of rows `want` of
    /// `ids` (the last one, all, or an answer's). More rows than a storage binding holds
    /// at the widest activation (`memory::binding_rows`: a long prompt) run in pieces,
    /// each attending to what the ones before it cached; only the wanted rows' logits
    /// are computed and read back.
    pub(crate) async fn decode_rows(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32], pos: &[u32], seg: &[u32], want: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let t = ids.len();
        if t == 0 || cache.len + t > cache.max_t || want.end > t {
            return Err(Error::Shape(format!("decoding {t} tokens (logits of rows {} to {}) into a KV cache holding {} of {}", want.start, want.end, cache.len, cache.max_t)));
        }
        let per = memory::binding_rows(&self.cfg, gpu.caps.max_binding).max(1);
        let mut logits = Vec::new();
        for (a, b) in k::spans(t, per) {
            let rows = want.start.clamp(a, b) - a..want.end.clamp(a, b) - a;
            logits.extend(self.decode_piece(gpu, cache, &ids[a..b], &pos[a..b], &seg[a..b], rows).await?);
        }
        Ok(logits)
    }

    /// `decode_rows` of rows that fit a binding, with the logits of `rows` of them
    /// (none where it is empty), the head run in chunks (`head_rows`).
    async fn decode_piece(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32], pos: &[u32], seg: &[u32], rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let t = ids.len();
        let inp = Inputs::new(gpu, Shape { b: 1, t }, ids, pos, seg)?;
        let mut rec = gpu.recorder("decode");
        // The new rows' segments join the cache's, which attention reads for every key.
        rec.encoder().copy_buffer_to_buffer(&inp.seg.buffer, inp.seg.offset, &cache.seg.buffer, cache.seg.offset + (cache.len * 4) as u64, (t * 4) as u64);
        let trunk = self.forward(gpu, &mut rec, &inp, Some(cache), Keep::Nothing, false)?;
        let chunks = self.head_rows(gpu, &mut rec, &trunk.hf, rows)?;
        gpu.submit(rec);
        cache.len += t;
        read_chunks(gpu, &chunks).await
    }
}

/// f32 tensors read back one after another into one vector (the chunks of a head's
/// logits or losses).
async fn read_chunks(gpu: &Gpu, chunks: &[Tensor]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.shape.iter().product::<usize>()).sum());
    for c in chunks {
        out.extend(gpu.read::<f32>(c).await?);
    }
    Ok(out)
}
