use aex_core::home::Home;
use aex_dataplane::control::{Cache, ControlPlane};
use aex_dataplane::http::{Gateway, Limits};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// AEX data plane: the OpenAI-compatible gateway (pingora). Asks the control
/// plane to admit and settle every call.
#[derive(Parser)]
#[command(name = "aex-dataplane", version)]
struct Args {
    /// AEX home directory (default: $AEX_HOME, else ~/.aex): the data-plane
    /// credential and .env (provider keys) are read from it.
    #[arg(long)]
    home: Option<PathBuf>,
    /// Address to serve the OpenAI API on. Port 0 picks a free port.
    #[arg(long, env = "AEX_DATAPLANE_LISTEN", default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Control-plane gRPC address; several over one database, comma
    /// separated (`http://cp-0:9001,http://cp-1:9001`), fail over.
    #[arg(
        long,
        env = "AEX_CONTROL_ADDR",
        default_value = "http://127.0.0.1:9001"
    )]
    control: String,
    /// CA certificate (PEM) that signed an https:// control plane's certificate.
    #[arg(long, env = "AEX_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a control plane that requires mutual TLS.
    #[arg(long, env = "AEX_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) of --tls-cert.
    #[arg(long, env = "AEX_TLS_KEY", value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// The data-plane credential, read from this file: the fleet one, or one
    /// scoped to this sidecar's agents (`aexctl dataplane credential
    /// create`). Without it: `AEX_DATAPLANE_TOKEN`, then
    /// `AEX_HOME/dataplane.token`.
    #[arg(long, env = "AEX_DATAPLANE_TOKEN_FILE", value_name = "FILE")]
    dataplane_token_file: Option<std::path::PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint, or `off`. Its own
    /// listener, loopback by default: the API port serves agents only.
    #[arg(
        long,
        env = "AEX_DATAPLANE_METRICS_LISTEN",
        default_value = "127.0.0.1:9004"
    )]
    metrics_listen: String,
    /// How long a call over its agent's concurrency limit waits for a
    /// slot, first come first served, before its 429; 0 refuses at once.
    #[arg(long, env = "AEX_CONCURRENCY_WAIT_MS", default_value_t = 5_000)]
    concurrency_wait_ms: u64,
    /// Browser pages allowed to call the API (CORS): comma-separated
    /// origins, e.g. `http://localhost:5173`. Empty: none (CORS off).
    #[arg(
        long,
        env = "AEX_CORS_ORIGINS",
        default_value = "",
        value_name = "ORIGINS"
    )]
    cors_origins: String,
    /// Largest request body accepted (bytes); larger ones get 413; a
    /// compressed body (gzip, deflate) is held to it decompressed.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Longest wait for a provider's response head.
    #[arg(long, default_value_t = 300_000)]
    first_byte_timeout_ms: u64,
    /// Longest silence between two pieces of a response (no total deadline).
    #[arg(long, default_value_t = 120_000)]
    idle_timeout_ms: u64,
    /// Largest non-streamed provider response (bytes); larger is a 502.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_response_bytes: usize,
    /// Longest time from a request head's first byte to its end (408).
    #[arg(long, default_value_t = 30_000)]
    header_timeout_ms: u64,
    /// How long an idle keep-alive connection stays open between requests.
    #[arg(long, default_value_t = 60_000)]
    keepalive_idle_ms: u64,
    /// Connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// How often long streams extend their reservations.
    #[arg(long, default_value_t = 20_000)]
    heartbeat_ms: u64,
    /// This data plane's name in the control plane's grant events (a pod
    /// name, say); a random one when not given.
    #[arg(long, env = "AEX_DATAPLANE_ID")]
    id: Option<String>,
    /// Admit a busy agent's calls from grants, without a round trip per
    /// call (docs/GRANTS.md); `off`: every call is admitted centrally.
    #[arg(long, env = "AEX_DATAPLANE_GRANTS", default_value = "on", value_parser = ["on", "off"])]
    grants: String,
    /// Backpressure: past this many calls and settlements admitted from
    /// grants and not yet acknowledged by the control plane, calls are
    /// admitted centrally until the ledger catches up.
    #[arg(long, default_value_t = aex_dataplane::control::MAX_BACKLOG, value_parser = clap::value_parser!(i64).range(1..))]
    report_backlog: i64,
    /// On SIGTERM, how long in-flight streams may take to finish.
    #[arg(long, default_value_t = 30_000)]
    drain_ms: u64,
}

