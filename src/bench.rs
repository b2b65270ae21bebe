//! `webtune bench kernels`: GFLOP/s for matmul at the shapes of SmolLM2-135M training,
//! attention at T = 512, and GB/s for the memory-bound ops. `webtune bench train`:
//! whole training steps of a `Run`, with what the host did for them (`gpu::Counters`).
//!
//! Timing is wall-clock around whole submissions (warm pipelines, repeated until at
//! least `min_secs` have passed), so it includes dispatch overhead, as training does.

use crate::rng::Rng;
use crate::error::Result;
use crate::gpu::{Counters, DType, Gpu, Recorder, Tensor};
use crate::kernels::{self, Attention, Matmul};
use crate::quant::QType;

/// One measured kernel: `work` is FLOPs (compute-bound) or bytes moved (memory-bound).
pub struct Row {
    pub name: String,
    pub secs: f64,
    pub work: f64,
    pub unit: &'static str,
}

impl Row {
    pub fn rate(&self) -> f64 {
        self.work / self.secs / 1e9
    }
}


/// Seconds per run of `record`, after one warm-up run.
async fn time<F>(gpu: &Gpu, min_secs: f64, mut record: F) -> Result<f64>
where
    F: FnMut(&Gpu, &mut Recorder) -> Result<()>,
{
    let mut rec = gpu.recorder("bench warm-up");
    record(gpu, &mut rec)?;
    gpu.submit(rec);
    gpu.wait()?;
    let start = crate::clock::now();
    let mut runs = 0u32;
    loop {
        let mut rec = gpu.recorder("bench");
        record(gpu, &mut rec)?;
        gpu.submit(rec);
        gpu.wait()?;
        runs += 1;
        let secs = crate::clock::now() - start;
        if secs >= min_secs {
            return Ok(secs / runs as f64);
        }
    }
}

fn random(gpu: &Gpu, label: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    let data = Rng::new(seed).vec(shape.iter().product(), 0.5);
    gpu.upload(label, &data, shape)
}

