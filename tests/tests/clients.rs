//! Conformance with real clients nobody here wrote: each is driven,
//! unchanged, against AEX in front of the mock provider. Clients are
//! installed outside the clone by `scripts/install-clients` (see
//! `aex_tests::clients` for how a missing one is reported).

use aex_tests::Stack;
use aex_tests::clients::{grpcurl, node_bin_with, python_with};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// Runs a driver script against the stack for `sdk_agents(prefix)`:
/// `PROGRAM SCRIPT BASE_URL EXTRA…` with the tokens in AEX_TOKEN_*; the
/// base URL is AEX's `/v1`, as OpenAI's clients take it.
async fn drive_as(
    stack: &Stack,
    prefix: &str,
    program: &std::path::Path,
    script: &str,
    extra: &[&std::path::Path],
) -> Value {
    drive_at(stack, "/v1", prefix, program, script, extra).await
}

/// `drive_as` with the base URL at `base_path` (Anthropic's clients take
/// the host: `""`).
async fn drive_at(
    stack: &Stack,
    base_path: &str,
    prefix: &str,
    program: &std::path::Path,
    script: &str,
    extra: &[&std::path::Path],
) -> Value {
    let mut cmd = Command::new(program);
    cmd.arg(script).arg(stack.url(base_path)).args(extra);
    for (name, token) in sdk_agents(stack, prefix) {
        cmd.env(format!("AEX_TOKEN_{name}"), token);
    }
    drive(cmd).await
}

/// Agents for an SDK driver: `PREFIX` can pay, `PREFIX-poor` cannot,
/// `PREFIX-fenced` may only use `sim`, `PREFIX-slow` has 30 RPM; plus a bad
/// token. Passed to the driver as AEX_TOKEN_{OK,POOR,FENCED,SLOW,BAD}.
fn sdk_agents(stack: &Stack, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("OK".into(), stack.agent(prefix, "1", "600", &[])),
        (
            "POOR".into(),
            stack.agent(&format!("{prefix}-poor"), "0.0001", "600", &[]),
        ),
        (
            "FENCED".into(),
            stack.agent(
                &format!("{prefix}-fenced"),
                "1",
                "600",
                &["--allowed-models", "sim"],
            ),
        ),
        (
            "SLOW".into(),
            stack.agent(&format!("{prefix}-slow"), "1", "30", &[]),
        ),
        ("BAD".into(), "aex_not_a_real_token".into()),
    ]
}

/// Runs a driver to completion and parses the JSON it prints.
async fn drive(mut cmd: Command) -> Value {
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run the driver");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the driver prints JSON")
}

fn denials(stack: &Stack, agent: &str, reason: &str) -> usize {
    stack
        .events(agent)
        .iter()
        .filter(|e| e["kind"] == "deny" && e["reason"] == reason)
        .count()
}

