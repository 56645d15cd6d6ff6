//! Local operations: daemon lifecycle, supervised `run`, kills, doctor and
//! the demo, through the real `aexctl` binary.

use aex_tests::{Stack, TestHome, bin, free_port};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Daemons started by a test are stopped even when it fails.
struct Started<'a>(&'a TestHome);

impl Drop for Started<'_> {
    fn drop(&mut self) {
        let _ = self.0.aexctl(&["daemon", "stop", "--timeout", "5"]);
    }
}

/// Running (a zombie awaiting its reaper does not count).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Data-plane, control-plane and control metrics ports; the data plane's
/// metrics port is [`dp_metrics`].
fn ports() -> (String, String, String) {
    (
        free_port().to_string(),
        free_port().to_string(),
        free_port().to_string(),
    )
}

/// A free port for the data plane's own metrics listener, so tests running
/// at once never share the default 9004.
fn dp_metrics() -> String {
    free_port().to_string()
}

#[test]
fn daemon_start_status_stop_restart_and_stale_pid_files() {
    let home = TestHome::new();
    let (p, c, m) = ports();
    let dpm = dp_metrics();
    let start = [
        "daemon",
        "start",
        "--port",
        &p,
        "--control-port",
        &c,
        "--metrics-port",
        &m,
        "--dataplane-metrics-port",
        &dpm,
    ];
    let _guard = Started(&home);

    let status = home.aexctl(&["daemon", "status"]);
    status.assert_ok();
    assert!(
        status.stdout.contains("Control plane: not running"),
        "{}",
        status.stdout
    );

    let out = home.aexctl(&start);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("on 127.0.0.1:{c} (gRPC)")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("on http://127.0.0.1:{p}/v1")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("logs/control.log") && out.stdout.contains("logs/dataplane.log"));

    let s = home.aexctl(&["daemon", "status", "--json"]).json();
    assert_eq!(s["control_plane"]["state"], "running");
    assert_eq!(s["control_plane"]["healthy"], true);
    assert_eq!(s["data_plane"]["state"], "running");
    assert_eq!(s["data_plane"]["healthy"], true);
    let control_pid = s["control_plane"]["pid"].as_u64().unwrap();

    // Other commands find the daemons through AEX_HOME/run.
    home.aexctl(&["agent", "create", "ops", "1", "60"])
        .assert_ok();
    let st = home.aexctl(&["status", "--json"]).json();
    assert_eq!(st["data_plane"]["state"], "running");
    assert_eq!(st["agents"], 1);

    let again = home.aexctl(&start);
    again.assert_ok();
    assert!(
        again.stdout.contains("AEX is already running"),
        "{}",
        again.stdout
    );

    let logs = home.aexctl(&["daemon", "logs", "-n", "5"]);
    logs.assert_ok();
    assert!(
        logs.stdout.contains("control plane started"),
        "{}",
        logs.stdout
    );

    let stop = home.aexctl(&["daemon", "stop"]);
    stop.assert_ok();
    assert!(stop.stdout.contains("AEX stopped."), "{}", stop.stdout);
    assert_eq!(
        home.aexctl(&["daemon", "status", "--json"]).json()["control_plane"]["state"],
        "stopped"
    );
    let not_running = home.aexctl(&["daemon", "stop"]);
    not_running.assert_ok();
    assert!(not_running.stdout.contains("AEX is not running."));
    assert!(!alive(control_pid), "the control plane was stopped");

    // A stale pid file: a process that no longer exists.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::write(home.file("run/control.pid"), format!("{}\n", gone.id())).unwrap();
    let stale = home.aexctl(&["daemon", "status"]);
    assert!(
        stale
            .stdout
            .contains("Control plane: not running (removed a stale pid file)"),
        "{}",
        stale.stdout
    );
    std::fs::write(home.file("run/dataplane.pid"), format!("{}\n", gone.id())).unwrap();
    let started = home.aexctl(&start);
    started.assert_ok();
    assert!(
        started.stdout.contains("Removed a stale pid file"),
        "{}",
        started.stdout
    );

    let restarted = home.aexctl(&[
        "daemon",
        "restart",
        "--port",
        &p,
        "--control-port",
        &c,
        "--metrics-port",
        &m,
        "--dataplane-metrics-port",
        &dpm,
    ]);
    restarted.assert_ok();
    assert!(
        restarted.stdout.contains("AEX stopped.") && restarted.stdout.contains("✅ Data plane"),
        "{}",
        restarted.stdout
    );
    assert_eq!(
        home.aexctl(&["agent", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "the ledger survives a restart"
    );
}

#[test]
fn a_port_in_use_is_named() {
    let home = TestHome::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let (p, _, m) = ports();
    let dpm = dp_metrics();
    let _guard = Started(&home);
    let out = home.aexctl(&[
        "daemon",
        "start",
        "--port",
        &p,
        "--control-port",
        &port,
        "--metrics-port",
        &m,
        "--dataplane-metrics-port",
        &dpm,
    ]);
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!("port {port} is in use")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--control-port"), "{}", out.stderr);
    assert_eq!(
        home.aexctl(&["daemon", "status", "--json"]).json()["control_plane"]["state"],
        "stopped"
    );
}

#[test]
fn uninitialised_home_is_refused_with_the_fix() {
    let home = TestHome::empty();
    let out = home.aexctl(&["daemon", "start", "--port", "1"]);
    out.assert_code(1);
    assert!(out.stderr.contains("aexctl init"), "{}", out.stderr);
}

fn run_as(stack: &Stack, agent: &str, cmd: &[&str]) -> std::process::Child {
    Command::new(bin("aexctl"))
        .args(["run", "--agent", agent, "--grace", "1"])
        .args(cmd)
        .env("AEX_HOME", stack.home.path())
        .env("AEX_CONTROL_ADDR", stack.control.url())
        .env("AEX_DATAPLANE_ADDR", stack.data.addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(stack: &Stack) -> serde_json::Value {
    stack.control.aexctl(&["status", "--json"]).json()
}

fn wait_active(stack: &Stack, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(stack)["processes_active"] != n {
        assert!(
            Instant::now() < deadline,
            "processes_active never reached {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_arguments_untouched_and_exits_with_the_childs_status() {
    let stack = Stack::start().await;
    stack.agent("runner", "1", "60", &[]);
    let script = "import os, sys; e = os.environ; print(e['OPENAI_BASE_URL'], e['ANTHROPIC_BASE_URL'], e['AEX_AGENT'], e['OPENAI_API_KEY'][:4], e['ANTHROPIC_API_KEY'] == e['OPENAI_API_KEY'], sys.argv[1:])";
    for with_dashes in [false, true] {
        let mut cmd = vec![];
        if with_dashes {
            cmd.push("--");
        }
        cmd.extend(["python3", "-c", script, "-x", "--flag"]);
        let out = run_as(&stack, "runner", &cmd).wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim(),
            format!(
                "http://{0}/v1 http://{0} runner aex_ True ['-x', '--flag']",
                stack.data.addr
            ),
            "with -- = {with_dashes}"
        );
    }
    let seven = run_as(&stack, "runner", &["sh", "-c", "exit 7"])
        .wait_with_output()
        .unwrap();
    assert_eq!(seven.status.code(), Some(7));
    let missing = run_as(&stack, "runner", &["no-such-command-aex"])
        .wait_with_output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot run 'no-such-command-aex'"));
    let nobody = run_as(&stack, "ghost", &["true"])
        .wait_with_output()
        .unwrap();
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no agent named 'ghost'"));

    // The process's own token works through the data plane while it runs.
    let call = "import json, os, urllib.request as u; r = u.urlopen(u.Request(os.environ['OPENAI_BASE_URL'] + '/chat/completions', data=json.dumps({'model': 'sim', 'messages': [{'role': 'user', 'content': 'hi'}]}).encode(), headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY'], 'Content-Type': 'application/json'})); print(r.status)";
    let out = run_as(&stack, "runner", &["python3", "-c", call])
        .wait_with_output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&stack);
    assert_eq!(s["processes_active"], 0);
    assert_eq!(s["processes_killed"], 0);
    assert_eq!(s["requests_served"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_forwarded_to_the_child() {
    let stack = Stack::start().await;
    stack.agent("signalled", "1", "60", &[]);
    let script = "import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))\nprint('ready', flush=True)\ntime.sleep(30)";
    let mut child = run_as(&stack, "signalled", &["python3", "-c", script]);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_stops_its_processes_within_two_seconds() {
    let stack = Stack::start().await;
    stack.agent("doomed", "1", "60", &[]);
    let mut child = run_as(&stack, "doomed", &["sleep", "30"]);
    wait_active(&stack, 1);
    let killed_at = Instant::now();
    let kill = stack.control.aexctl(&["agent", "kill", "doomed"]);
    kill.assert_ok();
    assert!(
        kill.stdout
            .contains("1 supervised process(es) told to terminate"),
        "{}",
        kill.stdout
    );
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(2)),
        128 + 15,
        "SIGTERM"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(2));
    let s = status(&stack);
    assert_eq!(
        (
            s["processes_active"].as_u64(),
            s["processes_killed"].as_u64()
        ),
        (Some(0), Some(1))
    );
    assert_eq!(stack.inspect("doomed")["state"], "paused");
    let human = stack.control.aexctl(&["status"]);
    assert!(
        human.stdout.contains("Processes Killed:   1"),
        "{}",
        human.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_exhaustion_kills_the_agents_processes_within_two_seconds() {
    let stack = Stack::start().await;
    // mock-model: each call reserves ~290 µ (its body bound plus 100 output
    // tokens) and costs 20 µ, so after one call the next cannot be reserved.
    stack.agent("spender", "0.0003", "600", &[]);
    let script = r#"
# aex-budget-exhaustion-test
import json, os, time, urllib.request as u, urllib.error as e
body = json.dumps({'model': 'mock-model', 'max_tokens': 100, 'messages': [{'role': 'user', 'content': 'x'}]}).encode()
while True:
    try:
        u.urlopen(u.Request(os.environ['OPENAI_BASE_URL'] + '/chat/completions', data=body,
                            headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY'], 'Content-Type': 'application/json'}))
        print('ok', flush=True)
    except e.HTTPError as err:
        print(err.code, flush=True)
    time.sleep(0.1)
"#;
    let started = Instant::now();
    let mut child = run_as(&stack, "spender", &["python3", "-c", script]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        // The python child has its own process group: it holds our pipes.
        let _ = Command::new("pkill")
            .args(["-f", "aex-budget-exhaustion-test"])
            .status();
        let out = child.wait_with_output().unwrap();
        panic!(
            "not killed; agent {}; events {};\nstdout:\n{}\nstderr:\n{}",
            stack.inspect("spender"),
            stack
                .control
                .aexctl(&["events", "--agent", "spender"])
                .stdout,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let code = wait_exit(&mut child, Duration::from_secs(1));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        code,
        128 + 15,
        "killed by SIGTERM; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.first().map(String::as_str), Some("ok"), "{lines:?}");
    assert!(
        lines.iter().filter(|l| *l == "402").count() <= 2,
        "killed promptly after the first 402: {lines:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget exhausted"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let s = status(&stack);
    assert_eq!(s["processes_killed"], 1);
    let agent = stack.inspect("spender");
    assert!(agent["spent_micro"].as_i64() <= agent["budget_micro"].as_i64());
}

#[test]
fn doctor_says_what_is_wrong_and_when_all_is_well() {
    let home = TestHome::new();
    let down = home.aexctl_offline(&["doctor"]);
    down.assert_code(1);
    assert!(down.stdout.contains("✅ AEX directory:"), "{}", down.stdout);
    assert!(down.stdout.contains("✅ Config Valid:"), "{}", down.stdout);
    assert!(down.stdout.contains("❌ Control plane:"), "{}", down.stdout);
    assert!(
        down.stdout.contains("fix: run `aexctl daemon start`"),
        "{}",
        down.stdout
    );
    assert!(!down.stdout.contains("All checks passed."));

    // A reachable stand-in for the Ollama provider, and both daemons up.
    let provider = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let models = std::fs::read_to_string(home.file("config/models.yaml"))
        .unwrap()
        .replace(
            "http://localhost:11434/v1",
            &format!("http://{}/v1", provider.local_addr().unwrap()),
        );
    std::fs::write(home.file("config/models.yaml"), models).unwrap();
    let (p, c, m) = ports();
    let dpm = dp_metrics();
    let _guard = Started(&home);
    home.aexctl(&[
        "daemon",
        "start",
        "--port",
        &p,
        "--control-port",
        &c,
        "--metrics-port",
        &m,
        "--dataplane-metrics-port",
        &dpm,
    ])
    .assert_ok();
    let up = home.aexctl(&["doctor"]);
    up.assert_ok();
    assert!(
        up.stdout.contains("✅ DB Integrity:        PASS (audit"),
        "{}",
        up.stdout
    );
    assert!(up.stdout.contains("✅ Daemon Health:"), "{}", up.stdout);
    assert!(
        up.stdout.trim_end().ends_with("All checks passed."),
        "{}",
        up.stdout
    );
    let json = home.aexctl(&["doctor", "--json"]).json();
    assert_eq!(json["passed"], true);

    std::fs::set_permissions(
        home.file(".env"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let loose = home.aexctl(&["doctor"]);
    loose.assert_code(1);
    assert!(loose.stdout.contains("fix: chmod 600"), "{}", loose.stdout);
}

#[test]
fn the_demo_runs_to_completion_and_agrees_with_the_ledger() {
    let started = Instant::now();
    let out = TestHome::empty().aexctl_offline(&["demo", "--json"]);
    out.assert_ok();
    let report = out.json();
    assert_eq!(report["agreement"], true, "{report}");
    assert_eq!(report["audit_passed"], true);
    let agents = report["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 13);
    let row = |n: &str| agents.iter().find(|a| a["agent"] == n).unwrap().clone();
    assert_eq!(row("demo-a00")["success"], 5);
    assert_eq!(
        row("demo-a10")["denied_402"],
        5,
        "the $0.004 agents cannot afford a call"
    );
    assert!(
        row("demo-burst")["limited_429"].as_u64().unwrap() > 0,
        "the burst trips RPM"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let human = TestHome::empty().aexctl_offline(&["demo"]);
    human.assert_ok();
    assert!(
        human
            .stdout
            .contains("✅ Every number the clients saw matches the ledger"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("Per-agent outcomes"));
}
