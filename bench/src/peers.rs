//! The gateways users would pick instead of AEX, started against the same
//! mock when `bench/install-peers` has installed them: the first AEX
//! (`aex==2.0.0.post2`, Python/uvicorn, its own SQLite ledger) and the
//! LiteLLM proxy (`litellm[proxy]==1.100.5`, no database: routing only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A peer gateway running on a free port; killed on drop.
pub struct Peer {
    pub name: &'static str,
    pub url: String,
    pub token: String,
    pub pid: u32,
    child: Child,
    _home: tempfile::TempDir,
    /// Stopped with SIGTERM, which also stops its worker processes (nginx's
    /// workers outlive a master killed with SIGKILL).
    terminate: bool,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.terminate {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub fn default_dir() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/aex-bench-peers")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `url` until it answers 200, or gives up after a minute.
async fn wait_healthy(name: &str, url: &str, child: &mut Child, log: Option<&Path>) -> bool {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let said = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(15).collect();
            eprintln!("{name} exited during start-up ({status}); skipped");
            for line in tail.iter().rev() {
                eprintln!("  {name}: {line}");
            }
            return false;
        }
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{name} did not become healthy within 60 s; skipped");
    false
}

/// AEX 2.0 with a throwaway HOME: `~/.aex/config/models.yaml` routes model
/// `bench` to the mock, an agent with a budget that never runs out.
pub async fn start_aex2(dir: &Path, mock_addr: std::net::SocketAddr) -> Option<Peer> {
    let python = dir.join("venv/bin/python");
    if !python.exists() {
        eprintln!(
            "AEX 2.0 is not installed in {}; run bench/install-peers",
            dir.display()
        );
        return None;
    }
    let home = tempfile::tempdir().expect("tempdir");
    let config = home.path().join(".aex/config");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(
        config.join("models.yaml"),
        [
            "version: 1",
            "providers:",
            "  local:",
            &format!("    base_url: http://{mock_addr}/v1"),
            "    type: openai_compatible",
            "models:",
            "  bench:",
            "    provider: local",
            "    provider_model: bench",
            "    pricing: { input_micro: 1, output_micro: 2 }",
            "    limits: { max_tokens: 4096 }",
            "    capabilities: { reasoning: false, tools: true, vision: false }",
            "default_model: bench",
            "",
        ]
        .join("\n"),
    )
    .expect("models.yaml");
    let aex = |args: &[&str]| {
        Command::new(&python)
            .args(["-m", "aex"])
            .args(args)
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .expect("run AEX 2.0")
    };
    // `init` asks for provider keys on stdin; none given is fine.
    aex(&["init"]);
    let created = aex(&["agent", "create", "bench", "1000000", "1000000"]);
    let printed = String::from_utf8_lossy(&created.stdout);
    let Some(token) = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("Token: ").map(str::to_string))
    else {
        eprintln!(
            "AEX 2.0: `aex agent create` printed no token; skipped\n{printed}{}",
            String::from_utf8_lossy(&created.stderr)
        );
        return None;
    };
    let port = free_port();
    let mut child = Command::new(&python)
        .args(["-m", "uvicorn", "aex.daemon.app:app", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--log-level", "warning"])
        .env("HOME", home.path())
        .env("LOCAL_API_KEY", "dummy")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("AEX 2.0 did not start: {e}; skipped"))
        .ok()?;
    if !wait_healthy(
        "AEX 2.0",
        &format!("http://127.0.0.1:{port}/health"),
        &mut child,
        None,
    )
    .await
    {
        let _ = child.kill();
        return None;
    }
    Some(Peer {
        name: "AEX 2.0",
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        token,
        pid: child.id(),
        child,
        _home: home,
        terminate: false,
    })
}

/// LiteLLM proxy, one model routed to the mock, no master key or database.
pub async fn start_litellm(dir: &Path, mock_addr: std::net::SocketAddr) -> Option<Peer> {
    let litellm = dir.join("litellm-venv/bin/litellm");
    if !litellm.exists() {
        eprintln!(
            "LiteLLM is not installed in {}; run bench/install-peers",
            dir.display()
        );
        return None;
    }
    let home = tempfile::tempdir().expect("tempdir");
    let config = home.path().join("litellm.yaml");
    std::fs::write(
        &config,
        [
            "model_list:",
            "  - model_name: bench",
            "    litellm_params:",
            "      model: openai/bench",
            &format!("      api_base: http://{mock_addr}/v1"),
            "      api_key: dummy",
            "",
        ]
        .join("\n"),
    )
    .expect("litellm.yaml");
    let port = free_port();
    let mut child = Command::new(&litellm)
        .arg("--config")
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("HOME", home.path())
        .env("LITELLM_LOG", "ERROR")
        // No phoning home from the benchmark.
        .env("LITELLM_TELEMETRY", "False")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(home.path().join("litellm.log")).expect("log file"),
        ))
        .spawn()
        .map_err(|e| eprintln!("LiteLLM did not start: {e}; skipped"))
        .ok()?;
    if !wait_healthy(
        "LiteLLM",
        &format!("http://127.0.0.1:{port}/health/liveliness"),
        &mut child,
        Some(&home.path().join("litellm.log")),
    )
    .await
    {
        let _ = child.kill();
        return None;
    }
    Some(Peer {
        name: "LiteLLM",
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        token: "unused".into(),
        pid: child.id(),
        child,
        _home: home,
        terminate: false,
    })
}

/// nginx's name in the tables.
pub const NGINX: &str = "nginx (plain proxy)";

/// nginx as a plain reverse proxy in front of the same mock (upstream
/// keepalive, no buffering): what a proxy that decides nothing costs on
/// this machine, the floor every gateway is measured against. Debian's
/// `nginx-light`, installed by `bench/install-peers`.
pub async fn start_nginx(mock_addr: std::net::SocketAddr) -> Option<Peer> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(nginx) = nginx else {
        eprintln!("nginx is not installed; run bench/install-peers (Debian's nginx-light)");
        return None;
    };
    let home = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let dir = home.path().display().to_string();
    // As root, the workers would switch to a user that cannot read the
    // temporary directory.
    let user =
        if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc"))
            == 0
        {
            "user root;"
        } else {
            ""
        };
    let conf = format!(
        "{user}
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream mock {{ server {mock_addr}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location = /nginx-health {{ return 200; }}
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }}
  }}
}}
"
    );
    let conf_path = home.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let log = home.path().join("error.log");
    let mut child = Command::new(&nginx)
        .args(["-p", &dir, "-c"])
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("nginx did not start: {e}; skipped"))
        .ok()?;
    if !wait_healthy(
        "nginx",
        &format!("http://127.0.0.1:{port}/nginx-health"),
        &mut child,
        Some(&log),
    )
    .await
    {
        let _ = child.kill();
        return None;
    }
    Some(Peer {
        name: NGINX,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        token: "unused".into(),
        pid: child.id(),
        child,
        _home: home,
        terminate: true,
    })
}
