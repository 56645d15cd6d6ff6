//! Claude Code (npm `@anthropic-ai/claude-code`), unchanged and headless
//! (`claude -p … --output-format json`), through AEX in front of the mock
//! as an `anthropic` provider (issue #16). Its base URL and key are the only
//! things pointed at AEX; telemetry, auto-updates and other non-essential
//! traffic are off, and every run has a throwaway config directory, so
//! nothing leaves 127.0.0.1.

use aex_tests::Stack;
use aex_tests::clients::node_bin_with;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One run's private directories: its config (`CLAUDE_CONFIG_DIR`, also
/// `HOME`) and its working directory.
struct Run {
    dir: tempfile::TempDir,
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "Claude Code printed no JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// The environment that keeps Claude Code to AEX alone: no telemetry, no
/// error reports, no update checks, no other non-essential traffic, and
/// every model it may pick (the main one and the small, fast one) the
/// model AEX serves.
const QUIET: &[(&str, &str)] = &[
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_TELEMETRY", "1"),
    ("DISABLE_ERROR_REPORTING", "1"),
    ("DISABLE_AUTOUPDATER", "1"),
    ("ANTHROPIC_MODEL", "claude-model"),
    ("ANTHROPIC_SMALL_FAST_MODEL", "claude-model"),
    ("ANTHROPIC_DEFAULT_HAIKU_MODEL", "claude-model"),
    ("NO_COLOR", "1"),
];

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::write(dir.path().join("work/note.txt"), "remember the milk\n").unwrap();
        Self { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// `PROGRAM ARGS…` in this run's workspace with the quiet environment
    /// and `env`, off the async runtime.
    async fn run(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> Ran {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(self.dir.path().join("work"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.config())
            .env("CLAUDE_CONFIG_DIR", self.config());
        for (k, v) in QUIET {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .expect("run Claude Code");
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `claude -p PROMPT --output-format json`, for its arguments.
fn print_mode(prompt: &str) -> Vec<&str> {
    vec!["-p", prompt, "--output-format", "json"]
}

fn claude(bin: &Path) -> PathBuf {
    bin.join("claude")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_a_tool_turn_through_aex_and_is_charged_what_the_mock_reported() {
    let Some(bin) = node_bin_with("@anthropic-ai/claude-code", "Claude Code") else {
        return;
    };
    let stack = Stack::start().await;
    let token = stack.agent("claude-code", "1", "600", &[]);
    let run = Run::new();
    let env = [
        ("ANTHROPIC_BASE_URL", stack.url("")),
        ("ANTHROPIC_API_KEY", token.clone()),
    ];
    let ran = run
        .run(
            &claude(&bin),
            &print_mode("use_tool:Read and say what you found"),
            &env,
        )
        .await;
    let seen = ran.json();
    assert_eq!(ran.code, Some(0), "{seen}\n{}", ran.stderr);
    assert_eq!(seen["is_error"], false, "{seen}");
    let result = seen["result"].as_str().unwrap();
    assert!(result.starts_with("tool said: "), "{seen}");

    // What Claude Code sent: its system prompt and tools (Read among
    // them, which needs no permission), the tool call answered with Read's
    // result in the second request.
    let calls: Vec<_> = stack
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/messages")
        .collect();
    assert_eq!(calls.len(), 2, "the tool call, then the answer");
    for call in &calls {
        assert_eq!(call.body["model"], "upstream-claude");
        assert!(
            call.body["tools"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["name"] == "Read")),
            "Claude Code offers its tools"
        );
        for (name, value) in &call.headers {
            assert!(!value.contains(&token), "the agent's token in {name}");
        }
    }
    let second = serde_json::to_string(&calls[1].body).unwrap();
    assert!(
        second.contains("\"tool_result\""),
        "Read's result went back"
    );

    // Claude Code's usage is the mock's (10 input tokens a call; the
    // answer's output counts the tool's output it echoes), and the ledger
    // charged exactly that: 1 µ an input token, 2 µ an output token.
    assert_eq!(seen["usage"]["input_tokens"], 20, "{seen}");
    let output = seen["usage"]["output_tokens"].as_i64().unwrap();
    assert!(output >= 10, "{seen}");
    let agent = stack.inspect("claude-code");
    assert_eq!(agent["spent_micro"], 20 + 2 * output);
    assert_eq!(agent["reserved_micro"], 0);
}

/// Claude Code on a model whose provider speaks OpenAI's API (a local
/// Ollama or vLLM, here the mock's `mock-model`): AEX translates its
/// Messages calls into chat completions and the answers back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_on_an_openai_compatible_model_through_translation() {
    let Some(bin) = node_bin_with("@anthropic-ai/claude-code", "Claude Code") else {
        return;
    };
    let stack = Stack::start().await;
    let token = stack.agent("claude-local", "1", "600", &[]);
    let ran = Run::new()
        .run(
            &claude(&bin),
            &print_mode("use_tool:Read and say what you found"),
            &[
                ("ANTHROPIC_BASE_URL", stack.url("")),
                ("ANTHROPIC_API_KEY", token),
                ("ANTHROPIC_MODEL", "mock-model".into()),
                ("ANTHROPIC_SMALL_FAST_MODEL", "mock-model".into()),
                ("ANTHROPIC_DEFAULT_HAIKU_MODEL", "mock-model".into()),
            ],
        )
        .await;
    let seen = ran.json();
    assert_eq!(ran.code, Some(0), "{seen}\n{}", ran.stderr);
    assert_eq!(seen["is_error"], false, "{seen}");
    assert!(
        seen["result"].as_str().unwrap().starts_with("tool said: "),
        "{seen}"
    );
    let calls = stack.mock.requests();
    assert_eq!(calls.len(), 2, "the tool call, then the answer");
    for call in &calls {
        assert_eq!(call.path, "/v1/chat/completions");
        assert_eq!(call.body["model"], "upstream-model");
        assert_eq!(call.body["messages"][0]["role"], "system");
        assert!(
            call.body["tools"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["function"]["name"] == "Read")),
            "Claude Code's tools as functions"
        );
    }
    assert!(
        calls[1].body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool"),
        "Read's result went back as a tool message"
    );
    // The chat usage (10 in, and the answer's output) is what Claude Code
    // saw and what the ledger charged.
    assert_eq!(seen["usage"]["input_tokens"], 20, "{seen}");
    let output = seen["usage"]["output_tokens"].as_i64().unwrap();
    let agent = stack.inspect("claude-local");
    assert_eq!(agent["spent_micro"], 20 + 2 * output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_with_a_spent_budget_stops_with_aexs_message() {
    let Some(bin) = node_bin_with("@anthropic-ai/claude-code", "Claude Code") else {
        return;
    };
    let stack = Stack::start().await;
    let token = stack.agent("claude-poor", "0.0001", "600", &[]);
    let ran = Run::new()
        .run(
            &claude(&bin),
            &print_mode("say hi"),
            &[
                ("ANTHROPIC_BASE_URL", stack.url("")),
                ("ANTHROPIC_API_KEY", token),
            ],
        )
        .await;
    let said = format!("{}{}", ran.stdout, ran.stderr);
    assert_ne!(ran.code, Some(0), "{said}");
    assert!(said.contains("Budget exceeded"), "AEX's message: {said}");
    assert_eq!(stack.mock.count(), 0, "nothing reached the provider");
    let denials = stack
        .events("claude-poor")
        .iter()
        .filter(|e| e["kind"] == "deny" && e["reason"] == "budget")
        .count();
    assert_eq!(denials, 1, "a 402 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aexctl_run_drives_claude_code_as_the_agent() {
    let Some(bin) = node_bin_with("@anthropic-ai/claude-code", "Claude Code") else {
        return;
    };
    let stack = Stack::start().await;
    stack.agent("claude-run", "1", "600", &[]);
    let run = Run::new();
    let aexctl = aex_tests::bin("aexctl");
    let claude = claude(&bin);
    let mut args = vec![
        "run",
        "--agent",
        "claude-run",
        "--",
        claude.to_str().unwrap(),
    ];
    args.extend(print_mode("say hi"));
    let ran = run
        .run(
            &aexctl,
            &args,
            &[
                ("AEX_HOME", stack.home.path().display().to_string()),
                ("AEX_CONTROL_ADDR", stack.control.url()),
                ("AEX_DATAPLANE_ADDR", stack.data.addr.to_string()),
            ],
        )
        .await;
    let seen = ran.json();
    assert_eq!(ran.code, Some(0), "{seen}\n{}", ran.stderr);
    // Claude Code streams: the mock's words.
    assert_eq!(seen["result"], "word0 word1 word2 word3 word4 ", "{seen}");
    // Charged to the agent `run` registered the process under.
    let agent = stack.inspect("claude-run");
    assert_eq!(agent["spent_micro"], 20);
}
