//! One decoder layer, forward and backward side by side: `layer_backward` runs the
//! steps of `layer_forward` in reverse, from what `Acts` saved.

use super::inputs::{Inputs, KvCache};
use super::linear::{Linear, LoraSaved};
use super::params::Param;
use super::{residual, zeros, Model};
use crate::error::Result;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::kernels as k;

/// The seven projections in a fixed order, so saved LoRA activations can be indexed.
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

pub struct Layer {
    pub ln1: Param,
    pub ln2: Param,
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
    /// q, k, v, o, gate, up, down
    pub linears: Vec<Linear>,
}

/// What one layer's forward saves for its backward.
pub(crate) struct Acts {
    pub(crate) x: Tensor,
    pub(crate) h1: Tensor,
    pub(crate) rstd1: Tensor,
    /// Qwen3: q and k before their per-head norm, and the norms' rstd.
    pub(crate) q_pre: Option<(Tensor, Tensor, Tensor, Tensor)>,
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) att: Tensor,
    pub(crate) lse: Tensor,
    pub(crate) x_mid: Tensor,
    pub(crate) h2: Tensor,
    pub(crate) rstd2: Tensor,
    pub(crate) g: Tensor,
    pub(crate) u: Tensor,
    pub(crate) m: Tensor,
    pub(crate) out: Tensor,
    pub(crate) lora: Vec<Option<LoraSaved>>,
}