/// What both official SDKs must show: answers and usage as the provider
/// sent them, a tool round trip, denials as the SDK's own errors, refused
/// once where retrying cannot help, and a 429 retried after exactly the
/// wait AEX gave (and recorded).
fn assert_sdk_conformance(stack: &Stack, prefix: &str, seen: &Value) {
    assert_eq!(seen["chat"]["content"], "hello from mock");
    assert_eq!(seen["chat"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(seen["tools"]["called"], "weather");
    assert_eq!(seen["tools"]["answer"], "tool said: sunny in Paris");
    assert_eq!(seen["responses"]["text"], "hello from mock");
    assert_eq!(seen["responses"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["responses_stream"]["last"], "response.completed");
    assert_eq!(seen["responses_stream"]["deltas"], 5);
    assert_eq!(
        seen["responses_stream"]["text"],
        "word0 word1 word2 word3 word4 "
    );
    assert_eq!(
        seen["responses_stream"]["usage"],
        serde_json::json!([10, 5])
    );

    assert_eq!(
        (seen["402"]["status"].as_u64(), seen["402"]["code"].as_str()),
        (Some(402), Some("budget_exceeded"))
    );
    assert_eq!(seen["403"]["status"], 403);
    assert_eq!(seen["401"]["status"], 401);
    assert_eq!(
        denials(stack, &format!("{prefix}-poor"), "budget"),
        1,
        "402 is not retried"
    );
    assert_eq!(
        denials(stack, &format!("{prefix}-fenced"), "model"),
        1,
        "403 is not retried"
    );

    assert_429_retried_as_told(stack, &format!("{prefix}-slow"), &seen["429"]);
}

/// A call made right after the agent's burst was used up: refused once, then
/// retried after exactly the wait AEX sent (`retry-after-ms`, which the
/// OpenAI SDKs prefer to `Retry-After`) and recorded in its deny event.
fn assert_429_retried_as_told(stack: &Stack, agent: &str, rate: &Value) {
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
    let rpm_denials: Vec<u64> = stack
        .events(agent)
        .iter()
        .filter(|e| e["kind"] == "deny" && e["reason"] == "rpm")
        .map(|e| e["details"]["retry_after_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(rpm_denials.len(), 2, "the probe's 429 and the client's one");
    assert_eq!(
        rpm_denials[1], told,
        "the ledger recorded what the client was told"
    );
}

/// What both Anthropic SDKs must show (issue #16): messages and streams
/// with the mock's usage, the prompt cache's parts included; a tool round
/// trip, also streamed; count_tokens answered by the provider; models in
/// Anthropic's shape; denials as the SDK's own errors with Anthropic's error
/// types, 402 and 403 not retried; a 429 retried after exactly AEX's wait.
fn assert_anthropic_sdk_conformance(stack: &Stack, prefix: &str, seen: &Value) {
    use serde_json::json;
    assert_eq!(seen["message"]["text"], "hello from mock");
    assert_eq!(seen["message"]["usage"], json!([10, 5, 80, 20]));
    assert_eq!(seen["message"]["stop_reason"], "end_turn");
    assert_eq!(seen["stream"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(seen["stream"]["usage"], json!([10, 5, 0, 0]));
    assert_eq!(seen["tools"]["called"], "weather");
    assert_eq!(seen["tools"]["stop_reason"], "tool_use");
    assert_eq!(seen["tools"]["answer"], "tool said: sunny in Paris");
    assert_eq!(
        seen["tools_stream"],
        json!({"name": "weather", "input": {"city": "Paris"}})
    );
    assert_eq!(seen["count"], 42);
    assert_eq!(
        seen["models"],
        json!([
            "cached-model",
            "claude-model",
            "dead-model",
            "mock-model",
            "sim"
        ])
    );
    assert_eq!(
        (seen["402"]["status"].as_u64(), seen["402"]["type"].as_str()),
        (Some(402), Some("billing_error"))
    );
    assert_eq!(seen["403"]["error"], "PermissionDeniedError");
    assert_eq!(seen["403"]["type"], "permission_error");
    assert_eq!(seen["401"]["error"], "AuthenticationError");
    assert_eq!(seen["401"]["type"], "authentication_error");
    assert_eq!(
        denials(stack, &format!("{prefix}-poor"), "budget"),
        1,
        "402 is not retried"
    );
    assert_eq!(
        denials(stack, &format!("{prefix}-fenced"), "model"),
        1,
        "403 is not retried"
    );
    assert_429_retried_as_told(stack, &format!("{prefix}-slow"), &seen["429"]);
    // The cached message at cache prices (10 × 1 µ + 80 × 0.1 µ + 20 ×
    // 1.25 µ + 5 × 2 µ), then four calls of 10 input and 5 output tokens.
    assert_eq!(stack.inspect(prefix)["spent_micro"], 53 + 4 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_python_sdk_works_unchanged() {
    let Some(python) = python_with("anthropic", "the Anthropic Python SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_anthropic_python.py"
    );
    let seen = drive_at(&stack, "", "apy", &python, script, &[]).await;
    assert_anthropic_sdk_conformance(&stack, "apy", &seen);
    assert_eq!(seen["retrieved"], "claude-model", "models.retrieve");
    // Anthropic's SDKs have an error class of their own for a 402.
    assert_eq!(seen["402"]["error"], "PaymentRequiredError");
    // Only what AEX admitted reached the provider: five calls and the
    // count (SLOW's calls use the simulated provider).
    assert_eq!(stack.mock.count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_node_sdk_works_unchanged() {
    let Some(bin) = node_bin_with("@anthropic-ai/sdk", "the Anthropic npm SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_anthropic_node.mjs"
    );
    let seen = drive_at(
        &stack,
        "",
        "ajs",
        &bin.join("node"),
        script,
        &[bin.parent().unwrap()],
    )
    .await;
    assert_anthropic_sdk_conformance(&stack, "ajs", &seen);
    assert_eq!(seen["402"]["error"], "PaymentRequiredError");
    assert_eq!(stack.mock.count(), 6);
}

/// Translation (issue #16): the Anthropic SDK on a model whose provider
/// speaks OpenAI's API, the OpenAI SDK on one whose provider speaks
/// Anthropic's — streams and tool round trips included, usage as the mock
/// reported it, charged exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_work_across_the_two_apis() {
    use serde_json::json;
    let Some(python) = python_with("anthropic", "the Anthropic Python SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_translation_python.py"
    );
    let mut cmd = Command::new(&python);
    cmd.arg(script)
        .arg(stack.url(""))
        .env("AEX_TOKEN_OK", stack.agent("across", "1", "600", &[]));
    let seen = drive(cmd).await;
    assert_eq!(
        seen["anthropic_message"],
        json!({"text": "hello from mock", "stop_reason": "end_turn", "usage": [10, 5]})
    );
    assert_eq!(
        seen["anthropic_stream"],
        json!({"text": "word0 word1 word2 word3 word4 ", "usage": [10, 5]})
    );
    assert_eq!(seen["anthropic_tools"]["called"], "weather");
    assert_eq!(seen["anthropic_tools"]["input"], json!({"city": "Paris"}));
    assert_eq!(seen["anthropic_tools"]["stop_reason"], "tool_use");
    assert!(
        seen["anthropic_tools"]["answer"]
            .as_str()
            .unwrap()
            .starts_with("tool said: sunny in Paris"),
        "{seen}"
    );
    assert_eq!(
        seen["openai_chat"],
        json!({"text": "hello from mock", "model": "claude-model", "usage": [10, 5]})
    );
    assert_eq!(
        seen["openai_stream"],
        json!({"text": "word0 word1 word2 word3 word4 ", "usage": [10, 5]})
    );
    assert_eq!(
        seen["openai_tools"],
        json!({"called": "weather", "arguments": {"city": "Paris"},
            "finish_reason": "tool_calls", "answer": "tool said: sunny in Paris"})
    );
    let paths: Vec<String> = stack.mock.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/messages",
            "/v1/messages",
            "/v1/messages"
        ]
    );
    // Eight calls of 10 input and 5 output tokens at 1 µ and 2 µ.
    assert_eq!(stack.inspect("across")["spent_micro"], 8 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged() {
    let Some(python) = python_with("openai", "the OpenAI Python SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_openai_python.py"
    );
    let seen = drive_as(&stack, "py", &python, script, &[]).await;
    assert_sdk_conformance(&stack, "py", &seen);
    assert_eq!(seen["403"]["error"], "PermissionDeniedError");
    assert_eq!(seen["401"]["error"], "AuthenticationError");
    assert_eq!(
        seen["embeddings"]["vector"],
        serde_json::json!([0.1, 0.2]),
        "base64 decoded by the SDK"
    );
    assert_eq!(
        seen["models"],
        serde_json::json!([
            "cached-model",
            "claude-model",
            "dead-model",
            "mock-model",
            "sim"
        ])
    );
    assert_eq!(seen["retrieved"], "mock-model", "models.retrieve");
    assert_eq!(seen["retrieve_fenced"], "model_not_found");
    // The model the SDK asked for (mock-model), not the provider's id
    // (upstream-model), in every answer and every chunk (issue #33).
    for (what, model) in [
        ("chat", &seen["chat"]["model"]),
        ("responses", &seen["responses"]["model"]),
        ("responses stream", &seen["responses_stream"]["model"]),
        ("embeddings", &seen["embeddings"]["model"]),
    ] {
        assert_eq!(model, "mock-model", "{what}");
    }
    assert_eq!(seen["stream"]["models"], serde_json::json!(["mock-model"]));
    // Charged exactly the usage the SDK reported: chat, stream, the two tool
    // turns, responses and its stream at 10 + 5×2 µ each; embeddings 10 µ.
    assert_eq!(stack.inspect("py")["spent_micro"], 6 * 20 + 10);
    // Only the calls AEX admitted reached the provider (SLOW uses the
    // simulated one); models.list is answered by AEX.
    assert_eq!(stack.mock.count(), 7);
}

/// Calls over an agent's concurrency wait for a slot (issue #33): eight
/// concurrent 2 s streams at `--max-concurrent 2`, from the OpenAI Python
/// SDK with its default retries, all succeed; a slot is never held by more
/// than two, and no refusal reached the ledger but those the SDK saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_waits_for_a_concurrency_slot() {
    let Some(python) = python_with("openai", "the OpenAI Python SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let token = stack.agent("narrow", "1", "600", &["--max-concurrent", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/drive_openai_queue.py");
    let mut cmd = Command::new(&python);
    cmd.arg(script)
        .arg(stack.url("/v1"))
        .env("AEX_TOKEN_NARROW", &token);
    let seen = drive(cmd).await;
    println!("{seen}");
    let calls = seen.as_array().unwrap();
    assert_eq!(calls.len(), 8);
    for call in calls {
        assert_eq!(call["ok"], true, "{seen}");
        assert_eq!(call["text"], "word0 word1 word2 word3 word4 ");
    }
    // Four rounds of two: the last calls waited about three rounds.
    let longest = calls
        .iter()
        .map(|c| c["seconds"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(longest > 6.0, "{seen}");
    let agent = stack.settled("narrow", Duration::from_secs(5)).await;
    assert_eq!(agent["spent_micro"], 8 * 20);
    // What the SDK saw refused, if anything, is what the ledger holds.
    let refused = stack
        .events("narrow")
        .iter()
        .filter(|e| e["kind"] == "deny")
        .count();
    let admitted = stack
        .events("narrow")
        .iter()
        .filter(|e| e["kind"] == "admit")
        .count();
    assert_eq!(
        admitted, 8,
        "one admission per call, however long it waited"
    );
    println!("{refused} refusals after a wait ran out (the SDK retried them)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_node_sdk_v7_works_unchanged() {
    let Some(bin) = node_bin_with("openai", "the OpenAI npm SDK") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/drive_openai_node.mjs");
    let seen = drive_as(
        &stack,
        "js",
        &bin.join("node"),
        script,
        &[bin.parent().unwrap()],
    )
    .await;
    assert!(
        seen["version"].as_str().unwrap().starts_with("7."),
        "{seen}"
    );
    assert_sdk_conformance(&stack, "js", &seen);
    assert_eq!(seen["402"]["error"], "APIError");
    assert_eq!(seen["403"]["error"], "PermissionDeniedError");
    assert_eq!(seen["401"]["error"], "AuthenticationError");
    assert_eq!(stack.inspect("js")["spent_micro"], 6 * 20);
    assert_eq!(stack.mock.count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_agents_runs_a_tool_through_the_responses_api() {
    let Some(python) = python_with("agents", "openai-agents") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_openai_agents.py"
    );
    let seen = drive_as(&stack, "agents", &python, script, &[]).await;
    for run in ["run", "streamed"] {
        // (The mock streams its words after the tool's output.)
        assert!(
            seen[run]["final"]
                .as_str()
                .unwrap()
                .starts_with("tool said: sunny in Paris"),
            "{seen}"
        );
        assert_eq!(seen[run]["requests"], 2, "the tool call, then the answer");
        assert_eq!(seen[run]["usage"], serde_json::json!([20, 10]));
    }
    assert_eq!(seen["streamed"]["completed"], 2);
    assert_eq!(
        (seen["402"]["status"].as_u64(), seen["402"]["code"].as_str()),
        (Some(402), Some("budget_exceeded"))
    );
    assert_eq!(seen["403"]["error"], "PermissionDeniedError");
    assert_eq!(seen["401"]["error"], "AuthenticationError");
    assert_eq!(denials(&stack, "agents-poor", "budget"), 1);
    assert_eq!(denials(&stack, "agents-fenced", "model"), 1);
    assert_429_retried_as_told(&stack, "agents-slow", &seen["429"]);

    // Every model call went to /v1/responses with the tool, and the tool's
    // output came back to the model; the ledger charged what the agent saw.
    let requests = stack.mock.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.path == "/v1/responses"));
    assert_eq!(requests[0].body["tools"][0]["name"], "weather");
    let replayed = requests[1].body["input"].as_array().unwrap();
    assert_eq!(
        replayed.last().unwrap()["type"],
        "function_call_output",
        "{replayed:?}"
    );
    assert_eq!(stack.inspect("agents")["spent_micro"], 2 * (20 + 2 * 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_streaming_without_stream_options_is_billed_for_real_usage() {
    let Some(python) = python_with("langchain_openai", "langchain-openai") else {
        return;
    };
    let stack = Stack::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/drive_langchain_openai.py"
    );
    let seen = drive_as(&stack, "langchain", &python, script, &[]).await;
    assert_eq!(seen["invoke"]["content"], "hello from mock");
    assert_eq!(seen["invoke"]["usage"], serde_json::json!([10, 5]));
    assert_eq!(seen["stream"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(
        seen["stream"]["client_saw_usage"], false,
        "the client never asked for usage, and got none"
    );
    // Denials arrive as the OpenAI SDK's errors, sent once; a 429 is
    // retried after the wait AEX gave.
    assert_eq!(
        (seen["402"]["status"].as_u64(), seen["402"]["code"].as_str()),
        (Some(402), Some("budget_exceeded"))
    );
    // (langchain-openai re-raises them as its subclasses of the SDK's errors)
    assert_eq!(seen["403"]["error"], "OpenAIPermissionDeniedError");
    assert_eq!(seen["401"]["error"], "OpenAIAuthenticationError");
    assert_eq!(denials(&stack, "langchain-poor", "budget"), 1);
    assert_eq!(denials(&stack, "langchain-fenced", "model"), 1);
    assert_429_retried_as_told(&stack, "langchain-slow", &seen["429"]);

    let requests = stack.mock.requests();
    assert_eq!(requests.len(), 2, "only admitted calls reach the provider");
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
        .events("langchain")
        .into_iter()
        .filter(|e| e["kind"] == "settle")
        .collect();
    assert!(
        settles
            .iter()
            .all(|e| e["details"]["usage_reported"] == true),
        "{settles:?}"
    );
}

/// Runs grpcurl against the control plane; returns (success, stdout, stderr).
fn run_grpcurl(grpcurl: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl)
        .args(args)
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_by_reflection_and_manages_agents() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let stack = Stack::start().await;
    let addr = stack.control.addr.to_string();
    let admin = format!("authorization: Bearer {}", stack.home.admin_token());

    // Reflection needs no credential: it only describes the API.
    let (ok, services, err) = run_grpcurl(&grpcurl, &["-plaintext", &addr, "list"]);
    assert!(ok, "{err}");
    for service in [
        "aex.v1.AgentService",
        "aex.v1.AdmissionService",
        "aex.v1.LedgerService",
        "aex.v1.ModelService",
        "aex.v1.ProcessService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.lines().any(|l| l == service), "{services}");
    }
    let (ok, described, err) = run_grpcurl(
        &grpcurl,
        &["-plaintext", &addr, "describe", "aex.v1.CreateAgentRequest"],
    );
    assert!(ok && described.contains("budget_micro"), "{described}{err}");

    let (ok, health, err) = run_grpcurl(
        &grpcurl,
        &["-plaintext", &addr, "grpc.health.v1.Health/Check"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "SERVING"
    );

    // Without the admin credential: refused, with a reason.
    let create = r#"{"name": "from-grpcurl", "budget_micro": 2500000, "rpm": 60}"#;
    let (ok, _, err) = run_grpcurl(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            create,
            &addr,
            "aex.v1.AgentService/CreateAgent",
        ],
    );
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");

    let (ok, created, err) = run_grpcurl(
        &grpcurl,
        &[
            "-plaintext",
            "-H",
            &admin,
            "-d",
            create,
            &addr,
            "aex.v1.AgentService/CreateAgent",
        ],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&created).unwrap();
    assert!(created["token"].as_str().unwrap().starts_with("aex_"));
    // grpcurl prints int64 as a JSON string (proto3 JSON mapping).
    assert_eq!(created["agent"]["budgetMicro"], "2500000");

    let (ok, listed, err) = run_grpcurl(
        &grpcurl,
        &[
            "-plaintext",
            "-H",
            &admin,
            &addr,
            "aex.v1.AgentService/ListAgents",
        ],
    );
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from-grpcurl"]);
    // And aexctl sees the same agent.
    assert_eq!(stack.inspect("from-grpcurl")["budget_micro"], 2_500_000);
}
