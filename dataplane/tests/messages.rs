//! Anthropic's Messages API end to end (issue #16): a client speaking it
//! → aex-dataplane → the mock as an `anthropic` provider (`claude-model`)
//! or the simulated one, with aex-control deciding. What the client gets
//! is Anthropic's shape throughout, errors included; what the ledger
//! charges is what the provider reported, the prompt cache's parts at
//! their own prices.

use aex_tests::{MOCK_PROVIDER_KEY, Stack};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

mod common;
use common::{events, header, read_sse};

fn message(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 50,
        "messages": [{"role": "user", "content": text}]})
}

/// As the Anthropic SDKs send it: the token in `x-api-key`, a version.
async fn post(
    stack: &Stack,
    token: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response {
    let mut r = Client::new()
        .post(stack.url(path))
        .header("x-api-key", token)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request")
}

/// Asserts Anthropic's error shape; returns the error's message.
async fn error_of(r: Response, status: u16, kind: &str) -> String {
    assert_eq!(r.status().as_u16(), status, "{:?}", r.headers());
    let body: Value = r.json().await.expect("JSON error body");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    message.to_string()
}

/// The `data` of each event of an SSE body, with its event name.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("every event has data");
            (name, serde_json::from_str(data).expect("JSON data"))
        })
        .collect()
}

#[tokio::test]
async fn a_message_goes_upstream_as_anthropic_expects_and_is_charged_at_cache_prices() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-fwd", "1", "600", &[]);
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &message("claude-model", "hello"),
        &[
            ("anthropic-beta", "prompt-caching-2024-07-31"),
            ("x-mock-usage", "10,5"),
            ("x-mock-cached", "80,20"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // 10 uncached input tokens × 1 µ + 80 read from the cache × 0.1 µ +
    // 20 written to it × 1.25 µ + 5 output tokens × 2 µ.
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("53"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["content"][0]["text"], "hello from mock");
    assert_eq!(answer["usage"]["cache_read_input_tokens"], 80);

    let seen = &stack.mock.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.body["model"], "upstream-claude");
    assert_eq!(
        seen.body["max_tokens"], 50,
        "the client's cap, within the model's"
    );
    assert_eq!(seen.header("x-api-key"), Some(MOCK_PROVIDER_KEY));
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    for (name, value) in &seen.headers {
        assert!(
            !value.contains(&token),
            "the agent token leaked upstream in {name}"
        );
    }
    let agent = stack.settled("claude-fwd", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], 53);
}

#[tokio::test]
async fn a_stream_is_relayed_event_by_event_and_settled_from_its_usage() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-stream", "1", "600", &[]);
    let mut body = message("claude-model", "hello");
    body["stream"] = json!(true);
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &body,
        &[("x-mock-usage", "10,5"), ("x-mock-cached", "80,20")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some("text/event-stream"));
    let text = read_sse(r).await;
    let names: Vec<String> = sse_events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    let agent = stack.settled("claude-stream", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], 53);
}

#[tokio::test]
async fn a_tool_round_trip_streams_the_tool_use_and_charges_both_turns() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-tools", "1", "600", &[]);
    let tools = json!([{"name": "weather", "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]);
    let mut ask = message("claude-model", "use_tool:weather please");
    ask["tools"] = tools.clone();
    ask["stream"] = json!(true);
    let text = read_sse(post(&stack, &token, "/v1/messages", &ask, &[]).await).await;
    let events = sse_events(&text);
    let start = &events[1].1;
    assert_eq!(start["content_block"]["type"], "tool_use", "{text}");
    assert_eq!(start["content_block"]["name"], "weather");
    let input: String = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        json!({"city": "Paris"})
    );
    let stop = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(stop.1["delta"]["stop_reason"], "tool_use");

    let mut answer = message("claude-model", "use_tool:weather please");
    answer["tools"] = tools;
    answer["messages"] = json!([
        {"role": "user", "content": "use_tool:weather please"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_mock_1",
            "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_mock_1",
            "content": "sunny in Paris"}]}
    ]);
    let r = post(&stack, &token, "/v1/messages", &answer, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "tool said: sunny in Paris");
    // Two turns of 10 input tokens × 1 µ; the tool call reported 5 output
    // tokens, the answer 5: × 2 µ.
    let agent = stack.settled("claude-tools", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], 40);
}

