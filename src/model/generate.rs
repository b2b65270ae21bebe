//! KV-cached generation: greedy, temperature, top-k and top-p sampling, seeded.

use super::Model;
use crate::rng::Rng;
use crate::error::{Error, Result};
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

impl Sampling {
    /// Refuses settings no sampler can use, naming them as the command line does.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Options(format!("--temperature {}: expected a number of at least 0 (0 is greedy)", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Options(format!("--top-p {}: expected a number in (0, 1] (1 keeps every token)", self.top_p)));
        }
        Ok(())
    }
}

/// How many leading tokens every prompt shares and `generate_batch` runs once: none
/// for one prompt or under 8 shared tokens; at most each prompt's length less one (its
/// own last row gives its logits).
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = prompts.split_first() else { return 0 };
    let common = rest.iter().map(|p| p.iter().zip(first).take_while(|(a, b)| a == b).count()).min().unwrap_or(0);
    let n = common.min(prompts.iter().map(|p| p.len().saturating_sub(1)).min().unwrap_or(0));
    if n >= 8 { n } else { 0 }
}

/// The prompts a model can continue: each of at least one token.
fn check_prompts<'a>(mut prompts: impl Iterator<Item = &'a [u32]>) -> Result<()> {
    if prompts.any(|p| p.is_empty()) {
        return Err(Error::Options("the prompt is empty (no tokens to continue): give it some text".into()));
    }
    Ok(())
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
        sampling.check()?;
        check_prompts(std::iter::once(prompt))?;
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

    /// `generate` for each of `prompts` (each its own sampler, seeded alike), all at
    /// once: the sequences share one KV cache as packed segments, and each step runs
    /// one pass over a token of every sequence still going, so B answers take as
    /// many passes as the longest of them, not their sum. Each row attends to its own
    /// sequence's keys in the order `generate` would, so the tokens are the same.
    /// Prompts whose cache would overfill a binding (`cache_tokens`) run in groups, one
    /// after the other, each as above.
    pub async fn generate_batch(&self, gpu: &Gpu, prompts: &[Vec<u32>], max_new: usize, sampling: &Sampling) -> Result<Vec<Vec<u32>>> {
        sampling.check()?;
        check_prompts(prompts.iter().map(Vec::as_slice))?;
        if prompts.is_empty() || max_new == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let (cap, mut out) = (self.cache_tokens(gpu), Vec::with_capacity(prompts.len()));
        // The group prompts[group] and the cache rows it takes.
        let (mut group, mut room) = (0..0, 0);
        for (j, p) in prompts.iter().enumerate() {
            if !group.is_empty() && room + p.len() + max_new > cap {
                out.extend(self.generate_group(gpu, &prompts[group.clone()], max_new, sampling).await?);
                (group, room) = (j..j, 0);
            }
            group.end = j + 1;
            room += p.len() + max_new;
        }
        out.extend(self.generate_group(gpu, &prompts[group], max_new, sampling).await?);
        Ok(out)
    }

    /// `generate_batch` of prompts whose cache fits a binding.
    async fn generate_group(&self, gpu: &Gpu, prompts: &[Vec<u32>], max_new: usize, sampling: &Sampling) -> Result<Vec<Vec<u32>>> {
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let room = prompts.iter().map(|p| p.len() + max_new).sum();
        let mut cache = self.kv_cache(gpu, room)?;
        let mut rngs: Vec<Rng> = prompts.iter().map(|_| Rng::new(sampling.seed)).collect();
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        // Each prompt into the cache as its own segment; its last row's logits. The
        // tokens every prompt starts with (a chat template's system prompt) run once: the
        // other segments get copies of their keys and values, the same values their own
        // pass would compute (each row's are its own), and run the rest.
        let shared = shared_prefix(prompts);
        let mut logits = Vec::new();
        let mut prefix = None;
        for (j, p) in prompts.iter().enumerate() {
            let from = match &prefix {
                Some(kv) => {
                    self.copy_rows(gpu, &mut cache, kv, j as u32)?;
                    shared
                }
                None => 0,
            };
            let pos: Vec<u32> = (from as u32..p.len() as u32).collect();
            logits.push(self.decode_rows(gpu, &mut cache, &p[from..], &pos, &vec![j as u32; p.len() - from], (p.len() - from).saturating_sub(1)..p.len() - from).await?);
            if j == 0 && shared > 0 {
                prefix = Some(self.cached_rows(gpu, &cache, 0, shared)?);
            }
        }
        let mut live: Vec<usize> = (0..prompts.len()).collect();
        loop {
            let (mut ids, mut pos, mut going) = (Vec::new(), Vec::new(), Vec::new());
            for (row, &j) in live.iter().enumerate() {
                let next = sample(&logits[row], sampling, &mut rngs[j]);
                out[j].push(next);
                if !self.cfg.eos.contains(&next) && out[j].len() < max_new {
                    ids.push(next);
                    pos.push(lens[j] as u32);
                    lens[j] += 1;
                    going.push(j);
                }
            }
            if going.is_empty() {
                return Ok(out);
            }
            let seg: Vec<u32> = going.iter().map(|&j| j as u32).collect();
            let rows = self.decode_rows(gpu, &mut cache, &ids, &pos, &seg, 0..ids.len()).await?;
            logits = rows.chunks(self.cfg.vocab).map(<[f32]>::to_vec).collect();
            live = going;
        }
    }
}
