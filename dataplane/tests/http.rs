//! HTTP/1.1 at the wire: half-closed and pipelined requests are answered in
//! order, and every malformed request gets its 4xx with a JSON body instead
//! of a silent close. Raw TCP against the real data plane.

use aex_tests::Stack;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

mod common;
use common::wire::{converse, parse_answers};

fn post(path: &str, token: &str, body: &Value, extra: &str) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: aex\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn chat() -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})
}

/// Before: a request followed by `shutdown(SHUT_WR)` got no answer and was
/// settled "client_disconnected" although the provider was called.
#[tokio::test]
async fn a_half_closed_request_is_answered_and_billed() {
    let stack = Stack::start().await;
    let token = stack.agent("half", "1", "600", &[]);
    let raw = post(
        "/v1/chat/completions",
        &token,
        &chat(),
        "x-mock-delay-ms: 300\r\n",
    );
    let addr = stack.data.addr;
    let got =
        tokio::task::spawn_blocking(move || converse(addr, &raw, true, Duration::from_secs(5)))
            .await
            .unwrap();
    let answers = parse_answers(&got);
    assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&got));
    assert_eq!(answers[0].status, 200);
    assert_eq!(
        answers[0].json()["choices"][0]["message"]["content"],
        "hello from mock"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = stack.events("half");
    let settle = events
        .iter()
        .find(|e| e["kind"] == "settle")
        .expect("settled");
    assert_eq!(settle["reason"], "completed");
}

/// Before: every pipelined request after the first was dropped (even three
/// `GET /healthz`), and one sent while the first waited reset the
/// connection, losing the first response.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let stack = Stack::start().await;
    let token = stack.agent("pipe", "1", "600", &[]);
    let addr = stack.data.addr;
    let three = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let got = tokio::task::spawn_blocking(move || {
        converse(addr, &three, false, Duration::from_millis(1500))
    })
    .await
    .unwrap();
    let statuses: Vec<u16> = parse_answers(&got).iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 404]);

    // The second request arrives while the first waits for the provider.
    let first = post(
        "/v1/chat/completions",
        &token,
        &chat(),
        "x-mock-delay-ms: 400\r\n",
    );
    let second = post("/v1/chat/completions", &token, &chat(), "");
    let got = tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        tcp.write_all(&first).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        tcp.write_all(&second).unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).expect("both answers, no reset");
        got
    })
    .await
    .unwrap();
    let answers = parse_answers(&got);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200], "{}", String::from_utf8_lossy(&got));
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| a.header("x-aex-request-id").unwrap())
        .collect();
    assert_ne!(ids[0], ids[1]);
}

/// The malformed-request table of the hardening issue. Before, each was
/// closed without a word (4,460 of the fuzz cases).
pub fn malformed_cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let many: String = (0..300).map(|i| format!("x-h{i}: v\r\n")).collect();
    let huge = format!("x-big: {}\r\n", "a".repeat(1_100_000));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(100_000));
    vec![
        (
            "more than 256 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: a\r\n{many}\r\n").into_bytes(),
            431,
        ),
        (
            "more than 1 MiB of headers",
            format!("GET /healthz HTTP/1.1\r\nHost: a\r\n{huge}\r\n").into_bytes(),
            431,
        ),
        (
            "bare CR in a value",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n".to_vec(),
            400,
        ),
        (
            "NUL in a value",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n".to_vec(),
            400,
        ),
        (
            "obs-fold",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n".to_vec(),
            400,
        ),
        (
            "duplicate Host",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bad Content-Length",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 12x\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "conflicting Content-Length",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "unknown Transfer-Encoding",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            501,
        ),
        ("HTTP/0.9", b"GET /healthz\r\n\r\n".to_vec(), 400),
        (
            "HTTP/1.2",
            b"GET /healthz HTTP/1.2\r\nHost: a\r\n\r\n".to_vec(),
            505,
        ),
        (
            "HTTP/2.0",
            b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n".to_vec(),
            505,
        ),
        (
            "HTTP/9.9",
            b"GET /healthz HTTP/9.9\r\nHost: a\r\n\r\n".to_vec(),
            505,
        ),
        ("a 100 KB URI", long_uri.into_bytes(), 414),
        (
            "a path that is not UTF-8",
            b"GET /v1/mod\xe9ls HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a UTF-8 path",
            "GET /v1/modèls HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                .as_bytes()
                .to_vec(),
            404,
        ),
        (
            "absolute form, Host agrees",
            b"GET http://aex/healthz HTTP/1.1\r\nHost: aex\r\nConnection: close\r\n\r\n".to_vec(),
            200,
        ),
        (
            "absolute form, Host differs (RFC 9112 3.2.2: the target wins)",
            b"GET http://aex:9000/healthz HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n".to_vec(),
            200,
        ),
    ]
}

