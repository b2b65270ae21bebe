//! Buffers built once. A training step records thousands of dispatches; creating a
//! uniform buffer, a bind group and a few storage buffers for each costs as much host
//! time as the GPU work itself on a real GPU. So:
//!
//! - **temporaries** (`Gpu::temp`, `Gpu::upload_in`, `Gpu::upload_temp`) come from a
//!   pool of buffers by size class and go back to it when their last `Tensor` clone
//!   drops; a step of the same shapes as the last one creates no buffer;
//! - **parameters** of every dispatch, and small uploads recorded with it, are bytes
//!   in one arena buffer, written with one queue write when the recorder is
//!   submitted; the arena starts again at 0 with each top-level recorder, so the
//!   n-th dispatch of a step has the same offset as in the step before;
//! - **bind groups** are cached by (pipeline, bindings with their offsets), so the
//!   same dispatch in the next step finds its bind group.
//!
//! Reuse is safe because GPU work runs in submission order: a freed buffer is handed
//! out again only once every recorder that was open when it was freed is submitted
//! (so its earlier uses are ahead on the queue, whatever thread recorded them), and a
//! temporary is cleared (or copied into) inside the encoder that then uses it. Buffers, pooled or cached, that stay
//! unused for `IDLE_GENERATIONS` top-level recorders are let go (`Gpu::trim`: all).
//! `Counters` say what was created and how long recording took: `webtune bench train`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Top-level recorders after which an unused pooled buffer or cached bind group is dropped.
pub const IDLE_GENERATIONS: u64 = 256;

/// What the GPU context did since it was made (`Gpu::counters`); `since` gives a step's share.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Counters {
    pub dispatches: u64,
    /// Compute passes begun (one per dispatch while profiling; otherwise a pass runs
    /// until a copy or clear needs the encoder).
    pub passes: u64,
    /// wgpu buffers created, and their bytes.
    pub buffers: u64,
    pub buffer_bytes: u64,
    pub bind_groups: u64,
    pub submits: u64,
    /// Bytes of the pooled buffers held now (the pool grows only when no free buffer
    /// fits, so after a step it is the step's peak of temporaries).
    pub pool_bytes: u64,
    /// The most `pool_bytes` has been (a run's peak of temporaries).
    pub pool_peak: u64,
    /// Host seconds spent recording dispatches and in `submit`.
    pub record_s: f64,
    pub submit_s: f64,
}

impl Counters {
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            dispatches: self.dispatches - before.dispatches,
            passes: self.passes - before.passes,
            buffers: self.buffers - before.buffers,
            buffer_bytes: self.buffer_bytes - before.buffer_bytes,
            bind_groups: self.bind_groups - before.bind_groups,
            submits: self.submits - before.submits,
            pool_bytes: self.pool_bytes,
            pool_peak: self.pool_peak,
            record_s: self.record_s - before.record_s,
            submit_s: self.submit_s - before.submit_s,
        }
    }
}

/// The size class of a pooled buffer: bytes rounded up to an eighth of their power of
/// two (at most 12.5% more), at least 256.
pub fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let step = (1u64 << (63 - b.leading_zeros())) / 8;
    b.div_ceil(step) * step
}

/// A pooled buffer: held by a tensor, or free once every recorder that may still use
/// it (those created up to `after`) is submitted.
pub(crate) struct Slot {
    pub buffer: wgpu::Buffer,
    pub busy: bool,
    pub after: u64,
    /// The generation it was freed in (for letting idle buffers go).
    pub freed: u64,
}

/// A buffer that recorders stage bytes into, bump-allocated from 0 again with each
/// top-level recorder.
#[derive(Default)]
pub(crate) struct Arena {
    pub buffer: Option<wgpu::Buffer>,
    pub cursor: u64,
}

/// One binding of a cached bind group: (binding, buffer, offset, size).
pub(crate) type BindEntry = (u32, wgpu::Buffer, u64, u64);

