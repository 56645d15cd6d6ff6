use crate::client::Admin;
use crate::error::Result;
use crate::output::{print_json, rfc3339};
use aex_core::home::Home;
use aex_core::money::usd_with_micro;
use aex_proto::v1 as pb;
use serde_json::json;

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
    let mut reasons: Vec<(&String, &u64)> = s.denials_by_reason.iter().collect();
    reasons.sort();
    let denial = |r: &str| s.denials_by_reason.get(r).copied().unwrap_or(0);
    let rate_denials = denial("rpm") + denial("tpm") + denial("concurrency") + denial("model_tpm");
    if args.json {
        print_json(&json!({
            "agents": s.agents,
            "total_budget_micro": s.total_budget_micro,
            "total_spent_micro": s.total_spent_micro,
            "total_reserved_micro": s.total_reserved_micro,
            "total_remaining_micro": s.total_remaining_micro,
            "requests_served": s.requests_served,
            "denials_by_reason": s.denials_by_reason,
            "budget_denials": denial("budget"),
            "rate_limit_denials": rate_denials,
            "auth_denials": denial("auth") + denial("token_expired"),
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
    println!("AEX Enforcement Status");
    println!();
    println!("  Agents:             {}", s.agents);
    println!(
        "  Total Budget:       {}",
        usd_with_micro(s.total_budget_micro)
    );
    println!(
        "  Total Spent:        {}",
        usd_with_micro(s.total_spent_micro)
    );
    println!(
        "  Total Reserved:     {}",
        usd_with_micro(s.total_reserved_micro)
    );
    println!(
        "  Remaining:          {}",
        usd_with_micro(s.total_remaining_micro)
    );
    println!();
    println!("  Requests Served:    {}", s.requests_served);
    println!("  Budget Denials:     {}", denial("budget"));
    println!("  Rate Limit Denials: {}", rate_denials);
    println!(
        "  Auth Denials:       {}",
        denial("auth") + denial("token_expired")
    );
    println!("  Policy Violations:  {}", s.policy_violations);
    println!(
        "  Upstream 429s:      {}  (the provider's limits, not AEX's)",
        s.upstream_denials
    );
    println!("  Upstream Errors:    {}", s.upstream_errors);
    println!(
        "  Overruns:           {}  ({} reported beyond reservations, not charged)",
        s.overruns,
        usd_with_micro(s.total_overrun_micro)
    );
    println!("  Open Reservations:  {}", s.open_reservations);
    println!("  Expired:            {}", s.expired_reservations);
    println!("  Processes Killed:   {}", s.processes_killed);
    println!("  Active Processes:   {}", s.processes_active);
    if !reasons.is_empty() {
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
        println!("  Denials by Rule:    {}", list.join(", "));
    }
    println!();
    println!(
        "  Control Plane:      running (PID {}, v{}, {}) since {}",
        s.pid,
        s.version,
        control,
        rfc3339(s.started_at_ms)
    );
    match dp {
        Ok(200) => println!(
            "  Data Plane:         running ({addr}, {} connected)",
            s.data_planes
        ),
        Ok(code) => println!("  Data Plane:         unhealthy ({addr} answered {code})"),
        Err(e) => println!("  Data Plane:         not reachable at {addr} ({e})"),
    }
    Ok(())
}
