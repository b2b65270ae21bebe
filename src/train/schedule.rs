//! Learning-rate schedules with warmup, as transformers' `get_*_schedule_with_warmup`.
//! The factor for optimizer step `current` (0-based: the first step uses 0).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!("unknown schedule `{other}` (constant, linear, cosine)")),
        }
    }
}

/// Multiplier of the base learning rate at 0-based step `current` of `total`.
pub fn factor(s: Schedule, current: u64, warmup: u64, total: u64) -> f64 {
    let (c, w, t) = (current as f64, warmup as f64, total as f64);
    if current < warmup {
        return c / w.max(1.0);
    }
    match s {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((t - c) / (t - w).max(1.0)).max(0.0),
        Schedule::Cosine => {
            let progress = (c - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}
