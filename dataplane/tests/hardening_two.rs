//! Regression tests for Hardening II (issue #31): each finding reproduced
//! from outside, as a client or a lying provider would, and shown fixed.
//! The grants findings are in `grants.rs` (backpressure) and
//! `no_call_lost.rs` (reports after an outage, and under load). Real processes; the mock is in-process.

use aex_tests::Stack;
use serde_json::{Value, json};

mod common;
use common::*;

/// Finding 2: a body naming two caps (and a server's own) was reserved for
/// the smaller and forwarded with all of them; a server honouring the
/// larger (SGLang) or llama.cpp's `n_predict` generated up to it. Now the
/// provider receives the reserved cap, and only it, under every name.
#[tokio::test]
async fn the_provider_receives_only_the_output_cap_reserved_for() {
    let stack = Stack::start().await;
    let token = stack.agent("capped", "1", "6000", &[]);
    let mut body = chat("mock-model");
    body["max_tokens"] = json!(10);
    body["max_completion_tokens"] = json!(4000);
    body["n_predict"] = json!(4000);
    body["options"] = json!({"num_predict": -1, "temperature": 0});
    let r = post(&stack, &token, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    let seen = stack
        .mock
        .requests()
        .pop()
        .expect("the call reached the mock");
    let caps: Vec<(&str, &Value)> = ["max_tokens", "max_completion_tokens", "n_predict"]
        .into_iter()
        .map(|f| (f, &seen.body[f]))
        .collect();
    assert_eq!(
        caps,
        [
            ("max_tokens", &json!(10)),
            ("max_completion_tokens", &json!(10)),
            ("n_predict", &json!(10)),
        ]
    );
    assert_eq!(
        seen.body["options"],
        json!({"num_predict": 10, "temperature": 0})
    );

    // The smaller cap under a server's own name is what is reserved for.
    let mut body = chat("mock-model");
    body["n_predict"] = json!(3);
    let r = post(&stack, &token, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    let seen = stack.mock.requests().pop().unwrap();
    assert_eq!(
        (&seen.body["n_predict"], &seen.body["max_completion_tokens"]),
        (&json!(3), &json!(3))
    );
    let admitted = events(&stack, "capped")
        .await
        .into_iter()
        .filter(|e| e.kind == "admit")
        .map(|e| {
            serde_json::from_str::<Value>(&e.details_json).unwrap()["output_tokens_cap"].clone()
        })
        .collect::<Vec<_>>();
    assert_eq!(admitted, [json!(10), json!(3)]);
}

/// Finding 3: a $0.01 agent ran up 39,998,200 µ of provider-reported usage
/// in 40 calls and stayed active. Now the first answer past the allowance
/// pauses it, with the reason in the event and a metric to alert on; its
/// next calls are refused, and nothing more reaches the provider.
#[tokio::test]
async fn a_provider_billing_past_the_reservations_stops_the_agent() {
    let stack = Stack::start().await;
    let token = stack.agent("overrun", "0.01", "6000", &[]);
    let body = chat("mock-model");
    let lie = [("x-mock-usage", "1000000,1000000")];
    let r = post(&stack, &token, "/v1/chat/completions", &body, &lie).await;
    assert_eq!(r.status().as_u16(), 200);
    stack
        .in_state("overrun", "paused", std::time::Duration::from_secs(5))
        .await;
    let calls_before = stack.mock.count();
    for _ in 0..5 {
        let r = post(&stack, &token, "/v1/chat/completions", &body, &lie).await;
        assert_eq!(r.status().as_u16(), 403, "a stopped agent is refused");
    }
    assert_eq!(
        stack.mock.count(),
        calls_before,
        "nothing more reached the provider"
    );

    let paused: Vec<_> = events(&stack, "overrun")
        .await
        .into_iter()
        .filter(|e| e.kind == "agent.paused")
        .collect();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].reason, "overruns");
    let details: Value = serde_json::from_str(&paused[0].details_json).unwrap();
    assert_eq!(details["allowance_micro"], 1_000);
    assert!(details["overrun_micro"].as_i64().unwrap() > 2_000_000);
    let metrics = reqwest::get(&stack.control.metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        aex_tests::prometheus_value(
            &metrics,
            "aex_agents_stopped_total",
            &[("reason", "overruns")]
        ),
        1.0,
        "{metrics}"
    );

    // A call a few tokens past its bound (a chat template's own tokens on
    // a tiny prompt) is recorded, not a reason to stop.
    let honest = stack.agent("honest", "1", "6000", &[]);
    let mut body = chat("mock-model");
    body["max_tokens"] = json!(1);
    let input = serde_json::to_vec(&body).unwrap().len();
    let usage = format!("{},1", input + 3);
    let r = post(
        &stack,
        &honest,
        "/v1/chat/completions",
        &body,
        &[("x-mock-usage", usage.as_str())],
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
    let agent = stack
        .settled("honest", std::time::Duration::from_secs(5))
        .await;
    let overrun = agent["overrun_micro"].as_i64().unwrap();
    assert!(
        agent["state"] == "active" && (1..=10).contains(&overrun),
        "{agent}"
    );
    let out = stack.control.aexctl(&["audit", "--json"]);
    assert_eq!(out.code(), 0, "{}", out.stdout);
}

/// Finding 4: the stream meter read only `content`, reasoning and tool
/// arguments, so text in any other field — `refusal`, `audio`, legacy
/// `function_call`, content as an array of parts, a `message` object, a
/// field no API defines — streamed 2–4 MB past a 20-token cap and was
/// charged 28 µ; an event without a delimiter was relayed for 1 MiB before
/// the cut-off applied. Each is now cut off near the reservation and
/// charged all of it.
#[tokio::test]
async fn text_in_any_field_of_a_stream_is_cut_off_at_the_reservation() {
    let stack = Stack::start().await;
    let mut body = chat("mock-model");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(10);
    let reserved = serde_json::to_vec(&body).unwrap().len() as i64 + 10 * 2;
    for field in [
        "refusal",
        "audio",
        "function_call",
        "parts",
        "message",
        "unknown",
        "undelimited",
    ] {
        let agent = format!("flood-{}", field.replace('_', "-"));
        let token = stack.agent(&agent, "1", "6000", &[]);
        let mode = format!("flood:{field}");
        let r = post(
            &stack,
            &token,
            "/v1/chat/completions",
            &body,
            &[("x-mock", mode.as_str())],
        )
        .await;
        assert_eq!(r.status().as_u16(), 200, "{field}");
        let received = r.bytes().await.expect("the stream ends").len();
        // The provider sent ~2000 chunks (≥ 200 KB, 2 MB of audio); a
        // 10-token cap is cut off within an event or two of ~184 bytes of
        // text, audio counted at 1/256 of its base64 (`generated.rs`).
        let most = if field == "audio" { 80_000 } else { 40_000 };
        assert!(
            received < most,
            "{field}: {received} bytes reached the client past a 10-token cap"
        );
        let a = stack
            .settled(&agent, std::time::Duration::from_secs(5))
            .await;
        assert_eq!(a["spent_micro"], reserved, "{field}: {a}");
        let settle = events(&stack, &agent)
            .await
            .into_iter()
            .find(|e| e.kind == "settle")
            .expect("settled");
        assert_eq!(settle.reason, "cut_off", "{field}");
    }
}

/// Finding 2, buffered: a provider ignoring the cap in a JSON answer
/// delivered 4,000 tokens on a 10-token reservation. A buffered answer is
/// now bounded like a stream: text past the cut-off is withheld (a 502
/// that tells why and not to retry), and the call is charged its
/// reservation.
#[tokio::test]
async fn a_buffered_answer_past_the_cap_is_withheld_and_charged_its_reservation() {
    let stack = Stack::start().await;
    let token = stack.agent("buffered", "1", "6000", &[]);
    let mut body = chat("mock-model");
    body["max_tokens"] = json!(10);
    let reserved = serde_json::to_vec(&body).unwrap().len() as i64 + 10 * 2;
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &body,
        &[("x-mock", "ignore-cap")],
    )
    .await;
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    let e = error_of(r, 502, "upstream_error").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("past the output cap"),
        "{e}"
    );
    let a = stack
        .settled("buffered", std::time::Duration::from_secs(5))
        .await;
    assert_eq!(a["spent_micro"], reserved, "{a}");
    // An honest answer within the cap is relayed as ever.
    let r = post(&stack, &token, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
}

