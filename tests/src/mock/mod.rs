//! A mock OpenAI-compatible provider for end-to-end tests. What it does is
//! chosen per request by the `x-mock` header (AEX forwards unknown headers):
//!
//! | x-mock | behaviour |
//! |---|---|
//! | (none) / `ok` | JSON or SSE answer with usage; a tool call when the user's turn says `use_tool:NAME` |
//! | `no-usage` | never reports usage |
//! | `429` | 429 with `Retry-After: 7` |
//! | `500` | 500 |
//! | `hang` | never answers |
//! | `drop` | closes the connection without answering |
//! | `drop-mid-stream` | streams two chunks, then closes |
//! | `ignore-cap` | streams 2000 chunks of text (or answers 2000 words), ignoring max tokens, no usage |
//! | `early-usage` | streams a tiny usage chunk first, then 2000 chunks ignoring max tokens |
//! | `n-choices` | answers every one of `n` choices at the cap, reporting usage for all |
//! | `huge` | a 200 OK JSON body of 8 MiB |
//! | `flood:FIELD` | streams 2000 chunks ignoring max tokens, no usage, the text in FIELD: `refusal`, `audio` (base64 `delta.audio.data`), `function_call` (legacy arguments), `parts` (content as an array), `message` (a `message` object in a chunk), `unknown` (a field no API defines), `undelimited` (one event that never ends) |
//! | `400`, `401`, `403`, `404`, `422` | that status with an OpenAI error body |
//!
//! `x-mock-delay-ms` paces stream chunks (and delays a JSON answer); `x-mock-usage: P,C` sets the
//! reported prompt and completion tokens (default 10 and min(5, cap)); `x-mock-cached: R[,W]` reports
//! R of the prompt tokens read from the provider's cache and W written to it (OpenAI's and
//! OpenRouter's `prompt_tokens_details`, Responses' `input_tokens_details`).
//!
//! It speaks Anthropic's Messages API on `/v1/messages` and `/v1/messages/count_tokens`
//! (`anthropic.rs`): the same modes where they apply (`ok`, `429`, `500`, `400`–`422`, `hang`,
//! `drop`, `drop-mid-stream`, `ignore-cap`, `no-usage`), errors in Anthropic's shape, and usage
//! in its words: `x-mock-usage: P,C` reports P as `input_tokens` (the uncached input) and
//! `x-mock-cached: R,W` as `cache_read_input_tokens` / `cache_creation_input_tokens`;
//! count_tokens answers P.
//! Every request is recorded for assertions.

mod anthropic;
mod openai;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    connections: std::sync::atomic::AtomicUsize,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, content_type: &str, body: String, extra: &[(&str, &str)]) -> Response<Body> {
    let mut r = Response::builder()
        .status(status)
        .header("content-type", content_type);
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.body(
        Full::new(Bytes::from(body))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    )
    .expect("valid response")
}

/// A stream of `events`, each after `delay`; the connection is dropped
/// before event `cut_after`, if given.
fn send_events(events: Vec<String>, delay: Duration, cut_after: Option<usize>) -> Response<Body> {
    let (tx, response) = streamed("text/event-stream");
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            if cut_after == Some(i) {
                let _ = tx
                    .send(Err(std::io::Error::other("mock drops mid-stream")))
                    .await;
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
    });
    response
}

/// An honest provider's output count covers the text it sends (a tool's
/// long output echoed back, as Claude Code's is), at AEX's most generous
/// 12 bytes a token.
fn honest_output(reported: u64, text_bytes: usize) -> u64 {
    reported.max((text_bytes as u64).div_ceil(12))
}

/// Chunks sent through a channel; an `Err` item aborts the connection.
fn streamed(
    content_type: &str,
) -> (
    mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    Response<Body>,
) {
    let (tx, rx) = mpsc::channel(16);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = StreamBody::new(stream).boxed();
    let response = Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(body)
        .expect("valid response");
    (tx, response)
}

