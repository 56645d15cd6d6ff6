use crate::client::Admin;
use crate::commands::daemon::{http_get, running_pid};
use crate::error::{CliError, Result};
use crate::output::{print_json, rendered};
use aex_core::config::{ModelsConfig, ProviderKind};
use aex_core::home::Home;
use aex_proto::v1 as pb;
use serde_json::json;
use std::fmt::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub(super) struct Line {
    ok: bool,
    label: String,
    value: String,
    /// What to do about it, when not ok.
    fix: String,
}

pub(super) fn line(
    ok: bool,
    label: &str,
    value: impl Into<String>,
    fix: impl Into<String>,
) -> Line {
    Line {
        ok,
        label: label.to_string(),
        value: value.into(),
        fix: fix.into(),
    }
}

/// host:port of an http(s) base URL.
fn authority(url: &str) -> Option<String> {
    let (tls, rest) = match url.split_once("://")? {
        ("https", r) => (true, r),
        ("http", r) => (false, r),
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    Some(
        if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        },
    )
}

async fn reachable(addr: &str) -> std::result::Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".into()),
    }
}

fn private(path: &std::path::Path) -> Option<bool> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o077 == 0)
}

/// Each check on its own line with ✅/❌ and the fix; exit 1 if any fails.
pub async fn run(home: &Home, control: &str, dataplane: &str, args: Args) -> Result<()> {
    let mut lines = Vec::new();
    let root = home.root();
    let initialised = root.is_dir();
    lines.push(line(
        initialised,
        "AEX directory",
        root.display().to_string(),
        "run `aexctl init`",
    ));
    let db = home.db_path();
    lines.push(line(
        db.exists(),
        "Database",
        db.display().to_string(),
        "run `aexctl init`",
    ));

    // Integrity: the full audit when the control plane is up, else SQLite's own check.
    let admin = Admin::connect(home, control).await;
    let integrity = match &admin {
        Ok(a) => {
            let mut a = a.clone_handles();
            match a.ledger.audit(pb::AuditRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let failed: Vec<_> = r
                        .checks
                        .iter()
                        .filter(|c| !c.passed)
                        .map(|c| c.name.clone())
                        .collect();
                    if failed.is_empty() {
                        line(
                            true,
                            "DB Integrity",
                            format!(
                                "PASS (audit: {} checks, {} events)",
                                r.checks.len(),
                                r.events_checked
                            ),
                            "",
                        )
                    } else {
                        line(
                            false,
                            "DB Integrity",
                            format!("FAIL: {}", failed.join(", ")),
                            "run `aexctl audit` for the offending rows",
                        )
                    }
                }
                Err(e) => line(
                    false,
                    "DB Integrity",
                    e.message().to_string(),
                    "run `aexctl audit`",
                ),
            }
        }
        Err(_) if db.exists() => {
            // The control plane's binary checks its own database: aexctl
            // never opens it.
            let checked =
                tokio::process::Command::new(crate::commands::daemon::binary("aex-control"))
                    .arg("check-db")
                    .arg("--home")
                    .arg(home.root())
                    .arg("--db")
                    .arg(&db)
                    .output()
                    .await;
            match checked {
                Ok(out) => {
                    let verdict = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v["integrity"].as_str().map(str::to_string));
                    match verdict {
                        Some(r) if r == "ok" => line(
                            true,
                            "DB Integrity",
                            "PASS (SQLite integrity check; start AEX for the full audit)",
                            "",
                        ),
                        Some(r) => line(false, "DB Integrity", r, "restore aex.db from a backup"),
                        None => line(
                            false,
                            "DB Integrity",
                            String::from_utf8_lossy(&out.stderr).trim().to_string(),
                            "check the file's permissions",
                        ),
                    }
                }
                Err(e) => line(
                    false,
                    "DB Integrity",
                    format!("cannot run aex-control check-db: {e}"),
                    "install aex-control next to aexctl or on PATH",
                ),
            }
        }
        Err(_) => line(false, "DB Integrity", "no database", "run `aexctl init`"),
    };
    lines.push(integrity);

    let config_path = home.models_yaml();
    lines.push(line(
        config_path.exists(),
        "Config",
        config_path.display().to_string(),
        "run `aexctl init`",
    ));
    let config = ModelsConfig::load(&config_path);
    match &config {
        Ok(c) => lines.push(line(
            true,
            "Config Valid",
            format!("{} model(s)", c.models.len()),
            "",
        )),
        Err(e) => lines.push(line(
            false,
            "Config Valid",
            e.to_string(),
            "fix the file, then `aexctl models reload`",
        )),
    }
    lines.push(
        match (home.read_admin_token(), private(&home.admin_token_path())) {
            (Ok(_), Some(true)) => line(
                true,
                "Admin credential",
                home.admin_token_path().display().to_string(),
                "",
            ),
            (Ok(_), _) => line(
                false,
                "Admin credential",
                "readable by other users",
                format!("chmod 600 {}", home.admin_token_path().display()),
            ),
            (Err(e), _) => line(
                false,
                "Admin credential",
                e.to_string(),
                "run `aexctl init`",
            ),
        },
    );

    lines.push(match &admin {
        Ok(a) => {
            let mut a = a.clone_handles();
            match a.ledger.get_status(pb::StatusRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    line(
                        true,
                        "Control plane",
                        format!("Running (PID {}, v{}, {control})", s.pid, s.version),
                        "",
                    )
                }
                Err(e) => line(
                    false,
                    "Control plane",
                    e.message().to_string(),
                    "check `aexctl daemon logs control`",
                ),
            }
        }
        Err(_) => line(
            false,
            "Control plane",
            format!("not reachable at {control}"),
            "run `aexctl daemon start`",
        ),
    });
    let pid = running_pid(home, "dataplane");
    lines.push(match http_get(dataplane, "/healthz").await {
        Ok((200, body)) => {
            let version = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["version"].as_str().map(str::to_string))
                .unwrap_or_default();
            let pid = pid.map(|p| format!("PID {p}, ")).unwrap_or_default();
            line(
                true,
                "Daemon Health",
                format!("ok (v{version}, {pid}http://{dataplane}/v1)"),
                "",
            )
        }
        Ok((code, _)) => line(
            false,
            "Daemon Health",
            format!("{dataplane} answered {code}"),
            "check `aexctl daemon logs dataplane`",
        ),
        Err(e) => line(
            false,
            "Daemon Health",
            format!("data plane not reachable at {dataplane} ({e})"),
            "run `aexctl daemon start`",
        ),
    });

    let env = home.env_file();
    lines.push(match private(&env) {
        Some(true) => line(true, ".env file", env.display().to_string(), ""),
        Some(false) => line(
            false,
            ".env file",
            format!("{} is readable by other users", env.display()),
            format!("chmod 600 {}", env.display()),
        ),
        None => line(
            false,
            ".env file",
            format!("{} is missing", env.display()),
            "run `aexctl init`",
        ),
    });
    if let Ok(c) = &config {
        for p in c.providers.values() {
            let label = format!("Provider {}", p.name);
            lines.push(match &p.kind {
                ProviderKind::Simulated(_) => line(true, &label, "built in (simulated)", ""),
                ProviderKind::OpenAiCompatible { base_url }
                | ProviderKind::Anthropic { base_url } => match authority(base_url) {
                    None => line(false, &label, format!("{base_url} is not an http(s) URL"), "fix base_url in models.yaml"),
                    Some(addr) => match reachable(&addr).await {
                        Ok(()) => line(true, &label, format!("{base_url} reachable"), ""),
                        Err(e) => line(
                            false,
                            &label,
                            format!("{base_url} not reachable ({e})"),
                            "start the provider (e.g. `ollama serve`) or fix base_url in models.yaml",
                        ),
                    },
                },
            });
        }
    }

    let failed = lines.iter().filter(|l| !l.ok).count();
    if args.json {
        print_json(&json!({
            "passed": failed == 0,
            "checks": lines.iter().map(|l| json!({"check": l.label, "ok": l.ok, "value": l.value, "fix": l.fix})).collect::<Vec<_>>(),
        }));
    } else {
        print!(
            "{}",
            rendered(|out| write_lines(out, env!("CARGO_PKG_VERSION"), &lines))
        );
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} check(s) failed; see the fixes above."
        )));
    }
    Ok(())
}

pub(super) fn write_lines(out: &mut impl Write, version: &str, lines: &[Line]) -> fmt::Result {
    let failed = lines.iter().filter(|l| !l.ok).count();
    writeln!(out, "AEX Doctor v{version}")?;
    writeln!(out)?;
    let width = lines.iter().map(|l| l.label.len()).max().unwrap_or(0) + 1;
    for l in lines {
        let mark = if l.ok { "✅" } else { "❌" };
        let label = format!("{}:", l.label);
        writeln!(
            out,
            "  {mark} {label:<width$} {}",
            l.value,
            width = width + 1
        )?;
        if !l.ok && !l.fix.is_empty() {
            writeln!(out, "       fix: {}", l.fix)?;
        }
    }
    writeln!(out)?;
    if failed == 0 {
        writeln!(out, "All checks passed.")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn authorities() {
        assert_eq!(
            super::authority("http://localhost:11434/v1").as_deref(),
            Some("localhost:11434")
        );
        assert_eq!(
            super::authority("https://api.groq.com/openai/v1").as_deref(),
            Some("api.groq.com:443")
        );
        assert_eq!(super::authority("ftp://x"), None);
    }
}