/// Finding 5: 4,096 idle sockets (no token, no byte) held every slot for
/// 60 s, denying every agent; of the connections past the limit, most were
/// closed without the 503. Now silence takes no slot (and is closed after
/// a few seconds), and every connection past the limit is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_take_no_slot_and_every_refusal_is_a_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start().await;
    let token = stack.agent("patient", "1", "6000", &[]);
    let addr = stack.data.addr;
    let mut idle = Vec::new();
    for _ in 0..5_000 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let started = std::time::Instant::now();
    let r = post(
        &stack,
        &token,
        "/v1/chat/completions",
        &chat("mock-model"),
        &[],
    )
    .await;
    assert_eq!(r.status().as_u16(), 200, "served past 5,000 idle sockets");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // They are closed once their first byte is overdue.
    tokio::time::sleep(aex_dataplane::connections::FIRST_BYTE + std::time::Duration::from_secs(1))
        .await;
    let text = reqwest::get(stack.data.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let silent = aex_tests::prometheus_value(
        &text,
        "aex_dataplane_connections_total",
        &[("outcome", "silent")],
    );
    assert!(silent >= 5_000.0, "{silent} idle sockets closed");
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 5_000);

    // Past the limit: every connection that sent a request gets the 503.
    let small = Stack::start_with(&["--max-connections", "4"]).await;
    let addr = small.data.addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = c.read(&mut buf).await.unwrap();
        held.push(c);
    }
    let refused = (0..600).map(|_| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            c.read_to_end(&mut answer),
        )
        .await
        .ok()?
        .ok()?;
        Some(String::from_utf8_lossy(&answer).into_owned())
    });
    let answers = futures_util::future::join_all(refused).await;
    let answered = answers
        .iter()
        .flatten()
        .filter(|a| a.starts_with("HTTP/1.1 503") && a.contains("retry-after: 1"))
        .count();
    assert_eq!(
        answered, 600,
        "every connection past the limit is answered 503"
    );
    drop(held);
}

