//! Stored state as folds of the chain's events. Audit replays the log and
//! compares what it says each agent, reservation, grant, supervised process
//! and data-plane credential is
//! with its row, so an edit made in the database without `ledger.key` is
//! named. Pure: events in, offenders out.

mod agents;
mod credentials;
mod grants;
mod processes;
mod reservations;

pub use agents::AgentFold;
pub use credentials::CredentialFold;
pub use grants::GrantFold;
pub use processes::ProcessFold;
pub use reservations::{ClosedDigest, ReservationFacts, ReservationFold, ReservationRow};

pub use aex_core::chain::{derived_key, token_mac};
