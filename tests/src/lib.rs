//! Test kit: runs the real AEX binaries on free ports (port 0) on 127.0.0.1
//! with a temporary `AEX_HOME`, and stops everything it starts (on drop,
//! also when a test panics).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Reports the running test as not run, where people look: loudly on
/// stderr, and in AEX_SKIP_LOG, which `scripts/test` lists at the end
/// (cargo hides what a passing test prints).
pub fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    eprintln!("\n!!! SKIPPED {test}: {why} !!!\n");
    if let Some(log) = std::env::var_os("AEX_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
    {
        let _ = writeln!(f, "{test}: {why}");
    }
}

/// The PostgreSQL server tests may create databases on
/// (`AEX_TEST_DATABASE_URL`, e.g. postgres://postgres@127.0.0.1:5432/test);
/// `None`, reported as skipped, when it is unset.
pub fn test_database_url() -> Option<String> {
    match std::env::var("AEX_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            skipped("AEX_TEST_DATABASE_URL is unset, so this PostgreSQL test did not run");
            None
        }
    }
}

/// A built workspace binary (`aex-control`, `aexctl`, …). Integration tests
/// run from `target/<profile>/deps/`, and `cargo test --workspace` builds
/// every package's binaries before any test runs.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build --workspace --bins` first)",
        path.display()
    );
    path
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read home") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A temporary AEX_HOME, initialised with `aexctl init`.
pub struct TestHome {
    dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new() -> Self {
        let home = Self::empty();
        let out = home.aexctl_offline(&["init"]);
        assert!(
            out.status.success(),
            "aexctl init failed: {}",
            out.stderr_text()
        );
        home
    }

    /// An initialised home whose models route to `mock` (the kit's
    /// models.yaml, the mock's key in `.env`).
    pub fn serving(mock: &mock::MockUpstream) -> Self {
        let home = Self::new();
        std::fs::write(
            home.file("config/models.yaml"),
            Stack::models_yaml(&mock.base_url()),
        )
        .unwrap();
        std::fs::write(
            home.file(".env"),
            format!("MOCK_API_KEY={MOCK_PROVIDER_KEY}\nCLAUDE_API_KEY={MOCK_PROVIDER_KEY}\n"),
        )
        .unwrap();
        home
    }

    /// A home directory that `init` has not run in.
    pub fn empty() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("aex-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A copy of another home, files and all (its daemons must be stopped:
    /// the database, its WAL and the anchor are copied as they are).
    pub fn copy_of(other: &TestHome) -> Self {
        let home = Self::empty();
        copy_tree(other.path(), home.path());
        home
    }

    /// This home's files replaced by a copy of `other`'s, at this home's
    /// path (where a head anchor is known to the chain by its path).
    pub fn reset_from(&self, other: &TestHome) {
        for entry in std::fs::read_dir(self.path()).expect("read home") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("rm -r");
            } else {
                std::fs::remove_file(&path).expect("rm");
            }
        }
        copy_tree(other.path(), self.path());
    }

    pub fn file(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.file("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    pub fn dataplane_token(&self) -> String {
        std::fs::read_to_string(self.file("dataplane.token"))
            .expect("dataplane.token")
            .trim()
            .to_string()
    }

    /// Runs `aexctl` with this home only: daemons are found through
    /// AEX_HOME/run (as `aexctl daemon start` records them).
    pub fn aexctl(&self, args: &[&str]) -> CmdOutput {
        run(Command::new(bin("aexctl"))
            .args(args)
            .env("AEX_HOME", self.path())
            .env_remove("AEX_CONTROL_ADDR")
            .env_remove("AEX_DATAPLANE_ADDR"))
    }

    /// Runs `aexctl` with this home and no reachable control plane configured.
    pub fn aexctl_offline(&self, args: &[&str]) -> CmdOutput {
        run(Command::new(bin("aexctl"))
            .args(args)
            .env("AEX_HOME", self.path())
            .env("AEX_CONTROL_ADDR", "http://127.0.0.1:1"))
    }

    pub fn start_control(&self) -> ControlPlane {
        ControlPlane::start(self)
    }
}

