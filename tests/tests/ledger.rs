//! Ledger integrity under crashes and tampering, and observability numbers
//! against what clients saw. Real processes, `kill -9`, a real SQLite file.

use aex_tests::{DataPlane, Stack, TestHome, prometheus_value};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10})
}

fn audit_passes(stack: &Stack) {
    let out = stack.control.aexctl(&["audit", "--json"]);
    let report = out.json();
    assert!(
        report["passed"].as_bool().unwrap(),
        "{}",
        serde_json::to_string_pretty(&report).unwrap()
    );
    out.assert_ok();
}

#[tokio::test]
async fn kill_9_of_the_control_plane_under_load_charges_every_success_once_and_no_failure() {
    let mut stack = Stack::start().await;
    let token = stack.agent("load", "100", "100000", &[]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (url, token) = (stack.url("/v1/chat/completions"), token.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the requests over the crash window.
            tokio::time::sleep(Duration::from_millis((i % 40) * 10)).await;
            let r = Client::new()
                .post(url)
                .bearer_auth(token)
                .header("x-mock-delay-ms", "100")
                .json(&chat("mock-model"))
                .send()
                .await
                .unwrap();
            let cost = r
                .headers()
                .get("x-aex-cost-micro")
                .map(|v| v.to_str().unwrap().parse::<i64>().unwrap());
            (r.status(), cost)
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed_at = now_ms();
    stack.control.restart(); // kill -9, then start again on the same address
    let restarted_at = now_ms();
    let mut charged_to_clients = 0;
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (status, cost) = t.await.unwrap();
        if status == StatusCode::OK {
            ok += 1;
            charged_to_clients += cost.expect("every success reports its cost");
        } else {
            failed += 1;
            assert!(status.is_server_error(), "{status}");
        }
    }
    eprintln!(
        "across the kill -9: {ok} succeeded, {failed} failed, {charged_to_clients} µ charged to clients"
    );
    assert_eq!(ok + failed, 200);
    assert!(ok > 0, "some requests succeed across the restart");
    let agent = stack.settled("load", Duration::from_secs(10)).await;
    assert_eq!(
        agent["spent_micro"].as_i64().unwrap(),
        charged_to_clients,
        "spent = what successful clients were told, so every success is charged once and no failure ({failed} failed)"
    );
    // The crash really landed mid-traffic: admissions on both sides of it.
    let admits: Vec<i64> = stack
        .control
        .aexctl(&["events", "--agent", "load", "--json", "--limit", "100000"])
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "admit")
        .map(|e| e["ts_ms"].as_i64().unwrap())
        .collect();
    assert!(
        admits.iter().any(|t| *t < killed_at),
        "admissions before the kill"
    );
    assert!(
        admits.iter().any(|t| *t >= restarted_at),
        "admissions after the restart"
    );
    audit_passes(&stack);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn kill_9_of_the_data_plane_mid_stream_expires_the_reservation_by_policy() {
    let mut stack = Stack::start_full(
        &["--reservation-ttl-ms", "1500", "--sweep-interval-ms", "100"],
        &["--heartbeat-ms", "300"],
    )
    .await;
    let token = stack.agent("orphan", "1", "600", &[]);
    let mut body = chat("mock-model");
    body["stream"] = json!(true);
    let r = Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .header("x-mock-delay-ms", "100")
        .header("x-mock-usage", "10,100")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    use futures_util::StreamExt;
    stream.next().await.unwrap().unwrap();
    // Longer than the TTL: heartbeats keep a healthy stream's reservation.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reserved = stack.inspect("orphan")["reserved_micro"].as_i64().unwrap();
    assert!(reserved > 0, "a heartbeating stream never expires");
    // kill -9 the data plane mid-stream; nobody will ever settle this call.
    let killed = std::mem::replace(
        &mut stack.data,
        DataPlane::start(&stack.home, &stack.control.url(), &[]),
    );
    drop(killed);
    drop(stream);
    let agent = stack.settled("orphan", Duration::from_secs(5)).await;
    assert_eq!(
        agent["spent_micro"].as_i64().unwrap(),
        reserved,
        "charged the reservation by the default policy"
    );
    let events = stack
        .control
        .aexctl(&["events", "--agent", "orphan", "--json"]);
    let expired: Vec<Value> = events
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "expire")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["amount_micro"], reserved);
    assert_eq!(expired[0]["details"]["policy"], "charge");
    let status = stack.control.aexctl(&["status", "--json"]).json();
    assert_eq!(status["expired_reservations"], 1);
    audit_passes(&stack);
}

