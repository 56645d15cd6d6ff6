//! `aex-bench floors`: what the pieces AEX is built from cost on this
//! machine, each alone, in the same run as direct and AEX. They bound what
//! any gateway of this design can reach here: a call through AEX crosses one
//! more HTTP hop than direct, makes a gRPC call to the control plane, and
//! waits for a durable ledger commit before the provider is asked.
//!
//! - *one extra HTTP hop*: a minimal hyper proxy in its own process that
//!   forwards each request on a kept-alive upstream connection, no logic;
//! - *gRPC unary call*: tonic's health check against a tonic server in its
//!   own process, over one shared HTTP/2 connection (as the data plane
//!   calls the control plane);
//! - *durable reservation*: the control plane's own ledger writer (SQLite
//!   WAL, group commit), one reservation per call, answered after commit.

use crate::{Args, Daemons, Result as Load, spawn_lines, workload};
use aex_control::clock::now_ms;
use aex_control::storage::Store;
use aex_control::storage::sqlite::SqliteStore;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `aex-bench floor-proxy`: forwards every request to `upstream` over one
/// upstream connection per client connection.
pub async fn serve_proxy(upstream: SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!(
        "floor proxy listening on {}",
        listener.local_addr().expect("addr")
    );
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(up)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let sender = Arc::new(tokio::sync::Mutex::new(sender));
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let forwarded = hyper::Request::from_parts(parts, Full::new(body));
                    let response = sender.lock().await.send_request(forwarded).await?;
                    let (parts, body) = response.into_parts();
                    let body = body.collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(hyper::Response::from_parts(parts, Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// `aex-bench floor-grpc`: a tonic server with only the health service.
pub async fn serve_grpc() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!(
        "floor gRPC listening on {}",
        listener.local_addr().expect("addr")
    );
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}

/// Latencies in ms, sorted, and the calls per second they came at.
struct Calls {
    sorted_ms: Vec<f64>,
    per_second: f64,
}

impl Calls {
    fn pct(&self, p: f64) -> f64 {
        let i = ((self.sorted_ms.len() as f64 * p) as usize).min(self.sorted_ms.len() - 1);
        self.sorted_ms[i]
    }
}

/// Runs `call` `total` times from `concurrency` tasks.
async fn drive<F, Fut>(total: u64, concurrency: u64, max: Duration, call: F) -> Calls
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + max;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (call, next) = (call.clone(), next.clone());
        tasks.spawn(async move {
            let mut ms = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() > deadline {
                    return ms;
                }
                let t0 = Instant::now();
                call(n).await;
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut sorted_ms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        sorted_ms.extend(done.expect("floor task"));
    }
    let per_second = sorted_ms.len() as f64 / started.elapsed().as_secs_f64();
    sorted_ms.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Calls {
        sorted_ms,
        per_second,
    }
}

/// tonic's client over hyper's HTTP/2 connection handle itself, without
/// the `Channel`'s buffer task in between.
#[derive(Clone)]
struct DirectH2 {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    authority: http::uri::Authority,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for DirectH2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        *req.uri_mut() = http::Uri::from_parts(parts).expect("valid URI");
        Box::pin(self.send.send_request(req))
    }
}

async fn direct_h2(addr: &str) -> DirectH2 {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the floor gRPC server");
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    DirectH2 {
        send,
        authority: addr.parse().expect("authority"),
    }
}

async fn grpc_calls(
    addr: &str,
    buffered: bool,
    total: u64,
    concurrency: u64,
    max: Duration,
) -> Calls {
    use tonic_health::pb::health_client::HealthClient;
    if !buffered {
        return health_checks(
            HealthClient::new(direct_h2(addr).await),
            total,
            concurrency,
            max,
        )
        .await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to the floor gRPC server");
    health_checks(HealthClient::new(channel), total, concurrency, max).await
}

/// Health checks over whichever transport `client` was built on.
async fn health_checks<T>(
    client: tonic_health::pb::health_client::HealthClient<T>,
    total: u64,
    concurrency: u64,
    max: Duration,
) -> Calls
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    drive(total, concurrency, max, move |_| {
        let mut client = client.clone();
        async move {
            client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health check");
        }
    })
    .await
}

/// Reservations through the control plane's ledger writer, each awaited
/// until committed, on a fresh database.
async fn reservation_calls(dir: &Path, total: u64, concurrency: u64, max: Duration) -> Calls {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.join(format!("floor-c{concurrency}.db")), vec![7; 32])
            .await
            .expect("open the store"),
    );
    let agent = store
        .create_agent(crate::scale::new_agent(0))
        .await
        .expect("agent");
    let run = format!("{:x}", now_ms());
    drive(total, concurrency, max, move |n| {
        let (store, agent_id, run) = (store.clone(), agent.id.clone(), run.clone());
        async move {
            store
                .reserve(crate::scale::reservation(
                    &format!("{run}_{n}"),
                    agent_id,
                    "seed-000000",
                ))
                .await
                .expect("reserve");
        }
    })
    .await
}

fn load_row(name: &str, c1: &Load, c32: &Load, direct: &(Load, Load)) -> String {
    format!(
        "| {name} | {:.3} / {:.3} | +{:.3} | {:.0} ({:.0}% of direct) |",
        c1.p50,
        c1.p99,
        c1.p50 - direct.0.p50,
        c32.rps,
        c32.rps / direct.1.rps * 100.0
    )
}

