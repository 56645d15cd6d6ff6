//! `aex-bench`: the same workload straight to a fast mock provider and
//! through AEX with full enforcement (auth, limits, reservation, settlement,
//! durable ledger, hash chain), in one run on one machine, so the numbers
//! can be compared as ratios. Writes a Markdown report.
//!
//! Every request body is unique (a counter in the prompt), so nothing can be
//! answered from a cache. Peers (the first AEX, LiteLLM) run in the same
//! invocation when `bench/install-peers` has installed them.

mod floors;
mod multinode;
mod peers;
mod scale;

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
    #[arg(long, default_value_t = 10_000, global = true)]
    requests: u64,
    /// Stop a workload after this long even if requests remain.
    #[arg(long, default_value_t = 60, global = true)]
    max_seconds: u64,
    /// Where to write the report.
    #[arg(long, default_value = "docs/BENCHMARKS.md", global = true)]
    out: PathBuf,
    /// Where `bench/install-peers` put AEX 2.0 and LiteLLM
    /// [default: ~/.cache/aex-bench-peers].
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Only direct, nginx as a plain proxy, and AEX.
    #[arg(long)]
    no_peers: bool,
    /// Run only these workloads (e.g. `--only "chat c=32"`), for profiling;
    /// the report then holds only their rows.
    #[arg(long)]
    only: Vec<String>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(clap::Subcommand)]
enum Mode {
    /// Seed a home with many agents and ledger events, then compare
    /// admission latency, audit and agent list with an empty home.
    Scale {
        #[arg(long, default_value_t = 10_000)]
        agents: u64,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// What AEX's parts cost alone on this machine: one extra HTTP hop, a
    /// gRPC call, a durable reservation.
    Floors,
    /// 1 and 2 control planes on PostgreSQL with 1-3 data planes, against
    /// one on SQLite and direct, in one run.
    Multinode {
        /// A PostgreSQL server the benchmark may create databases on.
        #[arg(
            long,
            env = "AEX_BENCH_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/test"
        )]
        database_url: String,
    },
    /// (internal) The bare proxy `floors` measures.
    #[command(hide = true)]
    FloorProxy {
        #[arg(long)]
        upstream: std::net::SocketAddr,
    },
    /// (internal) The bare gRPC server `floors` measures.
    #[command(hide = true)]
    FloorGrpc,
}

/// The models.yaml both modes use: model `bench` on the mock.
fn models_yaml(mock_addr: std::net::SocketAddr) -> String {
    format!(
        "version: 1\nproviders:\n  mock: {{ base_url: http://{mock_addr}/v1, type: openai_compatible }}\nmodels:\n  bench:\n    provider: mock\n    pricing: {{ input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60 }}\n    limits: {{ max_tokens: 4096 }}\ndefault_model: bench\n"
    )
}

/// Replaces this section of the report (between `<!-- name -->` markers),
/// or appends it, so each mode rewrites only its own numbers.
fn write_section(path: &Path, name: &str, content: &str) {
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    let block = format!("{open}\n{}\n{close}", content.trim_end());
    let existing = std::fs::read_to_string(path)
        .unwrap_or_else(|_| "# Benchmarks\n\nWritten by `aex-bench` (`./bench/run`); each mode rewrites only its own section.\n\n".into());
    let updated = match (existing.find(&open), existing.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &existing[..a], &existing[b + close.len()..])
        }
        _ => format!("{}\n{block}\n", existing.trim_end()),
    };
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).expect("docs dir");
    std::fs::write(path, updated).expect("write report");
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
        // Newest first: the data plane goes before the control plane it
        // settles with.
        for c in self.0.iter_mut().rev() {
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
    let (pid, lines) = spawn_lines(home, name, args, daemons, 1);
    (pid, lines[0].clone())
}

/// Starts a daemon and returns the last word of each of its first `lines`
/// stdout lines (the addresses it prints).
fn spawn_lines(
    home: &Path,
    name: &str,
    args: &[&str],
    daemons: &mut Daemons,
    lines: usize,
) -> (u32, Vec<String>) {
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
    let mut reader = BufReader::new(child.stdout.take().expect("piped"));
    let words = (0..lines)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).expect("an address line");
            line.trim().rsplit(' ').next().expect("address").to_string()
        })
        .collect();
    let pid = child.id();
    daemons.0.push(child);
    (pid, words)
}