#[tokio::test]
async fn every_refusal_is_in_anthropics_shape_with_the_same_headers() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-errors", "1", "600", &[]);
    let mut no_cap = message("claude-model", "hi");
    no_cap.as_object_mut().unwrap().remove("max_tokens");
    let r = post(&stack, &token, "/v1/messages", &no_cap, &[]).await;
    assert_eq!(
        error_of(r, 400, "invalid_request_error").await,
        "max_tokens: Field required"
    );

    let r = post(
        &stack,
        "aex_not_a_real_token",
        "/v1/messages",
        &message("claude-model", "hi"),
        &[],
    )
    .await;
    error_of(r, 401, "authentication_error").await;

    let poor = stack.agent("claude-poor", "0.0001", "600", &[]);
    let r = post(
        &stack,
        &poor,
        "/v1/messages",
        &message("claude-model", "hi"),
        &[],
    )
    .await;
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(header(&r, "x-aex-denied-by"), Some("budget"));
    error_of(r, 402, "billing_error").await;

    let fenced = stack.agent("claude-fenced", "1", "600", &["--allowed-models", "sim"]);
    let r = post(
        &stack,
        &fenced,
        "/v1/messages",
        &message("claude-model", "hi"),
        &[],
    )
    .await;
    assert_eq!(header(&r, "x-aex-denied-by"), Some("model"));
    error_of(r, 403, "permission_error").await;

    let slow = stack.agent("claude-slow", "1", "1", &[]);
    let first = post(&stack, &slow, "/v1/messages", &message("sim", "hi"), &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    let r = post(&stack, &slow, "/v1/messages", &message("sim", "hi"), &[]).await;
    assert_eq!(header(&r, "x-aex-denied-by"), Some("rpm"));
    assert!(header(&r, "retry-after-ms").is_some_and(|ms| ms.parse::<u64>().unwrap() > 0));
    assert!(header(&r, "retry-after").is_some());
    error_of(r, 429, "rate_limit_error").await;

    // The provider's own 429, relayed with its wait and marked as its.
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &message("claude-model", "hi"),
        &[("x-mock", "429")],
    )
    .await;
    assert_eq!(header(&r, "retry-after"), Some("7"));
    assert_eq!(header(&r, "x-aex-denied-by"), Some("upstream"));
    error_of(r, 429, "rate_limit_error").await;

    // What a model whose provider speaks OpenAI's API cannot be sent is
    // refused by name, before anything is reserved or sent.
    let before = stack.mock.count();
    let mut typed = message("mock-model", "hi");
    typed["tools"] = json!([{"type": "bash_20250124", "name": "bash"}]);
    let r = post(&stack, &token, "/v1/messages", &typed, &[]).await;
    let said = error_of(r, 400, "invalid_request_error").await;
    assert!(said.contains("'bash_20250124'"), "{said}");
    assert_eq!(stack.mock.count(), before, "nothing reached the provider");

    // Unknown paths and methods under /v1/messages answer in its shape too.
    let r = Client::new()
        .get(stack.url("/v1/messages"))
        .send()
        .await
        .unwrap();
    error_of(r, 405, "invalid_request_error").await;

    let agent = stack.settled("claude-errors", Duration::from_secs(2)).await;
    assert_eq!(agent["reserved_micro"], 0, "refused calls hold nothing");
}

#[tokio::test]
async fn a_provider_ignoring_max_tokens_is_cut_off_as_anthropic_ends_a_message() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-cut", "1", "600", &[]);
    let mut body = message("claude-model", "hello");
    body["max_tokens"] = json!(10);
    body["stream"] = json!(true);
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &body,
        &[("x-mock", "ignore-cap")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = read_sse(r).await;
    let events = sse_events(&text);
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        tail,
        ["content_block_stop", "message_delta", "message_stop"],
        "{text}"
    );
    let end = &events[events.len() - 2].1;
    assert_eq!(end["delta"]["stop_reason"], "max_tokens");
    let delivered: String = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["text"].as_str())
        .collect();
    // Up to the cut-off's line, and the word that passed it.
    let line = aex_dataplane::metering::cut_off_bytes(10) as usize;
    assert!(
        delivered.len() <= line + "word99 ".len(),
        "{} bytes for a cap of 10",
        delivered.len()
    );

    let agent = stack.settled("claude-cut", Duration::from_secs(2)).await;
    let spent = agent["spent_micro"].as_i64().unwrap();
    let settles: Vec<i64> = events_of(&stack, "claude-cut", "settle").await;
    assert_eq!(settles, [spent]);
    // Never more than the reservation: the prompt's bound and 10 tokens.
    let reserved: i64 = events_of(&stack, "claude-cut", "admit").await[0];
    assert!(spent <= reserved, "spent {spent} of {reserved}");
}

async fn events_of(stack: &Stack, agent: &str, kind: &str) -> Vec<i64> {
    events(stack, agent)
        .await
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.amount_micro)
        .collect()
}