fn calls_row(name: &str, c1: &Calls, c32: &Calls, direct: &(Load, Load)) -> String {
    format!(
        "| {name} | {:.3} / {:.3} | +{:.3} | {:.0} ({:.0}% of direct) |",
        c1.pct(0.5),
        c1.pct(0.99),
        c1.pct(0.5),
        c32.per_second,
        c32.per_second / direct.1.rps * 100.0
    )
}

pub async fn run(args: &Args, mock_addr: SocketAddr, out: &Path) {
    let max = Duration::from_secs(args.max_seconds);
    let mut daemons = Daemons(Vec::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, proxy) = spawn_lines(
        dir.path(),
        "aex-bench",
        &["floor-proxy", "--upstream", &mock_addr.to_string()],
        &mut daemons,
        1,
    );
    let (_, grpc) = spawn_lines(dir.path(), "aex-bench", &["floor-grpc"], &mut daemons, 1);
    let chat = |addr: &str| format!("http://{addr}/v1/chat/completions");
    let direct_url = chat(&mock_addr.to_string());
    let proxy_url = chat(&proxy[0]);

    let mut measured = Vec::new();
    for url in [&direct_url, &proxy_url] {
        let c1 = workload(url, "unused", false, 1, args).await;
        let c32 = workload(url, "unused", false, 32, args).await;
        eprintln!("{url}: c=1 p50 {:.3} ms, c=32 {:.0} rps", c1.p50, c32.rps);
        measured.push((c1, c32));
    }
    let proxied = measured.pop().expect("proxy");
    let direct = measured.pop().expect("direct");
    let grpc_c1 = grpc_calls(&grpc[0], true, args.requests, 1, max).await;
    let grpc_c32 = grpc_calls(&grpc[0], true, args.requests, 32, max).await;
    let h2_c1 = grpc_calls(&grpc[0], false, args.requests, 1, max).await;
    let h2_c32 = grpc_calls(&grpc[0], false, args.requests, 32, max).await;
    eprintln!(
        "gRPC without the buffer: c=1 p50 {:.3} ms, c=32 {:.0}/s",
        h2_c1.pct(0.5),
        h2_c32.per_second
    );
    eprintln!(
        "gRPC: c=1 p50 {:.3} ms, c=32 {:.0}/s",
        grpc_c1.pct(0.5),
        grpc_c32.per_second
    );
    let reserve_c1 = reservation_calls(dir.path(), args.requests, 1, max).await;
    let reserve_c32 = reservation_calls(dir.path(), args.requests, 32, max).await;
    eprintln!(
        "reservations: c=1 p50 {:.3} ms, c=32 {:.0}/s",
        reserve_c1.pct(0.5),
        reserve_c32.per_second
    );
    drop(daemons);

    let hop = proxied.0.p50 - direct.0.p50;
    let floor_added = hop + grpc_c1.pct(0.5) + reserve_c1.pct(0.5);
    let report = format!(
        "## Floors: what AEX's parts cost alone\n\n\
Produced by `./bench/run floors --requests {req}` on {cpus} CPUs, in one run. Each piece of AEX's path, alone, \
with nothing else of AEX around it (see `bench/src/floors.rs`): a call through AEX crosses one more HTTP hop than direct, \
makes a gRPC call to the control plane, and waits for a durable reservation before the provider is asked.\n\n\
| piece | c=1 p50 / p99 ms | c=1 p50 added | c=32 calls/s |\n\
|---|---|---|---|\n\
| direct to the mock (the baseline) | {:.3} / {:.3} | — | {:.0} (100%) |\n\
{}\n{}\n{}\n{}\n\n\
Sum of the three at c=1 (p50): **{floor_added:.3} ms**, before AEX parses a body, checks a policy or settles: \
the least any gateway with this design adds here, against the target of 0.2 ms.\n\n\
At c=32 the bare proxy alone reaches {:.0}% of direct: every call through any proxy costs the machine a second \
HTTP exchange, and the load generator and mock share its two cores. The ledger writer alone commits {:.0} reservations/s; \
every call through AEX also needs its settlement, so the durable ledger by itself caps AEX near {:.0} calls/s \
({:.0}% of direct), before any HTTP or gRPC work.\n",
        direct.0.p50,
        direct.0.p99,
        direct.1.rps,
        load_row(
            "one extra HTTP hop (bare hyper proxy, own process)",
            &proxied.0,
            &proxied.1,
            &direct
        ),
        calls_row(
            "gRPC unary call (tonic health check, own process)",
            &grpc_c1,
            &grpc_c32,
            &direct
        ),
        calls_row(
            "gRPC unary call, tonic over hyper's HTTP/2 handle (no buffer task)",
            &h2_c1,
            &h2_c32,
            &direct
        ),
        calls_row(
            "durable reservation (AEX's ledger writer, in process)",
            &reserve_c1,
            &reserve_c32,
            &direct
        ),
        proxied.1.rps / direct.1.rps * 100.0,
        reserve_c32.per_second,
        reserve_c32.per_second / 2.0,
        reserve_c32.per_second / 2.0 / direct.1.rps * 100.0,
        req = args.requests,
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    crate::write_section(out, "floors", &report);
    eprintln!("wrote {}", out.display());
}
