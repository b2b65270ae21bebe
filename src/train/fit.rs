//! A plan that fits: before the first step, the micro-batch (and, where the memory
//! budget needs it, gradient checkpointing) that a run's `--batch-size` is trained in,
//! so that every activation fits one storage binding and a step fits the budget.
//! `--batch-size` stays the effective batch: a batch of b runs as k micro-batches of
//! at most ⌈b/k⌉, and since the loss is normalised by the step's trained tokens the
//! step computes what `--batch-size ⌈b/k⌉ --grad-accum k` would. Where even one
//! sequence at a time with checkpointing does not fit, a LoRA run that names no
//! frozen-weight format packs its frozen weights smaller (`lower_frozen`), before the
//! model is loaded.

use super::RunOptions;
use crate::error::{Error, Result};
use crate::model::memory::{self, Plan};
use crate::model::{Config, Frozen};
use crate::quant::QType;

/// The plan a run trains with.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    /// Sequences (DPO: pairs) per micro-batch.
    pub micro: usize,
    pub grad_checkpoint: bool,
    /// What was changed from the options given, and why (None: nothing).
    pub note: Option<String>,
}

fn mib(b: u64) -> String {
    match b {
        0..1024 => format!("{b} bytes"),
        1024..1048576 => format!("{:.0} KiB", b as f64 / 1024.0),
        // A tenth below 100 MiB, where a budget and a step that rounded alike would
        // read "29 MiB, more than the memory budget of 29 MiB".
        1048576..0x640_0000 => format!("{} MiB", format!("{:.1}", b as f64 / (1u64 << 20) as f64).trim_end_matches(".0")),
        _ => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

/// `2GiB`, `512MiB`, `1.5G`, `800M` or a count of bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(Error::Options(format!("--memory-budget `{s}`: expected a size such as 512MiB, 2GiB or 1.5G"))),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok((n * scale as f64) as u64),
        _ => Err(Error::Options(format!("--memory-budget `{s}`: expected a size such as 512MiB, 2GiB or 1.5G"))),
    }
}

/// The memory a step may use: `--memory-budget`, else what the device has
/// (`Caps::memory`: 90% of the host's available memory on a CPU adapter, of the largest
/// device-local heap on Vulkan); else none known (Metal, DX12 and WebGPU report no
/// memory through wgpu), and only bindings bound the plan.
pub fn budget(opts: &RunOptions, device: Option<u64>) -> Result<Option<u64>> {
    match given(opts) {
        Some(b) => parse_bytes(b).map(Some),
        None => Ok(device),
    }
}

/// `--memory-budget`, where set.
fn given(opts: &RunOptions) -> Option<&str> {
    opts.memory_budget.as_deref().filter(|b| !b.is_empty())
}

/// Where a budget that no option set came from, for the plan's note.
pub fn budget_origin(opts: &RunOptions, caps: &crate::gpu::Caps) -> Option<String> {
    if given(opts).is_some() {
        return None;
    }
    let what = if caps.adapter.device_type == wgpu::DeviceType::Cpu {
        "90% of the host's available memory (a CPU adapter's device memory is the host's)".to_string()
    } else {
        format!("90% of the GPU's device-local heap of {}", mib(caps.device_heap?))
    };
    Some(format!("the memory budget is {what}; --memory-budget sets another"))
}

/// The frozen-weight formats a plan may lower to, in order: Q8_0, then NF4 (QLoRA's),
/// by their `--quantize` names.
const LOWER: [(&str, QType); 2] = [("q8", QType::Q8_0), ("nf4", QType::Nf4)];

/// Whether the plan may pack the frozen weights itself: a LoRA run whose options name
/// no frozen-weight format (`--quantize` unset or `auto`: `RunOptions::frozen` is `Auto`).
fn may_lower(opts: &RunOptions) -> bool {
    !opts.full && matches!(opts.frozen(), Ok(Frozen::Auto))
}

/// A plan's smallest unit, for its messages: one sequence, or one DPO pair (a row
/// holding both sides, `RunOptions::row_sides`).
fn unit(opts: &RunOptions) -> &'static str {
    if opts.row_sides() > 1 { "one pair" } else { "one sequence" }
}

/// `unit` with its row's tokens.
fn one(opts: &RunOptions, longest: usize) -> String {
    let row = if opts.row_sides() > 1 { " in its row (both sides, the prompt once)" } else { "" };
    format!("{} of {longest} tokens{row}", unit(opts))
}

/// A step's estimate at one sequence (DPO: a pair's row) of `longest` tokens with
/// gradient checkpointing, the frozen weights held as `frozen`: the least any plan can
/// need.
fn one_checkpointed(cfg: &Config, base: &Plan, longest: usize, frozen: Frozen) -> u64 {
    memory::estimate(cfg, &Plan { batch: 1, seq: longest, grad_checkpoint: true, frozen, ..base.clone() }).total()
}

