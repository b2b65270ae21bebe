//! KV-cached generation: greedy, temperature, top-k and top-p sampling, seeded.

use super::Model;
use crate::rng::Rng;
use crate::error::Result;
use crate::gpu::Gpu;

#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 42 }
    }
}

/// Pick the next token from `logits` `[V]`.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let mx = logits[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i] - mx) / s.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.unit() as f64 * total;
    for (p, &i) in probs.iter().zip(&idx) {
        u -= p;
        if u <= 0.0 {
            return i as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

impl Model {
    /// Continue `prompt` by up to `max_new` tokens, stopping after an EOS token (the
    /// model's, from its config and generation config). `on_token` sees each token
    /// as it is chosen. Returns the new tokens.
    pub async fn generate(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let mut cache = self.kv_cache(gpu, prompt.len() + max_new)?;
        let mut rng = Rng::new(sampling.seed);
        let mut out = Vec::new();
        let mut logits = self.decode(gpu, &mut cache, prompt).await?;
        while out.len() < max_new {
            let next = sample(&logits, sampling, &mut rng);
            out.push(next);
            on_token(next);
            if self.cfg.eos.contains(&next) || out.len() == max_new {
                break;
            }
            logits = self.decode(gpu, &mut cache, &[next]).await?;
        }
        Ok(out)
    }
}
