//! One decoder layer, forward and backward side by side: `layer_backward` runs the
//! steps of `layer_forward` in reverse, from what `Acts` saved.

use super::inputs::{Inputs, KvCache};
use super::linear::{backwards, downs, forwards, norm_backward_made_dh, norm_downs, Linear, LoraSaved};
use super::params::Param;
use super::{residual, zeros, Model};
use crate::error::Result;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::kernels::{self as k, SwigluBack};

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

/// Which forward `layer_forward` runs.
pub(crate) enum Pass {
    /// The forward proper.
    Forward,
    /// Checkpointing's forward again before the layer's backward, from the LoRA h's
    /// (`x'·Aᵀ`, by projection) that the forward kept beside the layer's input: it
    /// runs no LoRA down product, and since the backward reads the activations but not
    /// the output, no down base product either.
    Recompute(Vec<Option<LoraSaved>>),
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
    /// The MLP's hidden silu(g)·u as down's products read it (`mlp_hidden`).
    pub(crate) m: Tensor,
    pub(crate) m_glu: Option<usize>,
    /// The layer's output (None in the backward's recompute, which needs none).
    pub(crate) out: Option<Tensor>,
    pub(crate) lora: Vec<Option<LoraSaved>>,
}

impl Model {
    /// One decoder layer. With `cache`, the new keys and values are appended to it
    /// and the queries attend to everything cached (decoding, B = 1). LoRA dropout
    /// applies only when `train`. `pass`: the forward proper, or the one that
    /// checkpointing runs again before the layer's backward (`Pass::Recompute`).
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
        pass: Pass,
    ) -> Result<Acts> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let shape = inp.shape;
        let n = shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        let seed = |i: usize| if train { inp.seed(li, i) } else { None };
        let recompute = matches!(pass, Pass::Recompute(_));
        // LoRA's down products for the projections `idx` (which read x), or the h's
        // the forward saved when this is checkpointing's recompute.
        let mut kept = match pass {
            Pass::Forward => None,
            Pass::Recompute(lora) => Some(lora),
        };
        let mut lora_downs = |rec: &mut Recorder, idx: &[usize], x: &Tensor, x_glu: Option<usize>| -> Result<Vec<Option<LoraSaved>>> {
            match kept.as_mut() {
                Some(lora) => Ok(idx.iter().map(|&i| lora[i].take()).collect()),
                None => {
                    let lins: Vec<_> = idx.iter().map(|&i| &lin[i]).collect();
                    downs(gpu, rec, &lins, n, x, x_glu, &idx.iter().map(|&i| seed(i)).collect::<Vec<_>>(), self.adapter_enabled)
                }
            }
        };
        // A norm and the LoRA down products of the layers that read its output, as one
        // row kernel (`norm_downs`); checkpointing's recompute has the h's already.
        let norm_downs_of = |rec: &mut Recorder, (x, w, y, rstd): (&Tensor, &Tensor, &Tensor, &Tensor), idx: &[usize]| {
            let lins: Vec<_> = idx.iter().map(|&i| &lin[i]).collect();
            norm_downs(gpu, rec, (n, c, cfg.eps), (x, w, y, rstd), &lins, &idx.iter().map(|&i| seed(i)).collect::<Vec<_>>(), self.adapter_enabled)
        };
        let h1 = zeros(gpu, rec, "h1", &[n, c])?;
        let rstd1 = zeros(gpu, rec, "rstd1", &[n])?;
        // The input norm with LoRA's down products for q, k and v (one input), then
        // their base products, with each pair's up product inside, as one more
        // (`forwards`): their outputs share one temporary (with Qwen3's per-head norms,
        // the outputs before the norms do).
        let [q_out, k_out, v] = gpu.temps(rec, "q, k, v", &[vec![n, qd], vec![n, kvd], vec![n, kvd]])?.try_into().ok().expect("three");
        let lora_qkv = if recompute {
            k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x, &layer.ln1.value, &h1, &rstd1)?;
            lora_downs(rec, &[Q, K, V], &h1, None)?
        } else {
            norm_downs_of(rec, (&x, &layer.ln1.value, &h1, &rstd1), &[Q, K, V])?
        };
        let saved_qkv: Vec<_> = lora_qkv.iter().map(|s| s.as_ref()).collect();
        forwards(gpu, rec, &[&lin[Q], &lin[K], &lin[V]], n, &h1, &[&q_out, &k_out, &v], &saved_qkv)?;
        let (q, kk, q_pre) = if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (q, kk) = (zeros(gpu, rec, "q", &[n, qd])?, zeros(gpu, rec, "k", &[n, kvd])?);
            let (rq, rk) = (zeros(gpu, rec, "q_rstd", &[n * cfg.heads])?, zeros(gpu, rec, "k_rstd", &[n * cfg.kv_heads])?);
            k::rmsnorm_forward(gpu, rec, n * cfg.heads, hs, cfg.eps, &q_out, &qn.value, &q, &rq)?;
            k::rmsnorm_forward(gpu, rec, n * cfg.kv_heads, hs, cfg.eps, &k_out, &kn.value, &kk, &rk)?;
            (q, kk, Some((q_out, rq, k_out, rk)))
        } else {
            (q_out, k_out, None)
        };
        // With the GPU kernels attention rotates q and k as it loads them (q and k are
        // kept before RoPE); else a pass rotates them in place (and the KV cache holds
        // rotated keys).
        let rope = self.rope_on_load(gpu).filter(|_| cache.is_none());
        if rope.is_none() {
            k::rope_forward(gpu, rec, n, (cfg.heads, cfg.kv_heads), hs, &q, &kk, &inp.pos, &self.inv_freq)?;
        }
        let att = zeros(gpu, rec, "attention out", &[n, qd])?;
        let lse = zeros(gpu, rec, "lse", &[shape.b * cfg.heads * shape.t])?;
        match cache {
            None => k::attention_forward(gpu, rec, &self.attention(shape).sorted(inp.sorted), rope, &q, &kk, &v, inp.segments(rope.is_some()), &att, &lse)?,
            Some(cache) => {
                let at = self.attention(shape).cached(cache.len + shape.t);
                let offset = (cache.len * kvd * 4) as u64;
                rec.encoder().copy_buffer_to_buffer(&kk.buffer, kk.offset, &cache.k[li].buffer, cache.k[li].offset + offset, kk.bytes());
                rec.encoder().copy_buffer_to_buffer(&v.buffer, v.offset, &cache.v[li].buffer, cache.v[li].offset + offset, v.bytes());
                k::attention_forward(gpu, rec, &at, None, &q, &cache.k[li], &cache.v[li], &cache.seg, &att, &lse)?;
            }
        }
        // The residual connections ride on o_proj's and down's products: a copy of the
        // residual stream, then the product added into it (no add pass).
        let x_mid = residual(gpu, rec, "x_mid", &x)?;
        let [lora_o] = lora_downs(rec, &[O], &att, None)?.try_into().ok().expect("one");
        lin[O].forward(gpu, rec, n, &att, None, &x_mid, lora_o.as_ref(), true)?;
        let (h2, rstd2) = (zeros(gpu, rec, "h2", &[n, c])?, zeros(gpu, rec, "rstd2", &[n])?);
        let [g, u] = gpu.temps(rec, "gate, up", &[vec![n, inter], vec![n, inter]])?.try_into().ok().expect("two");
        let lora_mlp = if recompute {
            k::rmsnorm_forward(gpu, rec, n, c, cfg.eps, &x_mid, &layer.ln2.value, &h2, &rstd2)?;
            lora_downs(rec, &[GATE, UP], &h2, None)?
        } else {
            norm_downs_of(rec, (&x_mid, &layer.ln2.value, &h2, &rstd2), &[GATE, UP])?
        };
        forwards(gpu, rec, &[&lin[GATE], &lin[UP]], n, &h2, &[&g, &u], &[lora_mlp[0].as_ref(), lora_mlp[1].as_ref()])?;
        let (m, m_glu) = mlp_hidden(gpu, rec, n, inter, &g, &u)?;
        let [lora_down] = lora_downs(rec, &[DOWN], &m, m_glu)?.try_into().ok().expect("one");
        let out = if recompute {
            None
        } else {
            let out = residual(gpu, rec, "layer out", &x_mid)?;
            lin[DOWN].forward(gpu, rec, n, &m, m_glu, &out, lora_down.as_ref(), true)?;
            Some(out)
        };
        let lora = lora_qkv.into_iter().chain([lora_o]).chain(lora_mlp).chain([lora_down]).collect();
        Ok(Acts { x, h1, rstd1, q_pre, q, k: kk, v, att, lse, x_mid, h2, rstd2, g, u, m, m_glu, out, lora })
    }

    /// The gradient of one layer, in the reverse order of `layer_forward`: `dres`
    /// holds d(loss)/d(layer output) and becomes d(loss)/d(layer input). `down_dh`:
    /// down_proj's LoRA dh where the norm after the layer made it; returns the previous
    /// layer's, which this layer's input norm makes (`norm_backward_made_dh`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_backward(&self, gpu: &Gpu, rec: &mut Recorder, li: usize, inp: &Inputs, a: &Acts, dres: &Tensor, down_dh: Option<Tensor>) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let n = inp.shape.n();
        let (c, qd, kvd, hs, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim, cfg.intermediate);
        let lin = &layer.linears;
        // The layers given read one x; their LoRA products run grouped (`backwards`).
        let back_with = |rec: &mut Recorder, idx: &[usize], x: (&Tensor, Option<usize>), dys: &[&Tensor], dx: &Tensor, swiglu_back: Option<(SwigluBack, &Tensor)>, dh: Option<Tensor>| {
            let lins: Vec<_> = idx.iter().map(|&i| &lin[i]).collect();
            let saved: Vec<_> = idx.iter().map(|&i| a.lora[i].as_ref()).collect();
            let seeds: Vec<_> = idx.iter().map(|&i| inp.seed(li, i)).collect();
            backwards(gpu, rec, &lins, n, x, &saved, dys, dx, &seeds, swiglu_back, dh)
        };
        let back = |rec: &mut Recorder, idx: &[usize], x: (&Tensor, Option<usize>), dys: &[&Tensor], dx: &Tensor| back_with(rec, idx, x, dys, dx, None, None);
        // MLP: out = x_mid + down(silu(gate(h2)) · up(h2)), h2 = norm(x_mid)
        // dgate and dup in one temporary, so their LoRA products bind it once.
        let [dg, du] = gpu.temps(rec, "dgate, dup", &[vec![n, inter], vec![n, inter]])?.try_into().ok().expect("two");
        let dgu = Tensor::span("dgate, dup", &[&dg, &du], gpu.caps.max_binding).filter(|(_, o)| o[0] == 0);
        match (gate_up(gpu, n, inter, &a.g, &a.u), dgu) {
            // Down's dx product adds SwiGLU's backward of its dh into dgate and dup, from
            // gate and up: no dh, no pass.
            (Some((gu, up)), Some((dgu, o))) if lin[DOWN].w.parts.len() == 1 => {
                let dgu = Tensor { shape: vec![o[1] + n * inter], ..dgu };
                back_with(rec, &[DOWN], (&a.m, a.m_glu), &[dres], &dgu, Some((SwigluBack { g: 0, up, du: o[1] }, &gu)), down_dh)?;
            }
            _ => {
                let dm = zeros(gpu, rec, "dswiglu", &[n, inter])?;
                back_with(rec, &[DOWN], (&a.m, a.m_glu), &[dres], &dm, None, down_dh)?;
                k::swiglu_backward(gpu, rec, n * inter, &a.g, &a.u, &dm, &dg, &du)?;
            }
        }
        let dh2 = zeros(gpu, rec, "dh2", &[n, c])?;
        back(rec, &[GATE, UP], (&a.h2, None), &[&dg, &du], &dh2)?;
        // The post-attention norm's backward finishes o_proj's output gradient, and
        // makes o_proj's LoRA dh from it.
        let o_pair = a.lora[O].as_ref().map(|_| &lin[O]);
        let o_dh = norm_backward_made_dh(gpu, rec, (n, c), (&a.x_mid, &layer.ln2, &a.rstd2), &dh2, dres, o_pair)?;
        // Attention: x_mid = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
        let datt = zeros(gpu, rec, "datt", &[n, qd])?;
        back_with(rec, &[O], (&a.att, None), &[dres], &datt, None, o_dh)?;
        // The gradients that reach q, k and v's products share one temporary (with
        // Qwen3's per-head norms, those before the norms: dq and dk are apart).
        let [dq_in, dk_in, dv] = gpu.temps(rec, "dq, dk, dv", &[vec![n, qd], vec![n, kvd], vec![n, kvd]])?.try_into().ok().expect("three");
        let qk_norm = a.q_pre.as_ref().zip(layer.q_norm.as_ref().zip(layer.k_norm.as_ref()));
        let (dq, dk) = match qk_norm {
            Some(_) => (zeros(gpu, rec, "dq", &[n, qd])?, zeros(gpu, rec, "dk", &[n, kvd])?),
            None => (dq_in.clone(), dk_in.clone()),
        };
        let at = self.attention(inp.shape).sorted(inp.sorted);
        let rope = self.rope_on_load(gpu);
        k::attention_backward(gpu, rec, &at, rope, &a.q, &a.k, &a.v, inp.segments(rope.is_some()), &a.att, &a.lse, &datt, &dq, &dk, &dv)?;
        if rope.is_none() {
            k::rope_backward(gpu, rec, n, (cfg.heads, cfg.kv_heads), hs, &dq, &dk, &inp.pos, &self.inv_freq)?;
        }
        if let Some(((q_pre, rq, k_pre, rk), (qn, kn))) = qk_norm {
            k::rmsnorm_backward(gpu, rec, n * cfg.heads, hs, q_pre, &qn.value, rq, &dq, &dq_in, qn.grad(), None)?;
            k::rmsnorm_backward(gpu, rec, n * cfg.kv_heads, hs, k_pre, &kn.value, rk, &dk, &dk_in, kn.grad(), None)?;
        }
        let dh1 = zeros(gpu, rec, "dh1", &[n, c])?;
        back(rec, &[Q, K, V], (&a.h1, None), &[&dq_in, &dk_in, &dv], &dh1)?;
        // The input norm's backward finishes the previous layer's output gradient, and
        // makes that layer's down_proj LoRA dh from it.
        let prev_down = li.checked_sub(1).map(|p| &self.layers[p].linears[DOWN]).filter(|_| self.adapter_enabled);
        norm_backward_made_dh(gpu, rec, (n, c), (&a.x, &layer.ln1, &a.rstd1), &dh1, dres, prev_down)
    }

}