/// Run the benchmarks whose names contain `only` (all when empty), calling `report`
/// as each row is measured.
pub async fn kernels(gpu: &Gpu, min_secs: f64, only: &str, mut report: impl FnMut(&Row)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let t = 512;
    // Runs and reports one case when its name contains `only`.
    macro_rules! case {
        ($name:expr, $work:expr, $unit:expr, $record:expr) => {{
            let name: String = $name;
            if name.contains(only) {
                let secs = time(gpu, min_secs, $record).await?;
                let row = Row { name, secs, work: $work, unit: $unit };
                report(&row);
                rows.push(row);
            }
        }};
    }
    for (din, dout) in [(576, 576), (576, 1536), (1536, 576), (576, 49152)] {
        if !format!("matmul {t}×{din}→{dout}").contains(only) && !only.contains("matmul") {
            continue;
        }
        let x = random(gpu, "x", &[t, din], 1)?;
        let w = random(gpu, "w", &[dout, din], 2)?;
        let y = random(gpu, "y", &[t, dout], 3)?;
        let dx = gpu.zeros("dx", DType::F32, &[t, din])?;
        let dw = gpu.zeros("dw", DType::F32, &[dout, din])?;
        let cases = [
            ("forward  y = x·Wᵀ", Matmul::linear(t, din, dout), &x, &w, &y),
            ("grad x  dx = dy·W", Matmul::new(t, din, dout), &y, &w, &dx),
            ("grad W  dW = dyᵀ·x", Matmul::new(dout, din, t).trans_a(), &y, &x, &dw),
        ];
        for (what, mm, a, b, c) in cases {
            case!(format!("matmul {t}×{din}→{dout} {what}"), mm.flops(), "GFLOP/s", |g, r| kernels::matmul(g, r, &mm, a, b, c));
        }
    }

    // Frozen weights as training holds them: f16 (where the adapter has it) and packed
    // (QLoRA), for the products that read a frozen weight.
    let (din, dout) = (576, 1536);
    if format!("matmul {t}×{din}→{dout} frozen").contains(only) || only.contains("frozen") {
        let data = Rng::new(2).vec(dout * din, 0.5);
        let x = random(gpu, "x", &[t, din], 1)?;
        let y = random(gpu, "y", &[t, dout], 3)?;
        let dx = gpu.zeros("dx", DType::F32, &[t, din])?;
        let mut weights = vec![];
        if gpu.caps.shader_f16 {
            weights.push(("f16".to_string(), gpu.upload_f16("w f16", &data, &[dout, din])?));
        }
        for q in [QType::Q8_0, QType::Q4_0, QType::Nf4] {
            weights.push((q.name().to_string(), gpu.upload_packed("w packed", q, &crate::quant::quantize(q, &data)?, &[dout, din])?));
        }
        for (ty, w) in &weights {
            for (what, mm, a, c) in [("forward  y = x·Wᵀ", Matmul::linear(t, din, dout), &x, &y), ("grad x  dx = dy·W", Matmul::new(t, din, dout), &y, &dx)] {
                case!(format!("matmul {t}×{din}→{dout} frozen {ty} {what}"), mm.flops(), "GFLOP/s", |g, r| kernels::matmul(g, r, &mm, a, w, c));
            }
        }
    }

    let at = Attention::new(1, t, 9, 3, 64);
    let q = random(gpu, "q", &[t, 9, 64], 4)?;
    let k = random(gpu, "k", &[t, 3, 64], 5)?;
    let v = random(gpu, "v", &[t, 3, 64], 6)?;
    let seg = gpu.zeros("seg", DType::U32, &[t])?;
    let o = gpu.zeros("o", DType::F32, &[t, 9, 64])?;
    let lse = gpu.zeros("lse", DType::F32, &[9, t])?;
    let dq = gpu.zeros("dq", DType::F32, &[t, 9, 64])?;
    let dk = gpu.zeros("dk", DType::F32, &[t, 3, 64])?;
    let dv = gpu.zeros("dv", DType::F32, &[t, 3, 64])?;
    // Causal: half of QKᵀ and of P·V; the backward has twice the forward's products.
    let fwd_flops = 2.0 * 2.0 * (t * t) as f64 / 2.0 * 64.0 * 9.0;
    case!(format!("attention forward T={t} 9×64 heads, 3 kv"), fwd_flops, "GFLOP/s", |g, r| {
        kernels::attention_forward(g, r, &at, None, &q, &k, &v, &seg, &o, &lse)
    });
    case!(format!("attention backward T={t} 9×64 heads, 3 kv"), 2.0 * fwd_flops, "GFLOP/s", |g, r| {
        kernels::attention_backward(g, r, &at, None, &q, &k, &v, &seg, &o, &lse, &q, &dq, &dk, &dv)
    });
    // As training runs them on GPUs: q and k rotated as loaded (the rope pass's work inside).
    if kernels::RopeOnLoad::offered(gpu, 64) {
        let inv_freq = kernels::rope::inv_freq(64, 10000.0);
        let rope = Some(kernels::RopeOnLoad { inv_freq: &inv_freq });
        let seg_pos = gpu.upload("segments, positions", &(0..2 * t).map(|i| if i < t { 0 } else { (i - t) as u32 }).collect::<Vec<u32>>(), &[2, t])?;
        case!(format!("attention forward T={t} 9×64 heads, 3 kv, RoPE on load"), fwd_flops, "GFLOP/s", |g, r| {
            kernels::attention_forward(g, r, &at, rope, &q, &k, &v, &seg_pos, &o, &lse)
        });
        case!(format!("attention backward T={t} 9×64 heads, 3 kv, RoPE on load"), 2.0 * fwd_flops, "GFLOP/s", |g, r| {
            kernels::attention_backward(g, r, &at, rope, &q, &k, &v, &seg_pos, &o, &lse, &q, &dq, &dk, &dv)
        });
    }

    let c = 576;
    let x = random(gpu, "x", &[t, c], 7)?;
    let w = random(gpu, "w", &[c], 8)?;
    let y = gpu.zeros("y", DType::F32, &[t, c])?;
    let rstd = gpu.zeros("rstd", DType::F32, &[t])?;
    case!(format!("rmsnorm forward {t}×{c}"), (2 * t * c * 4) as f64, "GB/s", |g, r| {
        kernels::rmsnorm_forward(g, r, t, c, 1e-5, &x, &w, &y, &rstd)
    });
    // dx (read x and dy, read and write dx) without dw: the row reduction alone.
    let dx = gpu.zeros("dx", DType::F32, &[t, c])?;
    case!(format!("rmsnorm backward dx {t}×{c}"), (4 * t * c * 4) as f64, "GB/s", |g, r| {
        kernels::rmsnorm_backward(g, r, t, c, &x, &w, &rstd, &y, &dx, None, None)
    });

    let n = t * 1536;
    let gate = random(gpu, "gate", &[n], 9)?;
    let up = random(gpu, "up", &[n], 10)?;
    let h = gpu.zeros("h", DType::F32, &[n])?;
    case!(format!("swiglu forward {t}×1536"), (3 * n * 4) as f64, "GB/s", |g, r| {
        kernels::swiglu_forward(g, r, n, &gate, &up, &h)
    });
    case!(format!("add {t}×1536"), (3 * n * 4) as f64, "GB/s", |g, r| kernels::add(g, r, n, &gate, &up, &h));

    let vocab = 49152;
    if "cross-entropy".contains(only) || only.contains("cross") {
        let logits = random(gpu, "logits", &[t, vocab], 11)?;
        let targets: Vec<i32> = (0..t as i32).map(|i| i * 97 % vocab as i32).collect();
        let targets = gpu.upload("targets", &targets, &[t])?;
        let losses = gpu.zeros("losses", DType::F32, &[t])?;
        let lse = gpu.zeros("lse", DType::F32, &[t])?;
        let loss = gpu.zeros("loss", DType::F32, &[1])?;
        case!(format!("cross-entropy forward {t}×{vocab}"), (t * vocab * 4) as f64, "GB/s", |g, r| {
            kernels::cross_entropy_forward(g, r, t, vocab, 1.0 / t as f32, &logits, &targets, &losses, &lse, Some(&loss))
        });
    }

    // LoRA r=16 on all seven projections of SmolLM2-135M's 30 layers: about 4.9M parameters.
    let n = 4_884_480;
    let param = random(gpu, "param", &[n], 12)?;
    let grad = random(gpu, "grad", &[n], 13)?;
    let m = gpu.zeros("m", DType::F32, &[n])?;
    let v2 = gpu.zeros("v", DType::F32, &[n])?;
    let norm = gpu.zeros("norm", DType::F32, &[2])?;
    let opt = kernels::AdamW::default();
    // Reads grad twice (norm, step), param, m, v; writes param, m, v.
    case!(format!("grad norm + AdamW step, {n} params"), (8 * n * 4) as f64, "GB/s", |g, r| {
        kernels::grad_norm(g, r, &[&grad], 1.0, &norm)?;
        kernels::adamw_step(g, r, &opt, 1, &param, &grad, &m, &v2, &norm)
    });
    Ok(rows)
}