#[derive(Default)]
pub(crate) struct State {
    /// Pooled buffers by size class. A temporary takes the first free one of its class,
    /// or of a class up to half as large again (a batch a little shorter than the
    /// longest so far), so a step that allocates and frees as one before did gets the
    /// same buffer in each role, and finds the bind groups it made then.
    pub classes: BTreeMap<u64, Vec<Slot>>,
    /// Temporaries are sized for this many times their rows (`Gpu::sizing`).
    pub scale: f64,
    /// Dispatch parameters (UNIFORM) and small uploads (COPY_SRC), apart so that an
    /// upload's size does not move the parameters' offsets (and miss their bind groups).
    pub params: Arena,
    pub uploads: Arena,
    /// Sequence numbers of the recorders created and not yet submitted or dropped;
    /// the last one given out.
    pub open: BTreeSet<u64>,
    pub created: u64,
    /// Top-level recorders so far.
    pub generation: u64,
    pub binds: HashMap<(usize, Vec<BindEntry>), (wgpu::BindGroup, u64)>,
    pub counters: Counters,
    /// Dispatches so far by kernel entry point (`file::entry`).
    pub by_kernel: HashMap<Arc<str>, u64>,
}

impl State {
    /// The first free buffer of `class` (or up to half as large again) that no open
    /// recorder may still use; busy now. Its class and index.
    pub fn take(&mut self, class: u64) -> Option<(wgpu::Buffer, u64, usize)> {
        let oldest_open = self.open.first().copied().unwrap_or(u64::MAX);
        for (&c, slots) in self.classes.range_mut(class..=class + class / 2) {
            if let Some((i, s)) = slots.iter_mut().enumerate().find(|(_, s)| !s.busy && s.after < oldest_open) {
                s.busy = true;
                return Some((s.buffer.clone(), c, i));
            }
        }
        None
    }

    /// The bytes to pool a temporary of `bytes` in: scaled by `scale`, but not past
    /// `bound` (a logits chunk's largest, `Model::head_chunk_rows`) where it was under.
    pub fn sized_for(&self, bytes: u64, bound: u64) -> u64 {
        if self.scale <= 1.0 {
            return bytes;
        }
        ((bytes as f64 * self.scale) as u64).min(bytes.max(bound))
    }

    /// A new busy buffer of `class`; its index.
    pub fn add(&mut self, class: u64, buffer: wgpu::Buffer) -> usize {
        self.counters.pool_bytes += class;
        self.counters.pool_peak = self.counters.pool_peak.max(self.counters.pool_bytes);
        let slots = self.classes.entry(class).or_default();
        slots.push(Slot { buffer, busy: true, after: 0, freed: 0 });
        slots.len() - 1
    }
}

/// A pooled buffer on loan to a tensor (and its clones): free again on drop, for
/// recorders made after every one open now is submitted (those may still use it; a
/// reuse must come after them on the queue).
pub struct Lease {
    pub(crate) class: u64,
    pub(crate) index: usize,
    /// Bytes a binding of it covers: the whole buffer where that fits a binding, so
    /// the next step's bind group matches even when the tensor's shape changed a little.
    pub(crate) bind: u64,
    pub(crate) state: Arc<Mutex<State>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap();
        let after = if st.open.is_empty() { 0 } else { st.created };
        let g = st.generation;
        if let Some(s) = st.classes.get_mut(&self.class).and_then(|l| l.get_mut(self.index)) {
            (s.busy, s.after, s.freed) = (false, after, g);
        }
    }
}

/// Let go of pooled buffers and bind groups unused since `generation - IDLE_GENERATIONS`
/// (all of them with `all`).
pub(crate) fn sweep(st: &mut State, all: bool) {
    let keep_after = if all { u64::MAX } else { st.generation.saturating_sub(IDLE_GENERATIONS) };
    // Only from the end, so the buffers kept keep their indices.
    for (class, slots) in st.classes.iter_mut() {
        while slots.last().is_some_and(|s| !s.busy && s.freed < keep_after) {
            slots.pop();
            st.counters.pool_bytes -= class;
        }
    }
    st.classes.retain(|_, l| !l.is_empty());
    st.binds.retain(|_, (_, g)| *g >= keep_after && !all);
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 288);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 17));
        for b in [300u64, 4097, 123_457, 99_999_999] {
            let c = size_class(b);
            assert!(c >= b && (c - b) * 8 <= b, "{b} → {c}");
        }
    }
}
