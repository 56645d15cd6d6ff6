use crate::client::Admin;
use crate::error::{CliError, Result};
use crate::output::print_json;
use aex_core::home::Home;
use aex_proto::v1 as pb;
use serde_json::json;

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
        println!("AEX Audit — Invariant Verification");
        println!();
        for c in &report.checks {
            let mark = if c.passed { "✅" } else { "❌" };
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            println!("  {mark} {}: {verdict} — {}", c.name, c.detail);
            for o in &c.offenders {
                println!("       {o}");
            }
        }
        if !report.overruns.is_empty() {
            println!();
            println!(
                "  Overruns (provider reported more than was reserved; charged and recorded):"
            );
            for o in &report.overruns {
                println!("       {o}");
            }
        }
        println!();
        println!(
            "  {} events checked in {} ms.",
            report.events_checked, report.duration_ms
        );
        if failed == 0 {
            println!("All {} invariant checks passed.", report.checks.len());
        }
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} audit checks failed; see above. The ledger was changed outside AEX or is inconsistent.",
            report.checks.len()
        )));
    }
    Ok(())
}
