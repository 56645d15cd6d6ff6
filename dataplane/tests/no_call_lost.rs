//! Every call a client was told succeeded is in the ledger (issue #31,
//! finding 1; docs/GRANTS.md): admitted and settled once, under the request id the
//! client saw, and audit passes — through a control-plane outage longer
//! than a grant's life, and with no fault at all under the heaviest load the
//! machine takes, where reports once arrived after their grant's expiry and
//! were dropped (7.5% of calls at 32 connections). Real processes.

use aex_tests::Stack;
use aex_tests::load::{Answer, CostlyCall, run_for};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

mod common;
use common::*;

/// Holds that every success among `answers` is in `agent`'s ledger, admitted
/// and settled once, that nothing else was admitted but `warm_up_ok`
/// earlier calls, and that audit passes; returns how many admits were
/// reported after their grant expired.
async fn every_success_is_in_the_ledger(
    stack: &Stack,
    agent: &str,
    answers: &[Answer],
    warm_up_ok: usize,
) -> usize {
    let served: Vec<&str> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| {
            a.request_id
                .as_deref()
                .expect("a success names its request")
        })
        .collect();
    until_reports_drained(stack).await;
    stack.settled(agent, Duration::from_secs(30)).await;
    let ev = events(stack, agent).await;
    let detail = |e: &aex_proto::v1::Event, key: &str| {
        serde_json::from_str::<Value>(&e.details_json).unwrap()[key].clone()
    };
    let admitted: HashMap<String, String> = ev
        .iter()
        .filter(|e| e.kind == "admit")
        .map(|e| {
            let request = detail(e, "request_id").as_str().unwrap().to_string();
            (request, e.reservation_id.clone())
        })
        .collect();
    let missing: Vec<&&str> = served
        .iter()
        .filter(|id| !admitted.contains_key(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} successes are not in the ledger, e.g. {:?}",
        missing.len(),
        served.len(),
        &missing[..missing.len().min(3)]
    );
    // A call a client saw fail may be in the ledger too: a central
    // admission committed just as the control plane was killed, its answer
    // lost; the data plane gave up on it (503) and released it. Released,
    // never charged (seen in about one run in five). Every success is there
    // once, settled once.
    let mut settles = HashMap::new();
    for e in ev.iter().filter(|e| e.kind == "settle") {
        *settles.entry(e.reservation_id.as_str()).or_insert(0) += 1;
    }
    let released: HashMap<&str, i64> = ev
        .iter()
        .filter(|e| e.kind == "release")
        .map(|e| (e.reservation_id.as_str(), e.amount_micro))
        .collect();
    let succeeded: std::collections::HashSet<&str> = served.iter().copied().collect();
    let mut failed_admits = 0;
    for (request, rsv) in &admitted {
        if !succeeded.contains(request.as_str()) && released.get(rsv.as_str()) == Some(&0) {
            assert!(
                !settles.contains_key(rsv.as_str()),
                "{rsv} released and settled"
            );
            failed_admits += 1;
            continue;
        }
        assert_eq!(settles.get(rsv.as_str()), Some(&1), "{rsv} settled once");
    }
    assert_eq!(
        admitted.len(),
        warm_up_ok + served.len() + failed_admits,
        "no call recorded twice"
    );
    audit_passes(stack);
    ev.iter()
        .filter(|e| e.kind == "admit" && detail(e, "late") == true)
        .count()
}

/// A data plane keeps admitting from its grant while no control plane
/// answers; the control plane comes back after the grant's deadline and its
/// sweeper expires the grant before the queued reports arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_down_longer_than_a_grants_life_loses_no_served_call() {
    const DOWN: Duration = Duration::from_secs(8);
    let mut stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("outage", &call.budget_for(1_000_000), "100000", &[]);
    let warm_up_ok = until_a_grant(&stack, &token, &call).await;
    let url = stack.url("/v1/chat/completions");
    let load = tokio::spawn({
        let (token, call) = (token.clone(), CostlyCall::new());
        async move { run_for(&url, &token, &call, 32, DOWN + Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.control.kill();
    tokio::time::sleep(DOWN).await;
    stack.control.start_again();
    let answers = load.await.unwrap();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    println!(
        "{ok} of {} calls succeeded across an outage of {DOWN:?}",
        answers.len()
    );
    // Whether a report arrives after its grant's expiry is a race between
    // the returning control plane's first sweep and the data plane's
    // reconnection (usually the sweep: 1,834 late here); either way every
    // success must be in the ledger, which is what this test holds.
    let late = every_success_is_in_the_ledger(&stack, "outage", &answers, warm_up_ok).await;
    println!("{late} calls reported after their grant expired, each recorded");
}

/// No fault: 32 connections for 30 s, the benchmark's shape, on one data
/// plane admitting from its grants while the control plane records their
/// reports as fast as it can. Before the fix, reports fell behind, arrived
/// after their grant's expiry and were refused; now the data plane's report
/// backlog holds admission back and a late report is recorded anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_seconds_of_the_heaviest_load_lose_no_served_call() {
    const LENGTH: Duration = Duration::from_secs(30);
    let stack = Stack::start().await;
    let call = CostlyCall::new();
    let token = stack.agent("busy", &call.budget_for(10_000_000), "10000000", &[]);
    let warm_up_ok = until_a_grant(&stack, &token, &call).await;
    let answers = run_for(
        &stack.url("/v1/chat/completions"),
        &token,
        &call,
        32,
        LENGTH,
    )
    .await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let local = aex_tests::load::local_admissions(&[&stack.data]).await;
    println!(
        "{ok} of {} calls succeeded in {LENGTH:?} ({:.0}/s), {local} admitted from grants",
        answers.len(),
        ok as f64 / LENGTH.as_secs_f64()
    );
    assert_eq!(ok, answers.len(), "with no fault every call succeeds");
    let late = every_success_is_in_the_ledger(&stack, "busy", &answers, warm_up_ok).await;
    println!("{late} calls reported after their grant expired, each recorded");
}
