//! Conformance with real clients nobody here wrote: each is driven,
//! unchanged, against AEX in front of the mock provider. Clients are
//! installed outside the clone by `scripts/install-clients`; where one is
//! missing the test says so loudly and skips, unless AEX_REQUIRE_CLIENTS=1
//! (as in `.ci/run`), where a missing client fails.

use aex_tests::Stack;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn clients_dir() -> PathBuf {
    std::env::var_os("AEX_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/aex-clients")
        })
}

/// The venv's python if `module` imports there, else None (after saying so).
fn python_with(module: &str, client: &str) -> Option<PathBuf> {
    let python = clients_dir().join("venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let message = format!(
        "{client} is not installed in {}; run scripts/install-clients",
        clients_dir().display()
    );
    if std::env::var("AEX_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{message}");
    }
    eprintln!("\n!!! SKIPPED: {message} !!!\n");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged() {
    let Some(python) = python_with("openai", "the OpenAI Python SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let tokens = [
        ("OK", stack.agent("sdk", "1", "600", &[])),
        ("POOR", stack.agent("sdk-poor", "0.0001", "600", &[])),
        (
            "FENCED",
            stack.agent("sdk-fenced", "1", "600", &["--allowed-models", "sim"]),
        ),
        ("SLOW", stack.agent("sdk-slow", "1", "30", &[])),
        ("BAD", "aex_not_a_real_token".to_string()),
    ];
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_openai_python.py"
    );
    let mut cmd = Command::new(&python);
    cmd.arg(script).arg(stack.url("/v1"));
    for (name, token) in &tokens {
        cmd.env(format!("AEX_TOKEN_{name}"), token);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the driver prints JSON");

    assert_eq!(seen["chat"]["content"], "hello from mock");
    assert_eq!(seen["chat"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(seen["tools"]["finish_reason"], "stop");
    assert_eq!(seen["responses"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["responses_stream"]["last"], "response.completed");
    assert_eq!(
        seen["embeddings"]["vector"],
        serde_json::json!([0.1, 0.2]),
        "base64 decoded by the SDK"
    );
    assert_eq!(
        seen["models"],
        serde_json::json!(["dead-model", "mock-model", "sim"])
    );

    // Denials: the SDK's own exception types, no retries where none help.
    assert_eq!(
        (seen["402"]["status"].as_u64(), seen["402"]["code"].as_str()),
        (Some(402), Some("budget_exceeded"))
    );
    assert_eq!(seen["403"]["error"], "PermissionDeniedError");
    assert_eq!(seen["401"]["error"], "AuthenticationError");

    // The ledger agrees: charged exactly the usage the SDK reported, and
    // every refused call refused once (402/403/401 are not retried).
    let agent = stack.inspect("sdk");
    // chat, stream, tools, responses, responses stream: 10 + 5×2 µ each; embeddings 10 µ.
    assert_eq!(agent["spent_micro"], 5 * 20 + 10);
    let events = |name: &str| {
        stack
            .control
            .aexctl(&["events", "--agent", name, "--json"])
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let denials = |name: &str, reason: &str| {
        events(name)
            .iter()
            .filter(|e| e["kind"] == "deny" && e["reason"] == reason)
            .count()
    };
    assert_eq!(denials("sdk-poor", "budget"), 1, "402 is not retried");
    assert_eq!(denials("sdk-fenced", "model"), 1, "403 is not retried");
    // 429: the SDK's call was refused once, then retried after exactly the
    // wait the ledger recorded (retry-after-ms takes precedence in the SDK).
    let rate = &seen["429"];
    assert!(rate["burned"].as_u64().unwrap() >= 30, "{rate}");
    assert_eq!(rate["statuses"], serde_json::json!([429, 200]), "{rate}");
    let told: u64 = rate["retry_after_ms"][0].as_str().unwrap().parse().unwrap();
    let told_seconds: u64 = rate["retry_after"][0].as_str().unwrap().parse().unwrap();
    assert_eq!(told_seconds, told.div_ceil(1000), "{rate}");
    let waited = rate["waited_ms"][0].as_u64().unwrap();
    assert!(
        waited + 5 >= told && waited < told + 500,
        "waited {waited} ms, AEX said {told} ms"
    );
    let rpm_denials: Vec<u64> = events("sdk-slow")
        .iter()
        .filter(|e| e["kind"] == "deny" && e["reason"] == "rpm")
        .map(|e| e["details"]["retry_after_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(rpm_denials.len(), 2, "the probe's 429 and the SDK's one");
    assert_eq!(rpm_denials[1], told, "the ledger recorded what the SDK was told");
    // Only the calls AEX admitted reached the provider (SLOW uses the simulated one).
    assert_eq!(
        stack.mock.count(),
        6,
        "{:?}",
        stack
            .mock
            .requests()
            .iter()
            .map(|r| &r.path)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_streaming_without_stream_options_is_billed_for_real_usage() {
    let Some(python) = python_with("langchain_openai", "langchain-openai") else {
        return;
    };
    let stack = Stack::start().await;
    let token = stack.agent("langchain", "1", "600", &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_langchain_openai.py"
    );
    let mut cmd = Command::new(&python);
    cmd.arg(script)
        .arg(stack.url("/v1"))
        .env("AEX_TOKEN_OK", &token);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the driver prints JSON");
    assert_eq!(seen["invoke"]["content"], "hello from mock");
    assert_eq!(seen["invoke"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(
        seen["stream"]["client_saw_usage"], false,
        "the client never asked for usage, and got none"
    );
    let requests = stack.mock.requests();
    let streamed = &requests[1].body;
    assert_eq!(streamed["stream"], true);
    assert_eq!(
        streamed["stream_options"]["include_usage"], true,
        "AEX asked the provider for usage"
    );
    let agent = stack.inspect("langchain");
    // Both calls billed from the provider's usage: 10 + 5 × 2 µ each.
    assert_eq!(agent["spent_micro"], 40);
    let settles: Vec<Value> = stack
        .control
        .aexctl(&["events", "--agent", "langchain", "--json"])
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "settle")
        .collect();
    assert!(
        settles
            .iter()
            .all(|e| e["details"]["usage_reported"] == true),
        "{settles:?}"
    );
}
