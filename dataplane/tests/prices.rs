//! Prices that match the bill (the README's models.yaml prices): input the
//! provider read from or wrote to its prompt cache is charged at the
//! model's cache prices, on every API and path a call can take, to the
//! micro-dollar the client is told and the ledger keeps. The test kit's
//! `cached-model` costs 1 µ per input token, 0.1 µ per cached one, 1.25 µ
//! per cache write, 2 µ per output token; `mock-model` has no cache prices.

use aex_tests::Stack;
use aex_tests::load::local_admissions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

mod common;
use common::*;

/// 1000 prompt tokens, 803 of them cached and 100 written, 5 output:
/// 97 × 1 + 803 × 0.1 + 100 × 1.25 + 5 × 2 = 312.3 µ, rounded up.
const USAGE: &str = "1000,5";
const CACHED: &str = "803,100";
const COST: i64 = 313;

/// A chat call long enough (in bytes, AEX's bound on input tokens) that
/// the mock's 1000 prompt tokens are within its reservation.
fn long_chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "x".repeat(1200)}]})
}

fn cache_headers() -> [(&'static str, &'static str); 2] {
    [("x-mock-usage", USAGE), ("x-mock-cached", CACHED)]
}

fn details(e: &aex_proto::v1::Event) -> Value {
    serde_json::from_str(&e.details_json).unwrap()
}

#[tokio::test]
async fn cached_input_is_charged_at_its_price_on_every_api() {
    let stack = Stack::start().await;
    let token = stack.agent("cached", "1", "600", &[]);

    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &long_chat("cached-model"),
        &cache_headers(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("313"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"], 803,
        "the provider's usage reaches the client as it was"
    );

    // A stream: the usage chunk AEX asked for carries the cache parts.
    let mut streamed = long_chat("cached-model");
    streamed["stream"] = json!(true);
    let text = read_sse(
        post(
            &stack,
            &token,
            "/v1/chat/completions",
            &streamed,
            &cache_headers(),
        )
        .await,
    )
    .await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Responses: OpenAI reports no cache writes there; 64 of 100 cached:
    // 36 + 6.4 + 10 = 52.4 µ.
    let r = post(
        &stack,
        &token,
        "/v1/responses",
        &json!({"model": "cached-model", "input": "y".repeat(200)}),
        &[("x-mock-usage", "100,5"), ("x-mock-cached", "64")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("53"));

    // A model without cache prices charges cached input as input.
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &long_chat("mock-model"),
        &cache_headers(),
    )
    .await;
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("1010"));

    let agent = stack.settled("cached", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], COST * 2 + 53 + 1010);
    let events = events(&stack, "cached").await;
    let settles: Vec<_> = events.iter().filter(|e| e.kind == "settle").collect();
    assert_eq!(
        settles.iter().map(|e| e.amount_micro).collect::<Vec<_>>(),
        [COST, COST, 53, 1010]
    );
    let first = details(settles[0]);
    assert_eq!(
        (
            &first["prompt_tokens"],
            &first["cached_input_tokens"],
            &first["cache_write_tokens"]
        ),
        (&json!(1000), &json!(803), &json!(100)),
        "{first}"
    );
    // The reservation bounds every input token at the dearest input
    // price, so a cache the provider did not hit cannot overspend.
    let admit = events
        .iter()
        .find(|e| e.kind == "admit")
        .map(details)
        .unwrap();
    assert_eq!(admit["cached_input_pico_per_token"], 100_000, "{admit}");
    assert_eq!(admit["cache_write_pico_per_token"], 1_250_000, "{admit}");
    audit_passes(&stack);
}

/// A provider claiming more cached input than input gets no discount
/// beyond what it billed: the cached part is at most the whole input.
#[tokio::test]
async fn a_provider_cannot_make_cached_input_cost_less_than_nothing() {
    let stack = Stack::start().await;
    let token = stack.agent("liar", "1", "600", &[]);
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &long_chat("cached-model"),
        &[("x-mock-usage", "10,5"), ("x-mock-cached", "5000,5000")],
    )
    .await;
    // 10 × 0.1 (all cached) + 5 × 2.
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("11"));
    let agent = stack.settled("liar", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], 11);
    audit_passes(&stack);
}

/// Calls admitted from a grant (no round trip) are charged by the data
/// plane with the same prices, and the control plane records the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_admitted_from_a_grant_pay_cache_prices_too() {
    let stack = Stack::start().await;
    let token = stack.agent("busy-cached", "5", "100000", &[]);
    let calls = 60;
    for _ in 0..calls {
        let r = post(
            &stack,
            &token,
            "/v1/chat/completions",
            &long_chat("cached-model"),
            &cache_headers(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "x-aex-cost-micro"), Some("313"));
    }
    assert!(
        local_admissions(&[&stack.data]).await > 0.0,
        "no call was admitted from a grant"
    );
    // Reports reach the control plane within their interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let agent = stack.settled("busy-cached", Duration::from_secs(5)).await;
        if agent["spent_micro"] == COST * calls {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{agent}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    audit_passes(&stack);
}
