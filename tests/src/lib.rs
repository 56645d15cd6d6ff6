//! Test kit: runs the real AEX binaries on free ports (port 0) on 127.0.0.1
//! with a temporary `AEX_HOME`, and stops everything it starts (on drop,
//! also when a test panics).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
    home: PathBuf,
}

impl ControlPlane {
    pub fn start(home: &TestHome) -> Self {
        Self::start_with(home, &[])
    }

    pub fn start_with(home: &TestHome, extra_args: &[&str]) -> Self {
        let log = std::fs::File::create(home.file("logs/control.test.log")).expect("log file");
        let mut child = Command::new(bin("aex-control"))
            .args([
                "--home",
                home.path().to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .env("AEX_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn aex-control");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(home.file("logs/control.test.log")).unwrap_or_default();
                panic!("aex-control did not start:\n{log}");
            }
        };
        let addr = line
            .strip_prefix("aex-control listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from aex-control: {line}"));
        Self {
            child,
            addr,
            home: home.path().to_path_buf(),
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
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