fn main() -> std::process::ExitCode {
    aex_core::home::create_files_private();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let telemetry = runtime.block_on(async { aex_telemetry::init("aex-dataplane") });
    let code = match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aex-dataplane: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let home = Home::resolve(args.home)?;
    // In a sidecar the credential may come from the environment instead.
    let token = match (
        &args.dataplane_token_file,
        std::env::var("AEX_DATAPLANE_TOKEN"),
    ) {
        (Some(file), _) => std::fs::read_to_string(file)
            .map_err(|e| format!("--dataplane-token-file {}: {e}", file.display()))?
            .trim()
            .to_string(),
        (None, Ok(t)) if !t.trim().is_empty() => t.trim().to_string(),
        _ => home.read_dataplane_token()?,
    };
    if token.is_empty() {
        return Err(
            "the data-plane credential is empty: put the fleet one (AEX_HOME/dataplane.token) \
                    or a scoped one (`aexctl dataplane credential create`) in the file"
                .into(),
        );
    }
    let cache = Arc::new(Cache::new(Some(home.env_file())));
    let tls = aex_proto::tls::ClientTls {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    let metrics = Arc::new(aex_dataplane::metrics::Metrics::default());
    let settings = aex_dataplane::control::Settings {
        id: args
            .id
            .clone()
            .unwrap_or_else(|| aex_core::secrets::new_id("dp")),
        grants: args.grants == "on",
        max_backlog: args.report_backlog,
        metrics: metrics.clone(),
        concurrency_wait: Duration::from_millis(args.concurrency_wait_ms),
    };
    let control = ControlPlane::connect(&args.control, &tls, &token, cache, settings)?;
    tokio::spawn(control.clone().watch_forever());
    tokio::spawn(
        control
            .clone()
            .heartbeat_forever(Duration::from_millis(args.heartbeat_ms)),
    );
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        first_byte_timeout: Duration::from_millis(args.first_byte_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        max_response_bytes: args.max_response_bytes,
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        keepalive_idle: Duration::from_millis(args.keepalive_idle_ms),
    };
    let cors =
        aex_dataplane::http::cors::Cors::parse(&args.cors_origins).map_err(|e| e.to_string())?;
    let gateway = Arc::new(Gateway::new(control.clone(), limits, metrics.clone()).with_cors(cors));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}: {e} (use --listen to pick another address)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    // Parsed by tests and `aexctl daemon` when started on port 0.
    println!("aex-dataplane listening on {addr}");
    if args.metrics_listen != "off" {
        // Metrics are an aid, not the gateway: a busy port is reported, not fatal.
        match tokio::net::TcpListener::bind(&args.metrics_listen).await {
            Ok(listener) => {
                // Not println!: a parent that read only the first line may
                // have closed the pipe, and that must not stop the gateway.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stdout(),
                    "aex-dataplane metrics on http://{}/metrics",
                    listener.local_addr()?
                );
                let render = Arc::new(move || metrics.render());
                tokio::spawn(aex_telemetry::metrics::serve(listener, render));
            }
            Err(e) => eprintln!(
                "aex-dataplane: metrics disabled: cannot listen on {} ({e}); pick another with --metrics-listen",
                args.metrics_listen
            ),
        }
    }
    tracing::info!(%addr, control = %args.control, "data plane started");
    aex_dataplane::serve(
        listener,
        gateway,
        control,
        aex_telemetry::shutdown_signal(),
        Duration::from_millis(args.drain_ms),
        args.max_connections.max(1),
    )
    .await;
    tracing::info!("data plane stopped");
    Ok(())
}
