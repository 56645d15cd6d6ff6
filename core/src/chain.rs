//! Each event is chained to the previous one by HMAC-SHA256 keyed with the
//! secret in `AEX_HOME/ledger.key`. The sequence number and server timestamp
//! are inside what is hashed, so deleting, reordering or rewriting an event
//! (even with a recomputed plain hash) breaks verification.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `prev_hash` of the first event.
pub const GENESIS: &str = "genesis";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventBody {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub agent_id: String,
    pub agent_name: String,
    pub reservation_id: String,
    pub amount_micro: i64,
    pub reason: String,
    pub details_json: String,
}

/// HMAC over the previous hash and every field, each length-prefixed so that
/// no two different events can encode to the same bytes.
pub fn chain_hash(key: &[u8], prev_hash: &str, e: &EventBody) -> String {
    ChainKey::new(key).hash(prev_hash, e)
}

/// The ledger key with HMAC's key schedule done once: hashing many events
/// (the writer, an audit of a million) then costs the fields alone.
#[derive(Clone)]
pub struct ChainKey(Hmac<Sha256>);

impl ChainKey {
    pub fn new(key: &[u8]) -> Self {
        Self(Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length"))
    }

    /// The same value as [`chain_hash`] with this key.
    pub fn hash(&self, prev_hash: &str, e: &EventBody) -> String {
        let mut mac = self.0.clone();
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        field(prev_hash.as_bytes());
        field(&e.seq.to_be_bytes());
        field(&e.ts_ms.to_be_bytes());
        field(e.kind.as_bytes());
        field(e.agent_id.as_bytes());
        field(e.agent_name.as_bytes());
        field(e.reservation_id.as_bytes());
        field(&e.amount_micro.to_be_bytes());
        field(e.reason.as_bytes());
        field(e.details_json.as_bytes());
        crate::secrets::hex(&mac.finalize().into_bytes())
    }
}

/// A purpose-specific key derived from `ledger.key`, so values the chain
/// commits to can be neither read back nor forged by anyone without it.
pub fn derived_key(ledger_key: &[u8], purpose: &[u8]) -> Vec<u8> {
    let mut derive =
        Hmac::<Sha256>::new_from_slice(ledger_key).expect("HMAC accepts any key length");
    derive.update(purpose);
    derive.finalize().into_bytes().to_vec()
}

/// An HMAC under the key derived from `ledger.key` for `purpose`.
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
    crate::secrets::hex(&mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> EventBody {
        EventBody {
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            kind: "agent.created".into(),
            agent_id: "agt_1".into(),
            agent_name: "dev".into(),
            amount_micro: 5_000_000,
            details_json: "{}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_field_and_the_key_matter() {
        let key = b"k".repeat(32);
        let base = chain_hash(&key, GENESIS, &event(1));
        assert_eq!(base.len(), 64);
        assert_eq!(base, chain_hash(&key, GENESIS, &event(1)));
        assert_ne!(base, chain_hash(b"other-key", GENESIS, &event(1)));
        assert_ne!(base, chain_hash(&key, "x", &event(1)));
        let mut e = event(1);
        e.amount_micro += 1;
        assert_ne!(base, chain_hash(&key, GENESIS, &e));
        let mut e = event(1);
        e.seq = 2;
        assert_ne!(base, chain_hash(&key, GENESIS, &e));
        // Shifting bytes between adjacent fields changes the hash.
        let mut a = event(1);
        a.agent_id = "ab".into();
        a.agent_name = "c".into();
        let mut b = event(1);
        b.agent_id = "a".into();
        b.agent_name = "bc".into();
        assert_ne!(chain_hash(&key, GENESIS, &a), chain_hash(&key, GENESIS, &b));
    }
}
