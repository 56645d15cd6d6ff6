//! AEX's pure domain, shared by the control plane, the data plane and
//! `aexctl` so that they agree on formats: integer money, ids and token
//! hashing, the `AEX_HOME` layout, models.yaml parsed and validated, the
//! ledger's keyed hash chain, and the domain's records and decisions: agents,
//! reservations, supervised processes and the events that log each change.
//! No database, network or runtime here: those are the binaries' edges (see
//! docs/ARCHITECTURE.md).

pub mod agent;
pub mod chain;
pub mod config;
pub mod credential;
pub mod denial;
pub mod event;
pub mod expiring;
pub mod grant;
pub mod home;
pub mod inflight;
pub mod limiter;
pub mod money;
pub mod named;
pub mod overrun;
pub mod policy;
pub mod presented;
pub mod process;
pub mod reservation;
pub mod reserve;
pub mod secrets;
pub mod time;