/// Finding 3, inputs: `previous_response_id`, files by id and hosted tools
/// make the provider add input AEX never sees, so the bound from the body
/// is no bound; `service_tier: "priority"` is billed above the model's
/// price. Now such inputs are a 400 naming the field unless models.yaml
/// gives the model's context window, which is then reserved; the tier
/// never reaches the provider.
#[tokio::test]
async fn inputs_the_body_cannot_bound_are_refused_or_reserved_at_the_context_window() {
    let stack = Stack::start().await;
    let token = stack.agent("stateful", "1", "6000", &[]);
    let body = json!({"model": "mock-model", "input": "continue", "previous_response_id": "resp_1",
                      "max_output_tokens": 10});
    let r = post(&stack, &token, "/v1/responses", &body, &[]).await;
    let e = error_of(r, 400, "invalid_request").await;
    assert_eq!(e["param"], "previous_response_id", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_input_tokens"),
        "{e}"
    );
    let hosted = json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}],
                        "tools": [{"type": "web_search"}]});
    let r = post(&stack, &token, "/v1/chat/completions", &hosted, &[]).await;
    let e = error_of(r, 400, "invalid_request").await;
    assert_eq!(e["param"], "tools", "{e}");
    assert_eq!(stack.mock.count(), 0, "nothing reached the provider");

    // With the model's context window in models.yaml, reserved for it.
    let path = stack.home.file("config/models.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap().replacen(
        "limits: { max_tokens: 100 }",
        "limits: { max_tokens: 100, max_input_tokens: 5000 }",
        1,
    );
    std::fs::write(&path, yaml).unwrap();
    stack.control.aexctl(&["models", "reload"]).assert_ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = post(&stack, &token, "/v1/responses", &body, &[]).await;
        if r.status() != 400 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(r.status().as_u16(), 200);
    let admit = events(&stack, "stateful")
        .await
        .into_iter()
        .find(|e| e.kind == "admit")
        .expect("admitted");
    let details: Value = serde_json::from_str(&admit.details_json).unwrap();
    assert_eq!(details["input_tokens_bound"], 5000);
    assert_eq!(
        admit.amount_micro,
        5000 + 10 * 2,
        "the window at the input price"
    );

    // A billing switch never reaches the provider.
    let mut tiered = chat("mock-model");
    tiered["service_tier"] = json!("priority");
    let r = post(&stack, &token, "/v1/chat/completions", &tiered, &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    let seen = stack.mock.requests().pop().unwrap();
    assert!(seen.body.get("service_tier").is_none(), "{}", seen.body);
}

