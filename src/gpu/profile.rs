//! GPU time per kernel, from timestamp queries written at the start and end of each
//! compute pass (every dispatch is its own pass), where the adapter offers
//! `timestamp-query`. Off by default: [`Gpu::set_profiling`](super::Gpu::set_profiling)
//! turns it on, [`Gpu::kernel_times`](super::Gpu::kernel_times) reads what was timed.

use std::sync::Arc;

use serde::Serialize;

/// Passes timed per recorder: a query set holds at most 4096 queries, two per pass.
pub const PASSES_PER_RECORDER: u32 = 2048;

/// The queries of one recorder and the kernel each pair belongs to.
pub struct Timed {
    pub queries: wgpu::QuerySet,
    pub names: Vec<Arc<str>>,
}

/// Whether timing is on, and the resolved timestamps of submitted recorders not yet read.
#[derive(Default)]
pub(crate) struct Profiler {
    pub on: bool,
    pub pending: Vec<(wgpu::Buffer, Vec<Arc<str>>)>,
}

/// The GPU time of one kernel entry point (`file::entry`), summed over its dispatches.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KernelTime {
    pub kernel: String,
    pub calls: u32,
    pub ms: f64,
}

/// Sum the (begin, end) tick pairs of each pass by kernel, slowest first.
/// `period_ns` is nanoseconds per tick (`Queue::get_timestamp_period`).
pub fn summarize(passes: impl IntoIterator<Item = (Arc<str>, u64, u64)>, period_ns: f32) -> Vec<KernelTime> {
    let mut out: Vec<KernelTime> = Vec::new();
    for (name, begin, end) in passes {
        let ms = end.saturating_sub(begin) as f64 * period_ns as f64 * 1e-6;
        match out.iter_mut().find(|k| *k.kernel == *name) {
            Some(k) => (k.calls, k.ms) = (k.calls + 1, k.ms + ms),
            None => out.push(KernelTime { kernel: name.to_string(), calls: 1, ms }),
        }
    }
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_summed_by_kernel_in_milliseconds_slowest_first() {
        let (a, b): (Arc<str>, Arc<str>) = ("a::x".into(), "b::y".into());
        let t = summarize([(a.clone(), 0, 1000), (b.clone(), 5000, 9000), (a, 2000, 2500), (b, 10, 5)], 2.0);
        assert_eq!(t, vec![KernelTime { kernel: "b::y".into(), calls: 2, ms: 0.008 }, KernelTime { kernel: "a::x".into(), calls: 2, ms: 0.003 }]);
    }
}
