//! GPU memory a training step needs, computed from the config alone: the same
//! tensors `Model::load` and `Model::forward_backward` allocate, counted in bytes.

use std::collections::BTreeMap;

use super::{Config, Frozen, LoraConfig, Tensors, Tuning};
use crate::quant::QType;

/// What is being estimated.
#[derive(Clone, Debug)]
pub struct Plan {
    pub tuning: Tuning,
    pub batch: usize,
    pub seq: usize,
    pub grad_checkpoint: bool,
    /// Frozen matrices in f16 (adapters with shader-f16).
    pub f16_weights: bool,
    /// How frozen matrices are held (`--quantize`; QLoRA packs them).
    pub frozen: Frozen,
    /// The block types of the matrices the base stores packed (a GGUF's), by name: kept
    /// unless `frozen` dequantizes (`Plan::stored`).
    pub stored: BTreeMap<String, QType>,
    /// The adapter's largest storage binding (bounds the logits chunk).
    pub max_binding: u64,
    /// SwiGLU's hidden is made as down's products load it, never stored (the GPU
    /// kernels, `Caps::variant` tiled); CPU drivers store it.
    pub swiglu_in_loads: bool,
    /// DPO from a trained LoRA adapter (`Run::init_adapter`): the run keeps that
    /// adapter on the GPU as its reference, beside a scratch copy to swap it through,
    /// two more copies of the LoRA values (counted in the training state).
    pub reference_adapter: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// Every weight as stored.
    pub weights: u64,
    /// Gradients and AdamW moments of the trainable parameters (LoRA pairs' values
    /// too), and a DPO run's reference adapter (`Plan::reference_adapter`).
    pub training_state: u64,
    /// Activations and temporaries at the peak of a step.
    pub activations: u64,
}

impl Plan {
    /// The block types `w` stores the matrices of `cfg` in (`Tensors::packed_type`).
    pub fn stored(cfg: &Config, w: &dyn Tensors) -> BTreeMap<String, QType> {
        cfg.tensor_shapes().into_iter().filter(|(_, s)| s.len() == 2).filter_map(|(n, _)| Some((n.clone(), w.packed_type(&n)?))).collect()
    }

    /// How the matrices of `cfg` are held, counted by type: `q4_1 × 210, q8_0 × 1`.
    pub fn held(&self, cfg: &Config) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, _, cols) in matrices(cfg) {
            let t = match self.packed(&name, cols) {
                Some(q) => q.name(),
                None if self.f16_weights && self.tuning != Tuning::Full => "f16",
                None => "f32",
            };
            *counts.entry(t).or_default() += 1;
        }
        counts.iter().map(|(t, n)| format!("{t} × {n}")).collect::<Vec<_>>().join(", ")
    }

    /// The packed type the frozen matrix `name` of `cols` columns is held in, if any.
    pub fn packed(&self, name: &str, cols: usize) -> Option<QType> {
        if self.tuning == Tuning::Full {
            return None;
        }
        self.frozen.packed_as(self.stored.get(name).copied(), cols).map(|(q, _)| q)
    }
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.weights + self.training_state + self.activations
    }
}

fn lora_targets<'a>(cfg: &Config, l: &'a LoraConfig) -> impl Iterator<Item = (usize, usize)> + 'a {
    cfg.projections().into_iter().filter(|(n, ..)| l.targets.iter().any(|t| t == n)).map(|(_, _, i, o)| (i, o))
}

/// The widest activation row of a layer, in values a token: the hidden state, q, k/v
/// or the MLP's intermediate (a micro-batch's activations of this width must fit one
/// storage binding).
pub fn widest_row(cfg: &Config) -> usize {
    cfg.hidden.max(cfg.heads * cfg.head_dim).max(cfg.kv_heads * cfg.head_dim).max(cfg.intermediate)
}

/// The token rows one storage binding of `max_binding` bytes holds at the widest
/// activation (`widest_row`): a training micro-batch's, an evaluation batch's or a
/// decoded piece's rows must not exceed it.
pub fn binding_rows(cfg: &Config, max_binding: u64) -> usize {
    (max_binding / (widest_row(cfg) as u64 * 4)) as usize
}

/// Bytes a tensor of `n` elements occupies (buffers are padded to 16 bytes).
fn bytes(n: usize, elem: usize) -> u64 {
    ((n.max(1) * elem) as u64).div_ceil(16) * 16
}

/// Every matrix of `cfg` as (name, elements, columns).
fn matrices(cfg: &Config) -> Vec<(String, usize, usize)> {
    let (c, v) = (cfg.hidden, cfg.vocab);
    let mut out: Vec<(String, usize, usize)> = vec![("model.embed_tokens.weight".into(), v * c, c)];
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".into(), v * c, c));
    }
    for l in 0..cfg.layers {
        out.extend(cfg.projections().iter().map(|(n, g, i, o)| (format!("model.layers.{l}.{g}.{n}.weight"), i * o, *i)));
    }
    out
}

