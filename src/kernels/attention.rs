//! Launchers for `kernels/attention.wgsl`.

use super::{check, check_binding, groups, loop_span, spans, ATTENTION};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Recorder, Tensor, Variant};

/// Causal grouped-query attention over `[B, T, NH, HS]` queries and `[B, TK, NKV, HS]`
/// keys and values, scores scaled by `scale` (usually 1/√HS). In training TK = T; in
/// cached decoding the queries are the last T of TK positions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub b: usize,
    pub t: usize,
    pub tk: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
    pub scale: f32,
    /// Each row's examples are contiguous and in ascending order of their ids (the
    /// segments' low 30 bits), padding last: training batches (`Inputs::sorted`). The
    /// kernels then start a query's keys at its example's first and end a key's
    /// queries at its example's last, by binary search, instead of looping over the
    /// row's other examples. Training only (TK = T).
    pub sorted: bool,
}

impl Attention {
    pub fn new(b: usize, t: usize, nh: usize, nkv: usize, hs: usize) -> Attention {
        Attention { b, t, tk: t, nh, nkv, hs, scale: 1.0 / (hs as f32).sqrt(), sorted: false }
    }

    /// With `sorted` segments (see the field).
    pub fn sorted(mut self, sorted: bool) -> Attention {
        self.sorted = sorted;
        self
    }

    /// The last `t` of `tk` positions attend to all earlier ones (KV-cached decoding).
    pub fn cached(mut self, tk: usize) -> Attention {
        self.tk = tk;
        self
    }

    fn check(&self, op: &str) -> Result<()> {
        check(self.b > 0 && self.t > 0 && self.nh > 0 && self.nkv > 0, op, || format!("empty shape: batch {}, {} queries, {} heads ({} kv)", self.b, self.t, self.nh, self.nkv))?;
        check(self.tk >= self.t, op, || format!("{} queries but only {} keys", self.t, self.tk))?;
        check(!self.sorted || self.tk == self.t, op, || "sorted segments are for training, where keys = queries".into())?;
        check(self.nh.is_multiple_of(self.nkv), op, || format!("n_kv_heads {} must divide n_heads {}", self.nkv, self.nh))?;
        check(self.hs.is_multiple_of(4) && self.hs <= 128, op, || format!("head size {} must be a multiple of 4, at most 128", self.hs))
    }

    pub fn q_len(&self) -> usize {
        self.b * self.t * self.nh * self.hs
    }

    pub fn kv_len(&self) -> usize {
        self.b * self.tk * self.nkv * self.hs
    }

    /// Rows of the softmax statistics: `[B, NH, T]`.
    pub fn rows(&self) -> usize {
        self.b * self.nh * self.t
    }

    fn params(&self) -> Params {
        Params {
            b: self.b as u32,
            t: self.t as u32,
            nh: self.nh as u32,
            nkv: self.nkv as u32,
            hs: self.hs as u32,
            scale: self.scale,
            tk: self.tk as u32,
            r0: 0,
            r1: self.tk as u32,
            pos_off: 0,
            sorted: self.sorted as u32,
            _p: 0,
            inv_freq: [0.0; 64],
        }
    }

    /// Ranges of the loop axis (keys, or queries for dk/dv) that one dispatch covers:
    /// each step of it loops `per` times and `fixed` more run around it, and an
    /// invocation must stay within the driver's loop budget.
    fn ranges(&self, gpu: &Gpu, len: usize, per: usize, fixed: usize) -> Vec<(usize, usize)> {
        spans(len, loop_span(gpu, per, fixed)).collect()
    }

    fn grid(&self, heads: usize) -> [u32; 3] {
        [groups(self.t, 64), heads as u32, self.b as u32]
    }
}

/// Loop iterations of the kernels' binary search over a row's sorted segments
/// (`lower_bound`, once per invocation): at most log2 of a row's 2^32 positions.
const SEARCH: usize = 32;

