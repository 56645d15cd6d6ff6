use crate::client::Admin;
use crate::error::Result;
use crate::output::{print_json, rfc3339, table};
use aex_core::home::Home;
use aex_core::money::usd;
use aex_proto::v1 as pb;
use serde_json::json;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Refresh every N seconds until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
    /// Burn-rate window in seconds.
    #[arg(long, default_value_t = 300)]
    window: u32,
    #[arg(long)]
    json: bool,
}

fn duration_text(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub async fn run(home: &Home, control: &str, args: Args) -> Result<()> {
    let mut admin = Admin::connect(home, control).await?;
    loop {
        let m = admin
            .ledger
            .get_metrics(pb::MetricsRequest {
                window_seconds: args.window,
            })
            .await
            .map_err(|e| admin.status(e))?
            .into_inner();
        if args.json {
            print_json(&json!({
                "window_seconds": m.window_seconds,
                "agents": m.agents.iter().map(|a| json!({
                    "name": a.name, "budget_micro": a.budget_micro, "spent_micro": a.spent_micro,
                    "remaining_micro": a.remaining_micro,
                    "burn_rate_micro_per_second": a.burn_rate_micro_per_second,
                    "seconds_to_exhaustion": a.seconds_to_exhaustion,
                    "requests_last_minute": a.requests_last_minute, "rpm_limit": a.rpm_limit,
                    "requests_served": a.requests_served, "denials": a.denials,
                    "last_activity_at": a.last_activity_at_ms.map(rfc3339),
                })).collect::<Vec<_>>(),
            }));
        } else {
            if args.watch.is_some() {
                // Clear the screen and go home, so the table refreshes in place.
                print!("\x1b[2J\x1b[H");
            }
            let mut t = table(&[
                "Agent",
                "Spent ($)",
                "Remaining ($)",
                "Burn Rate",
                "Time to Budget",
                "Req/min",
                "RPM",
                "Served",
                "Denied",
                "Last Activity",
            ]);
            for a in &m.agents {
                t.add_row(vec![
                    a.name.clone(),
                    usd(a.spent_micro).replacen('$', "", 1),
                    usd(a.remaining_micro).replacen('$', "", 1),
                    format!("{:.2} µ/s", a.burn_rate_micro_per_second),
                    a.seconds_to_exhaustion.map_or("∞".into(), duration_text),
                    a.requests_last_minute.to_string(),
                    a.rpm_limit.to_string(),
                    a.requests_served.to_string(),
                    a.denials.to_string(),
                    a.last_activity_at_ms.map_or("never".into(), rfc3339),
                ]);
            }
            println!(
                "AEX Metrics (burn rate over the last {} s)",
                m.window_seconds
            );
            println!("{t}");
        }
        match args.watch {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs.max(1))).await,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::duration_text(42.0), "42s");
        assert_eq!(super::duration_text(323.0), "5m 23s");
        assert_eq!(super::duration_text(7_300.0), "2h 1m");
        assert_eq!(super::duration_text(200_000.0), "2d 7h");
    }
}
