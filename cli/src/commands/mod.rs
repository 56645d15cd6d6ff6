pub mod agent;
pub mod audit;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod doctor;
pub mod events;
pub mod init;
pub mod metrics;
pub mod models;
pub mod run;
#[cfg(test)]
mod snapshots;
pub mod status;
pub mod version;

use crate::error::Result;
use crate::{Cli, Command};
use aex_core::home::Home;

pub async fn run(cli: Cli) -> Result<()> {
    let home = Home::resolve(cli.home)?;
    let control = crate::addresses::control(&home, cli.control);
    crate::client::use_tls(aex_proto::tls::ClientTls {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
    });
    match cli.command {
        Command::Init(args) => init::run(&home, args).await,
        Command::Version(args) => version::run(args),
        Command::Agent(cmd) => agent::run(&home, &control, cmd).await,
        Command::Models(cmd) => models::run(&home, &control, cmd).await,
        Command::Status(args) => status::run(&home, &control, args).await,
        Command::Metrics(args) => metrics::run(&home, &control, args).await,
        Command::Audit(args) => audit::run(&home, &control, args).await,
        Command::Events(args) => events::run(&home, &control, args).await,
        Command::Daemon(cmd) => daemon::run(&home, cmd).await,
        Command::Dataplane(cmd) => dataplane::run(&home, &control, cmd).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Doctor(args) => {
            let dataplane = crate::addresses::dataplane(&home, None);
            doctor::run(&home, &control, &dataplane, args).await
        }
        Command::Run(args) => {
            let dataplane = crate::addresses::dataplane(&home, args.dataplane_flag());
            run::run(&home, &control, &dataplane, args).await
        }
    }
}
