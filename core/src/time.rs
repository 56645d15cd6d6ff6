//! Instants as people read them: what the CLI prints and what an error
//! message names.

use std::time::{Duration, UNIX_EPOCH};

/// Unix ms → `2026-02-20T11:29:40Z` (UTC, to the second; before 1970 reads
/// as 1970).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn instants_read_as_utc_seconds() {
        assert_eq!(super::rfc3339(1_771_586_980_000), "2026-02-20T11:29:40Z");
        assert_eq!(super::rfc3339(-5), "1970-01-01T00:00:00Z");
    }
}
