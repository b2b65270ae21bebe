//! Seconds from a monotonic clock, natively and in the browser (where
//! `std::time::Instant` is unavailable).

#[cfg(not(target_arch = "wasm32"))]
pub fn now() -> f64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

#[cfg(target_arch = "wasm32")]
pub fn now() -> f64 {
    js_sys::Date::now() / 1000.0
}

/// Days since 1970-01-01 (UTC).
pub fn days_since_epoch() -> i64 {
    #[cfg(not(target_arch = "wasm32"))]
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_millis() as f64);
    #[cfg(target_arch = "wasm32")]
    let ms = js_sys::Date::now();
    (ms / 86_400_000.0).floor() as i64
}
