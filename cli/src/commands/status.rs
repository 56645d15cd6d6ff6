use crate::client::Admin;
use crate::error::Result;
use crate::output::{print_json, rendered, rfc3339};
use aex_core::denial::Rule;
use aex_core::home::Home;
use aex_core::money::usd_with_micro;
use aex_proto::v1 as pb;
use serde_json::json;
use std::fmt::{self, Write};

#[derive(clap::Args)]
pub struct Args {
    /// Data-plane address to check [env: AEX_DATAPLANE_ADDR].
    #[arg(long, value_name = "HOST:PORT")]
    dataplane: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(home: &Home, control: &str, args: Args) -> Result<()> {
    let mut admin = Admin::connect(home, control).await?;
    let s = admin
        .ledger
        .get_status(pb::StatusRequest {})
        .await
        .map_err(|e| admin.status(e))?
        .into_inner();
    let addr = crate::addresses::dataplane(home, args.dataplane);
    let dp = super::daemon::http_status(&addr, "/healthz").await;
    let denials = DenialTotals::of(&s);
    if args.json {
        print_json(&json!({
            "agents": s.agents,
            "total_budget_micro": s.total_budget_micro,
            "total_spent_micro": s.total_spent_micro,
            "total_reserved_micro": s.total_reserved_micro,
            "total_remaining_micro": s.total_remaining_micro,
            "requests_served": s.requests_served,
            "denials_by_reason": s.denials_by_reason,
            "budget_denials": denials.budget,
            "rate_limit_denials": denials.rate_limit,
            "auth_denials": denials.auth,
            "policy_violations": s.policy_violations,
            "upstream_denials": s.upstream_denials,
            "upstream_errors": s.upstream_errors,
            "overruns": s.overruns,
            "total_overrun_micro": s.total_overrun_micro,
            "open_reservations": s.open_reservations,
            "expired_reservations": s.expired_reservations,
            "processes_active": s.processes_active,
            "processes_killed": s.processes_killed,
            "control_plane": {
                "state": "running", "address": control, "pid": s.pid, "version": s.version,
                "started_at": rfc3339(s.started_at_ms), "database": s.database,
                "connected_data_planes": s.data_planes,
            },
            "data_plane": match &dp {
                Ok(code) => json!({"state": if *code == 200 { "running" } else { "unhealthy" }, "address": addr, "healthz": code}),
                Err(e) => json!({"state": "unreachable", "address": addr, "error": e}),
            },
        }));
        return Ok(());
    }
    print!(
        "{}",
        rendered(|out| write_status(out, &s, control, &addr, &dp))
    );
    Ok(())
}

/// The denial totals both forms show, by the rules each groups.
struct DenialTotals {
    budget: u64,
    rate_limit: u64,
    auth: u64,
}

impl DenialTotals {
    fn of(s: &pb::Status) -> Self {
        let total = |of: fn(Rule) -> bool| -> u64 {
            s.denials_by_reason
                .iter()
                .filter(|(r, _)| Rule::parse(r).is_some_and(of))
                .map(|(_, n)| n)
                .sum()
        };
        Self {
            budget: total(|r| r == Rule::Budget),
            rate_limit: total(Rule::is_rate_limit),
            auth: total(Rule::is_authentication),
        }
    }
}

/// The human form of `status`; `dp` is the data plane's /healthz answer.
pub(super) fn write_status(
    out: &mut impl Write,
    s: &pb::Status,
    control: &str,
    addr: &str,
    dp: &std::result::Result<u16, String>,
) -> fmt::Result {
    let mut reasons: Vec<(&String, &u64)> = s.denials_by_reason.iter().collect();
    reasons.sort();
    let denials = DenialTotals::of(s);
    writeln!(out, "AEX Enforcement Status")?;
    writeln!(out)?;
    writeln!(out, "  Agents:             {}", s.agents)?;
    writeln!(
        out,
        "  Total Budget:       {}",
        usd_with_micro(s.total_budget_micro)
    )?;
    writeln!(
        out,
        "  Total Spent:        {}",
        usd_with_micro(s.total_spent_micro)
    )?;
    writeln!(
        out,
        "  Total Reserved:     {}",
        usd_with_micro(s.total_reserved_micro)
    )?;
    writeln!(
        out,
        "  Remaining:          {}",
        usd_with_micro(s.total_remaining_micro)
    )?;
    writeln!(out)?;
    writeln!(out, "  Requests Served:    {}", s.requests_served)?;
    writeln!(out, "  Budget Denials:     {}", denials.budget)?;
    writeln!(out, "  Rate Limit Denials: {}", denials.rate_limit)?;
    writeln!(out, "  Auth Denials:       {}", denials.auth)?;
    writeln!(out, "  Policy Violations:  {}", s.policy_violations)?;
    writeln!(
        out,
        "  Upstream 429s:      {}  (the provider's limits, not AEX's)",
        s.upstream_denials
    )?;
    writeln!(out, "  Upstream Errors:    {}", s.upstream_errors)?;
    writeln!(
        out,
        "  Overruns:           {}  ({} reported beyond reservations, not charged)",
        s.overruns,
        aex_core::money::overrun_text(s.total_overrun_micro)
    )?;
    writeln!(out, "  Open Reservations:  {}", s.open_reservations)?;
    writeln!(out, "  Expired:            {}", s.expired_reservations)?;
    writeln!(out, "  Processes Killed:   {}", s.processes_killed)?;
    writeln!(out, "  Active Processes:   {}", s.processes_active)?;
    if !reasons.is_empty() {
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
        writeln!(out, "  Denials by Rule:    {}", list.join(", "))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "  Control Plane:      running (PID {}, v{}, {}) since {}",
        s.pid,
        s.version,
        control,
        rfc3339(s.started_at_ms)
    )?;
    match dp {
        Ok(200) => writeln!(
            out,
            "  Data Plane:         running ({addr}, {} connected)",
            s.data_planes
        )?,
        Ok(code) => writeln!(
            out,
            "  Data Plane:         unhealthy ({addr} answered {code})"
        )?,
        Err(e) => writeln!(out, "  Data Plane:         not reachable at {addr} ({e})")?,
    }
    Ok(())
}
