use crate::error::{CliError, Result};
use crate::output::print_json;
use aex_core::home::Home;
use clap::Subcommand;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Start the control plane, then the data plane, in the background.
    Start(StartArgs),
    /// Stop both: in-flight streams get --timeout to finish and settle.
    Stop(StopArgs),
    /// Are they running, where, and are they healthy.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop, then start.
    Restart(StartArgs),
    /// Print the daemons' logs.
    Logs(LogsArgs),
}

#[derive(clap::Args, Clone)]
pub struct StartArgs {
    /// Data-plane (OpenAI API) port.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Control-plane gRPC port.
    #[arg(long, default_value_t = 9001)]
    control_port: u16,
    /// Control-plane Prometheus port.
    #[arg(long, default_value_t = 9002)]
    metrics_port: u16,
    /// Data-plane Prometheus port (its own listener, never the API port).
    #[arg(long, default_value_t = 9004)]
    dataplane_metrics_port: u16,
    /// Address to bind; loopback unless you mean to expose AEX.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Seconds to wait for both to become healthy.
    #[arg(long, default_value_t = 20)]
    timeout: u64,
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds in-flight calls get to finish (and settle) before SIGKILL.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing new lines.
    #[arg(long, short)]
    follow: bool,
    /// Lines from the end of each log.
    #[arg(long, short = 'n', default_value_t = 50)]
    lines: usize,
    /// Only this daemon's log.
    #[arg(value_parser = ["control", "dataplane"])]
    which: Option<String>,
}

#[derive(Clone, Copy)]
struct Daemon {
    /// control | dataplane
    name: &'static str,
    binary: &'static str,
    title: &'static str,
}

const CONTROL: Daemon = Daemon {
    name: "control",
    binary: "aex-control",
    title: "Control plane",
};
const DATAPLANE: Daemon = Daemon {
    name: "dataplane",
    binary: "aex-dataplane",
    title: "Data plane",
};

impl Daemon {
    fn pid_file(self, home: &Home) -> PathBuf {
        home.run_dir().join(format!("{}.pid", self.name))
    }
    fn addr_file(self, home: &Home) -> PathBuf {
        home.run_dir().join(format!("{}.addr", self.name))
    }
    fn log_file(self, home: &Home) -> PathBuf {
        home.logs_dir().join(format!("{}.log", self.name))
    }
}

/// What a pid file says about a daemon.
enum Running {
    Yes(u32),
    No,
    /// A pid file whose process is gone (or is now another program).
    Stale(u32),
}

fn is_our_process(pid: u32, binary: &str) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // Guard against pid reuse: the process must be the binary we started
    // (an empty command line is a zombie).
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(binary))
        .unwrap_or(false)
}

fn running(home: &Home, d: Daemon) -> Running {
    let Ok(text) = std::fs::read_to_string(d.pid_file(home)) else {
        return Running::No;
    };
    match text.trim().parse::<u32>() {
        Ok(pid) if is_our_process(pid, d.binary) => Running::Yes(pid),
        Ok(pid) => Running::Stale(pid),
        Err(_) => Running::Stale(0),
    }
}

/// Removes a stale pid file; says so.
/// The pid of a running daemon (`control` or `dataplane`), if any.
pub fn running_pid(home: &Home, name: &str) -> Option<u32> {
    let d = if name == "control" {
        CONTROL
    } else {
        DATAPLANE
    };
    match running(home, d) {
        Running::Yes(pid) => Some(pid),
        _ => None,
    }
}

fn clear_stale(home: &Home, d: Daemon, quiet: bool) {
    if let Running::Stale(pid) = running(home, d) {
        let _ = std::fs::remove_file(d.pid_file(home));
        let _ = std::fs::remove_file(d.addr_file(home));
        if !quiet {
            println!(
                "  Removed a stale pid file of the {} (PID {pid} is not running).",
                d.title.to_lowercase()
            );
        }
    }
}

/// The daemon binaries sit next to aexctl when installed together; else PATH.
pub fn binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn port_free(addr: &str, port: u16, flag: &str) -> Result<()> {
    std::net::TcpListener::bind(addr).map(drop).map_err(|e| {
        CliError::Failed(format!(
            "port {port} is in use ({addr}: {e}). Stop whatever listens there, or pick another port with {flag}."
        ))
    })
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn(home: &Home, d: Daemon, args: &[String]) -> Result<std::process::Child> {
    std::fs::create_dir_all(home.logs_dir()).map_err(|e| {
        CliError::Failed(format!("cannot create {}: {e}", home.logs_dir().display()))
    })?;
    std::fs::create_dir_all(home.run_dir()).map_err(|e| {
        CliError::Failed(format!("cannot create {}: {e}", home.run_dir().display()))
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.log_file(home))
        .map_err(|e| {
            CliError::Failed(format!("cannot open {}: {e}", d.log_file(home).display()))
        })?;
    let err = log
        .try_clone()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new(binary(d.binary))
        .args(args)
        .env("AEX_HOME", home.root())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: a Ctrl-C in this terminal is not for it.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot start {}: {e}. Is it installed (./scripts/install)?",
                d.binary
            ))
        })?;
    std::fs::write(d.pid_file(home), format!("{}\n", child.id()))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(child)
}

