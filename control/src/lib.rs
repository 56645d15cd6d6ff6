//! AEX control plane: agents, models, limits, budgets and the ledger,
//! served over gRPC. The `aex-control` binary is a thin wrapper over
//! [`server::Control`]; `aexctl` reuses the pure modules (money, config,
//! home) so the CLI and the server agree on formats.

pub mod admission;
pub mod auth;
pub mod config;
pub mod error;
pub mod home;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod secrets;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod telemetry;
