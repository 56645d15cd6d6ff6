//! Waiting for a concurrency slot (issue #33): calls over an agent's
//! concurrency limit wait in a first-come queue on the data plane, for up
//! to `--concurrency-wait-ms`, and only a wait that runs out is a 429 —
//! logged once, as the client saw it.

use aex_tests::Stack;
use reqwest::{Client, StatusCode};
use std::time::{Duration, Instant};

mod common;
use common::*;

async fn slow_call(stack: &Stack, token: &str, delay_ms: u64) -> (StatusCode, Option<String>) {
    let r = Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("x-mock-delay-ms", delay_ms.to_string())
        .json(&chat("mock-model"))
        .send()
        .await
        .unwrap();
    let by = header(&r, "x-aex-denied-by").map(str::to_string);
    (r.status(), by)
}

/// A call that holds one of the agent's slots for `delay_ms`, in the
/// background; its status when it ends.
fn hold_a_slot(stack: &Stack, token: &str, delay_ms: u64) -> tokio::task::JoinHandle<StatusCode> {
    let (url, token) = (stack.url("/v1/chat/completions"), token.to_string());
    tokio::spawn(async move {
        Client::new()
            .post(url)
            .bearer_auth(token)
            .header("x-mock-delay-ms", delay_ms.to_string())
            .json(&chat("mock-model"))
            .send()
            .await
            .unwrap()
            .status()
    })
}

fn denials(stack: &Stack, agent: &str) -> usize {
    stack
        .events(agent)
        .iter()
        .filter(|e| e["kind"] == "deny")
        .count()
}

#[tokio::test]
async fn calls_over_the_limit_wait_for_a_slot_and_all_pass() {
    let stack = Stack::start().await;
    let token = stack.agent("pair", "1", "600", &["--max-concurrent", "2"]);
    let started = Instant::now();
    let calls = (0..6).map(|_| slow_call(&stack, &token, 600));
    let answers = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::OK),
        "{answers:?}"
    );
    // Three rounds of two 600 ms calls: never more than two at once.
    assert!(took >= Duration::from_millis(1700), "{took:?}");
    stack.settled("pair", Duration::from_secs(2)).await;
    assert_eq!(denials(&stack, "pair"), 0, "no client was refused");
    let status = stack.control.aexctl(&["status", "--json"]).json();
    assert_eq!(status["rate_limit_denials"], 0);
}

#[tokio::test]
async fn a_wait_that_runs_out_is_one_429_and_one_event() {
    let stack = Stack::start_with(&["--concurrency-wait-ms", "400"]).await;
    let token = stack.agent("single", "1", "600", &["--max-concurrent", "1"]);
    let holder = hold_a_slot(&stack, &token, 2000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let (status, by) = slow_call(&stack, &token, 0).await;
    let waited = asked.elapsed();
    assert_eq!(
        (status, by.as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("concurrency"))
    );
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    assert_eq!(denials(&stack, "single"), 1, "the one the client saw");
}

#[tokio::test]
async fn without_a_wait_the_refusal_is_at_once() {
    let stack = Stack::start_with(&["--concurrency-wait-ms", "0"]).await;
    let token = stack.agent("single", "1", "600", &["--max-concurrent", "1"]);
    let holder = hold_a_slot(&stack, &token, 1500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let (status, by) = slow_call(&stack, &token, 0).await;
    assert_eq!(
        (status, by.as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("concurrency"))
    );
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    assert_eq!(denials(&stack, "single"), 1);
}

/// With no wait, a refusal says when a slot will free (issue #33): once a
/// call has shown how long the agent's calls take, the 429's wait is when
/// the oldest call in flight is expected to end — within 100 ms of when its
/// slot actually freed — not a fixed second.
#[tokio::test]
async fn a_refusal_says_when_the_slot_frees() {
    let stack = Stack::start_with(&["--concurrency-wait-ms", "0"]).await;
    let token = stack.agent("timed", "1", "600", &["--max-concurrent", "1"]);
    // One call shows how long the agent's calls take.
    assert_eq!(slow_call(&stack, &token, 1500).await.0, StatusCode::OK);
    stack.settled("timed", Duration::from_secs(2)).await;
    let holder = hold_a_slot(&stack, &token, 1500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&chat("mock-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let told: i64 = header(&r, "retry-after-ms").unwrap().parse().unwrap();
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    stack.settled("timed", Duration::from_secs(2)).await;
    let events = stack.events("timed");
    let deny = events.iter().find(|e| e["kind"] == "deny").unwrap();
    let freed = events.iter().rfind(|e| e["kind"] == "settle").unwrap();
    assert_eq!(deny["details"]["retry_after_ms"], told);
    let freed_after = freed["ts_ms"].as_i64().unwrap() - deny["ts_ms"].as_i64().unwrap();
    println!("told {told} ms; the slot freed {freed_after} ms after the refusal");
    assert!(
        (freed_after - told).abs() <= 100,
        "told {told} ms, freed after {freed_after} ms"
    );
}
