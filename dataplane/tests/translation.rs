//! Translation between the two APIs end to end (issue #16): a Messages
//! client on a model whose provider speaks OpenAI's API (the mock's
//! `cached-model`), and a chat client on one whose provider speaks
//! Anthropic's (`claude-model`). What each client gets is its own API's
//! shape, whole and streamed, tools included; what the ledger charges is
//! the usage the provider reported, the prompt cache's parts at their
//! prices.

use aex_tests::{MOCK_PROVIDER_KEY, Stack};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

mod common;
use common::{header, post, read_sse};

/// Every event's JSON data (`None` for `[DONE]`).
fn data(text: &str) -> Vec<Option<Value>> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let d = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data");
            serde_json::from_str(d).ok()
        })
        .collect()
}

fn weather() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
}

#[tokio::test]
async fn a_messages_client_is_served_by_an_openai_compatible_model() {
    let stack = Stack::start().await;
    let token = stack.agent("to-chat", "1", "600", &[]);
    let body = json!({"model": "cached-model", "max_tokens": 50,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hello"}]});
    let r = post(
        &stack,
        &token,
        "/v1/messages",
        &body,
        &[("x-mock-usage", "100,5"), ("x-mock-cached", "80")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-aex-untranslated"), Some("cache_control"));
    // 20 uncached input tokens × 1 µ + 80 read from the cache × 0.1 µ + 5
    // output tokens × 2 µ.
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("38"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer,
        json!({"id": "msg_chatcmpl-mock", "type": "message", "role": "assistant",
            "model": "cached-model", "content": [{"type": "text", "text": "hello from mock"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 80,
                      "cache_creation_input_tokens": 0, "output_tokens": 5}})
    );
    let seen = &stack.mock.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.body,
        json!({"model": "upstream-model", "max_tokens": 50,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hello"}]})
    );
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {MOCK_PROVIDER_KEY}").as_str())
    );

    // A tool round trip, streamed: the tool call as a tool_use block, its
    // input as partial JSON, then the answer to its result.
    let mut ask = json!({"model": "cached-model", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "use_tool:weather"}],
        "tools": [{"name": "weather", "description": "Weather", "input_schema": weather()}]});
    let text = read_sse(post(&stack, &token, "/v1/messages", &ask, &[]).await).await;
    let events: Vec<Value> = data(&text).into_iter().flatten().collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    assert_eq!(events[1]["content_block"]["name"], "weather");
    let input: Value =
        serde_json::from_str(events[2]["delta"]["partial_json"].as_str().unwrap()).unwrap();
    assert_eq!(input, json!({"city": "Paris"}));
    assert_eq!(events[4]["delta"]["stop_reason"], "tool_use");
    assert_eq!(events[4]["usage"]["input_tokens"], 10);
    let upstream = stack.mock.requests()[1].body.clone();
    assert_eq!(upstream["stream_options"], json!({"include_usage": true}));
    assert_eq!(upstream["tools"][0]["function"]["name"], "weather");

    ask["messages"] = json!([
        {"role": "user", "content": "use_tool:weather"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": events[1]["content_block"]["id"],
            "name": "weather", "input": input}]},
        {"role": "user", "content": [{"type": "tool_result",
            "tool_use_id": events[1]["content_block"]["id"], "content": "sunny"}]}]);
    let text = read_sse(post(&stack, &token, "/v1/messages", &ask, &[]).await).await;
    let said: String = data(&text)
        .into_iter()
        .flatten()
        .filter_map(|e| e["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert!(said.starts_with("tool said: sunny"), "{text}");
    assert_eq!(stack.mock.requests()[2].body["messages"][2]["role"], "tool");

    // 38 µ, then two streamed calls of 10 input and 5 output tokens.
    let agent = stack.settled("to-chat", Duration::from_secs(2)).await;
    assert_eq!(agent["spent_micro"], 38 + 2 * 20);
}

#[tokio::test]
async fn a_chat_client_is_served_by_an_anthropic_model() {
    let stack = Stack::start().await;
    let token = stack.agent("to-messages", "1", "600", &[]);
    let body = json!({"model": "claude-model", "max_completion_tokens": 40,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "use_tool:weather"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": weather()}}]});
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &body,
        &[("x-mock-usage", "10,5"), ("x-mock-cached", "80,20")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // 10 × 1 µ + 80 × 0.1 µ + 20 × 1.25 µ + 5 × 2 µ.
    assert_eq!(header(&r, "x-aex-cost-micro"), Some("53"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "claude-model");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "weather"
    );
    assert_eq!(
        serde_json::from_str::<Value>(
            choice["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 110, "completion_tokens": 5, "total_tokens": 115,
            "prompt_tokens_details": {"cached_tokens": 80, "cache_write_tokens": 20}})
    );
    let seen = &stack.mock.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some(MOCK_PROVIDER_KEY));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.body["system"], "Be brief.");
    assert_eq!(seen.body["max_tokens"], 40);
    assert_eq!(seen.body["tools"][0]["input_schema"], weather());

    // Streamed, with and without the usage chunk.
    for include_usage in [true, false] {
        let mut s = json!({"model": "claude-model", "stream": true,
            "messages": [{"role": "user", "content": "hello"}]});
        if include_usage {
            s["stream_options"] = json!({"include_usage": true});
        }
        let text = read_sse(post(&stack, &token, "/v1/chat/completions", &s, &[]).await).await;
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let chunks: Vec<Value> = data(&text).into_iter().flatten().collect();
        let said: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(said, "word0 word1 word2 word3 word4 ");
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, Some("stop"));
        let usage = chunks.iter().find(|c| c["usage"].is_object());
        assert_eq!(usage.is_some(), include_usage, "{text}");
        if let Some(u) = usage {
            assert_eq!(u["usage"]["prompt_tokens"], 10);
            assert_eq!(u["usage"]["completion_tokens"], 5);
        }
    }

    // The provider's own 429, in OpenAI's shape, its wait kept.
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &body,
        &[("x-mock", "429")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), Some("7"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["message"], "mock 429");

    // A provider that ignores the cap is cut off as OpenAI ends a stream at
    // its limit.
    let capped = json!({"model": "claude-model", "stream": true, "max_tokens": 10,
        "messages": [{"role": "user", "content": "hello"}]});
    let text = read_sse(
        post(
            &stack,
            &token,
            "/v1/chat/completions",
            &capped,
            &[("x-mock", "ignore-cap")],
        )
        .await,
    )
    .await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks: Vec<Value> = data(&text).into_iter().flatten().collect();
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length",
        "{text}"
    );

    // What Anthropic's API cannot carry is refused by name, unreserved.
    let before = stack.mock.count();
    let mut n = body.clone();
    n["n"] = json!(2);
    let r = post(&stack, &token, "/v1/chat/completions", &n, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("'n'"),
        "{e}"
    );
    assert_eq!(stack.mock.count(), before);

    let agent = stack.settled("to-messages", Duration::from_secs(2)).await;
    assert_eq!(agent["reserved_micro"], 0);
    let spent = agent["spent_micro"].as_i64().unwrap();
    assert!(spent >= 53 + 2 * 20, "{spent}");
}
