//! An HTTP-level fuzzer against the running data plane: random requests
//! (hostile bodies, headers, framing, pipelining, half-closes, byte-level
//! mutations) over raw TCP, then the ledger is checked.
//!
//! Bounded for CI (`AEX_FUZZ_CASES`, default 20,000); run longer with e.g.
//! `AEX_FUZZ_CASES=1000000 cargo test -p aex-dataplane --test fuzz_http -- --nocapture`.
//! The seed is printed; `AEX_FUZZ_SEED=N` replays a run.
//!
//! Asserted: no 5xx of AEX's own (the provider is the simulated one, which
//! never fails), no silent close or reset of a well-framed request, both
//! daemons alive, `aexctl audit` passing, `spent <= budget`, and `status`
//! counting exactly the calls the clients saw admitted.

use aex_tests::Stack;
use aex_tests::rng::{Rng, seed_from_env};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod common;
use common::wire::{Answer, parse_answers, try_converse};

/// What a case is, so the right things can be asserted about its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Well-framed requests: each must be answered, in order.
    Framed { requests: usize },
    /// Bytes that may or may not be HTTP: only "no 5xx, no crash".
    Mutated,
}

struct Case {
    kind: Kind,
    bytes: Vec<u8>,
    half_close: bool,
}

const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/nope",
    "/v1/chat/completions?x=1",
];

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "20",
    "129",
    "1.5",
    "1e308",
    "18446744073709551615",
    "null",
    "true",
    "\"7\"",
    "[]",
    "{}",
];

fn json_body(rng: &mut Rng, path: &str) -> Vec<u8> {
    if rng.chance(8) {
        // Not JSON at all, or not UTF-8.
        let junk: [&[u8]; 5] = [b"{not json", b"\xff\xfe{}", b"", b"[1,2]", b"null"];
        let picked = rng.pick::<&[u8]>(&junk);
        return picked.to_vec();
    }
    let model = *rng.pick(&[
        "\"sim\"", "\"sim\"", "\"sim\"", "\"nope\"", "5", "\"\"", "null",
    ]);
    let mut fields = vec![format!("\"model\":{model}")];
    let content = match rng.below(4) {
        0 => "\"hi\"".to_string(),
        1 => format!("\"{}\"", "x".repeat(rng.below(5000) as usize)),
        2 => "[{\"type\":\"text\",\"text\":\"hi\"}]".to_string(),
        _ => "7".to_string(),
    };
    match path {
        p if p.starts_with("/v1/chat") => {
            if !rng.chance(5) {
                fields.push(format!(
                    "\"messages\":[{{\"role\":\"user\",\"content\":{content}}}]"
                ));
            }
        }
        "/v1/completions" => fields.push("\"prompt\":\"hi\"".into()),
        _ => fields.push(format!("\"input\":{content}")),
    }
    for name in [
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "stream",
        "tools",
        "stream_options",
    ] {
        if rng.chance(7) {
            let value = match name {
                "stream" => *rng.pick(&["true", "false", "\"yes\"", "null"]),
                "tools" => *rng.pick(&[
                    "[]",
                    "{}",
                    "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]",
                ]),
                "stream_options" => *rng.pick(&["{\"include_usage\":true}", "3"]),
                _ => *rng.pick(VALUES),
            };
            fields.push(format!("\"{name}\":{value}"));
        }
    }
    if rng.chance(10) {
        fields.push(format!(
            "\"x_unknown_{}\":{}",
            rng.below(9),
            rng.pick(VALUES)
        ));
    }
    let mut body = format!("{{{}}}", fields.join(",")).into_bytes();
    if rng.chance(3) {
        // A duplicate key or trailing garbage.
        let tails: [&[u8]; 3] = [b" ", b"}", b",\"model\":\"sim\"}"];
        let tail = rng.pick::<&[u8]>(&tails);
        body.extend_from_slice(tail);
    }
    body
}

