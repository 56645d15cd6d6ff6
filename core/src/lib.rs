//! AEX's pure domain, shared by the control plane, the data plane and
//! `aexctl` so that they agree on formats: integer money, ids and token
//! hashing, the `AEX_HOME` layout, models.yaml parsed and validated, and the
//! ledger's keyed hash chain. No database, network or runtime here: those
//! are the binaries' edges (see docs/ARCHITECTURE.md).

pub mod chain;
pub mod config;
pub mod home;
pub mod money;
pub mod secrets;
