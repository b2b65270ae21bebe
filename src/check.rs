//! Tools for checking kernels: a seeded generator and the one tolerance rule used by
//! every test, `|got − want| ≤ atol + rtol·|want|`.

/// xorshift64*: small, seeded, the same on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `n` values uniform in [-mag, mag).
    pub fn vec(&mut self, n: usize, mag: f32) -> Vec<f32> {
        (0..n).map(|_| (self.unit() * 2.0 - 1.0) * mag).collect()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Compare element-wise; on failure the message names the worst index, both values
/// and the max error. Returns the max absolute error.
pub fn compare(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let mut max_err = 0f32;
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = err - (atol + rtol * w.abs());
        if !err.is_finite() || !g.is_finite() {
            return Err(format!("{what}: non-finite at index {i}: got {g}, want {w}"));
        }
        max_err = max_err.max(err);
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    match worst {
        None => Ok(max_err),
        Some((i, _)) => Err(format!(
            "{what}: index {i}: got {}, want {} (atol {atol}, rtol {rtol}; max abs error {max_err} over {} values)",
            got[i],
            want[i],
            got.len()
        )),
    }
}
