use crate::client::Admin;
use crate::error::{CliError, Result};
use crate::output::rfc3339;
use aex_core::home::Home;
use aex_proto::v1 as pb;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
pub struct Args {
    /// Only this agent's events.
    #[arg(long)]
    agent: Option<String>,
    /// Keep printing new events as they are logged.
    #[arg(long, short)]
    follow: bool,
    /// Only events newer than this: a duration (10m, 2h) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only one call's story: its denial, or its admit, closing, overruns and
    /// provider answers. ID is the `x-aex-request-id` its answer carried.
    #[arg(long, value_name = "ID")]
    request: Option<String>,
    /// At most this many events (the newest ones when not following).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn since_ms(text: &str) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(text) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return Ok(now.saturating_sub(d).as_millis() as i64);
    }
    humantime::parse_rfc3339_weak(text)
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64)
        .map_err(|_| {
            CliError::Failed(format!(
                "--since '{text}' is neither a duration (10m, 2h) nor a time (2026-11-22T10:00:00Z)"
            ))
        })
}

fn print_event(e: &pb::Event, json_lines: bool) {
    if json_lines {
        let details: serde_json::Value =
            serde_json::from_str(&e.details_json).unwrap_or(json!(null));
        println!(
            "{}",
            json!({"seq": e.seq, "time": rfc3339(e.ts_ms), "ts_ms": e.ts_ms, "kind": e.kind, "agent": e.agent_name,
                   "reason": e.reason, "amount_micro": e.amount_micro, "reservation_id": e.reservation_id,
                   "details": details, "hash": e.hash})
        );
    } else {
        let amount = if e.amount_micro != 0 {
            format!(" {} µ", e.amount_micro)
        } else {
            String::new()
        };
        let reason = if e.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.reason)
        };
        // What the client was answered, where the event says.
        let details: serde_json::Value =
            serde_json::from_str(&e.details_json).unwrap_or(json!(null));
        let answered = match (details["status"].as_u64(), details["code"].as_str()) {
            (Some(status), Some(code)) => format!(" {status} {code}"),
            _ => String::new(),
        };
        let request = details["request_id"]
            .as_str()
            .map(|id| format!(" {id}"))
            .unwrap_or_default();
        let agent = if e.agent_name.is_empty() {
            "-"
        } else {
            &e.agent_name
        };
        println!(
            "{:>7}  {}  {:<18} {agent}{reason}{answered}{amount}{request}",
            e.seq,
            rfc3339(e.ts_ms),
            e.kind
        );
    }
}

/// Up to 5000 events after `after_seq`.
async fn next_page(
    admin: &mut Admin,
    filter: &pb::ListEventsRequest,
    after_seq: i64,
) -> Result<Vec<pb::Event>> {
    let request = pb::ListEventsRequest {
        after_seq,
        limit: 5000,
        ..filter.clone()
    };
    match admin.ledger.list_events(request).await {
        Ok(r) => Ok(r.into_inner().events),
        Err(e) => Err(admin.status(e)),
    }
}

pub async fn run(home: &Home, control: &str, args: Args) -> Result<()> {
    let mut admin = Admin::connect(home, control).await?;
    let since = args
        .since
        .as_deref()
        .map(since_ms)
        .transpose()?
        .unwrap_or(0);
    let filter = pb::ListEventsRequest {
        agent_name: args.agent.clone().unwrap_or_default(),
        since_ms: since,
        request_id: args.request.clone().unwrap_or_default(),
        ..Default::default()
    };
    // Page through everything matching, keeping the newest `limit` unless
    // following (then everything from `since` on is printed).
    let mut after_seq = 0;
    let mut tail: std::collections::VecDeque<pb::Event> = Default::default();
    loop {
        let page = next_page(&mut admin, &filter, after_seq).await?;
        let Some(last) = page.last() else { break };
        after_seq = last.seq;
        for e in page {
            tail.push_back(e);
            if !args.follow && tail.len() > args.limit as usize {
                tail.pop_front();
            }
        }
    }
    for e in &tail {
        print_event(e, args.json);
    }
    if tail.is_empty()
        && let Some(id) = &args.request
    {
        eprintln!(
            "No event names request '{id}'. Check the id (the x-aex-request-id header of the answer); a request \
             refused before admission (malformed, too large, no control plane) has no event in the ledger."
        );
    }
    if !args.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = next_page(&mut admin, &filter, after_seq).await?;
        for e in &page {
            print_event(e, args.json);
            after_seq = e.seq;
        }
    }
}
