//! The control plane's one clock: milliseconds since the Unix epoch. Read
//! at the edges (a request's arrival, a sweep, an admin change) and passed
//! in; the domain (`aex_core`) and the stores never read it.

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