async fn db(home: &TestHome) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", home.file("aex.db").display()))
        .await
        .unwrap()
}

/// A control plane with a few admin events in its log.
fn ledger_with_events() -> (TestHome, aex_tests::ControlPlane) {
    let home = TestHome::new();
    let cp = home.start_control();
    cp.aexctl(&["agent", "create", "victim", "5", "60"])
        .assert_ok();
    cp.aexctl(&["agent", "create", "bystander", "1", "60"])
        .assert_ok();
    cp.aexctl(&["agent", "update", "victim", "--top-up", "1"])
        .assert_ok();
    cp.aexctl(&["agent", "pause", "bystander"]).assert_ok();
    cp.aexctl(&["audit"]).assert_ok();
    (home, cp)
}

fn failing_audit(cp: &aex_tests::ControlPlane) -> String {
    let out = cp.aexctl(&["audit"]);
    out.assert_code(1);
    assert!(out.stderr.contains("audit checks failed"), "{}", out.stderr);
    out.stdout
}

#[tokio::test]
async fn editing_spent_in_the_database_is_named_by_audit() {
    let (home, cp) = ledger_with_events();
    sqlx::query("UPDATE agents SET spent_micro = 1234 WHERE name = 'victim'")
        .execute(&db(&home).await)
        .await
        .unwrap();
    let out = failing_audit(&cp);
    assert!(
        out.contains("❌ spent_matches_settle_events: FAIL"),
        "{out}"
    );
    assert!(
        out.contains("agent 'victim': spent 1234 µ but settle events sum to 0 µ"),
        "{out}"
    );
    assert!(out.contains("✅ chain_intact: PASS"), "{out}");
}

#[tokio::test]
async fn deleting_an_event_is_named_by_audit() {
    let (home, cp) = ledger_with_events();
    sqlx::query("DELETE FROM events WHERE seq = 2")
        .execute(&db(&home).await)
        .await
        .unwrap();
    let out = failing_audit(&cp);
    assert!(out.contains("❌ chain_intact: FAIL"), "{out}");
    assert!(out.contains("event seq 2 is missing"), "{out}");
}

#[tokio::test]
async fn rewriting_an_event_with_a_recomputed_unkeyed_hash_is_named_by_audit() {
    let (home, cp) = ledger_with_events();
    let pool = db(&home).await;
    let (prev, kind): (String, String) =
        sqlx::query_as("SELECT prev_hash, kind FROM events WHERE seq = 3")
            .fetch_one(&pool)
            .await
            .unwrap();
    // A forger without the ledger key: plain SHA-256 over the new content.
    let forged = format!(
        "{:x}",
        Sha256::digest(format!("{prev}|3|{kind}|999999999").as_bytes())
    );
    sqlx::query("UPDATE events SET amount_micro = 999999999, hash = $1 WHERE seq = 3")
        .bind(&forged)
        .execute(&pool)
        .await
        .unwrap();
    let out = failing_audit(&cp);
    assert!(out.contains("event seq 3"), "{out}");
    assert!(
        out.contains("was altered: its HMAC does not match"),
        "{out}"
    );
}

