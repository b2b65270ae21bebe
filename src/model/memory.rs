//! GPU memory a training step needs, computed from the config alone: the same
//! tensors `Model::load` and `Model::forward_backward` allocate, counted in bytes.

use super::{Config, LoraConfig, Tuning};

/// What is being estimated.
#[derive(Clone, Debug)]
pub struct Plan {
    pub tuning: Tuning,
    pub batch: usize,
    pub seq: usize,
    pub grad_checkpoint: bool,
    /// Frozen matrices in f16 (adapters with shader-f16).
    pub f16_weights: bool,
    /// Frozen matrices packed as this type (`--quantize`; QLoRA), those whose rows are
    /// whole blocks.
    pub quantize: Option<crate::quant::QType>,
    /// The adapter's largest storage binding (bounds the logits chunk).
    pub max_binding: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// Every weight as stored.
    pub weights: u64,
    /// Gradients and AdamW moments of the trainable parameters (LoRA pairs' values too).
    pub training_state: u64,
    /// Activations and temporaries at the peak of a step.
    pub activations: u64,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.weights + self.training_state + self.activations
    }
}

fn lora_targets<'a>(cfg: &Config, l: &'a LoraConfig) -> impl Iterator<Item = (usize, usize)> + 'a {
    cfg.projections().into_iter().filter(|(n, ..)| l.targets.iter().any(|t| t == n)).map(|(_, _, i, o)| (i, o))
}

/// Bytes a tensor of `n` elements occupies (buffers are padded to 16 bytes).
fn bytes(n: usize, elem: usize) -> u64 {
    ((n.max(1) * elem) as u64).div_ceil(16) * 16
}

pub fn estimate(cfg: &Config, plan: &Plan) -> Memory {
    let (c, q, kv, hs, inter, v) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate, cfg.vocab);
    let full = plan.tuning == Tuning::Full;
    let mat = if plan.f16_weights && !full { 2 } else { 4 };
    let f32b = |n: usize| bytes(n, 4);
    // Weights, tensor by tensor (row-parts of a split matrix pad separately: a few
    // bytes), as (elements, columns).
    let mut matrices: Vec<(usize, usize)> = vec![(v * c, c)];
    if !cfg.tie_embeddings {
        matrices.push((v * c, c));
    }
    let mut vectors: Vec<usize> = vec![c];
    for _ in 0..cfg.layers {
        matrices.extend(cfg.projections().iter().map(|(_, _, i, o)| (i * o, *i)));
        vectors.extend([c, c]);
        if cfg.qkv_bias {
            vectors.extend([q, kv, kv]);
        }
        if cfg.qk_norm {
            vectors.extend([hs, hs]);
        }
    }
    let sum = |ts: &[usize], elem: usize| ts.iter().map(|&n| bytes(n, elem)).sum::<u64>();
    let frozen = |&(n, cols): &(usize, usize)| match plan.quantize {
        Some(q) if !full && q.fits(cols) => bytes(q.bytes(n), 1),
        _ => bytes(n, mat),
    };
    let matrix_elems: Vec<usize> = matrices.iter().map(|m| m.0).collect();
    let weights = matrices.iter().map(frozen).sum::<u64>() + sum(&vectors, 4) + f32b(hs / 2);
    let training_state = match &plan.tuning {
        Tuning::Frozen => 0,
        Tuning::Full => 3 * (sum(&matrix_elems, 4) + sum(&vectors, 4)),
        Tuning::Lora(l) => {
            let per_layer: u64 = lora_targets(cfg, l).map(|(i, o)| f32b(l.r * i) + f32b(o * l.r)).sum();
            4 * per_layer * cfg.layers as u64
        }
    };

    let n = plan.batch * plan.seq;
    let (nh, nkv) = (cfg.heads, cfg.kv_heads);
    let lora = match &plan.tuning {
        Tuning::Lora(l) => Some(l),
        _ => None,
    };
    // What one layer's forward keeps (Acts) plus its two temporaries (o_proj and down outputs).
    let mut layer_fwd = [c, c, q, kv, kv, q, c, c, inter, inter, inter, c, c, c].iter().map(|&k| f32b(n * k)).sum::<u64>()
        + f32b(n) * 2
        + f32b(plan.batch * nh * plan.seq);
    if cfg.qk_norm {
        layer_fwd += f32b(n * q) + f32b(n * kv) + f32b(n * nh) + f32b(n * nkv);
    }
    // The backward's temporaries for one layer.
    let mut layer_bwd = [inter, inter, inter, c, c, q, q, kv, kv].iter().map(|&k| f32b(n * k)).sum::<u64>()
        + f32b(2 * plan.batch * nh * plan.seq)
        + f32b(c);
    if cfg.qk_norm {
        layer_bwd += f32b(n * q) + f32b(n * kv);
    }
    if let Some(l) = lora {
        for (din, _) in lora_targets(cfg, l) {
            layer_fwd += f32b(n * l.r) + if l.dropout > 0.0 { f32b(n * din) } else { 0 };
            layer_bwd += f32b(n * l.r) + if l.dropout > 0.0 { f32b(n * din) } else { 0 };
        }
    }
    let head_rows = ((plan.max_binding.min(64 << 20) / (v as u64 * 4)) as usize).clamp(1, n);
    // hf, dhf, dres, the embeddings, the final rstd, one logits chunk and its rows.
    let head = 4 * f32b(n * c) + f32b(n) + f32b(head_rows * v) + 3 * f32b(head_rows);
    let layers = cfg.layers as u64;
    let activations = if plan.grad_checkpoint {
        // Each layer's input stays; one layer is recomputed and differentiated at a time.
        layers * f32b(n * c) + layer_fwd + layer_bwd + head
    } else {
        // One command buffer holds every layer's activations and temporaries.
        layers * (layer_fwd + layer_bwd) + head
    };
    Memory { weights, training_state, activations }
}
