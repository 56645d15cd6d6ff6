//! Stored state as folds of the chain's events. Audit replays the log and
//! compares what it says each agent, reservation and supervised process is
//! with its row, so an edit made in the database without `ledger.key` is
//! named. Pure: events in, offenders out.

mod agents;
mod processes;
mod reservations;

pub use agents::AgentFold;
pub use processes::ProcessFold;
pub use reservations::{ClosedDigest, ReservationFacts, ReservationFold, ReservationRow};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A purpose-specific key derived from `ledger.key`, so values the chain
/// commits to can be neither read back nor forged by anyone without it.
fn derived_key(ledger_key: &[u8], purpose: &[u8]) -> Vec<u8> {
    let mut derive =
        Hmac::<Sha256>::new_from_slice(ledger_key).expect("HMAC accepts any key length");
    derive.update(purpose);
    derive.finalize().into_bytes().to_vec()
}

fn keyed(ledger_key: &[u8], purpose: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(&derived_key(ledger_key, purpose))
        .expect("HMAC accepts any key length")
}

/// The chain's commitment to an agent's token hash: keyed, so the events
/// (which `aexctl events` prints) never carry a token verifier anyone
/// without `ledger.key` could use or forge.
pub fn token_mac(ledger_key: &[u8], token_sha256: &str) -> String {
    let mut mac = keyed(ledger_key, b"aex/token-commit/v1");
    mac.update(token_sha256.as_bytes());
    aex_core::secrets::hex(&mac.finalize().into_bytes())
}