/// Gate and up as one tensor (gate from its start, up the offset returned further on),
/// where they lie in one buffer.
fn gate_up(gpu: &Gpu, n: usize, inter: usize, g: &Tensor, u: &Tensor) -> Option<(Tensor, usize)> {
    let (gu, offsets) = Tensor::span("gate, up", &[g, u], gpu.caps.max_binding).filter(|(_, o)| o[0] == 0)?;
    // Exactly gate's start to up's last element (the span ends at up's padding).
    Some((Tensor { shape: vec![offsets[1] + n * inter], ..gu }, offsets[1]))
}

/// The MLP's hidden h = silu(gate)·up as down's products read it. With the GPU kernels,
/// gate and up (`gate_up`) and up's offset, so the products make h as they load it
/// (`kernels::Glu`) and no pass stores it. On CPU drivers, whose kernels load each
/// element of A once per 4 columns of the product, h from a SwiGLU pass: made 144
/// times over in down's forward, it cost more than the pass.
fn mlp_hidden(gpu: &Gpu, rec: &mut Recorder, n: usize, inter: usize, g: &Tensor, u: &Tensor) -> Result<(Tensor, Option<usize>)> {
    if gpu.caps.variant == crate::gpu::Variant::Tiled {
        if let Some((gu, up)) = gate_up(gpu, n, inter, g, u) {
            return Ok((gu, Some(up)));
        }
    }
    let m = zeros(gpu, rec, "swiglu", &[n, inter])?;
    k::swiglu_forward(gpu, rec, n * inter, g, u, &m)?;
    Ok((m, None))
}