/// Where a LoRA run names no frozen-weight format (`--quantize`) and its step fits the
/// budget in no other way (even one sequence at a time with gradient checkpointing
/// does not), the first of `LOWER` its step fits with: the `--quantize` value, and a
/// line saying why. None where the format as given fits, the run names its format or
/// trains every weight, or there is no budget. `base` is the options' memory plan.
pub fn lower_frozen(cfg: &Config, opts: &RunOptions, base: &Plan, longest: usize, budget: Option<u64>) -> Option<(&'static str, String)> {
    let bud = budget?;
    if !may_lower(opts) {
        return None;
    }
    let given = one_checkpointed(cfg, base, longest, base.frozen);
    if given <= bud {
        return None;
    }
    LOWER.into_iter().find_map(|(q, t)| {
        let need = one_checkpointed(cfg, base, longest, Frozen::Quantize(t));
        (need <= bud).then(|| {
            let note = format!(
                "plan: the frozen weights are packed as {} (as --quantize {q}): with them as given, {} at a time with gradient checkpointing needs about {}, more than the memory budget of {}; packed, about {}",
                t.name().to_uppercase(),
                one(opts, longest),
                mib(given),
                mib(bud),
                mib(need)
            );
            (q, note)
        })
    })
}

/// The plan for batches of `opts.train.batch_size` over sequences of up to `longest`
/// tokens, given `base` (the memory plan of the options as given: its `batch` and
/// `seq` are replaced here) and the `budget`.
pub fn fit(cfg: &Config, opts: &RunOptions, base: &Plan, longest: usize, budget: Option<u64>) -> Result<Fit> {
    let b = opts.train.batch_size.max(1);
    // DPO runs a pair in one row (`PairBatch`): `longest` is a pair's row.
    let row = memory::widest_row(cfg) as u64 * 4;
    let fits_binding = |m: usize| m * longest <= memory::binding_rows(cfg, base.max_binding);
    if cfg.vocab as u64 * 4 > base.max_binding {
        return Err(Error::Options(format!(
            "one token's logits over the vocabulary of {} take {} bytes, more than this adapter's largest storage binding ({} bytes): this model cannot train here",
            cfg.vocab,
            cfg.vocab * 4,
            base.max_binding
        )));
    }
    if !fits_binding(1) {
        return Err(Error::Options(format!(
            "{} needs {} for its widest activation ({} values a token), more than this adapter's largest storage binding ({}); lower --max-seq-len to {} or less",
            one(opts, longest),
            mib(longest as u64 * row),
            row / 4,
            mib(base.max_binding),
            memory::binding_rows(cfg, base.max_binding) / opts.row_sides()
        )));
    }
    let step = |m: usize, ckpt: bool| memory::estimate(cfg, &Plan { batch: m, seq: longest, grad_checkpoint: ckpt, ..base.clone() }).total();
    for ckpt in if opts.grad_checkpoint { vec![true] } else { vec![false, true] } {
        let mut last = 0;
        for k in 1..=b {
            let m = b.div_ceil(k);
            if m == last || !fits_binding(m) {
                continue;
            }
            last = m;
            let need = step(m, ckpt);
            if budget.is_some_and(|bud| need > bud) {
                continue;
            }
            let mut why = Vec::new();
            if m < b {
                let k = b.div_ceil(m);
                // The largest micro-batch the bindings allow: smaller is the budget's doing.
                let m_bind = (1..=b).map(|k| b.div_ceil(k)).find(|&m| fits_binding(m)).unwrap_or(1);
                let reason = if m == m_bind {
                    format!("a micro-batch's widest activation must fit one {} storage binding", mib(base.max_binding))
                } else {
                    format!("a micro-batch of {m_bind} needs about {}, more than the memory budget of {}", mib(step(m_bind, ckpt)), mib(budget.unwrap_or(0)))
                };
                why.push(format!("batch {b} runs as {k} micro-batches of up to {m} (gradient accumulation ×{k}, the same effective batch): {reason}"));
            }
            if ckpt && !opts.grad_checkpoint {
                why.push(format!("gradient checkpointing is on: without it, {} at a time needs about {}, more than the memory budget of {}", unit(opts), mib(step(1, false)), mib(budget.unwrap_or(0))));
            }
            let note = (!why.is_empty()).then(|| format!("plan: {} (about {} a step)", why.join("; "), mib(need)));
            return Ok(Fit { micro: m, grad_checkpoint: ckpt, note });
        }
    }
    let packed = matches!(base.frozen, Frozen::Quantize(_));
    // A LoRA run that names no format has had its weights lowered as far as `LOWER`
    // goes (`lower_frozen`); one that names f16 or f32 may still pack them.
    let (with_nf4, advice) = match (packed, opts.full, may_lower(opts)) {
        (false, false, true) => (format!(" ({} with the frozen weights packed as NF4)", mib(one_checkpointed(cfg, base, longest, Frozen::Quantize(QType::Nf4)))), ""),
        (false, false, false) => (String::new(), ", or pack the frozen weights (--quantize nf4)"),
        _ => (String::new(), ""),
    };
    Err(Error::Options(format!(
        "a step does not fit the memory budget of {}: {} at a time, with gradient checkpointing{}, needs about {}{with_nf4}; set a larger --memory-budget or lower --max-seq-len{advice}",
        mib(budget.unwrap_or(0)),
        one(opts, longest),
        if packed { " and the frozen weights packed" } else { "" },
        mib(step(1, true)),
    )))
}