impl Model {
    /// One decoder layer. With `cache`, the new keys and values are appended to it
    /// and the queries attend to everything cached (decoding, B = 1). LoRA dropout
    /// applies only when `train`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward(
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
            lora[Q] = lin[Q].forward(gpu, rec, n, &h1, &q_pre, seed(Q), self.adapter_enabled, false)?;
            lora[K] = lin[K].forward(gpu, rec, n, &h1, &k_pre, seed(K), self.adapter_enabled, false)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.heads, hs, cfg.eps, &q_pre, &qn.value, &q, &rq)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.kv_heads, hs, cfg.eps, &k_pre, &kn.value, &kk, &rk)?;
            Some((q_pre, rq, k_pre, rk))
        } else {
            lora[Q] = lin[Q].forward(gpu, rec, n, &h1, &q, seed(Q), self.adapter_enabled, false)?;
            lora[K] = lin[K].forward(gpu, rec, n, &h1, &kk, seed(K), self.adapter_enabled, false)?;
            None
        };
        lora[V] = lin[V].forward(gpu, rec, n, &h1, &v, seed(V), self.adapter_enabled, false)?;
        k::rope_forward(gpu, rec, n, (cfg.heads, cfg.kv_heads), hs, &q, &kk, &inp.pos, &self.inv_freq)?;
        let att = zeros(gpu, rec, "attention out", &[n, qd])?;
        let lse = zeros(gpu, rec, "lse", &[shape.b * cfg.heads * shape.t])?;
        match cache {
            None => k::attention_forward(gpu, rec, &self.attention(shape), &q, &kk, &v, &inp.seg, &att, &lse)?,
            Some(cache) => {
                let at = self.attention(shape).cached(cache.len + shape.t);
                let offset = (cache.len * kvd * 4) as u64;
                rec.encoder().copy_buffer_to_buffer(&kk.buffer, kk.offset, &cache.k[li].buffer, cache.k[li].offset + offset, kk.bytes());
                rec.encoder().copy_buffer_to_buffer(&v.buffer, v.offset, &cache.v[li].buffer, cache.v[li].offset + offset, v.bytes());
                k::attention_forward(gpu, rec, &at, &q, &cache.k[li], &cache.v[li], &cache.seg, &att, &lse)?;
            }
        }
        // The residual connections ride on o_proj's and down's products: a copy of the
        // residual stream, then the product added into it (no add pass).
        let x_mid = residual(gpu, rec, "x_mid", &x)?;
        lora[O] = lin[O].forward(gpu, rec, n, &att, &x_mid, seed(O), self.adapter_enabled, true)?;
        let (h2, rstd2) = (zeros(gpu, rec, "h2", &[n, c])?, zeros(gpu, rec, "rstd2", &[n])?);
        k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x_mid, &layer.ln2.value, &h2, &rstd2)?;
        let (g, u, m) = (zeros(gpu, rec, "gate", &[n, inter])?, zeros(gpu, rec, "up", &[n, inter])?, zeros(gpu, rec, "swiglu", &[n, inter])?);
        lora[GATE] = lin[GATE].forward(gpu, rec, n, &h2, &g, seed(GATE), self.adapter_enabled, false)?;
        lora[UP] = lin[UP].forward(gpu, rec, n, &h2, &u, seed(UP), self.adapter_enabled, false)?;
        k::swiglu_forward(gpu, rec, n * inter, &g, &u, &m)?;
        let out = residual(gpu, rec, "layer out", &x_mid)?;
        lora[DOWN] = lin[DOWN].forward(gpu, rec, n, &m, &out, seed(DOWN), self.adapter_enabled, true)?;
        Ok(Acts { x, h1, rstd1, q_pre, q, k: kk, v, att, lse, x_mid, h2, rstd2, g, u, m, out, lora })
    }

    /// The gradient of one layer, in the reverse order of `layer_forward`: `dres`
    /// holds d(loss)/d(layer output) and becomes d(loss)/d(layer input).
    pub(crate) fn layer_backward(&self, gpu: &Gpu, rec: &mut Recorder, li: usize, inp: &Inputs, a: &Acts, dres: &Tensor) -> Result<()> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let n = inp.shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        let back = |rec: &mut Recorder, i: usize, x: &Tensor, dy: &Tensor, dx: &Tensor| {
            lin[i].backward(gpu, rec, n, x, a.lora[i].as_ref(), dy, dx, inp.seed(li, i))
        };
        // MLP: out = x_mid + down(silu(gate(h2)) · up(h2)), h2 = norm(x_mid)
        let dm = zeros(gpu, rec, "dswiglu", &[n, inter])?;
        back(rec, DOWN, &a.m, dres, &dm)?;
        let (dg, du) = (zeros(gpu, rec, "dgate", &[n, inter])?, zeros(gpu, rec, "dup", &[n, inter])?);
        k::swiglu_backward(gpu, rec, n * inter, &a.g, &a.u, &dm, &dg, &du)?;
        let dh2 = zeros(gpu, rec, "dh2", &[n, c])?;
        back(rec, GATE, &a.h2, &dg, &dh2)?;
        back(rec, UP, &a.h2, &du, &dh2)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x_mid, &layer.ln2.value, &a.rstd2, &dh2, dres, layer.ln2.grad())?;
        // Attention: x_mid = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
        let datt = zeros(gpu, rec, "datt", &[n, qd])?;
        back(rec, O, &a.att, dres, &datt)?;
        let (dq, dk, dv) = (zeros(gpu, rec, "dq", &[n, qd])?, zeros(gpu, rec, "dk", &[n, kvd])?, zeros(gpu, rec, "dv", &[n, kvd])?);
        k::attention_backward(gpu, rec, &self.attention(inp.shape), &a.q, &a.k, &a.v, &inp.seg, &a.att, &a.lse, &datt, &dq, &dk, &dv)?;
        k::rope_backward(gpu, rec, n, (cfg.heads, cfg.kv_heads), hs, &dq, &dk, &inp.pos, &self.inv_freq)?;
        let dh1 = zeros(gpu, rec, "dh1", &[n, c])?;
        if let (Some((q_pre, rq, k_pre, rk)), Some(qn), Some(kn)) = (&a.q_pre, &layer.q_norm, &layer.k_norm) {
            let (dq_pre, dk_pre) = (zeros(gpu, rec, "dq_pre", &[n, qd])?, zeros(gpu, rec, "dk_pre", &[n, kvd])?);
            k::rmsnorm_backward(gpu, rec, n * cfg.heads, hs, q_pre, &qn.value, rq, &dq, &dq_pre, qn.grad())?;
            k::rmsnorm_backward(gpu, rec, n * cfg.kv_heads, hs, k_pre, &kn.value, rk, &dk, &dk_pre, kn.grad())?;
            back(rec, Q, &a.h1, &dq_pre, &dh1)?;
            back(rec, K, &a.h1, &dk_pre, &dh1)?;
        } else {
            back(rec, Q, &a.h1, &dq, &dh1)?;
            back(rec, K, &a.h1, &dk, &dh1)?;
        }
        back(rec, V, &a.h1, &dv, &dh1)?;
        k::rmsnorm_backward(gpu, rec, n, c, &a.x, &layer.ln1.value, &a.rstd1, &dh1, dres, layer.ln1.grad())
    }

}
