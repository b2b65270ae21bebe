//! The one tolerance rule used by every test, `|got − want| ≤ atol + rtol·|want|`.
//! (`Rng` lives in `crate::rng`; re-exported here for the tests.)

pub use crate::rng::Rng;

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