fn header_lines(rng: &mut Rng, tokens: &[String]) -> String {
    let mut out = String::from("Host: aex\r\n");
    match rng.below(10) {
        0 => {}
        1 => out.push_str("Authorization: Bearer aex_not_a_real_token\r\n"),
        2 => out.push_str("Authorization: Basic Zm9vOmJhcg==\r\n"),
        _ => out.push_str(&format!("Authorization: Bearer {}\r\n", rng.pick(tokens))),
    }
    if rng.chance(70) {
        out.push_str("Content-Type: application/json\r\n");
    }
    for _ in 0..rng.below(4) {
        let name = *rng.pick(&[
            "OpenAI-Organization",
            "OpenAI-Project",
            "X-Custom",
            "Idempotency-Key",
            "traceparent",
            "Accept",
            "Cookie",
            "Expect",
            "Connection",
        ]);
        let value = match rng.below(4) {
            0 => "x".repeat(rng.below(10_000) as usize),
            1 => "close".to_string(),
            2 => "100-continue".to_string(),
            _ => format!("v{}", rng.below(1000)),
        };
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out
}

/// One well-framed request: Content-Length or chunked, any method.
fn framed_request(rng: &mut Rng, tokens: &[String]) -> Vec<u8> {
    let path = *rng.pick(PATHS);
    let method = if rng.chance(85) {
        if path.starts_with("/v1/models")
            || path.starts_with("/healthz")
            || path.starts_with("/readyz")
        {
            "GET"
        } else {
            "POST"
        }
    } else {
        *rng.pick(&["GET", "PUT", "DELETE", "OPTIONS", "PATCH"])
    };
    let headers = header_lines(rng, tokens);
    let body = if method == "GET" {
        Vec::new()
    } else {
        json_body(rng, path)
    };
    let mut out = format!("{method} {path} HTTP/1.1\r\n{headers}").into_bytes();
    // Connection: close would end the conversation early; keep framing simple.
    if rng.chance(20) && !body.is_empty() {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for part in body.chunks(1 + rng.below(64) as usize) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
    }
    out
}

fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(5) {
            0 => bytes[at] = rng.next_u64() as u8,
            1 => {
                bytes.remove(at);
            }
            2 => bytes.insert(
                at,
                *rng.pick(&[b'\r', b'\n', b'\0', b' ', b':', 0x80, b'\t']),
            ),
            3 => bytes.truncate(at),
            _ => {
                let from = rng.below(bytes.len() as u64) as usize;
                let piece: Vec<u8> = bytes[from..(from + 16).min(bytes.len())].to_vec();
                bytes.splice(at..at, piece);
            }
        }
    }
    bytes
}

fn case(rng: &mut Rng, tokens: &[String]) -> Case {
    match rng.below(10) {
        // Several requests in one write, answered in order.
        0 | 1 => {
            let n = 2 + rng.below(3) as usize;
            let mut bytes = Vec::new();
            for _ in 0..n {
                bytes.extend(framed_request(rng, tokens));
            }
            Case {
                kind: Kind::Framed { requests: n },
                bytes,
                half_close: true,
            }
        }
        2..=3 => Case {
            kind: Kind::Mutated,
            bytes: {
                let framed = framed_request(rng, tokens);
                mutate(rng, framed)
            },
            half_close: true,
        },
        _ => Case {
            kind: Kind::Framed { requests: 1 },
            bytes: framed_request(rng, tokens),
            half_close: true,
        },
    }
}

#[derive(Default)]
struct Tally {
    cases: AtomicU64,
    answers: AtomicU64,
    admitted: AtomicU64,
    by_class: [AtomicU64; 6],
}

fn check(case: &Case, answers: &[Answer], raw: &[u8]) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(400)]).to_string();
    for a in answers.iter().filter(|a| a.status >= 200) {
        // 501 (unknown transfer coding) and 505 (HTTP version) are the
        // protocol's answers to mangled bytes, not failures.
        let protocol_answer = case.kind == Kind::Mutated && matches!(a.status, 501 | 505);
        if a.status >= 500 && !protocol_answer {
            return Err(format!(
                "AEX answered {} to {:?}\nreply: {}",
                a.status,
                shown(),
                String::from_utf8_lossy(&a.body)
            ));
        }
        if a.status >= 400 && serde_json::from_slice::<serde_json::Value>(&a.body).is_err() {
            return Err(format!(
                "a {} without a JSON body for {:?}",
                a.status,
                shown()
            ));
        }
    }
    let finals = answers.iter().filter(|a| a.status >= 200).count();
    if let Kind::Framed { requests } = case.kind
        && finals != requests
        // A 4xx that closes the connection (413, 431) ends the pipeline.
        && answers.last().is_none_or(|a| a.header("connection") != Some("close"))
    {
        return Err(format!(
            "{finals} answers to {requests} well-framed requests: {:?}\nreplies: {}",
            shown(),
            String::from_utf8_lossy(&raw[..raw.len().min(600)])
        ));
    }
    Ok(())
}