/// Waits until `healthy` says yes; fails early if the process died (seen on
/// the child handle itself: /proc can lag behind a fresh exec).
async fn wait_healthy<F, Fut>(
    home: &Home,
    d: Daemon,
    child: &mut std::process::Child,
    timeout: Duration,
    healthy: F,
) -> Result<u32>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if healthy().await {
            return Ok(child.id());
        }
        if !matches!(child.try_wait(), Ok(None)) {
            let _ = std::fs::remove_file(d.pid_file(home));
            return Err(CliError::Failed(format!(
                "the {} exited while starting. Last lines of {}:\n{}",
                d.title.to_lowercase(),
                d.log_file(home).display(),
                log_tail(&d.log_file(home), 15)
            )));
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the {} did not become healthy within {} s; see {}",
                d.title.to_lowercase(),
                timeout.as_secs(),
                d.log_file(home).display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn control_healthy(url: &str) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

/// `GET path` on the data plane: its HTTP status, or why not.
pub async fn http_status(addr: &str, path: &str) -> std::result::Result<u16, String> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// `GET path`: (status, body), or why not. A minimal client for health
/// probes: one request, `Connection: close`.
pub async fn http_get(addr: &str, path: &str) -> std::result::Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response);
        let status = text
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "not an HTTP answer".to_string())?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .unwrap_or_else(|_| Err("no answer within 2 s".into()))
}

pub async fn run(home: &Home, cmd: DaemonCommand) -> Result<()> {
    match cmd {
        DaemonCommand::Start(args) => start(home, &args).await,
        DaemonCommand::Stop(args) => stop(home, Duration::from_secs(args.timeout)).await,
        DaemonCommand::Restart(args) => {
            stop(home, Duration::from_secs(30)).await?;
            start(home, &args).await
        }
        DaemonCommand::Status { json } => status(home, json).await,
        DaemonCommand::Logs(args) => logs(home, args).await,
    }
}

async fn start(home: &Home, a: &StartArgs) -> Result<()> {
    home.read_admin_token()?;
    clear_stale(home, CONTROL, false);
    clear_stale(home, DATAPLANE, false);
    let (control_up, data_up) = (running(home, CONTROL), running(home, DATAPLANE));
    if let (Running::Yes(c), Running::Yes(d)) = (&control_up, &data_up) {
        println!("AEX is already running (control plane PID {c}, data plane PID {d}).");
        return status(home, false).await;
    }
    println!("Starting AEX in {}...", home.root().display());
    let control_addr = format!("{}:{}", a.bind, a.control_port);
    let control_url = format!("http://{control_addr}");
    let metrics_addr = format!("{}:{}", a.bind, a.metrics_port);
    let data_addr = format!("{}:{}", a.bind, a.port);
    let data_metrics_addr = format!("{}:{}", a.bind, a.dataplane_metrics_port);
    let timeout = Duration::from_secs(a.timeout);

    let control_pid = match control_up {
        Running::Yes(pid) => pid,
        _ => {
            port_free(&control_addr, a.control_port, "--control-port")?;
            port_free(&metrics_addr, a.metrics_port, "--metrics-port")?;
            if matches!(data_up, Running::No | Running::Stale(_)) {
                port_free(&data_addr, a.port, "--port")?;
            }
            let args = [
                "--listen".to_string(),
                control_addr.clone(),
                "--metrics-listen".into(),
                metrics_addr.clone(),
            ];
            let mut child = spawn(home, CONTROL, &args)?;
            std::fs::write(CONTROL.addr_file(home), &control_url)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            wait_healthy(home, CONTROL, &mut child, timeout, || {
                control_healthy(&control_url)
            })
            .await?
        }
    };
    let data_pid = match data_up {
        Running::Yes(pid) => pid,
        _ => {
            port_free(&data_addr, a.port, "--port")?;
            port_free(
                &data_metrics_addr,
                a.dataplane_metrics_port,
                "--dataplane-metrics-port",
            )?;
            let args = [
                "--listen".to_string(),
                data_addr.clone(),
                "--control".into(),
                control_url.clone(),
                "--metrics-listen".into(),
                data_metrics_addr.clone(),
            ];
            let mut child = spawn(home, DATAPLANE, &args)?;
            std::fs::write(DATAPLANE.addr_file(home), &data_addr)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            wait_healthy(home, DATAPLANE, &mut child, timeout, || async {
                http_status(&data_addr, "/readyz").await == Ok(200)
            })
            .await?
        }
    };
    println!(
        "  ✅ Control plane: running (PID {control_pid}) on {control_addr} (gRPC), metrics http://{metrics_addr}/metrics"
    );
    println!(
        "  ✅ Data plane:    running (PID {data_pid}) on http://{data_addr}/v1, metrics http://{data_metrics_addr}/metrics"
    );
    println!("  Logs: {}", CONTROL.log_file(home).display());
    println!("        {}", DATAPLANE.log_file(home).display());
    println!("Point agents at it: export OPENAI_BASE_URL=http://{data_addr}/v1");
    Ok(())
}

