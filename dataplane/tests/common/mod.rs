//! What the end-to-end tests share: requests, error shapes, the ledger.
#![allow(dead_code)] // each test binary uses its own subset

use aex_proto::v1::{self as pb, ledger_service_client::LedgerServiceClient};
use aex_tests::Stack;
use aex_tests::load::{CostlyCall, count, plane_metric, run_calls_on};
use reqwest::{Client, Response};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub mod wire;

pub fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

pub async fn post(
    stack: &Stack,
    token: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response {
    let mut r = Client::new()
        .post(stack.url(path))
        .bearer_auth(token)
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request")
}

pub fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Asserts OpenAI's error shape and returns the error object.
pub async fn error_of(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "{:?}", r.headers());
    let body: Value = r.json().await.expect("JSON error body");
    let e = body["error"].clone();
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("type").is_some() && e.get("param").is_some(),
        "{body}"
    );
    e
}

/// Every event of `agent`, in order (read a page at a time).
pub async fn events(stack: &Stack, agent: &str) -> Vec<pb::Event> {
    const PAGE: u32 = 10_000;
    let mut client = LedgerServiceClient::connect(stack.control.url())
        .await
        .unwrap();
    let mut all: Vec<pb::Event> = Vec::new();
    loop {
        let mut request = tonic::Request::new(pb::ListEventsRequest {
            agent_name: agent.into(),
            limit: PAGE,
            after_seq: all.last().map_or(0, |e| e.seq),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", stack.home.admin_token())
                .parse()
                .unwrap(),
        );
        let page = client
            .list_events(request)
            .await
            .unwrap()
            .into_inner()
            .events;
        let last = page.len() < PAGE as usize;
        all.extend(page);
        if last {
            return all;
        }
    }
}

pub async fn read_sse(r: Response) -> String {
    let bytes = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("the stream broke: {e:?}"));
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The data plane's Prometheus text, from its own metrics listener.
pub async fn metrics_text(stack: &Stack) -> String {
    reqwest::get(stack.data.metrics_url())
        .await
        .expect("metrics listener")
        .text()
        .await
        .expect("metrics text")
}

/// `aexctl audit --json` passes; its report.
pub fn audit_passes(stack: &Stack) -> Value {
    let out = stack.control.aexctl(&["audit", "--json"]);
    assert_eq!(out.code(), 0, "audit failed:\n{}", out.stdout);
    out.json()
}

/// Keeps the agent busy on the stack's data plane until it holds a grant
/// (at most 15 s); returns how many calls succeeded meanwhile.
pub async fn until_a_grant(stack: &Stack, token: &str, call: &CostlyCall) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ok = 0;
    while plane_metric(
        &stack.data,
        "aex_dataplane_grants_total",
        &[("event", "installed")],
    )
    .await
        == 0.0
    {
        assert!(Instant::now() < deadline, "no grant was issued");
        ok += count(&run_calls_on(&[&stack.data], token, call, 30, 3).await, 200);
    }
    ok
}

/// [`aex_tests::load::until_reports_drained`] for the stack's data plane.
pub async fn until_reports_drained(stack: &Stack) {
    aex_tests::load::until_reports_drained(&[&stack.data]).await;
}
