//! `aex-bench scale`: does AEX stay fast as the ledger grows? Seeds a home
//! with many agents and events through the control plane's own store (the
//! same group-committed writer a running control plane uses), then starts
//! the daemons on it and measures, against an empty home in the same run:
//! admission latency through the data plane, `aexctl audit` and
//! `aexctl agent list`.

use crate::{Daemons, sibling, spawn, workload};
use aex_control::clock::now_ms;
use aex_control::storage::sqlite::SqliteStore;
use aex_control::storage::{
    Closing, NewAgent, NewReservation, ReservationRecord, Settlement, Store,
};
use aex_core::money::{Pricing, TokenUsage};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

pub struct ScaleArgs {
    pub agents: u64,
    pub events: u64,
    pub requests: u64,
    pub max_seconds: u64,
}

pub fn new_agent(i: u64) -> NewAgent {
    // Never a real token: these agents exist to be listed and audited.
    NewAgent {
        token_prefix: "aex_seed".into(),
        rpm: 600,
        ..NewAgent::new(&format!("seed-{i:06}"), &format!("{i:064x}"), 1_000_000_000)
    }
}

/// Agents, then reservation + settlement pairs (two events each) spread
/// over them, 64 at a time. Returns the seconds the events took.
async fn seed(home: &aex_core::home::Home, agents: u64, events: u64) -> (f64, f64) {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&home.db_path(), home.read_ledger_key().expect("ledger key"))
            .await
            .expect("open the store"),
    );
    let started = Instant::now();
    let mut ids = Vec::with_capacity(agents as usize);
    for i in 0..agents {
        ids.push(store.create_agent(new_agent(i)).await.expect("agent").id);
    }
    let agent_seconds = started.elapsed().as_secs_f64();
    let ids = Arc::new(ids);
    let started = Instant::now();
    let pairs = events.saturating_sub(agents) / 2;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (store, ids, next) = (store.clone(), ids.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= pairs {
                    return;
                }
                let agent_id = ids[(n % ids.len() as u64) as usize].clone();
                let name = format!("seed-{:06}", n % ids.len() as u64);
                store
                    .reserve(reservation(&format!("seed_{n}"), agent_id.clone(), &name))
                    .await
                    .expect("reserve");
                store
                    .settle(Settlement {
                        reservation_id: format!("rsv_seed_{n}"),
                        agent_id,
                        agent_name: name,
                        closing: Closing::Finished(aex_core::reservation::Outcome::Completed),
                        charge_micro: 3,
                        overrun_micro: 0,
                        usage: TokenUsage::new(12, 1),
                        extra_events: vec![],
                        details: serde_json::json!({"seeded": true}),
                        at_ms: now_ms(),
                    })
                    .await
                    .expect("settle");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("seeding task");
    }
    (agent_seconds, started.elapsed().as_secs_f64())
}

/// What one bench call reserves: 100 input and 16 output tokens of the
/// bench model, 30 µ; `key` makes the ids unique.
pub fn reservation(key: &str, agent_id: String, agent_name: &str) -> NewReservation {
    let now = now_ms();
    NewReservation {
        record: ReservationRecord {
            id: format!("rsv_{key}"),
            request_id: format!("req_{key}"),
            agent_id,
            model: "bench".into(),
            amount_micro: 30,
            pricing: Pricing::flat(150_000, 600_000),
            input_tokens_bound: 100,
            output_tokens_cap: 16,
            created_at_ms: now,
            expires_at_ms: now + 600_000,
        },
        agent_name: agent_name.into(),
        max_open: 0,
        grant_id: None,
        log_budget_denial: true,
        at_ms: now,
        details: serde_json::json!({"model": "bench"}),
    }
}

/// Seconds an `aexctl` command takes, and its output.
fn timed_aexctl(home: &Path, control_url: &str, args: &[&str]) -> (f64, String) {
    let started = Instant::now();
    let out = Command::new(sibling("aexctl"))
        .args(args)
        .env("AEX_HOME", home)
        .env("AEX_CONTROL_ADDR", control_url)
        .output()
        .expect("aexctl");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "aexctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (seconds, String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Measured {
    agents: usize,
    events: i64,
    p50: f64,
    p99: f64,
    audit_seconds: f64,
    audit_passed: bool,
    list_seconds: f64,
}

