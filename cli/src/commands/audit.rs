use crate::client::Admin;
use crate::error::{CliError, Result};
use crate::output::{print_json, rendered};
use aex_core::home::Home;
use aex_proto::v1 as pb;
use serde_json::json;
use std::fmt::{self, Write};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

/// Exits 1 when any check fails.
pub async fn run(home: &Home, control: &str, args: Args) -> Result<()> {
    let mut admin =
        Admin::connect_with_timeout(home, control, std::time::Duration::from_secs(600)).await?;
    let report = admin
        .ledger
        .audit(pb::AuditRequest {})
        .await
        .map_err(|e| admin.status(e))?
        .into_inner();
    let failed = report.checks.iter().filter(|c| !c.passed).count();
    if args.json {
        print_json(&json!({
            "passed": failed == 0,
            "events_checked": report.events_checked,
            "duration_ms": report.duration_ms,
            "overruns": report.overruns,
            "checks": report.checks.iter().map(|c| json!({
                "name": c.name, "passed": c.passed, "detail": c.detail, "offenders": c.offenders,
            })).collect::<Vec<_>>(),
        }));
    } else {
        print!("{}", rendered(|out| write_report(out, &report)));
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} audit checks failed; see above. The ledger was changed outside AEX or is inconsistent.",
            report.checks.len()
        )));
    }
    Ok(())
}

pub(super) fn write_report(out: &mut impl Write, report: &pb::AuditReport) -> fmt::Result {
    let failed = report.checks.iter().filter(|c| !c.passed).count();
    writeln!(out, "AEX Audit — Invariant Verification")?;
    writeln!(out)?;
    for c in &report.checks {
        let mark = if c.passed { "✅" } else { "❌" };
        let verdict = if c.passed { "PASS" } else { "FAIL" };
        writeln!(out, "  {mark} {}: {verdict} — {}", c.name, c.detail)?;
        for o in &c.offenders {
            writeln!(out, "       {o}")?;
        }
    }
    if !report.overruns.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "  Overruns (provider reported more than was reserved; charged and recorded):"
        )?;
        for o in &report.overruns {
            writeln!(out, "       {o}")?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "  {} events checked in {} ms.",
        report.events_checked, report.duration_ms
    )?;
    if failed == 0 {
        writeln!(out, "All {} invariant checks passed.", report.checks.len())?;
    }
    Ok(())
}
