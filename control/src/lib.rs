//! AEX control plane: agents, models, limits, budgets and the ledger,
//! served over gRPC. The `aex-control` binary is a thin wrapper over
//! [`server::Control`]. The pure domain it shares with the data plane and
//! `aexctl` (money, config, home, the chain) is `aex-core`.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod credentials;
pub mod error;
pub mod in_order;
pub mod ledger;
pub mod metrics;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
