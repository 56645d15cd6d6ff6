use aex_control::admission::core::ExpiryPolicy;
use aex_control::home::Home;
use aex_control::server::{Control, ReservationSettings};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// AEX control plane: the gRPC service that owns agents, models, limits,
/// budgets and the ledger.
#[derive(Parser)]
#[command(name = "aex-control", version)]
struct Args {
    /// AEX home directory (default: $AEX_HOME, else ~/.aex).
    #[arg(long)]
    home: Option<PathBuf>,
    /// Address to listen on. Port 0 picks a free port (printed on start).
    #[arg(long, env = "AEX_CONTROL_LISTEN", default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// SQLite database file (default: AEX_HOME/aex.db).
    #[arg(long, env = "AEX_DB")]
    db: Option<PathBuf>,
    /// How long a reservation lives without being settled or extended by a
    /// data plane's heartbeat.
    #[arg(long, env = "AEX_RESERVATION_TTL_MS", default_value_t = 120_000)]
    reservation_ttl_ms: i64,
    /// What expired reservations cost: `charge` the reserved amount (the
    /// provider may have been paid) or `release` it.
    #[arg(long, env = "AEX_EXPIRED_RESERVATIONS", default_value = "charge", value_parser = ["charge", "release"])]
    expired_reservations: String,
    /// How often expired reservations are swept.
    #[arg(long, default_value_t = 1_000)]
    sweep_interval_ms: u64,
    /// Address of the Prometheus `/metrics` endpoint, or `off`.
    #[arg(
        long,
        env = "AEX_CONTROL_METRICS_LISTEN",
        default_value = "127.0.0.1:9002"
    )]
    metrics_listen: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aex_control::home::create_files_private();
    let args = Args::parse();
    let telemetry = aex_control::telemetry::init("aex-control");
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aex-control: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let home = Home::resolve(args.home)?;
    let reservations = ReservationSettings {
        ttl_ms: args.reservation_ttl_ms.max(1_000),
        expiry_policy: if args.expired_reservations == "release" {
            ExpiryPolicy::Release
        } else {
            ExpiryPolicy::Charge
        },
        sweep_interval_ms: args.sweep_interval_ms.max(10),
    };
    let control = Control::open(&home, args.db, reservations).await?;
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
    println!("aex-control listening on {addr}");
    if args.metrics_listen != "off" {
        // Metrics are an aid, not the ledger: a busy port is reported, not fatal.
        match tokio::net::TcpListener::bind(&args.metrics_listen).await {
            Ok(metrics) => {
                println!(
                    "aex-control metrics on http://{}/metrics",
                    metrics.local_addr()?
                );
                control.serve_metrics(metrics);
            }
            Err(e) => eprintln!(
                "aex-control: metrics disabled: cannot listen on {} ({e}); pick another with --metrics-listen",
                args.metrics_listen
            ),
        }
    }
    tracing::info!(%addr, home = %home.root().display(), "control plane started");
    control
        .serve(listener, aex_control::telemetry::shutdown_signal())
        .await?;
    tracing::info!("control plane stopped");
    Ok(())
}