/// SIGTERM, then SIGKILL if it is still there after `grace`.
async fn terminate(home: &Home, d: Daemon, grace: Duration) -> Option<u32> {
    clear_stale(home, d, false);
    let Running::Yes(pid) = running(home, d) else {
        return None;
    };
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while is_our_process(pid, d.binary) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_our_process(pid, d.binary) {
        println!(
            "  The {} did not stop within {} s; killing it.",
            d.title.to_lowercase(),
            grace.as_secs()
        );
        let _ = kill(target, Signal::SIGKILL);
        while is_our_process(pid, d.binary) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = std::fs::remove_file(d.pid_file(home));
    let _ = std::fs::remove_file(d.addr_file(home));
    Some(pid)
}

async fn stop(home: &Home, grace: Duration) -> Result<()> {
    // The data plane first: its in-flight calls settle through the control plane.
    let data = terminate(home, DATAPLANE, grace).await;
    let control = terminate(home, CONTROL, Duration::from_secs(10)).await;
    match (control, data) {
        (None, None) => println!("AEX is not running."),
        _ => {
            if let Some(pid) = data {
                println!("  Data plane stopped (PID {pid}).");
            }
            if let Some(pid) = control {
                println!("  Control plane stopped (PID {pid}).");
            }
            println!("AEX stopped.");
        }
    }
    Ok(())
}

async fn status(home: &Home, json: bool) -> Result<()> {
    let describe = async |d: Daemon| {
        let stale = matches!(running(home, d), Running::Stale(_));
        clear_stale(home, d, true);
        let addr = std::fs::read_to_string(d.addr_file(home))
            .unwrap_or_default()
            .trim()
            .to_string();
        match running(home, d) {
            Running::Yes(pid) => {
                let healthy = match d.name {
                    "control" => control_healthy(&addr).await,
                    _ => http_status(&addr, "/readyz").await == Ok(200),
                };
                json!({"state": "running", "pid": pid, "address": addr, "healthy": healthy,
                       "log": d.log_file(home)})
            }
            _ => {
                json!({"state": "stopped", "stale_pid_file_removed": stale, "log": d.log_file(home)})
            }
        }
    };
    let control = describe(CONTROL).await;
    let data = describe(DATAPLANE).await;
    if json {
        print_json(&json!({"control_plane": control, "data_plane": data}));
        return Ok(());
    }
    for (title, s) in [(CONTROL.title, &control), (DATAPLANE.title, &data)] {
        if s["state"] == "running" {
            let health = if s["healthy"] == true {
                "healthy"
            } else {
                "NOT healthy"
            };
            println!(
                "{title}: running (PID {}, {}, {health})",
                s["pid"],
                s["address"].as_str().unwrap_or("")
            );
        } else if s["stale_pid_file_removed"] == true {
            println!("{title}: not running (removed a stale pid file)");
        } else {
            println!("{title}: not running");
        }
    }
    Ok(())
}

async fn logs(home: &Home, a: LogsArgs) -> Result<()> {
    let daemons: Vec<Daemon> = match a.which.as_deref() {
        Some("control") => vec![CONTROL],
        Some(_) => vec![DATAPLANE],
        None => vec![CONTROL, DATAPLANE],
    };
    let mut offsets = Vec::new();
    for d in &daemons {
        let path = d.log_file(home);
        if daemons.len() > 1 {
            println!("==> {} <==", path.display());
        }
        if !path.exists() {
            println!(
                "(no log yet: the {} has not been started with `aexctl daemon start`)",
                d.title.to_lowercase()
            );
        } else {
            println!("{}", log_tail(&path, a.lines));
        }
        offsets.push(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
    }
    if !a.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (d, offset) in daemons.iter().zip(offsets.iter_mut()) {
            let Ok(mut f) = std::fs::File::open(d.log_file(home)) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < *offset {
                *offset = 0; // rotated or truncated
            }
            if len > *offset && f.seek(SeekFrom::Start(*offset)).is_ok() {
                let mut new = String::new();
                let _ = f.read_to_string(&mut new);
                *offset = len;
                print!("{new}");
            }
        }
    }
}
