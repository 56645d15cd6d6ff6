//! `aex-bench`: the same workload straight to a fast mock provider and
//! through AEX with full enforcement (auth, limits, reservation, settlement,
//! durable ledger, hash chain), in one run on one machine, so the numbers
//! can be compared as ratios. Writes a Markdown report.
//!
//! Every request body is unique (a counter in the prompt), so nothing can be
//! answered from a cache.

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "aex-bench")]
struct Args {
    /// Requests per workload and target.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Stop a workload after this long even if requests remain.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Where to write the report.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
}

const CHAT: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}"#;
const STREAM: &[u8] = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1,\"total_tokens\":13}}\n\ndata: [DONE]\n\n";

/// A canned provider, as cheap as a server can be: it only looks for
/// `"stream":true` in the body to pick the answer.
async fn mock(listener: tokio::net::TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                use http_body_util::BodyExt;
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let stream = body.windows(13).any(|w| w == b"\"stream\":true");
                let (ct, payload) = if stream {
                    ("text/event-stream", STREAM)
                } else {
                    ("application/json", CHAT)
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", ct)
                        .body(Full::new(Bytes::from_static(payload)))
                        .expect("valid response"),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("a directory").join(name)
}

fn spawn(home: &Path, name: &str, args: &[&str], daemons: &mut Daemons) -> (u32, String) {
    let mut child = Command::new(sibling(name))
        .args(args)
        .env("AEX_HOME", home)
        .env("AEX_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {name} (build with `cargo build --release --workspace --bins`): {e}"
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("first line");
    let pid = child.id();
    daemons.0.push(child);
    (
        pid,
        line.trim().rsplit(' ').next().expect("address").to_string(),
    )
}

/// (CPU seconds so far, peak RSS in MiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|t| t.parse::<f64>().ok()).sum()
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, hwm_kb / 1024.0)
}

struct Result {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    done: u64,
    errors: u64,
}

async fn workload(url: &str, token: &str, stream: bool, concurrency: u64, args: &Args) -> Result {
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, token, counter, errors) = (
            url.to_string(),
            token.to_string(),
            counter.clone(),
            errors.clone(),
        );
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            // One client (connection) per worker, kept alive like an agent's.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()
                .expect("client");
            let mut latencies = Vec::new();
            loop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() > deadline {
                    return latencies;
                }
                let mut body = json!({"model": "bench", "max_tokens": 16,
                    "messages": [{"role": "user", "content": format!("unique request {n}")}]});
                if stream {
                    body["stream"] = json!(true);
                }
                let t0 = Instant::now();
                let ok = match client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut all: Vec<f64> = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("worker"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Result {
        rps: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        done: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mock_addr = listener.local_addr().expect("addr");
    tokio::spawn(mock(listener));

    let dir = tempfile::tempdir().expect("tempdir");
    let home = aex_control::home::Home::new(dir.path());
    home.init(false).expect("init");
    std::fs::write(
        home.models_yaml(),
        format!(
            "version: 1\nproviders:\n  mock: {{ base_url: http://{mock_addr}/v1, type: openai_compatible }}\nmodels:\n  bench:\n    provider: mock\n    pricing: {{ input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60 }}\n    limits: {{ max_tokens: 4096 }}\ndefault_model: bench\n"
        ),
    )
    .expect("models.yaml");
    let mut daemons = Daemons(Vec::new());
    let (control_pid, control_addr) = spawn(
        dir.path(),
        "aex-control",
        &["--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        &mut daemons,
    );
    let control_url = format!("http://{control_addr}");
    let (data_pid, data_addr) = spawn(
        dir.path(),
        "aex-dataplane",
        &["--listen", "127.0.0.1:0", "--control", &control_url],
        &mut daemons,
    );
    // 1,000 agents, as the RSS target asks; the benchmark drives the last.
    let mut token = String::new();
    for i in 0..1000 {
        let out = Command::new(sibling("aexctl"))
            .args([
                "agent",
                "create",
                &format!("bench-{i:04}"),
                "1000000",
                "4000000000",
                "--json",
            ])
            .env("AEX_HOME", dir.path())
            .env("AEX_CONTROL_ADDR", &control_url)
            .output()
            .expect("aexctl");
        if i == 999 {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("agent JSON");
            token = v["token"].as_str().expect("token").to_string();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let direct = format!("http://{mock_addr}/v1/chat/completions");
    let through = format!("http://{data_addr}/v1/chat/completions");
    let mut rows = Vec::new();
    for (stream, concurrency) in [(false, 1), (true, 1), (false, 32), (true, 32)] {
        let name = format!("{} c={concurrency}", if stream { "stream" } else { "chat" });
        let d = workload(&direct, "unused", stream, concurrency, &args).await;
        let (c0, _) = usage(control_pid);
        let (p0, _) = usage(data_pid);
        let a = workload(&through, &token, stream, concurrency, &args).await;
        let (c1, control_rss) = usage(control_pid);
        let (p1, data_rss) = usage(data_pid);
        let per_k = |cpu: f64| {
            if a.done == 0 {
                0.0
            } else {
                cpu / a.done as f64 * 1000.0
            }
        };
        eprintln!(
            "{name}: direct {:.0} rps p50 {:.3} ms; AEX {:.0} rps p50 {:.3} ms ({} errors)",
            d.rps, d.p50, a.rps, a.p50, a.errors
        );
        rows.push(format!(
            "| {name} | {:.0} | {:.0} ({:.0}%) | {:.3} / {:.3} / {:.3} | {:.3} / {:.3} / {:.3} | **{:+.3}** / {:+.3} | {:.2} / {:.2} | {:.0} / {:.0} | {} / {} |",
            d.rps, a.rps, a.rps / d.rps * 100.0,
            d.p50, d.p90, d.p99, a.p50, a.p90, a.p99,
            a.p50 - d.p50, a.p99 - d.p99,
            per_k(p1 - p0), per_k(c1 - c0),
            data_rss, control_rss,
            a.done, a.errors,
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "# Benchmarks\n\n\
Produced by `./bench/run` (= `cargo build --release --workspace --bins && target/release/aex-bench --requests {req}`) \
on {cpus} CPUs, load generator, mock provider and AEX on the same machine. Absolute numbers on a shared box are noise; \
compare AEX with *direct* in the same run.\n\n\
- *direct*: the client talks to the mock provider itself.\n\
- *AEX*: the same client through `aex-dataplane` with full enforcement: token auth, RPM/TPM limits, \
a durable reservation and settlement per request in the SQLite ledger (WAL), each with its HMAC-chained events. \
1,000 agents exist; one is driven.\n\
- Every body is unique; each worker keeps one connection alive.\n\n\
| workload | direct rps | AEX rps (% of direct) | direct p50 / p90 / p99 ms | AEX p50 / p90 / p99 ms | added p50 / p99 ms | CPU s per 1k req: data / control | peak RSS MiB: data / control | AEX requests / errors |\n\
|---|---|---|---|---|---|---|---|---|\n{}\n\n\
Targets (issue #7): added p50 ≤ 0.2 ms and p99 ≤ 1 ms at c=1; AEX ≥ 50% of direct throughput at c=32; \
RSS ≤ 64 MB per plane with 1,000 agents. Peers (AEX 2.0, LiteLLM) are not in this run yet.\n",
        rows.join("\n"),
        req = args.requests,
    );
    std::fs::create_dir_all(args.out.parent().unwrap_or(Path::new("."))).expect("docs dir");
    std::fs::write(&args.out, report).expect("write report");
    eprintln!("wrote {}", args.out.display());
}