/// Starts the daemons on `home`, drives one new agent at c=1, then times
/// audit and agent list.
async fn measure(home: &Path, args: &ScaleArgs) -> Measured {
    let mut daemons = Daemons(Vec::new());
    let (_, control_addr) = spawn(
        home,
        "aex-control",
        &["--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        &mut daemons,
    );
    let control_url = format!("http://{control_addr}");
    let (_, data_addr) = spawn(
        home,
        "aex-dataplane",
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            &control_url,
            "--metrics-listen",
            "off",
        ],
        &mut daemons,
    );
    let (_, created) = timed_aexctl(
        home,
        &control_url,
        &[
            "agent",
            "create",
            "driven",
            "1000000",
            "4000000000",
            "--json",
        ],
    );
    let token = serde_json::from_str::<serde_json::Value>(&created).expect("agent JSON")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let url = format!("http://{data_addr}/v1/chat/completions");
    let load = crate::Args {
        requests: args.requests,
        max_seconds: args.max_seconds,
        out: Default::default(),
        peers_dir: None,
        no_peers: true,
        only: Vec::new(),
        mode: None,
    };
    let r = workload(&url, &token, false, 1, &load).await;
    let (audit_seconds, audit) = timed_aexctl(home, &control_url, &["audit", "--json"]);
    let audit: serde_json::Value = serde_json::from_str(&audit).expect("audit JSON");
    let (list_seconds, listed) = timed_aexctl(home, &control_url, &["agent", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("list JSON");
    Measured {
        agents: listed.as_array().map_or(0, Vec::len),
        events: audit["events_checked"].as_i64().unwrap_or(-1),
        p50: r.p50,
        p99: r.p99,
        audit_seconds,
        audit_passed: audit["passed"].as_bool().unwrap_or(false),
        list_seconds,
    }
}

pub async fn run(args: ScaleArgs, mock_addr: std::net::SocketAddr, out: &Path) {
    let write_models = |home: &aex_core::home::Home| {
        std::fs::write(home.models_yaml(), crate::models_yaml(mock_addr)).expect("models.yaml");
    };
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = aex_core::home::Home::new(empty_dir.path());
    empty.init(false).expect("init");
    write_models(&empty);
    let big_dir = tempfile::tempdir().expect("tempdir");
    let big = aex_core::home::Home::new(big_dir.path());
    big.init(false).expect("init");
    write_models(&big);

    eprintln!("seeding {} agents and {} events…", args.agents, args.events);
    let (agent_seconds, event_seconds) = seed(&big, args.agents, args.events).await;
    eprintln!("seeded in {agent_seconds:.1} s (agents) + {event_seconds:.1} s (events)");
    let small = measure(empty_dir.path(), &args).await;
    let large = measure(big_dir.path(), &args).await;
    let line = |label: &str, m: &Measured| {
        format!(
            "| {label} | {} | {} | {:.3} / {:.3} | {:.2} s ({}) | {:.2} s |",
            m.agents,
            m.events,
            m.p50,
            m.p99,
            m.audit_seconds,
            if m.audit_passed { "passed" } else { "FAILED" },
            m.list_seconds
        )
    };
    let pairs = args.events.saturating_sub(args.agents) / 2;
    let section = format!(
        "## Scale\n\n\
Produced by `./bench/run scale --agents {agents} --events {events}` on the same machine. \
The large home is seeded through the control plane's own store: {agents} agents \
({agent_seconds:.1} s), then {pairs} reservation + settlement pairs through the group-committed ledger writer \
at 64 concurrent callers ({event_seconds:.1} s, {rate:.0} ledger operations/s). Then both homes get the daemons, \
one new agent is driven at c=1 for {req} requests, and `aexctl audit` (the whole chain's HMACs and every invariant) \
and `aexctl agent list` are timed end to end, process start included.\n\n\
| home | agents listed | events | c=1 latency p50 / p99 ms | `aexctl audit` | `aexctl agent list --json` |\n\
|---|---|---|---|---|---|\n{}\n{}\n\n\
Targets (issue #7): admission latency does not grow with the event count; audit over 1M events ≤ 30 s; agent list stays fast.\n",
        line("empty", &small),
        line("seeded", &large),
        agents = args.agents,
        events = args.events,
        rate = (pairs * 2) as f64 / event_seconds.max(1e-9),
        req = args.requests,
    );
    crate::write_section(out, "scale", &section);
    eprintln!("{section}");
}