/// (admit, added latency) histograms as (sum, count): the control plane's
/// server-side admission time and everything the data plane adds.
async fn split_snapshot(control_metrics: &str, data_metrics: &str) -> ((f64, f64), (f64, f64)) {
    (
        histogram(control_metrics, "aex_admit_duration_seconds").await,
        histogram(data_metrics, "aex_added_latency_seconds").await,
    )
}

/// (sum, count) of a Prometheus histogram, from a metrics URL.
async fn histogram(url: &str, name: &str) -> (f64, f64) {
    let text = match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return (0.0, 0.0),
    };
    let value = |suffix: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (value("_sum"), value("_count"))
}

/// (CPU seconds so far, peak RSS in MiB) of a process, from /proc.
/// [`usage`] of `pid` and every process under it (a peer's workers).
fn usage_tree(pid: u32) -> (f64, f64) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .map(usage_tree)
        .fold(usage(pid), |(cpu, rss), (c, r)| (cpu + c, rss + r))
}

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
    /// What the first failed request got, to say why in the report.
    first_error: Option<String>,
}

async fn workload(url: &str, token: &str, stream: bool, concurrency: u64, args: &Args) -> Result {
    workload_over(
        &[url.to_string()],
        &[token.to_string()],
        stream,
        concurrency,
        args,
    )
    .await
}

