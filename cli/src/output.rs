//! Shared rendering: tables, JSON, times, durations.

use crate::error::{CliError, Result};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    // Never truncate: a cut-off agent name ("rw-20260…") is useless.
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

/// What a `write_*` renderer writes, as text: the human output is built
/// apart from printing it, so it can be snapshot-tested.
pub fn rendered(write: impl FnOnce(&mut String) -> std::fmt::Result) -> String {
    let mut out = String::new();
    write(&mut out).expect("writing to a String cannot fail");
    out
}

pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

pub use aex_core::time::rfc3339;

pub fn rfc3339_opt(ms: Option<i64>) -> serde_json::Value {
    ms.map(|m| serde_json::Value::String(rfc3339(m)))
        .unwrap_or(serde_json::Value::Null)
}

/// `--ttl`: `30m`, `24h`, `7d`, `1w`…; a bare number means hours, as in the
/// first AEX. `0` or `never` means no expiry.
pub fn parse_ttl(text: &str) -> Result<u64> {
    let t = text.trim();
    if t == "never" {
        return Ok(0);
    }
    if let Ok(hours) = t.parse::<u64>() {
        return hours
            .checked_mul(3600)
            .ok_or_else(|| CliError::Failed(format!("--ttl {text} is too long")));
    }
    humantime::parse_duration(t)
        .map(|d| d.as_secs())
        .map_err(|e| {
            CliError::Failed(format!(
                "--ttl '{text}' is not a duration ({e}); write e.g. 30m, 24h, 7d, or a number of hours"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("24").unwrap(), 86_400);
        assert_eq!(parse_ttl("30m").unwrap(), 1_800);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert_eq!(parse_ttl("never").unwrap(), 0);
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("-1").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(1_771_586_980_000), "2026-02-20T11:29:40Z");
    }
}