/// One measured training step: its tokens and wall time, and what the host created
/// and recorded for it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepRow {
    pub step: u64,
    pub tokens: usize,
    pub secs: f64,
    pub counters: Counters,
}

impl StepRow {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.secs
    }

    /// Host microseconds spent recording one dispatch.
    pub fn us_per_dispatch(&self) -> f64 {
        1e6 * self.counters.record_s / self.counters.dispatches.max(1) as f64
    }
}

/// What `bench train` measured: the steps, and the GPU time of one more step by
/// timestamp queries (None where the adapter has none) with its dispatch count.
pub struct TrainBench {
    pub steps: Vec<StepRow>,
    pub gpu_ms: Option<(f64, u64)>,
    /// That step's GPU time by kernel (pipeline), slowest first.
    pub gpu_by_kernel: Vec<crate::gpu::KernelTime>,
    /// The first measured step's dispatches by kernel entry point, most first.
    pub by_kernel: Vec<(String, u64)>,
}

/// Time `steps` steps of `run` after one warm-up step (pipelines compile, buffers
/// are made), calling `report` after each; then one step with timestamp queries.
/// The run must plan at least `steps + 2` steps.
pub async fn train(gpu: &Gpu, run: &mut crate::train::Run, steps: u64, mut report: impl FnMut(&StepRow)) -> Result<TrainBench> {
    if run.total_steps() < steps + 2 {
        return Err(crate::Error::Config(format!("the run plans {} steps; bench train needs {}", run.total_steps(), steps + 2)));
    }
    run.profile_every = None;
    run.next(gpu).await?;
    let mut rows = Vec::new();
    let mut by_kernel = Vec::new();
    let tally = gpu.dispatches_by_kernel();
    for i in 0..steps {
        let before = gpu.counters();
        let start = crate::clock::now();
        let e = run.next(gpu).await?;
        let row = StepRow { step: e.stats.step, tokens: e.stats.tokens, secs: crate::clock::now() - start, counters: gpu.counters().since(&before) };
        if i == 0 {
            by_kernel = gpu
                .dispatches_by_kernel()
                .into_iter()
                .filter_map(|(k, n)| {
                    let d = n - tally.get(&k).copied().unwrap_or(0);
                    (d > 0).then_some((k, d))
                })
                .collect();
            by_kernel.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        report(&row);
        rows.push(row);
    }
    let mut gpu_by_kernel = Vec::new();
    let gpu_ms = if gpu.set_profiling(true) {
        let before = gpu.counters();
        run.next(gpu).await?;
        gpu.set_profiling(false);
        gpu_by_kernel = gpu.kernel_times().await?;
        let ms = gpu_by_kernel.iter().map(|k| k.ms).sum();
        Some((ms, gpu.counters().since(&before).dispatches))
    } else {
        None
    };
    Ok(TrainBench { steps: rows, gpu_ms, gpu_by_kernel, by_kernel })
}