impl Default for TestHome {
    fn default() -> Self {
        Self::new()
    }
}

pub struct CmdOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    pub fn stderr_text(&self) -> &str {
        &self.stderr
    }
    /// Parses stdout as JSON, panicking with the whole output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "expected success, got {}:\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

fn run(cmd: &mut Command) -> CmdOutput {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.stdin(Stdio::null()).output().expect("spawn");
    CmdOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A running `aex-control`, killed on drop.
pub struct ControlPlane {
    child: Child,
    pub addr: std::net::SocketAddr,
    /// `http://127.0.0.1:PORT/metrics`
    pub metrics_url: String,
    home: PathBuf,
    /// What it was started with, for [`Self::start_again`].
    extra_args: Vec<String>,
}

impl ControlPlane {
    pub fn start(home: &TestHome) -> Self {
        Self::start_with(home, &[])
    }

    pub fn start_with(home: &TestHome, extra_args: &[&str]) -> Self {
        Self::start_on(home, "127.0.0.1:0", extra_args)
    }

    /// Starts on a given address.
    pub fn start_on(home: &TestHome, listen: &str, extra_args: &[&str]) -> Self {
        Self::spawn(home.path(), listen, extra_args, &[])
    }

    fn spawn(home: &Path, listen: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let log_path = home.join("logs/control.test.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let mut child = Command::new(bin("aex-control"))
            .args(["--home", home.to_str().unwrap(), "--listen", listen])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra_args)
            .envs(env.iter().copied())
            .env("AEX_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn aex-control");
        let (addr, lines) = first_line_addr(&mut child, "aex-control listening on ", || {
            std::fs::read_to_string(&log_path).unwrap_or_default()
        });
        let metrics_url = lines
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .and_then(|l| {
                l.strip_prefix("aex-control metrics on ")
                    .map(str::to_string)
            })
            .expect("aex-control prints its metrics address");
        Self {
            child,
            addr,
            metrics_url,
            home: home.to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `aexctl` against this control plane.
    pub fn aexctl(&self, args: &[&str]) -> CmdOutput {
        run(Command::new(bin("aexctl"))
            .args(args)
            .env("AEX_HOME", &self.home)
            .env("AEX_CONTROL_ADDR", self.url()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates an agent with `aexctl agent create NAME BUDGET RPM ARGS…` and
    /// returns its token.
    pub fn agent(&self, name: &str, budget_usd: &str, rpm: &str, args: &[&str]) -> String {
        let mut all = vec!["agent", "create", name, budget_usd, rpm, "--json"];
        all.extend_from_slice(args);
        let out = self.aexctl(&all);
        out.assert_ok();
        out.json()["token"].as_str().expect("token").to_string()
    }

    /// Waits until every reservation of `agent` is settled (settlement is
    /// queued, so it lands just after the response); returns the agent.
    pub async fn settled(&self, agent: &str, within: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let out = self.aexctl(&["agent", "inspect", agent, "--json"]);
            out.assert_ok();
            let a = out.json();
            if a["reserved_micro"] == 0 {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not settled within {within:?}: {a}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`, then a fresh process on the same address and home.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// `kill -9`; nothing answers on its address until [`Self::start_again`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A fresh process on the same address, home and arguments (after
    /// [`Self::kill`]).
    pub fn start_again(&mut self) {
        let args = self.extra_args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let replacement = Self::spawn(&self.home.clone(), &self.addr.to_string(), &args, &[]);
        *self = replacement;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
pub mod clients;
pub mod cluster;
pub mod load;
pub mod mock;
pub mod postgres;
pub mod rng;

/// The smallest chat call the mock model serves: one short user message,
/// at most 10 output tokens.
pub fn chat() -> serde_json::Value {
    serde_json::json!({"model": "mock-model", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]})
}

/// A running `aex-dataplane`, killed on drop.
pub struct DataPlane {
    child: Child,
    pub addr: std::net::SocketAddr,
    /// Its Prometheus listener (None when started with `--metrics-listen off`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl DataPlane {
    /// Starts it against `control_url` and waits until `/readyz` says ready.
    pub fn start(home: &TestHome, control_url: &str, extra_args: &[&str]) -> Self {
        Self::start_env(home, control_url, extra_args, &[])
    }

    pub fn start_env(
        home: &TestHome,
        control_url: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.file("logs/dataplane.test.log"))
            .expect("log file");
        let own_metrics = !extra_args.contains(&"--metrics-listen");
        let mut child = Command::new(bin("aex-dataplane"))
            .args([
                "--home",
                home.path().to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--control",
                control_url,
            ])
            .args(if own_metrics {
                &["--metrics-listen", "127.0.0.1:0"][..]
            } else {
                &[]
            })
            .args(extra_args)
            .envs(env.iter().copied())
            // AEX_TEST_DATAPLANE_LOG=debug shows pingora's view when a client hangs.
            .env(
                "AEX_LOG",
                std::env::var("AEX_TEST_DATAPLANE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn aex-dataplane");
        let (addr, lines) = first_line_addr(&mut child, "aex-dataplane listening on ", || {
            std::fs::read_to_string(home.file("logs/dataplane.test.log")).unwrap_or_default()
        });
        let metrics_addr = own_metrics.then(|| {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .expect("the metrics address line");
            line.strip_prefix("aex-dataplane metrics on http://")
                .and_then(|a| a.strip_suffix("/metrics"))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("unexpected second line: {line}"))
        });
        let dp = Self {
            child,
            addr,
            metrics_addr,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while http_status(dp.addr, "/readyz") != Some(200) {
            assert!(
                std::time::Instant::now() < deadline,
                "aex-dataplane never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        dp
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: nothing it holds is given back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://…/metrics` on the data plane's own metrics listener.
    pub fn metrics_url(&self) -> String {
        format!(
            "http://{}/metrics",
            self.metrics_addr
                .expect("started with its own metrics listener")
        )
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn first_line_addr(
    child: &mut Child,
    prefix: &str,
    log: impl Fn() -> String,
) -> (std::net::SocketAddr, mpsc::Receiver<String>) {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the process did not start:\n{}", log());
    };
    let addr = line
        .strip_prefix(prefix)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    (addr, rx)
}

/// A port nothing listens on right now (bound, then released).
/// A port free on 127.0.0.1 now, for a daemon the test starts. Taken below
/// the kernel's ephemeral range, so that the outgoing connections other
/// tests make (database pools, HTTP clients), whose source ports come from
/// that range, cannot take it before the daemon binds it; spread by
/// process and call, so that tests running at once rarely try the same.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_001));
    let span = high - low;
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = low + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 31) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A sample from Prometheus text: the value of the series named `metric`
/// whose labels include every `label="value"` given (0 when absent).
pub fn prometheus_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Status of a plain GET, or None when nothing answers.
pub fn http_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: aex\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// The provider key the mock expects; written to the test home's `.env`.
pub const MOCK_PROVIDER_KEY: &str = "sk-mock-upstream-key";

/// mock → control plane → data plane, configured with:
/// `mock-model` (provider `mock`: 1 µ/input token, 2 µ/output token, max 100
/// output tokens, tools and vision), `cached-model` (the same upstream with
/// cache prices: 0.1 µ per cached input token, 1.25 µ per cache write),
/// `claude-model` (the mock again, as an `anthropic` provider, with
/// cached-model's prices, tools and vision),
/// `dead-model` (a provider nothing listens on) and `sim` (the simulated
/// provider).
pub struct Stack {
    pub data: DataPlane,
    pub control: ControlPlane,
    pub mock: mock::MockUpstream,
    pub home: TestHome,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(dataplane_args: &[&str]) -> Self {
        Self::start_full(&[], dataplane_args).await
    }

    pub async fn start_full(control_args: &[&str], dataplane_args: &[&str]) -> Self {
        Self::start_env(control_args, dataplane_args, &[]).await
    }

    /// With extra environment for both daemons (e.g. OTEL_* variables).
    pub async fn start_env(
        control_args: &[&str],
        dataplane_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mock = mock::MockUpstream::start().await;
        let home = TestHome::serving(&mock);
        let control = ControlPlane::spawn(home.path(), "127.0.0.1:0", control_args, env);
        let data = DataPlane::start_env(&home, &control.url(), dataplane_args, env);
        Self {
            data,
            control,
            mock,
            home,
        }
    }

    pub fn models_yaml(mock_base_url: &str) -> String {
        format!(
            "version: 1
providers:
  mock:
    base_url: {mock_base_url}
    type: openai_compatible
    # The mock is steered per request by these; AEX forwards them only
    # because they are listed.
    forward_headers: [x-mock, x-mock-delay-ms, x-mock-usage, x-mock-cached]
  # The same mock, spoken to in Anthropic's Messages API (its base URL
  # given with /v1, which an anthropic provider drops).
  claude:
    base_url: {mock_base_url}
    type: anthropic
    forward_headers: [x-mock, x-mock-delay-ms, x-mock-usage, x-mock-cached]
  dead: {{ base_url: http://127.0.0.1:1/v1, type: openai_compatible }}
  sim: {{ type: simulated, latency_ms: 0, tokens_per_second: 0, completion_tokens: 8 }}
models:
  mock-model:
    provider: mock
    provider_model: upstream-model
    pricing: {{ input_micro: 1, output_micro: 2 }}
    limits: {{ max_tokens: 100 }}
    capabilities: {{ tools: true, vision: true }}
  cached-model:
    provider: mock
    provider_model: upstream-model
    pricing: {{ input_micro: 1, cached_input_micro: 0.1, cache_write_micro: 1.25, output_micro: 2 }}
    limits: {{ max_tokens: 100 }}
  claude-model:
    provider: claude
    provider_model: upstream-claude
    pricing: {{ input_micro: 1, cached_input_micro: 0.1, cache_write_micro: 1.25, output_micro: 2 }}
    limits: {{ max_tokens: 100 }}
    capabilities: {{ tools: true, vision: true }}
  dead-model:
    provider: dead
    pricing: {{ input_micro: 1, output_micro: 2 }}
    limits: {{ max_tokens: 100 }}
  sim:
    provider: sim
    pricing: {{ input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60 }}
    limits: {{ max_tokens: 100 }}
default_model: mock-model
"
        )
    }

    pub fn url(&self, path: &str) -> String {
        self.data.url(path)
    }

    /// Creates an agent with `aexctl agent create NAME BUDGET RPM ARGS…` and
    /// returns its token.
    pub fn agent(&self, name: &str, budget_usd: &str, rpm: &str, args: &[&str]) -> String {
        self.control.agent(name, budget_usd, rpm, args)
    }

    /// The agent's ledger events, oldest first (`aexctl events --agent NAME --json`).
    pub fn events(&self, agent: &str) -> Vec<serde_json::Value> {
        let out = self.control.aexctl(&["events", "--agent", agent, "--json"]);
        out.assert_ok();
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
            .collect()
    }

    /// `aexctl agent inspect NAME --json`.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let out = self.control.aexctl(&["agent", "inspect", name, "--json"]);
        out.assert_ok();
        out.json()
    }

    /// Waits until every reservation of `agent` is settled; returns the agent.
    pub async fn settled(&self, agent: &str, within: Duration) -> serde_json::Value {
        self.control.settled(agent, within).await
    }

    /// Waits until `agent` is in `state` (`aexctl agent inspect`'s word for
    /// it); returns the agent.
    pub async fn in_state(&self, agent: &str, state: &str, within: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let a = self.inspect(agent);
            if a["state"] == state {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not {state} within {within:?}: {a}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