/// The workload with its workers spread over `urls` (worker i on
/// `urls[i % len]`), as agents spread over several data planes.
/// Worker *w* calls `urls[w mod n]` as `tokens[w mod m]`.
async fn workload_over(
    urls: &[String],
    tokens: &[String],
    stream: bool,
    concurrency: u64,
    args: &Args,
) -> Result {
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (url, token, counter, errors, first_error) = (
            urls[worker as usize % urls.len()].clone(),
            tokens[worker as usize % tokens.len()].clone(),
            counter.clone(),
            errors.clone(),
            first_error.clone(),
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
                let outcome = match client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        Err(format!(
                            "{status}: {}",
                            text.chars().take(200).collect::<String>()
                        ))
                    }
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => latencies.push(t0.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().expect("not poisoned").get_or_insert(e);
                    }
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
        first_error: first_error.lock().expect("not poisoned").take(),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match args.mode {
        Some(Mode::FloorProxy { upstream }) => return floors::serve_proxy(upstream).await,
        Some(Mode::FloorGrpc) => return floors::serve_grpc().await,
        _ => {}
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mock_addr = listener.local_addr().expect("addr");
    tokio::spawn(mock(listener));

    if let Some(Mode::Floors) = args.mode {
        floors::run(&args, mock_addr, &args.out).await;
        return;
    }
    if let Some(Mode::Multinode { database_url }) = &args.mode {
        multinode::run(&args, mock_addr, database_url).await;
        return;
    }
    if let Some(Mode::Scale { agents, events }) = args.mode {
        let scale = scale::ScaleArgs {
            agents,
            events,
            requests: args.requests.min(2_000),
            max_seconds: args.max_seconds,
        };
        scale::run(scale, mock_addr, &args.out).await;
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let home = aex_core::home::Home::new(dir.path());
    home.init(false).expect("init");
    std::fs::write(home.models_yaml(), models_yaml(mock_addr)).expect("models.yaml");
    let mut daemons = Daemons(Vec::new());
    let (control_pid, control_lines) = spawn_lines(
        dir.path(),
        "aex-control",
        &["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        &mut daemons,
        2,
    );
    let control_url = format!("http://{}", control_lines[0]);
    let control_metrics = control_lines[1].clone();
    let (data_pid, data_lines) = spawn_lines(
        dir.path(),
        "aex-dataplane",
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            &control_url,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &mut daemons,
        2,
    );
    let data_addr = data_lines[0].clone();
    let data_metrics = data_lines[1].clone();
    // The same, every call admitted by a round trip: what grants change.
    let (per_call_pid, per_call_lines) = spawn_lines(
        dir.path(),
        "aex-dataplane",
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            &control_url,
            "--metrics-listen",
            "off",
            "--grants",
            "off",
        ],
        &mut daemons,
        1,
    );
    let per_call_addr = per_call_lines[0].clone();
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

    // nginx as a plain proxy is the floor, and runs with or without peers.
    let mut peers: Vec<peers::Peer> = peers::start_nginx(mock_addr).await.into_iter().collect();
    if !args.no_peers {
        let dir = args.peers_dir.clone().unwrap_or_else(peers::default_dir);
        peers.extend(peers::start_aex2(&dir, mock_addr).await);
        peers.extend(peers::start_litellm(&dir, mock_addr).await);
    }

    let direct = format!("http://{mock_addr}/v1/chat/completions");
    let through = format!("http://{data_addr}/v1/chat/completions");
    let per_call = format!("http://{per_call_addr}/v1/chat/completions");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut splits = Vec::new();
    let mut floor = Vec::new();
    for (stream, concurrency) in [(false, 1), (true, 1), (false, 32), (true, 32)] {
        let name = format!("{} c={concurrency}", if stream { "stream" } else { "chat" });
        if !args.only.is_empty() && !args.only.contains(&name) {
            continue;
        }
        let d = workload(&direct, "unused", stream, concurrency, &args).await;
        eprintln!("{name}: direct {:.0} rps p50 {:.3} ms", d.rps, d.p50);
        rows.push(row(&name, "direct", &d, &d, None));
        // (name, url, token, processes to measure, whether it is AEX)
        let mut targets = vec![
            (
                "**AEX**",
                through.clone(),
                token.clone(),
                vec![data_pid, control_pid],
                true,
            ),
            (
                "AEX, grants off",
                per_call.clone(),
                token.clone(),
                vec![per_call_pid, control_pid],
                false,
            ),
        ];
        for p in &peers {
            targets.push((p.name, p.url.clone(), p.token.clone(), vec![p.pid], false));
        }
        // (rps, added p50, added p99) of AEX and of nginx, for the floor table.
        let (mut aex_seen, mut nginx_seen) = (None, None);
        for (target, url, token, pids, is_aex) in targets {
            let split_before = if is_aex {
                Some(split_snapshot(&control_metrics, &data_metrics).await)
            } else {
                None
            };
            let before: Vec<(f64, f64)> = pids.iter().map(|&p| usage_tree(p)).collect();
            let r = workload(&url, &token, stream, concurrency, &args).await;
            let after: Vec<(f64, f64)> = pids.iter().map(|&p| usage_tree(p)).collect();
            if let Some((admit_before, added_before)) = split_before {
                // Where AEX's own time goes: the control plane deciding and
                // reserving (server side), against all the data plane adds.
                let (admit, added) = split_snapshot(&control_metrics, &data_metrics).await;
                let mean_ms =
                    |a: (f64, f64), b: (f64, f64)| (b.0 - a.0) / (b.1 - a.1).max(1.0) * 1000.0;
                let central = (admit.1 - admit_before.1) / (added.1 - added_before.1).max(1.0);
                splits.push(format!(
                    "| {name} | {:.3} | {:.1}% | {:.3} |",
                    mean_ms(added_before, added),
                    central * 100.0,
                    mean_ms(admit_before, admit),
                ));
            }
            let per_k = |i: usize| {
                if r.done == 0 {
                    0.0
                } else {
                    (after[i].0 - before[i].0) / r.done as f64 * 1000.0
                }
            };
            let cost = (0..pids.len())
                .map(|i| format!("{:.2}", per_k(i)))
                .collect::<Vec<_>>()
                .join(" / ");
            let rss = after
                .iter()
                .map(|(_, rss)| format!("{rss:.0}"))
                .collect::<Vec<_>>()
                .join(" / ");
            eprintln!(
                "{name}: {target} {:.0} rps p50 {:.3} ms ({} errors)",
                r.rps, r.p50, r.errors
            );
            if let Some(e) = &r.first_error {
                notes.push(format!(
                    "- {name}, {target}: first error of {}: `{e}`",
                    r.errors
                ));
            }
            let seen = Some((r.rps, r.p50 - d.p50, r.p99 - d.p99));
            if is_aex {
                aex_seen = seen;
            } else if target == peers::NGINX {
                nginx_seen = seen;
            }
            rows.push(row(&name, target, &r, &d, Some((cost, rss))));
        }
        if let (Some(a), Some(n)) = (aex_seen, nginx_seen) {
            floor.push(format!(
                "| {name} | {:.0}% | {:+.3} / {:+.3} | **{:+.3}** | {:+.3} |",
                a.0 / n.0 * 100.0,
                a.1,
                n.1,
                a.1 - n.1,
                a.2
            ));
        }
    }
    drop(peers);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "## Throughput and latency against peers\n\n\
Produced by `./bench/run --requests {req}` (= `cargo build --release --workspace --bins && target/release/aex-bench --requests {req}`; \
peers installed by `bench/install-peers`) on {cpus} CPUs, with load generator, mock provider, AEX and the peers on the same machine. \
Absolute numbers on a shared box are noise; compare each gateway with *direct* in the same run. \
Each workload stops after {max}s even if requests remain.\n\n\
- *direct*: the client talks to the mock provider itself (hyper, canned answers).\n\
- *AEX*: the same client through `aex-dataplane` with full enforcement: token auth, policy, the RPM limit, \
a durable reservation and settlement per request in the SQLite ledger (WAL, group commit), each with its HMAC-chained events; \
the busy agent's calls are admitted from grants (docs/GRANTS.md) and reported in batches, each recorded as the same events. \
1,000 agents exist; one is driven. CPU and RSS are given as data plane / control plane.\n\
- *AEX, grants off*: a second data plane on the same control plane with `--grants off`: one admission round trip per call.\n\
- *nginx (plain proxy)*: nginx in front of the same mock, deciding nothing: the floor.\n\
- *AEX 2.0*: the first AEX (`aex==2.0.0.post2`, uvicorn), with its own ledger.\n\
- *LiteLLM*: `litellm[proxy]==1.100.5`, no database (routing only, no budgets).\n\
- Every body is unique (AEX 2.0 answers repeated bodies from a cache); each worker keeps one connection alive.\n\n\
| workload | target | rps (% of direct) | p50 / p90 / p99 ms | added p50 / p99 ms | CPU s per 1k req | peak RSS MiB | requests / errors |\n\
|---|---|---|---|---|---|---|---|\n{}\n\n{}\
Where AEX's time goes, from its own metrics over each AEX run: what the data plane adds to a request, mean \
(`aex_added_latency_seconds`); the share of calls admitted centrally, by a round trip (the rest came from grants); \
and what the control plane spends deciding and durably reserving one of those, server side (`aex_admit_duration_seconds`).\n\n\
| workload | added by AEX, mean ms | admitted centrally | control-plane admit, mean ms |\n\
|---|---|---|---|\n{}\n\n\
Against the floor of any proxy here, *nginx* as a plain reverse proxy (Debian's `nginx-light`, `proxy_pass` to the \
same mock with upstream keepalive, no buffering, `worker_processes auto`; CPU and RSS summed over its processes), \
in the same run:\n\n\
| workload | AEX rps, % of nginx | added p50 ms, AEX / nginx | AEX minus nginx, p50 ms | AEX added p99 ms |\n\
|---|---|---|---|---|\n{}\n\n\
Targets (issue #14): at c=1, AEX's added p50 ≤ nginx's + 0.10 ms and AEX's added p99 ≤ 1 ms; at c=32, AEX ≥ 70% of \
nginx's throughput, with full enforcement and a durable ledger; RSS ≤ 64 MB per plane with 1,000 agents. \
(Issue #7's were against direct: added p50 ≤ 0.2 ms, p99 ≤ 1 ms at c=1, ≥ 50% of direct at c=32.)\n",
        rows.join("\n"),
        if notes.is_empty() {
            String::new()
        } else {
            format!("Errors:\n{}\n\n", notes.join("\n"))
        },
        splits.join("\n"),
        if floor.is_empty() {
            "| — | nginx did not run (bench/install-peers installs it) | | | |".to_string()
        } else {
            floor.join("\n")
        },
        req = args.requests,
        max = args.max_seconds,
    );
    write_section(&args.out, "throughput", &report);
    eprintln!("wrote {}", args.out.display());
}

/// One table row; `costs` is (CPU per 1k requests, peak RSS) per process.
fn row(
    workload: &str,
    target: &str,
    r: &Result,
    direct: &Result,
    costs: Option<(String, String)>,
) -> String {
    // No costs: this is the direct row, which adds nothing to itself.
    let (cpu, rss, added) = match costs {
        Some((cpu, rss)) => (
            cpu,
            rss,
            format!(
                "**{:+.3}** / {:+.3}",
                r.p50 - direct.p50,
                r.p99 - direct.p99
            ),
        ),
        None => ("—".into(), "—".into(), "—".into()),
    };
    format!(
        "| {workload} | {target} | {:.0} ({:.0}%) | {:.3} / {:.3} / {:.3} | {added} | {cpu} | {rss} | {} / {} |",
        r.rps,
        r.rps / direct.rps * 100.0,
        r.p50,
        r.p90,
        r.p99,
        r.done,
        r.errors,
    )
}