pub fn estimate(cfg: &Config, plan: &Plan) -> Memory {
    let (c, q, kv, hs, inter, v) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate, cfg.vocab);
    let full = plan.tuning == Tuning::Full;
    let mat = if plan.f16_weights && !full { 2 } else { 4 };
    let f32b = |n: usize| bytes(n, 4);
    // Weights, tensor by tensor (row-parts of a split matrix pad separately: a few
    // bytes).
    let matrices = matrices(cfg);
    let mut vectors: Vec<usize> = vec![c];
    for _ in 0..cfg.layers {
        vectors.extend([c, c]);
        if cfg.qkv_bias {
            vectors.extend([q, kv, kv]);
        }
        if cfg.qk_norm {
            vectors.extend([hs, hs]);
        }
    }
    let sum = |ts: &[usize], elem: usize| ts.iter().map(|&n| bytes(n, elem)).sum::<u64>();
    let frozen = |(name, n, cols): &(String, usize, usize)| match plan.packed(name, *cols) {
        Some(q) => bytes(q.bytes(*n), 1),
        None => bytes(*n, mat),
    };
    let matrix_elems: Vec<usize> = matrices.iter().map(|m| m.1).collect();
    let weights = matrices.iter().map(frozen).sum::<u64>() + sum(&vectors, 4) + f32b(hs / 2);
    let training_state = match &plan.tuning {
        Tuning::Frozen => 0,
        Tuning::Full => 3 * (sum(&matrix_elems, 4) + sum(&vectors, 4)),
        Tuning::Lora(l) => {
            let per_layer: u64 = lora_targets(cfg, l).map(|(i, o)| f32b(l.r * i) + f32b(o * l.r)).sum();
            // Values, gradients, AdamW's m and v; the reference adapter and its scratch.
            (4 + 2 * plan.reference_adapter as u64) * per_layer * cfg.layers as u64
        }
    };

    let n = plan.batch * plan.seq;
    let (nh, nkv) = (cfg.heads, cfg.kv_heads);
    // A temporary is a pooled buffer of its size class (up to an eighth more).
    let f32b = |n: usize| crate::gpu::reuse::size_class(bytes(n, 4));
    let lora = match &plan.tuning {
        Tuning::Lora(l) => Some(l),
        _ => None,
    };
    // What one layer's forward keeps (Acts: o_proj and down add into the residual copies;
    // SwiGLU's hidden where it is stored, `swiglu_in_loads`).
    let fits = (2 * n * inter * 4) as u64 <= plan.max_binding;
    let stored_hidden: &[usize] = if plan.swiglu_in_loads && fits { &[] } else { &[inter] };
    let mut layer_fwd = [c, c, q, kv, kv, q, c, c, inter, inter, c].iter().chain(stored_hidden).map(|&k| f32b(n * k)).sum::<u64>()
        + f32b(n) * 2
        + f32b(plan.batch * nh * plan.seq);
    if cfg.qk_norm {
        layer_fwd += f32b(n * q) + f32b(n * kv) + f32b(n * nh) + f32b(n * nkv);
    }
    // The backward's temporaries for one layer.
    // (No SwiGLU dh where gate and up fit a binding together: down's dx product adds its
    // backward into dgate and dup.)
    let hidden: &[usize] = if fits { &[] } else { &[inter] };
    let mut layer_bwd = [inter, inter, c, c, q, q, kv, kv].iter().chain(hidden).map(|&k| f32b(n * k)).sum::<u64>()
        + f32b(2 * plan.batch * nh * plan.seq);
    if cfg.qk_norm {
        layer_bwd += f32b(n * q) + f32b(n * kv);
    }
    // h and dh per pair; dropout's mask is made inside the products (no x' copy).
    let lora_h: u64 = lora.map_or(0, |l| lora_targets(cfg, l).map(|_| f32b(n * l.r)).sum());
    layer_fwd += lora_h;
    layer_bwd += lora_h;
    let head_rows = ((crate::gpu::Caps::chunk_bytes_of(plan.max_binding) / (v as u64 * 4)) as usize).clamp(1, n);
    // hf, dhf, dres, the embeddings, the final rstd, one logits chunk and its rows.
    let head = 4 * f32b(n * c) + f32b(n) + f32b(head_rows * v) + 3 * f32b(head_rows);
    let layers = cfg.layers as u64;
    let activations = if plan.grad_checkpoint {
        // Each layer's input and LoRA h's stay; one layer is recomputed (from its h's)
        // and differentiated at a time.
        layers * (f32b(n * c) + lora_h) + layer_fwd - lora_h + layer_bwd + head
    } else {
        // One command buffer holds every layer's activations and temporaries.
        layers * (layer_fwd + layer_bwd) + head
    };
    Memory { weights, training_state, activations }
}