impl MockUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                st.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let recorded = Recorded {
        path: path.clone(),
        headers,
        body: body.clone(),
    };
    let behaviour = recorded.header("x-mock").unwrap_or("ok").to_string();
    let delay = Duration::from_millis(
        recorded
            .header("x-mock-delay-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let cap = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .or_else(|| body.get("max_output_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let (prompt, completion) = recorded
        .header("x-mock-usage")
        .and_then(|v| v.split_once(','))
        .and_then(|(p, c)| Some((p.trim().parse().ok()?, c.trim().parse().ok()?)))
        .unwrap_or((10u64, 5u64.min(cap)));
    let (cache_read, cache_write) = recorded
        .header("x-mock-cached")
        .map(|v| {
            let mut parts = v.split(',').map(|p| p.trim().parse::<u64>().unwrap_or(0));
            (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
        })
        .unwrap_or((0, 0));
    let recorded_usage = recorded.header("x-mock-usage").is_some();
    state.requests.lock().unwrap().push(recorded);

    let model = body.get("model").cloned().unwrap_or(json!("mock"));
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let wants_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if path.ends_with("/messages") || path.ends_with("/messages/count_tokens") {
        let usage = anthropic::Usage {
            input: prompt,
            output: completion,
            cache_read,
            cache_write,
        };
        let explicit = recorded_usage;
        return messages(&path, &body, &behaviour, delay, usage, explicit).await;
    }
    let responses = path.ends_with("/responses");
    let embeddings = path.ends_with("/embeddings");
    let flood = behaviour.strip_prefix("flood:").map(str::to_string);
    let report_usage = behaviour != "no-usage" && behaviour != "ignore-cap" && flood.is_none();
    let early_usage = behaviour == "early-usage";
    let error = |status: u16, code: &str| {
        json!({"error": {"message": format!("mock {status}"), "type": "mock", "param": null, "code": code}})
            .to_string()
    };
    match behaviour.as_str() {
        "429" => {
            return Ok(full(
                429,
                "application/json",
                error(429, "rate_limit_exceeded"),
                &[("retry-after", "7")],
            ));
        }
        "500" => {
            return Ok(full(
                500,
                "application/json",
                error(500, "server_error"),
                &[],
            ));
        }
        "400" | "401" | "403" | "404" | "422" => {
            let status: u16 = behaviour.parse().expect("listed");
            return Ok(full(
                status,
                "application/json",
                error(status, "mock_refused"),
                &[],
            ));
        }
        "huge" => {
            let text = "x".repeat(8 * 1024 * 1024);
            let v = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
            return Ok(full(200, "application/json", v.to_string(), &[]));
        }
        "n-choices" => {
            // What an OpenAI-like upstream does with `n`: every choice runs
            // to the cap, and usage counts them all.
            let n = body.get("n").and_then(Value::as_u64).unwrap_or(1);
            let per_choice = cap.min(1000);
            let choices: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "finish_reason": "length",
                    "message": {"role": "assistant", "content": "word ".repeat(per_choice as usize)}}))
                .collect();
            let v = json!({"id": "chatcmpl-n", "object": "chat.completion", "model": body.get("model"),
                "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": n * per_choice,
                          "total_tokens": prompt + n * per_choice}});
            return Ok(full(200, "application/json", v.to_string(), &[]));
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        "drop" => return Err(std::io::Error::other("mock drops the connection")),
        _ => {}
    }
    let shape = if responses {
        openai::Shape::Responses
    } else {
        openai::Shape::Chat
    };
    let answer = openai::answer_for(&body, shape);
    // Honest (`honest_output`), unless x-mock-usage says otherwise.
    let mut reported = completion;
    if let (openai::Answer::Text { tool_output }, "ok", false) =
        (&answer, behaviour.as_str(), recorded_usage)
    {
        let text = if stream {
            openai::deltas(tool_output, completion).concat()
        } else {
            openai::text(tool_output)
        };
        reported = honest_output(completion, text.len());
    }
    let usage = if responses {
        json!({"input_tokens": prompt, "output_tokens": reported, "total_tokens": prompt.saturating_add(reported),
               "input_tokens_details": {"cached_tokens": cache_read}, "output_tokens_details": {"reasoning_tokens": 0}})
    } else {
        json!({"prompt_tokens": prompt, "completion_tokens": reported, "total_tokens": prompt.saturating_add(reported),
               "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write}})
    };
    let usage = report_usage.then_some(usage);
    if embeddings {
        // [0.1, 0.2] as little-endian f32, for clients that ask for base64
        // (the OpenAI SDKs' default).
        let vector = if body.get("encoding_format").and_then(Value::as_str) == Some("base64") {
            json!("zczMPc3MTD4=")
        } else {
            json!([0.1, 0.2])
        };
        let mut v = json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": vector}]});
        if report_usage {
            v["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
        }
        return Ok(full(200, "application/json", v.to_string(), &[]));
    }
    if !stream {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut v = if responses {
            openai::response(&model, &answer, usage)
        } else {
            openai::chat_completion(&model, &answer, usage)
        };
        if behaviour == "ignore-cap" && !responses {
            v["choices"][0]["message"]["content"] = json!(openai::deltas(&None, 2000).concat());
        }
        return Ok(full(200, "application/json", v.to_string(), &[]));
    }
    if let Some(field) = flood {
        let (tx, response) = streamed("text/event-stream");
        tokio::spawn(async move {
            for event in openai::flood_events(&model, &field, 2000) {
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
            }
        });
        return Ok(response);
    }
    let words = match (&answer, behaviour.as_str()) {
        (openai::Answer::Text { tool_output }, "ignore-cap" | "early-usage") => {
            openai::deltas(tool_output, 2000)
        }
        (openai::Answer::Text { tool_output }, "drop-mid-stream") => openai::deltas(tool_output, 2),
        (openai::Answer::Text { tool_output }, _) => openai::deltas(tool_output, completion),
        (openai::Answer::ToolCall { .. }, _) => Vec::new(),
    };
    let mut events = if responses {
        openai::response_events(&model, &answer, &words, usage.clone())
    } else {
        openai::chat_chunks(&model, &answer, &words)
    };
    if early_usage && !responses {
        // A liar's trick: report almost nothing up front, then stream on.
        events.insert(
            0,
            openai::chat_usage_chunk(
                &model,
                &json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
            ),
        );
    }
    let cut_after = (behaviour == "drop-mid-stream").then_some(
        // The head events and two deltas.
        if responses { 4 + 2 } else { 1 + 2 },
    );
    if !responses {
        if let (true, Some(usage)) = (wants_usage, &usage) {
            events.push(openai::chat_usage_chunk(&model, usage));
        }
        events.push("data: [DONE]\n\n".to_string());
    }
    Ok(send_events(events, delay, cut_after))
}

/// A Messages API request (see the table above for the modes).
async fn messages(
    path: &str,
    body: &Value,
    behaviour: &str,
    delay: Duration,
    mut usage: anthropic::Usage,
    explicit_usage: bool,
) -> Result<Response<Body>, std::io::Error> {
    match behaviour {
        "429" => {
            return Ok(full(
                429,
                "application/json",
                anthropic::error(429),
                &[("retry-after", "7")],
            ));
        }
        "500" | "400" | "401" | "403" | "404" | "422" => {
            let status: u16 = behaviour.parse().expect("listed");
            return Ok(full(
                status,
                "application/json",
                anthropic::error(status),
                &[],
            ));
        }
        "hang" => tokio::time::sleep(Duration::from_secs(3600)).await,
        "drop" => return Err(std::io::Error::other("mock drops the connection")),
        _ => {}
    }
    if path.ends_with("/count_tokens") {
        let v = json!({"input_tokens": usage.input});
        return Ok(full(200, "application/json", v.to_string(), &[]));
    }
    let model = body.get("model").cloned().unwrap_or(json!("mock"));
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let answer = openai::answer_for(body, openai::Shape::Messages);
    let ignore_cap = behaviour == "ignore-cap";
    // Honest (`honest_output`), unless x-mock-usage says otherwise.
    let honest = |usage: &mut anthropic::Usage, text_bytes: usize| {
        if !explicit_usage && !ignore_cap {
            usage.output = honest_output(usage.output, text_bytes);
        }
    };
    if !stream {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let flood = ignore_cap.then(|| openai::deltas(&None, 2000).concat());
        if let openai::Answer::Text { tool_output } = &answer {
            honest(&mut usage, openai::text(tool_output).len());
        }
        let v = anthropic::whole(&model, &answer, usage, flood);
        return Ok(full(200, "application/json", v.to_string(), &[]));
    }
    let count = match behaviour {
        "ignore-cap" => 2000,
        "drop-mid-stream" => 2,
        _ => usage.output,
    };
    let words = anthropic::words(&answer, count);
    honest(&mut usage, words.iter().map(String::len).sum());
    let usage_at_end = !matches!(behaviour, "ignore-cap" | "no-usage");
    let events = anthropic::events(&model, &answer, &words, usage, usage_at_end);
    // message_start, the block's start and a ping, then two deltas.
    let cut_after = (behaviour == "drop-mid-stream").then_some(3 + 2);
    Ok(send_events(events, delay, cut_after))
}