fn run_worker(
    addr: SocketAddr,
    seed: u64,
    cases: u64,
    tokens: Arc<Vec<String>>,
    tally: Arc<Tally>,
) -> Result<(), String> {
    let mut rng = Rng(seed);
    for i in 0..cases {
        let case = case(&mut rng, &tokens);
        let raw = match try_converse(addr, &case.bytes, case.half_close, Duration::from_secs(10)) {
            Ok(raw) => raw,
            Err((e, got)) if matches!(case.kind, Kind::Framed { .. }) => {
                return Err(format!(
                    "case {i} of worker seed {seed}: reset ({e}) after {} bytes for a well-framed request: {:?}",
                    got.len(),
                    String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(400)])
                ));
            }
            Err((_, got)) => got,
        };
        let answers = parse_answers(&raw);
        check(&case, &answers, &raw).map_err(|e| format!("case {i} of worker seed {seed}: {e}"))?;
        tally.cases.fetch_add(1, Ordering::Relaxed);
        tally
            .answers
            .fetch_add(answers.len() as u64, Ordering::Relaxed);
        for a in &answers {
            // A call the control plane admitted (success, streamed or not).
            if a.header("x-aex-remaining-micro").is_some() {
                tally.admitted.fetch_add(1, Ordering::Relaxed);
            }
            let class = match a.status {
                200..=299 => 0,
                400 => 1,
                401 | 403 => 2,
                402 | 429 => 3,
                404 | 405 | 408 | 411..=415 | 431 => 4,
                _ => 5,
            };
            tally.by_class[class].fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_survives_hostile_http() {
    let seed = seed_from_env("AEX_FUZZ_SEED");
    let cases: u64 = std::env::var("AEX_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    println!("http fuzz: seed {seed}, {cases} cases (replay with AEX_FUZZ_SEED={seed})");
    eprintln!("http fuzz: seed {seed}, {cases} cases (replay with AEX_FUZZ_SEED={seed})");

    let stack = Stack::start_with(&["--max-body-bytes", "65536"]).await;
    let rich = stack.agent("rich", "1000", "1000000", &[]);
    let poor = stack.agent("poor", "0.0001", "1000000", &[]);
    let slow = stack.agent("slow", "1000", "30", &[]);
    let tokens = Arc::new(vec![rich.clone(), rich.clone(), rich, poor, slow]);
    let tally = Arc::new(Tally::default());
    let workers = 4u64;
    let addr = stack.data.addr;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (tokens, tally) = (tokens.clone(), tally.clone());
            let worker_seed = seed.wrapping_add(w.wrapping_mul(0x9e37_79b9));
            let share = cases / workers + u64::from(w < cases % workers);
            std::thread::spawn(move || run_worker(addr, worker_seed, share, tokens, tally))
        })
        .collect();
    let results: Vec<_> = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for r in &results {
        if let Err(e) = r {
            panic!("seed {seed}: {e}");
        }
    }
    let by_class: Vec<u64> = tally
        .by_class
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    println!(
        "http fuzz: {} cases, {} answers (2xx {}, 400 {}, 401/403 {}, 402/429 {}, other 4xx {}, rest {}), {} admitted",
        tally.cases.load(Ordering::Relaxed),
        tally.answers.load(Ordering::Relaxed),
        by_class[0],
        by_class[1],
        by_class[2],
        by_class[3],
        by_class[4],
        by_class[5],
        tally.admitted.load(Ordering::Relaxed),
    );
    assert_eq!(tally.cases.load(Ordering::Relaxed), cases);
    assert_eq!(
        aex_tests::http_status(addr, "/healthz"),
        Some(200),
        "data plane alive"
    );

    // Every admitted call settles; then the ledger must agree with the clients.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = stack.control.aexctl(&["status", "--json"]);
        status.assert_ok();
        let s = status.json();
        if s["total_reserved_micro"] == 0 {
            assert_eq!(
                s["requests_served"].as_u64().unwrap(),
                tally.admitted.load(Ordering::Relaxed),
                "status counts exactly the calls clients saw admitted: {s}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reservations still open: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in ["rich", "poor", "slow"] {
        let a = stack.inspect(name);
        assert!(
            a["spent_micro"].as_i64() <= a["budget_micro"].as_i64(),
            "{a}"
        );
    }
    let audit = stack.control.aexctl(&["audit", "--json"]);
    assert_eq!(
        audit.code(),
        0,
        "audit failed after the fuzz:\n{}",
        audit.stdout
    );
}