#[tokio::test]
async fn status_and_metrics_count_what_clients_saw_by_reason() {
    let stack = Stack::start().await;
    let limited = stack.agent("limited", "1", "2", &[]);
    let poor = stack.agent("poor", "0.00001", "600", &[]);
    let fenced = stack.agent("fenced", "1", "600", &["--allowed-models", "sim"]);
    let upstream = stack.agent("upstream", "1", "600", &[]);
    let client = Client::new();
    let mut seen: std::collections::HashMap<(u16, String), u64> = Default::default();
    let mut send = async |token: &str, model: &str, mock: Option<&str>| {
        let mut r = client
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(token)
            .json(&chat(model));
        if let Some(m) = mock {
            r = r.header("x-mock", m);
        }
        let r = r.send().await.unwrap();
        let by = r
            .headers()
            .get("x-aex-denied-by")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        *seen.entry((r.status().as_u16(), by)).or_default() += 1;
    };
    for _ in 0..4 {
        send(&limited, "sim", None).await;
    }
    for _ in 0..2 {
        send(&poor, "mock-model", None).await;
    }
    send(&fenced, "mock-model", None).await;
    for _ in 0..3 {
        send("aex_wrong", "sim", None).await;
    }
    for _ in 0..2 {
        send(&upstream, "mock-model", Some("429")).await;
    }
    send(&upstream, "mock-model", None).await;
    let count = |status: u16, by: &str| seen.get(&(status, by.to_string())).copied().unwrap_or(0);
    assert_eq!(
        (
            count(200, ""),
            count(429, "rpm"),
            count(402, "budget"),
            count(403, "model"),
            count(401, "auth"),
            count(429, "upstream")
        ),
        (3, 2, 2, 1, 3, 2),
        "{seen:?}"
    );
    for agent in ["limited", "upstream"] {
        stack.settled(agent, Duration::from_secs(2)).await;
    }
    let s = stack.control.aexctl(&["status", "--json"]).json();
    // Admitted = the 200s plus the calls the provider refused.
    assert_eq!(
        s["requests_served"],
        count(200, "") + count(429, "upstream")
    );
    assert_eq!(s["budget_denials"], count(402, "budget"));
    assert_eq!(s["rate_limit_denials"], count(429, "rpm"));
    assert_eq!(s["auth_denials"], count(401, "auth"));
    assert_eq!(s["policy_violations"], count(403, "model"));
    assert_eq!(s["upstream_denials"], count(429, "upstream"));
    assert_eq!(s["denials_by_reason"]["rpm"], 2);
    assert_eq!(s["control_plane"]["state"], "running");
    assert_eq!(s["control_plane"]["connected_data_planes"], 1);

    let m = stack.control.aexctl(&["metrics", "--json"]).json();
    let row = |name: &str| {
        m["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(row("limited")["requests_served"], 2);
    assert_eq!(row("limited")["denials"], 2);
    assert_eq!(row("limited")["requests_last_minute"], 2);
    assert!(
        row("limited")["burn_rate_micro_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(row("poor")["denials"], 2);
    assert_eq!(row("upstream")["requests_served"], 3);

    // Prometheus, on both planes, agrees with the clients too.
    let dp = client
        .get(stack.data.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let requests = |status: &str, reason: &str| {
        prometheus_value(
            &dp,
            "aex_requests_total",
            &[
                ("endpoint", "chat/completions"),
                ("status", status),
                ("reason", reason),
            ],
        ) as u64
    };
    assert_eq!(requests("200", "ok"), count(200, ""));
    assert_eq!(requests("429", "rpm"), count(429, "rpm"));
    assert_eq!(requests("402", "budget"), count(402, "budget"));
    assert_eq!(requests("403", "model"), count(403, "model"));
    assert_eq!(requests("401", "auth"), count(401, "auth"));
    assert_eq!(requests("429", "upstream"), count(429, "upstream"));
    assert_eq!(
        prometheus_value(
            &dp,
            "aex_upstream_errors_total",
            &[("kind", "rate_limited")]
        ) as u64,
        count(429, "upstream")
    );
    let sent: u64 = seen.values().sum();
    assert_eq!(
        prometheus_value(&dp, "aex_added_latency_seconds_count", &[]) as u64,
        sent
    );
    let spent_total = stack.control.aexctl(&["status", "--json"]).json()["total_spent_micro"]
        .as_f64()
        .unwrap();
    assert_eq!(
        prometheus_value(&dp, "aex_spent_micro_total", &[]),
        spent_total
    );
    let cp = client
        .get(&stack.control.metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decided = |decision: &str, reason: &str| {
        prometheus_value(
            &cp,
            "aex_admissions_total",
            &[("decision", decision), ("reason", reason)],
        ) as u64
    };
    assert_eq!(
        decided("admitted", ""),
        count(200, "") + count(429, "upstream")
    );
    assert_eq!(decided("denied", "rpm"), count(429, "rpm"));
    assert_eq!(decided("denied", "budget"), count(402, "budget"));
    assert_eq!(decided("denied", "model"), count(403, "model"));
    assert_eq!(
        prometheus_value(&cp, "aex_charged_micro_total", &[]),
        spent_total
    );
    assert_eq!(prometheus_value(&cp, "aex_open_reservations", &[]), 0.0);
    assert_eq!(prometheus_value(&cp, "aex_agents", &[]), 4.0);
    audit_passes(&stack);
}