/// The (forward, backward dq, backward dk/dv) entry points for this adapter:
/// FlashAttention-2 tiles on GPUs, a row per invocation on CPU drivers (where
/// workgroup barriers cost more than the memory they save).
fn entries(gpu: &Gpu) -> [&'static str; 3] {
    match gpu.caps.variant {
        Variant::Tiled => ["attention_forward_tiled", "attention_backward_dq_tiled", "attention_backward_dkv_tiled"],
        Variant::Register => ["attention_forward_row", "attention_backward_dq_row", "attention_backward_dkv_row"],
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    t: u32,
    nh: u32,
    nkv: u32,
    hs: u32,
    scale: f32,
    tk: u32,
    r0: u32,
    r1: u32,
    pos_off: u32,
    sorted: u32,
    _p: u32,
    inv_freq: [f32; 64],
}

/// RoPE on load (the tiled kernels' `ROPE`): q and k as stored are before the rotation;
/// the attention rotates them as it loads them (and dq, dk back), by the positions that
/// follow the segments in `seg` (`[2, B, T]`: segments, then positions) and these
/// inverse frequencies (`[HS/2]`, at most 64).
#[derive(Clone, Copy)]
pub struct RopeOnLoad<'a> {
    pub inv_freq: &'a [f32],
}

impl RopeOnLoad<'_> {
    /// Whether the adapter's kernels take RoPE on load for this shape: the tiled ones
    /// (`Variant::Tiled`), with a head size that is a multiple of 8, at most 128.
    pub fn offered(gpu: &Gpu, hs: usize) -> bool {
        gpu.caps.variant == Variant::Tiled && hs.is_multiple_of(8) && hs <= 128
    }

    /// The kernels' parameters and overrides for `at`, checking `seg` holds positions.
    fn apply(rope: Option<Self>, gpu: &Gpu, op: &str, at: &Attention, seg: &Tensor, mut p: Params) -> Result<(Params, &'static [(&'static str, f64)])> {
        let Some(r) = rope else {
            return Ok((p, &[]));
        };
        check(RopeOnLoad::offered(gpu, at.hs), op, || format!("RoPE on load is the tiled kernels' (head size a multiple of 8, at most 128); head size {} on the {} kernels", at.hs, if gpu.caps.variant == Variant::Tiled { "tiled" } else { "register" }))?;
        check(at.tk == at.t, op, || "RoPE on load is for training, where keys = queries".into())?;
        check(r.inv_freq.len() == at.hs / 2, op, || format!("{} inverse frequencies for head size {}", r.inv_freq.len(), at.hs))?;
        seg.expect(op, "seg (segments, then positions)", DType::U32, 2 * at.b * at.t)?;
        p.pos_off = (at.b * at.t) as u32;
        p.inv_freq[..r.inv_freq.len()].copy_from_slice(r.inv_freq);
        Ok((p, &[("ROPE", 1.0)]))
    }
}

/// `o = softmax(scale · q·kᵀ + causal/segment mask) · v`, saving `lse` `[B, NH, T]`.
/// `seg` `[B, T]` u32: keys in another segment (packed example) are masked. With
/// `rope`, q and k are before RoPE and rotated as loaded (`RopeOnLoad`), and `seg`
/// holds the segments, then the positions (`[2, B, T]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    gpu: &Gpu,
    rec: &mut Recorder,
    at: &Attention,
    rope: Option<RopeOnLoad>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: &Tensor,
    o: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    let op = "attention_forward";
    at.check(op)?;
    q.expect(op, "q", DType::F32, at.q_len())?;
    // With one sequence, k, v and seg may be a longer KV cache filled to TK.
    let kv_expect = if at.b == 1 { Tensor::expect_min } else { Tensor::expect };
    kv_expect(k, op, "k", DType::F32, at.kv_len())?;
    kv_expect(v, op, "v", DType::F32, at.kv_len())?;
    if rope.is_none() {
        kv_expect(seg, op, "seg", DType::U32, at.b * at.tk)?;
    }
    o.expect(op, "o", DType::F32, at.q_len())?;
    lse.expect(op, "lse", DType::F32, at.rows())?;
    check_binding(gpu, op, &[q, k, v, o])?;
    let (params, overrides) = RopeOnLoad::apply(rope, gpu, op, at, seg, at.params())?;
    // Key ranges that fit the loop budget; each range resumes from the last's (o, lse).
    let [name, _, _] = entries(gpu);
    let pipeline = gpu.pipeline(&ATTENTION, name, overrides);
    let hs4 = at.hs / 4;
    // Per key: the score and the update (2·HS/4) and the key's share of staging a tile;
    // besides, the sorted segments' binary search (`SEARCH`).
    for (r0, r1) in at.ranges(gpu, at.tk, 2 * hs4 + 2, 3 * hs4 + 16 + SEARCH) {
        gpu.dispatch(
            rec,
            &pipeline,
            name,
            &Params { r0: r0 as u32, r1: r1 as u32, ..params },
            &[(1, q.into()), (2, k.into()), (3, v.into()), (4, seg.into()), (5, o.into()), (6, Bind::from(lse))],
            at.grid(at.nh),
        )?;
    }
    Ok(())
}

