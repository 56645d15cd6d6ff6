//! Grants end to end (docs/GRANTS.md): a busy agent's calls admitted by the
//! data plane from a grant, with the budget's boundary as exact as when
//! every call is a round trip; grants given back when the agent changes;
//! a killed data plane's grants expired and charged. Real processes; the
//! mock is in-process.

use aex_tests::{Stack, prometheus_value};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn audit_passes(stack: &Stack) -> Value {
    let out = stack.control.aexctl(&["audit", "--json"]);
    assert_eq!(out.code(), 0, "audit failed:\n{}", out.stdout);
    out.json()
}

async fn dataplane_metric(stack: &Stack, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(stack.data.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus_value(&text, metric, labels)
}

/// A call whose charge is exactly its reservation: the mock reports the
/// input bound and the cap as usage, so no settlement gives anything back
/// and how many calls fit does not depend on timing.
struct CostlyCall {
    body: Value,
    usage: String,
    cost_micro: i64,
}

impl CostlyCall {
    fn new() -> Self {
        let mut body = chat("mock-model");
        body["max_tokens"] = json!(10);
        let input = serde_json::to_vec(&body).unwrap().len() as i64;
        Self {
            body,
            usage: format!("{input},10"),
            // mock-model: 1 µ per input token, 2 µ per output token.
            cost_micro: input + 10 * 2,
        }
    }

    fn budget_for(&self, calls: i64) -> String {
        format!("{:.6}", (calls * self.cost_micro) as f64 / 1e6)
    }
}

/// `calls` requests, `at_once` at a time; the statuses in order of answer.
async fn run_calls(
    stack: &Stack,
    token: &str,
    call: &CostlyCall,
    calls: usize,
    at_once: usize,
) -> Vec<u16> {
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..calls {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let request = client
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(token)
            .header("x-mock-usage", &call.usage)
            .json(&call.body);
        tasks.push(tokio::spawn(async move {
            let status = request.send().await.unwrap().status().as_u16();
            drop(permit);
            status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_agent_is_admitted_from_grants_and_its_budget_stays_exact() {
    let stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("busy", &call.budget_for(50), "100000", &[]);

    let statuses = run_calls(&stack, &token, &call, 300, 8).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((ok, refused), (50, 250), "{statuses:?}");
    assert_eq!(stack.mock.count(), 50);

    let local = dataplane_metric(
        &stack,
        "aex_dataplane_admissions_total",
        &[("path", "local")],
    )
    .await;
    assert!(local > 0.0, "no call was admitted from a grant");
    println!("{ok} admitted, {local} of them from grants");

    // Every grant goes back (idle, or recalled at the edge) and nothing is
    // left reserved.
    let agent = stack.settled("busy", Duration::from_secs(10)).await;
    assert_eq!(agent["spent_micro"], 50 * call.cost_micro, "{agent}");
    let ev = events(&stack, "busy").await;
    let admits_from_grants = ev
        .iter()
        .filter(|e| e.kind == "admit" && e.details_json.contains("\"grant\""))
        .count();
    assert_eq!(
        admits_from_grants as f64, local,
        "one admit event per local call"
    );
    assert_eq!(ev.iter().filter(|e| e.kind == "admit").count(), 50);
    assert!(ev.iter().any(|e| e.kind == "grant.issued"));
    let settles: i64 = ev
        .iter()
        .filter(|e| e.kind == "settle")
        .map(|e| e.amount_micro)
        .sum();
    assert_eq!(settles, 50 * call.cost_micro, "ledger = sum of settles");
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == "deny" && e.reason == "budget")
            .count(),
        250,
        "every refusal logged once"
    );
    assert!(
        !ev.iter().any(|e| e.kind == "grant.expired"),
        "a live data plane gives its grants back"
    );
    audit_passes(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_calls_cost_a_fraction_of_a_round_trip_each() {
    let stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("steady", &call.budget_for(100_000), "100000", &[]);
    // Busy enough for a grant.
    run_calls(&stack, &token, &call, 100, 4).await;
    let rpcs_before = dataplane_metric(&stack, "aex_dataplane_control_rpcs_total", &[]).await;
    let local_before = dataplane_metric(
        &stack,
        "aex_dataplane_admissions_total",
        &[("path", "local")],
    )
    .await;
    let calls = 400;
    let statuses = run_calls(&stack, &token, &call, calls, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let rpcs =
        dataplane_metric(&stack, "aex_dataplane_control_rpcs_total", &[]).await - rpcs_before;
    let local = dataplane_metric(
        &stack,
        "aex_dataplane_admissions_total",
        &[("path", "local")],
    )
    .await
        - local_before;
    println!("{calls} calls: {local} from grants, {rpcs} control-plane RPCs");
    assert!(
        rpcs * 20.0 <= calls as f64,
        "{rpcs} RPCs for {calls} calls: more than one per 20"
    );
    stack.settled("steady", Duration::from_secs(10)).await;
    audit_passes(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_is_refused_at_once_and_its_grant_goes_back() {
    let stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("pausable", &call.budget_for(10_000), "100000", &[]);
    run_calls(&stack, &token, &call, 60, 4).await;
    let held = || {
        let a = stack.inspect("pausable");
        a["reserved_micro"].as_i64().unwrap()
    };
    // Keep it busy until a grant holds part of its budget.
    let deadline = Instant::now() + Duration::from_secs(10);
    while held() == 0 {
        assert!(Instant::now() < deadline, "no grant was issued");
        run_calls(&stack, &token, &call, 20, 4).await;
    }
    stack
        .control
        .aexctl(&["agent", "pause", "pausable"])
        .assert_ok();
    let paused_at = Instant::now();
    // The data plane hears it on the watch stream: from then on every call
    // is refused, and the grant is given back.
    let deadline = paused_at + Duration::from_secs(1);
    loop {
        let statuses = run_calls(&stack, &token, &call, 4, 4).await;
        if statuses.iter().all(|s| *s == 403) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still admitted after 1 s: {statuses:?}"
        );
    }
    let agent = stack.settled("pausable", Duration::from_secs(2)).await;
    let ev = events(&stack, "pausable").await;
    assert!(
        ev.iter().any(|e| e.kind == "grant.returned"),
        "no grant went back"
    );
    assert!(!ev.iter().any(|e| e.kind == "grant.expired"));
    assert!(agent["spent_micro"].as_i64() <= agent["budget_micro"].as_i64());
    audit_passes(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_data_plane_loses_its_grants_at_their_deadline_charged_by_policy() {
    let mut stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("orphan", &call.budget_for(10_000), "100000", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.inspect("orphan")["reserved_micro"] == 0 {
        assert!(Instant::now() < deadline, "no grant was issued");
        run_calls(&stack, &token, &call, 30, 4).await;
    }
    // The last calls' settlements reported (at most 100 ms later), the
    // grant still held (it goes back after 1 s idle).
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.data.kill();
    let killed_at = Instant::now();
    // Within a grant's lifetime (5 s) and a sweep (1 s), it is expired.
    let agent = stack.settled("orphan", Duration::from_secs(8)).await;
    println!("expired after {:?}", killed_at.elapsed());
    let ev = events(&stack, "orphan").await;
    let expired: Vec<_> = ev.iter().filter(|e| e.kind == "grant.expired").collect();
    assert!(!expired.is_empty(), "no grant expired");
    for e in &expired {
        assert_eq!(e.reason, "charge", "the default policy charges: {e:?}");
        assert!(e.details_json.contains("\"data_plane\""), "{e:?}");
    }
    let charged: i64 = expired.iter().map(|e| e.amount_micro).sum();
    let settled: i64 = ev
        .iter()
        .filter(|e| e.kind == "settle")
        .map(|e| e.amount_micro)
        .sum();
    assert_eq!(agent["spent_micro"].as_i64().unwrap(), settled + charged);
    assert!(agent["spent_micro"].as_i64() <= agent["budget_micro"].as_i64());
    audit_passes(&stack);
}