/// Finding 5, keep-alive: a connection that proved no token is closed after
/// its 401, so idle keep-alives cannot hold the slots agents need.
#[tokio::test]
async fn a_401_closes_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start().await;
    let mut c = tokio::net::TcpStream::connect(stack.data.addr)
        .await
        .unwrap();
    let body = chat("mock-model").to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer aex_nobody\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.read_to_end(&mut answer),
    )
    .await
    .expect("closed, not kept alive")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 401"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

/// Item 9: bodies were read, buffered and validated before the token was
/// checked. Now a caller without a valid token is answered as soon as its
/// headers arrive: a request announcing 4 MB and sending none of it gets
/// its 401 at once (and a connection closed after it), while a valid
/// token's request waits for its body. An invalid body with a bad token is
/// a 401, not a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_checked_before_the_body_is_read() {
    use std::time::{Duration, Instant};
    let stack = Stack::start().await;
    let token = stack.agent("valid", "1", "6000", &[]);
    let head = |auth: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: aex\r\ncontent-type: application/json\r\n\
             {auth}content-length: 4000000\r\n\r\n"
        )
    };
    // The first answer back (its head and its body, however they arrive),
    // or what came within `wait`: the connection stays open while the
    // data plane discards an upload that never comes.
    let first_answer = |head: String, wait: Duration| {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(stack.data.addr).unwrap();
        tcp.write_all(head.as_bytes()).unwrap();
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if let [answer] = wire::parse_answers(&got).as_slice()
                && answer.header("content-length").and_then(|l| l.parse().ok())
                    == Some(answer.body.len())
            {
                break;
            }
        }
        String::from_utf8_lossy(&got).to_string()
    };
    for auth in ["authorization: Bearer aex_not-a-token\r\n", ""] {
        let started = Instant::now();
        let got = first_answer(head(auth), Duration::from_secs(3));
        assert!(got.starts_with("HTTP/1.1 401"), "{auth:?}: {got}");
        assert!(got.contains("invalid_api_key"), "{got}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered after {:?}: the body was waited for",
            started.elapsed()
        );
    }
    // A valid token's request is read whole: nothing comes back before it.
    let got = first_answer(
        head(&format!("authorization: Bearer {token}\r\n")),
        Duration::from_millis(1500),
    );
    assert!(got.is_empty(), "{got}");

    let bad_json = post_raw(&stack, "aex_not-a-token", "{not json").await;
    assert_eq!(bad_json.status().as_u16(), 401);
    let bad_json = post_raw(&stack, &token, "{not json").await;
    assert_eq!(bad_json.status().as_u16(), 400);
}

async fn post_raw(stack: &Stack, token: &str, body: &'static str) -> reqwest::Response {
    reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}
