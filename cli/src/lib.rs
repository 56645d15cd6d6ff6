//! `aexctl`: manage AEX agents and models over gRPC. `main` is thin; each
//! subcommand lives in its own file under `commands/`.

pub mod addresses;
pub mod client;
pub mod commands;
pub mod error;
pub mod output;

use clap::{Parser, Subcommand};
use error::CliError;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "aexctl",
    version,
    about = "Manage AEX, the execution-governance gateway for AI agents"
)]
pub struct Cli {
    /// AEX home directory (default: $AEX_HOME, else ~/.aex).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Control-plane gRPC address [env: AEX_CONTROL_ADDR] [default: http://127.0.0.1:9001].
    #[arg(long, global = true, value_name = "URL")]
    pub control: Option<String>,
    /// CA certificate (PEM) that signed an https:// control plane's certificate.
    #[arg(long, global = true, env = "AEX_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a control plane that requires mutual TLS.
    #[arg(long, global = true, env = "AEX_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "AEX_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create AEX_HOME: default models.yaml, credentials, ledger key, database.
    Init(commands::init::Args),
    /// Print the version.
    Version(commands::version::Args),
    /// Start, stop and watch the local daemons.
    #[command(subcommand)]
    Daemon(commands::daemon::DaemonCommand),
    /// Run the 12-agent demo on a throwaway AEX_HOME and check the ledger.
    Demo(commands::demo::Args),
    /// Check the installation, the daemons and the providers, with fixes.
    Doctor(commands::doctor::Args),
    /// Create, list, inspect and manage agents.
    #[command(subcommand)]
    Agent(commands::agent::AgentCommand),
    /// Data-plane credentials scoped to some agents (for sidecars).
    #[command(subcommand)]
    Dataplane(commands::dataplane::DataplaneCommand),
    /// List or reload the model configuration.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Totals, denials by rule, and the state of both daemons.
    Status(commands::status::Args),
    /// Per-agent spend, burn rate and time to budget exhaustion.
    Metrics(commands::metrics::Args),
    /// Verify the ledger's invariants and hash chain (exit 1 on any failure).
    Audit(commands::audit::Args),
    /// Print the event log (`--follow` to tail it).
    Events(commands::events::Args),
    /// Run a command as an agent, supervised: `aexctl run --agent NAME [--] CMD ARGS...`
    Run(commands::run::Args),
}

pub fn main() -> std::process::ExitCode {
    // `aexctl agent list | head` must end quietly, not panic on a closed pipe:
    // restore the default SIGPIPE action that Rust's runtime replaces.
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(CliError::Exit(code)) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// For commands that were given a bad value clap could not check.
pub fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}