#[tokio::test]
async fn every_malformed_request_gets_its_status_and_a_json_body() {
    let stack = Stack::start().await;
    let addr = stack.data.addr;
    for (what, raw, want) in malformed_cases() {
        let got = tokio::task::spawn_blocking(move || {
            converse(addr, &raw, false, Duration::from_secs(3))
        })
        .await
        .unwrap();
        let answers = parse_answers(&got);
        assert_eq!(
            answers.len(),
            1,
            "{what}: {}",
            String::from_utf8_lossy(&got[..got.len().min(300)])
        );
        let a = &answers[0];
        assert_eq!(a.status, want, "{what}");
        let body = a.json();
        if want >= 400 {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}: {body}"
            );
            assert!(body["error"]["code"].is_string(), "{what}: {body}");
        }
    }
    assert_eq!(
        aex_tests::http_status(addr, "/healthz"),
        Some(200),
        "still serving"
    );
    let metrics = common::metrics_text(&stack).await;
    let malformed: f64 = [400, 414, 431, 501, 505]
        .iter()
        .map(|s| {
            aex_tests::prometheus_value(
                &metrics,
                "aex_requests_total",
                &[("status", &s.to_string()), ("reason", "malformed")],
            )
        })
        .sum();
    assert_eq!(malformed, 15.0, "every one is counted");
}

/// Before: no deadline for a request's headers (a client trickling bytes
/// held a connection forever) and no cap on connections.
#[tokio::test]
async fn a_slow_head_gets_408_and_connections_past_the_cap_get_503() {
    let stack = Stack::start_with(&["--header-timeout-ms", "400", "--max-connections", "2"]).await;
    let addr = stack.data.addr;
    let got = tokio::task::spawn_blocking(move || {
        converse(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n",
            false,
            Duration::from_secs(3),
        )
    })
    .await
    .unwrap();
    let answers = parse_answers(&got);
    assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&got));
    assert_eq!(answers[0].status, 408);
    assert_eq!(answers[0].json()["error"]["code"], "request_timeout");

    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            // Complete requests keep the connection (keep-alive), so both
            // slots stay taken while the third arrives.
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf).unwrap();
            c
        })
        .collect();
    let got = tokio::task::spawn_blocking(move || {
        converse(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
            false,
            Duration::from_secs(3),
        )
    })
    .await
    .unwrap();
    let answers = parse_answers(&got);
    assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&got));
    assert_eq!(answers[0].status, 503);
    assert_eq!(answers[0].header("retry-after"), Some("1"));
    assert_eq!(answers[0].json()["error"]["code"], "overloaded");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(aex_tests::http_status(addr, "/healthz"), Some(200));
}

/// Found by the HTTP fuzzer: a streamed answer was delimited by closing the
/// connection (no chunked encoding) while it said `Connection: keep-alive`,
/// so whatever was sent after a stream on that connection was lost.
#[tokio::test]
async fn a_connection_outlives_a_stream() {
    let stack = Stack::start().await;
    let token = stack.agent("streamer", "1", "600", &[]);
    let mut streamed = chat();
    streamed["stream"] = json!(true);
    let mut raw = post("/v1/chat/completions", &token, &streamed, "");
    raw.extend(post("/v1/chat/completions", &token, &chat(), ""));
    let addr = stack.data.addr;
    let got =
        tokio::task::spawn_blocking(move || converse(addr, &raw, true, Duration::from_secs(5)))
            .await
            .unwrap();
    let answers = parse_answers(&got);
    assert_eq!(answers.len(), 2, "{}", String::from_utf8_lossy(&got));
    assert_eq!(answers[0].header("transfer-encoding"), Some("chunked"));
    assert!(String::from_utf8_lossy(&answers[0].body).ends_with("data: [DONE]\n\n"));
    assert_eq!(answers[1].status, 200);
}
