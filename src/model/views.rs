//! The teaching views the page shows: the loss of each token, a head's attention
//! map, each layer's gradient norm.

use super::inputs::Inputs;
use super::Model;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

impl Model {
    /// Per-token cross-entropy (nats) of predicting `targets[i]` at row i; None where
    /// the target is negative (not trained). On the GPU, by the training loss's kernel.
    pub async fn token_losses(&self, gpu: &Gpu, inp: &Inputs, targets: &[i32]) -> Result<Vec<Option<f32>>> {
        let losses = self.row_losses(gpu, inp, targets).await?;
        Ok(targets.iter().zip(losses).map(|(&t, l)| (t >= 0).then_some(l)).collect())
    }

    /// Attention probabilities `[T, T]` of query head `head` in layer `layer` for the
    /// first sequence of `inp` (row t: how much token t attends to each earlier one).
    pub async fn attention_map(&self, gpu: &Gpu, inp: &Inputs, layer: usize, head: usize) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        if layer >= cfg.layers || head >= cfg.heads {
            return Err(Error::Shape(format!("layer {layer}, head {head}: the model has {} layers of {} heads", cfg.layers, cfg.heads)));
        }
        let mut rec = gpu.recorder("attention map");
        let acts = self.layer_activations(gpu, &mut rec, inp, layer)?;
        gpu.submit(rec);
        let (mut q, mut k) = (gpu.read::<f32>(&acts.q).await?, gpu.read::<f32>(&acts.k).await?);
        if self.rope_on_load(gpu).is_some() {
            // Kept before RoPE (attention rotated them as it loaded them): rotate here.
            let pos = gpu.read::<u32>(&inp.pos).await?;
            crate::reference::rope_forward(inp.shape.n(), (cfg.heads, cfg.kv_heads), cfg.head_dim, &mut q, &mut k, &pos, &self.inv_freq_host);
        }
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

}