/// Adds the gradients of `attention_forward` into `dq`, `dk`, `dv`, given its
/// inputs, its output `o`, the saved `lse` and the output gradient `dout`. With `rope`
/// (`attention_forward`'s), dq and dk are the gradients of q and k as stored, rotated
/// back in the kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    rec: &mut Recorder,
    at: &Attention,
    rope: Option<RopeOnLoad>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
) -> Result<()> {
    let op = "attention_backward";
    at.check(op)?;
    check(at.tk == at.t, op, || "the backward is for training, where keys = queries".into())?;
    for (t, name) in [(q, "q"), (o, "o"), (dout, "dout"), (dq, "dq")] {
        t.expect(op, name, DType::F32, at.q_len())?;
    }
    for (t, name) in [(k, "k"), (v, "v"), (dk, "dk"), (dv, "dv")] {
        t.expect(op, name, DType::F32, at.kv_len())?;
    }
    if rope.is_none() {
        seg.expect(op, "seg", DType::U32, at.b * at.t)?;
    }
    lse.expect(op, "lse", DType::F32, at.rows())?;
    check_binding(gpu, op, &[q, k, v, o, dout, dq, dk, dv])?;
    let (params, overrides) = RopeOnLoad::apply(rope, gpu, op, at, seg, at.params())?;
    // stats = [lse, dsum]: the dq pass writes dsum, the dk/dv pass reads it.
    let stats = gpu.temp(rec, "attention stats", DType::F32, &[2, at.rows()])?;
    rec.encoder().copy_buffer_to_buffer(&lse.buffer, lse.offset, &stats.buffer, stats.offset, lse.bytes());
    // dq (and dsum) over key ranges, dk/dv over query ranges (each query head of the
    // group loops over the range), each range adding its part.
    let hs4 = at.hs / 4;
    let [_, name, _] = entries(gpu);
    let pipeline = gpu.pipeline(&ATTENTION, name, overrides);
    for (r0, r1) in at.ranges(gpu, at.t, 2 * hs4 + 2, 4 * hs4 + 16 + SEARCH) {
        let binds = [
            (1, q.into()),
            (2, k.into()),
            (3, v.into()),
            (4, seg.into()),
            (7, o.into()),
            (9, dout.into()),
            (10, Bind::from(&stats)),
            (11, dq.into()),
        ];
        let p = Params { r0: r0 as u32, r1: r1 as u32, ..params };
        gpu.dispatch(rec, &pipeline, name, &p, &binds, at.grid(at.nh))?;
    }
    let group = at.nh / at.nkv;
    let [_, _, name] = entries(gpu);
    let pipeline = gpu.pipeline(&ATTENTION, name, overrides);
    for (r0, r1) in at.ranges(gpu, at.t, group * (2 * hs4 + 2), group + 4 * hs4 + 16 + SEARCH) {
        let binds = [
            (1, q.into()),
            (2, k.into()),
            (3, v.into()),
            (4, seg.into()),
            (8, Bind::from(&stats)),
            (9, dout.into()),
            (12, dk.into()),
            (13, dv.into()),
        ];
        let p = Params { r0: r0 as u32, r1: r1 as u32, ..params };
        gpu.dispatch(rec, &pipeline, name, &p, &binds, at.grid(at.nkv))?;
    }
    Ok(())
}