#[tokio::test]
async fn count_tokens_is_answered_by_the_provider_or_by_aex_and_reserves_nothing() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-count", "1", "600", &[]);
    let mut body = message("claude-model", "hello");
    body.as_object_mut().unwrap().remove("max_tokens");
    let r = post(
        &stack,
        &token,
        "/v1/messages/count_tokens",
        &body,
        &[("x-mock-usage", "42,0")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "x-aex-token-count"),
        None,
        "the provider counted"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"input_tokens": 42})
    );
    let seen = stack.mock.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/messages/count_tokens");
    assert_eq!(seen.body["model"], "upstream-claude");
    assert_eq!(seen.header("x-api-key"), Some(MOCK_PROVIDER_KEY));

    // The simulated provider and an OpenAI-compatible one have no count
    // endpoint: AEX's own, never 0, and nothing sent.
    let before = stack.mock.count();
    for model in ["mock-model", "sim"] {
        body["model"] = json!(model);
        let r = post(&stack, &token, "/v1/messages/count_tokens", &body, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "{model}");
        assert_eq!(header(&r, "x-aex-token-count"), Some("estimate"));
        let counted = r.json::<Value>().await.unwrap()["input_tokens"]
            .as_u64()
            .unwrap();
        assert!(counted > 0);
    }
    assert_eq!(stack.mock.count(), before);

    let r = post(
        &stack,
        "aex_not_a_real_token",
        "/v1/messages/count_tokens",
        &body,
        &[],
    )
    .await;
    error_of(r, 401, "authentication_error").await;
    let fenced = stack.agent(
        "claude-count-fenced",
        "1",
        "600",
        &["--allowed-models", "sim"],
    );
    body["model"] = json!("claude-model");
    let r = post(&stack, &fenced, "/v1/messages/count_tokens", &body, &[]).await;
    error_of(r, 403, "permission_error").await;

    let kinds: Vec<String> = events(&stack, "claude-count")
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        !kinds.iter().any(|k| k == "admit" || k == "settle"),
        "counting reserves nothing: {kinds:?}"
    );
}

#[tokio::test]
async fn the_simulated_provider_speaks_messages_and_models_are_listed_in_anthropics_shape() {
    let stack = Stack::start().await;
    let token = stack.agent("claude-sim", "1", "600", &[]);
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &message("sim", "hello"),
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let cost: i64 = header(&r, "x-aex-cost-micro").unwrap().parse().unwrap();
    let whole: Value = r.json().await.unwrap();
    assert_eq!(whole["stop_reason"], "end_turn");
    assert_eq!(whole["usage"]["output_tokens"], 8);
    let mut body = message("sim", "hello");
    body["stream"] = json!(true);
    let text = read_sse(post(&stack, &token, "/v1/messages", &body, &[]).await).await;
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    let events = sse_events(&text);
    let input = events[0].1["message"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    let output = events[events.len() - 2].1["usage"]["output_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(output, 8);
    // sim's prices: $0.15 and $0.60 per million tokens, rounded up to 1 µ.
    let streamed = (input * 150_000 + output * 600_000).div_ceil(1_000_000);
    let agent = stack.settled("claude-sim", Duration::from_secs(2)).await;
    assert_eq!(
        agent["spent_micro"],
        cost + streamed as i64,
        "charged the usage the stream reported"
    );

    let list: Value = Client::new()
        .get(stack.url("/v1/models"))
        .header("x-api-key", &token)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["has_more"], false);
    assert_eq!(list["data"][0]["type"], "model");
    assert_eq!(list["first_id"], "cached-model");
    let r = Client::new()
        .get(stack.url("/v1/models"))
        .header("x-api-key", "aex_not_a_real_token")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    error_of(r, 401, "authentication_error").await;
}

#[tokio::test]
async fn a_messages_client_gone_mid_stream_is_charged_the_input_reported_and_what_it_saw() {
    use futures_util::StreamExt;
    let stack = Stack::start().await;
    let token = stack.agent("claude-leaver", "1", "600", &[]);
    let mut body = message("claude-model", "hello");
    body["stream"] = json!(true);
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &body,
        &[("x-mock-delay-ms", "200"), ("x-mock-usage", "10,40")],
    )
    .await;
    let mut chunks = r.bytes_stream();
    loop {
        let chunk = chunks.next().await.unwrap().unwrap();
        if String::from_utf8_lossy(&chunk).contains("text_delta") {
            break;
        }
    }
    drop(chunks);
    let agent = stack.settled("claude-leaver", Duration::from_secs(2)).await;
    let ev = events(&stack, "claude-leaver").await;
    let settle = ev.iter().find(|e| e.kind == "settle").expect("settled");
    assert_eq!(settle.reason, "client_disconnected");
    // message_start reported the input (10 × 1 µ) and 1 output token so
    // far; the text delivered is counted on top at 12 bytes a token at
    // most, never less than the provider said.
    let spent = agent["spent_micro"].as_i64().unwrap();
    assert!((12..=10 + 2 * 40).contains(&spent), "{spent}");
}
