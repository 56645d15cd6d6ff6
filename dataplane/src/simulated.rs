//! The built-in `simulated` provider: answers like an OpenAI-compatible
//! server or like Anthropic's Messages API, whichever the request spoke,
//! deterministically, with real `usage`, at a configurable pace. It
//! produces exactly the bytes a provider would, so its responses go through
//! the same metering, stripping and settlement as a real upstream's.

use crate::api::Api;
use crate::request::Inspected;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub latency_ms: u32,
    pub tokens_per_second: u32,
    pub completion_tokens: u32,
}

const WORDS: &[&str] = &[
    "AEX", "decides", "every", "model", "call", "before", "it", "reaches", "a", "provider", "so",
    "agents", "stay", "within", "budget", "and", "rate", "limits",
];

pub struct SimulatedResponse {
    pub content_type: &'static str,
    chunks: VecDeque<Bytes>,
    first_delay: Duration,
    interval: Duration,
    started: bool,
}

impl SimulatedResponse {
    /// The next piece of the body, paced like a real model.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.chunks.pop_front()?;
        let delay = if self.started {
            self.interval
        } else {
            self.first_delay
        };
        self.started = true;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some(chunk)
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_event(kind: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {value}\n\n"))
}

fn embedding(input: &str, dims: usize) -> Vec<f32> {
    // FNV-1a seeded per dimension: deterministic, cheap, input-dependent.
    (0..dims)
        .map(|d| {
            let mut h: u32 = 0x811c_9dc5 ^ d as u32;
            for b in input.bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            (h as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn embedding_value(v: &[f32], base64: bool) -> Value {
    if base64 {
        use base64::Engine;
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

pub fn respond(
    settings: Settings,
    request: &Inspected,
    model: &str,
    output_cap: u64,
    request_id: &str,
) -> SimulatedResponse {
    let n = u64::from(settings.completion_tokens).min(output_cap) as usize;
    let truncated = u64::from(settings.completion_tokens) > output_cap;
    let finish = if truncated { "length" } else { "stop" };
    let words: Vec<String> = (0..n)
        .map(|i| format!("{} ", WORDS[i % WORDS.len()]))
        .collect();
    let text: String = words.concat();
    let prompt = request.estimated_prompt_tokens();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = format!("sim-{request_id}");
    let mut chunks = VecDeque::new();
    let content_type;
    match (request.api(), request.stream()) {
        (Api::ChatCompletions, false) => {
            content_type = "application/json";
            chunks.push_back(Bytes::from(
                json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                              "total_tokens": prompt + n as u64},
                })
                .to_string(),
            ));
        }
        (Api::ChatCompletions, true) => {
            content_type = "text/event-stream";
            let chunk = |delta: Value, finish: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            };
            chunks.push_back(sse(&chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )));
            for w in &words {
                chunks.push_back(sse(&chunk(json!({"content": w}), Value::Null)));
            }
            chunks.push_back(sse(&chunk(json!({}), json!(finish))));
            chunks.push_back(sse(&json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                         "total_tokens": prompt + n as u64},
            })));
            chunks.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        (Api::Completions, false) => {
            content_type = "application/json";
            chunks.push_back(Bytes::from(
                json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                              "total_tokens": prompt + n as u64},
                })
                .to_string(),
            ));
        }
        (Api::Completions, true) => {
            content_type = "text/event-stream";
            for w in &words {
                chunks.push_back(sse(
                    &json!({"id": id, "object": "text_completion", "created": created,
                    "model": model, "choices": [{"index": 0, "text": w, "finish_reason": null}]}),
                ));
            }
            chunks.push_back(sse(
                &json!({"id": id, "object": "text_completion", "created": created,
                "model": model, "choices": [{"index": 0, "text": "", "finish_reason": finish}]}),
            ));
            chunks.push_back(sse(&json!({"id": id, "object": "text_completion", "created": created,
                "model": model, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                "total_tokens": prompt + n as u64}})));
            chunks.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        (Api::Responses, stream) => {
            let response = |status: &str, output: Value, usage: Value| {
                json!({"id": id, "object": "response", "created_at": created, "model": model,
                       "status": status, "output": output, "usage": usage})
            };
            let message = json!([{"type": "message", "id": format!("msg-{id}"), "role": "assistant",
                "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]}]);
            let usage = json!({"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n as u64});
            let status = if truncated { "incomplete" } else { "completed" };
            if stream {
                // The whole event sequence OpenAI sends, each with its
                // sequence number: clients (OpenAI Agents, OpenClaw) build
                // their output from the item and part events.
                content_type = "text/event-stream";
                let item_id = format!("msg-{id}");
                let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
                let mut events = vec![
                    json!({"type": "response.created",
                        "response": response("in_progress", json!([]), Value::Null)}),
                    json!({"type": "response.in_progress",
                        "response": response("in_progress", json!([]), Value::Null)}),
                    json!({"type": "response.output_item.added", "output_index": 0,
                        "item": {"type": "message", "id": item_id, "role": "assistant",
                                 "status": "in_progress", "content": []}}),
                    json!({"type": "response.content_part.added", "item_id": item_id,
                        "output_index": 0, "content_index": 0, "part": part("")}),
                ];
                events.extend(words.iter().map(|w| {
                    json!({"type": "response.output_text.delta", "item_id": item_id,
                        "output_index": 0, "content_index": 0, "delta": w})
                }));
                events.push(
                    json!({"type": "response.output_text.done", "item_id": item_id,
                    "output_index": 0, "content_index": 0, "text": text}),
                );
                events.push(
                    json!({"type": "response.content_part.done", "item_id": item_id,
                    "output_index": 0, "content_index": 0, "part": part(&text)}),
                );
                events.push(
                    json!({"type": "response.output_item.done", "output_index": 0,
                    "item": message[0]}),
                );
                let done = if truncated {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(json!({"type": done, "response": response(status, message, usage)}));
                let mut framed = events.into_iter().enumerate().map(|(i, mut event)| {
                    event["sequence_number"] = json!(i);
                    let kind = event["type"].as_str().unwrap_or_default().to_string();
                    sse_event(&kind, &event)
                });
                // Paced like tokens: the head events go out as one chunk,
                // then a chunk per delta, then the closing events as one.
                let head: Vec<Bytes> = framed.by_ref().take(4).collect();
                chunks.push_back(Bytes::from(head.concat()));
                chunks.extend(framed.by_ref().take(words.len()));
                let tail: Vec<Bytes> = framed.collect();
                chunks.push_back(Bytes::from(tail.concat()));
            } else {
                content_type = "application/json";
                chunks.push_back(Bytes::from(response(status, message, usage).to_string()));
            }
        }
        (Api::Embeddings, _) => {
            content_type = "application/json";
            let base64 = request
                .body()
                .get("encoding_format")
                .and_then(Value::as_str)
                == Some("base64");
            let inputs: Vec<String> = match request.body().get("input") {
                Some(Value::Array(items)) => items.iter().map(|i| i.to_string()).collect(),
                Some(other) => vec![other.to_string()],
                None => vec![],
            };
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    json!({"object": "embedding", "index": i,
                    "embedding": embedding_value(&embedding(input, 16), base64)})
                })
                .collect();
            chunks.push_back(Bytes::from(
                json!({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
                .to_string(),
            ));
        }
        (Api::Messages, stream) => {
            let stop = if truncated { "max_tokens" } else { "end_turn" };
            let message = |content: Value, stop: Value, output: usize| {
                json!({"id": format!("msg_{id}"), "type": "message", "role": "assistant",
                    "model": model, "content": content, "stop_reason": stop,
                    "stop_sequence": null,
                    "usage": {"input_tokens": prompt, "output_tokens": output,
                        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
            };
            if stream {
                // Anthropic's whole event sequence: the SDKs build their
                // message from the start, block and delta events.
                content_type = "text/event-stream";
                let head = [
                    sse_event(
                        "message_start",
                        &json!({"type": "message_start",
                            "message": message(json!([]), Value::Null, 1)}),
                    ),
                    sse_event(
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
                    ),
                    sse_event("ping", &json!({"type": "ping"})),
                ];
                chunks.push_back(Bytes::from(head.concat()));
                chunks.extend(words.iter().map(|w| {
                    sse_event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": w}}),
                    )
                }));
                let tail = [
                    sse_event(
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": 0}),
                    ),
                    sse_event(
                        "message_delta",
                        &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop, "stop_sequence": null},
                            "usage": {"output_tokens": n}}),
                    ),
                    sse_event("message_stop", &json!({"type": "message_stop"})),
                ];
                chunks.push_back(Bytes::from(tail.concat()));
            } else {
                content_type = "application/json";
                chunks.push_back(Bytes::from(
                    message(json!([{"type": "text", "text": text}]), json!(stop), n).to_string(),
                ));
            }
        }
        (Api::CountTokens, _) => {
            content_type = "application/json";
            chunks.push_back(Bytes::from(json!({"input_tokens": prompt}).to_string()));
        }
    }
    let interval = if request.stream() && settings.tokens_per_second > 0 {
        Duration::from_micros(1_000_000 / u64::from(settings.tokens_per_second))
    } else {
        Duration::ZERO
    };
    SimulatedResponse {
        content_type,
        chunks,
        first_delay: Duration::from_millis(u64::from(settings.latency_ms)),
        interval,
        started: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::inspect;
    use crate::sse::{SseMeter, usage_of_body};

    const FAST: Settings = Settings {
        latency_ms: 0,
        tokens_per_second: 0,
        completion_tokens: 5,
    };

    async fn body(mut r: SimulatedResponse) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await {
            out.extend_from_slice(&c);
        }
        out
    }

    #[tokio::test]
    async fn reports_real_usage_capped_by_the_output_limit() {
        let req = inspect(
            Api::ChatCompletions,
            br#"{"model":"s","messages":[{"role":"user","content":"hello"}]}"#,
        )
        .unwrap();
        let b = body(respond(FAST, &req, "s", 3, "r1")).await;
        let usage = usage_of_body(Api::ChatCompletions, &b).unwrap();
        assert_eq!(usage.completion_tokens, 3);
        assert_eq!(usage.prompt_tokens, req.estimated_prompt_tokens());
        assert!(
            String::from_utf8(b)
                .unwrap()
                .contains("\"finish_reason\":\"length\"")
        );
    }

    #[tokio::test]
    async fn a_streamed_response_sends_every_event_openai_sends_in_order() {
        let raw = r#"{"model":"s","stream":true,"input":"hi"}"#;
        let req = inspect(Api::Responses, raw.as_bytes()).unwrap();
        let b = body(respond(FAST, &req, "s", 100, "r")).await;
        let events: Vec<Value> = String::from_utf8(b)
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let mut expected = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        expected.extend(["response.output_text.delta"; 5]);
        expected.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(kinds, expected);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i);
        }
        let deltas: String = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(events[9]["text"], deltas.as_str());
        assert_eq!(
            events[12]["response"]["output"][0]["content"][0]["text"],
            deltas.as_str()
        );
    }

    #[tokio::test]
    async fn streams_are_metered_like_a_provider() {
        for (api, raw) in [
            (
                Api::ChatCompletions,
                r#"{"model":"s","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                Api::Responses,
                r#"{"model":"s","stream":true,"input":"hi"}"#,
            ),
            (
                Api::Completions,
                r#"{"model":"s","stream":true,"prompt":"hi"}"#,
            ),
            (
                Api::Messages,
                r#"{"model":"s","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
        ] {
            let req = inspect(api, raw.as_bytes()).unwrap();
            let b = body(respond(FAST, &req, "s", 100, "r")).await;
            let mut meter = SseMeter::new(api, true);
            let mut out = Vec::new();
            meter.feed(&b, &mut out);
            meter.finish(&mut out);
            assert_eq!(meter.usage().unwrap().completion_tokens, 5, "{api:?}");
        }
    }

    #[tokio::test]
    async fn a_message_stops_at_max_tokens_as_anthropic_says_it() {
        let raw = br#"{"model":"s","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = inspect(Api::Messages, raw).unwrap();
        let b = body(respond(FAST, &req, "s", 3, "r")).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["content"][0]["text"], "AEX decides every ");
        assert_eq!(
            usage_of_body(Api::Messages, &b).unwrap().completion_tokens,
            3
        );
        let counted = inspect(Api::CountTokens, br#"{"model":"s","messages":[]}"#).unwrap();
        let b = body(respond(FAST, &counted, "s", 0, "r")).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(v["input_tokens"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn embeddings_honour_base64() {
        let req = inspect(
            Api::Embeddings,
            br#"{"model":"s","input":["a","b"],"encoding_format":"base64"}"#,
        )
        .unwrap();
        let b = body(respond(FAST, &req, "s", 0, "r")).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert!(v["data"][0]["embedding"].is_string());
    }
}
