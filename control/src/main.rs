use aex_control::admission::engine::ExpiryPolicy;
use aex_control::server::{Control, ReservationSettings, ServerTls};
use aex_control::storage::Database;
use aex_core::home::Home;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// AEX control plane: the gRPC service that owns agents, models, limits,
/// budgets and the ledger.
#[derive(Parser)]
#[command(name = "aex-control", version)]
struct Args {
    /// Without a command: serve.
    #[command(subcommand)]
    command: Option<Command>,
    /// AEX home directory (default: $AEX_HOME, else ~/.aex).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Address to listen on. Port 0 picks a free port (printed on start).
    #[arg(long, env = "AEX_CONTROL_LISTEN", default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// SQLite database file (default: AEX_HOME/aex.db).
    #[arg(long, env = "AEX_DB", global = true)]
    db: Option<PathBuf>,
    /// The ledger on a PostgreSQL server instead of the SQLite file:
    /// postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, shared by every
    /// control plane of a deployment.
    #[arg(long, env = "AEX_DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
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
    /// Pause an agent once usage its provider reported past its
    /// reservations (never charged) adds up to this share of its budget,
    /// at least $0.001; `off`: record overruns only.
    #[arg(long, env = "AEX_OVERRUN_ALLOWANCE", default_value = "1%", value_parser = parse_overrun_allowance)]
    overrun_allowance: aex_core::overrun::OverrunLimit,
    /// Address of the Prometheus `/metrics` endpoint, or `off`.
    #[arg(
        long,
        env = "AEX_CONTROL_METRICS_LISTEN",
        default_value = "127.0.0.1:9002"
    )]
    metrics_listen: String,
    /// Serve gRPC over TLS with this certificate (PEM; with --tls-key).
    #[arg(
        long,
        env = "AEX_CONTROL_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "AEX_CONTROL_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients presenting a certificate this CA
    /// (PEM) signed.
    #[arg(
        long,
        env = "AEX_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
}

/// The database's own chores, run by `aexctl init` and `aexctl doctor` so
/// that the CLI never opens the database itself.
#[derive(clap::Subcommand)]
enum Command {
    /// Create the database if needed, apply pending migrations, and exit.
    Migrate,
    /// Check the database file (read-only) and print the verdict as JSON;
    /// exits 1 when it is damaged.
    CheckDb,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aex_core::home::create_files_private();
    let args = Args::parse();
    let telemetry = aex_telemetry::init("aex-control");
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
    let database = Database::choose(&home, args.database_url.as_deref(), args.db.clone())?;
    match args.command {
        Some(Command::Migrate) => {
            let applied = database.migrate().await?;
            println!(
                "{}",
                serde_json::json!({"database": database.describe(), "migrations_applied": applied})
            );
            return Ok(());
        }
        Some(Command::CheckDb) => {
            let verdict = match &database {
                Database::Sqlite(path) => {
                    aex_control::storage::sqlite::integrity_check(path).await?
                }
                Database::Postgres(options) => aex_control::storage::postgres::check(options).await,
            };
            println!(
                "{}",
                serde_json::json!({"database": database.describe(), "integrity": verdict})
            );
            if verdict != "ok" {
                return Err(format!("{} is not usable: {verdict}", database.describe()).into());
            }
            return Ok(());
        }
        None => {}
    }
    let reservations = ReservationSettings {
        ttl_ms: args.reservation_ttl_ms.max(1_000),
        expiry_policy: if args.expired_reservations == "release" {
            ExpiryPolicy::Release
        } else {
            ExpiryPolicy::Charge
        },
        sweep_interval_ms: args.sweep_interval_ms.max(10),
        overrun_limit: args.overrun_allowance,
    };
    let mut control = Control::open(&home, &database, reservations).await?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        control.tls = Some(ServerTls::load(cert, key, args.tls_client_ca.as_deref())?);
    }
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
        .serve(listener, aex_telemetry::shutdown_signal())
        .await?;
    tracing::info!("control plane stopped");
    Ok(())
}

/// `--overrun-allowance`: `N%` of the budget (at least the default floor),
/// or `off`.
fn parse_overrun_allowance(s: &str) -> Result<aex_core::overrun::OverrunLimit, String> {
    use aex_core::overrun::OverrunLimit;
    if s == "off" {
        return Ok(OverrunLimit::OFF);
    }
    s.strip_suffix('%')
        .and_then(|n| n.trim().parse::<u32>().ok())
        .filter(|n| *n <= 100)
        .map(|percent_of_budget| OverrunLimit {
            percent_of_budget,
            ..OverrunLimit::DEFAULT
        })
        .ok_or_else(|| format!("'{s}' is not an allowance: give a whole percentage of the budget from 0% to 100% (e.g. 1%), or off"))
}
