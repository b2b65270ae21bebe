//! What a pass reads: its `Shape`, the `Inputs` on the GPU (ids, positions,
//! segments, the dropout seed) and the decoding `KvCache`.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

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
    /// the segment ids, then the positions (`[2, N]`): what attention with RoPE on
    /// load reads (`kernels::RopeOnLoad`)
    pub seg_pos: Tensor,
    /// Training: the seed of this pass's LoRA dropout masks. None: no dropout.
    pub dropout_seed: Option<u32>,
    /// Each row's examples are contiguous and in ascending order (`sorted_rows`), as
    /// training batches lay them out: attention then skips a row's other examples
    /// (`kernels::Attention::sorted`).
    pub sorted: bool,
}

impl Inputs {
    pub fn new(gpu: &Gpu, shape: Shape, ids: &[u32], pos: &[u32], seg: &[u32]) -> Result<Inputs> {
        let n = shape.n();
        if ids.len() != n || pos.len() != n || seg.len() != n {
            return Err(Error::Shape(format!("inputs: {} ids, {} positions, {} segments for {n} tokens", ids.len(), pos.len(), seg.len())));
        }
        let seg_pos = gpu.upload_temp("segments, positions", &[seg, pos].concat(), &[2, n])?;
        Ok(Inputs {
            shape,
            ids_host: ids.to_vec(),
            ids: gpu.upload_temp("ids", ids, &[n])?,
            pos: gpu.upload_temp("positions", pos, &[n])?,
            // Its own upload, not a view of seg_pos: a pooled tensor binds its whole
            // buffer, so batches of other lengths reuse the same bind groups.
            seg: gpu.upload_temp("segments", seg, &[n])?,
            seg_pos,
            dropout_seed: None,
            sorted: sorted_rows(seg, shape.t),
        })
    }

    /// Unpacked sequences: positions 0..T, one segment each.
    pub fn sequences(gpu: &Gpu, shape: Shape, ids: &[u32]) -> Result<Inputs> {
        let pos: Vec<u32> = (0..shape.n()).map(|i| (i % shape.t) as u32).collect();
        Self::new(gpu, shape, ids, &pos, &vec![0; shape.n()])
    }

    /// What attention reads as its segments: with RoPE on load (`with_pos`) the
    /// segments and then the positions (`seg_pos`), else the segments alone.
    pub fn segments(&self, with_pos: bool) -> &Tensor {
        if with_pos {
            &self.seg_pos
        } else {
            &self.seg
        }
    }

    /// The dropout seed of projection `idx` of layer `li`.
    pub(crate) fn seed(&self, li: usize, idx: usize) -> Option<u32> {
        self.dropout_seed.map(|s| crate::rng::hash(s ^ crate::rng::hash((li * 7 + idx) as u32)))
    }
}

/// Keys and values of some cached rows, every layer's (`Model::cached_rows`).
pub struct CachedRows {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub rows: usize,
}

/// A KV cache for decoding one sequence: per layer `[max_t, KV]` keys and values.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub seg: Tensor,
    pub len: usize,
    pub max_t: usize,
}

/// Whether each row of `t` segments holds its examples (the low 30 bits; the top two
/// are a DPO pair's side) in ascending order, so each example is contiguous (padding,
/// `u32::MAX`, last).
pub fn sorted_rows(seg: &[u32], t: usize) -> bool {
    use crate::data::batch::example;
    seg.chunks(t.max(1)).all(|row| row.windows(2).all(|w| example(w[0]) <= example(w[1])))
}
