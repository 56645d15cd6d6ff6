//! The keyed hash chain checked event by event, for audit: a missing,
//! reordered, unchained or altered event, and a deleted tail, each named.

use super::audit::Check;
use aex_core::chain::{ChainKey, GENESIS};
use aex_core::event::EventRecord;

/// Verifies the chain event by event, in `seq` order, so the log can be
/// streamed in pages without holding it in memory.
pub struct ChainVerifier {
    key: ChainKey,
    next_seq: i64,
    prev_hash: String,
    checked: u64,
    fault: Option<String>,
}

impl ChainVerifier {
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: ChainKey::new(key),
            next_seq: 1,
            prev_hash: GENESIS.to_string(),
            checked: 0,
            fault: None,
        }
    }

    pub fn push(&mut self, e: &EventRecord) {
        if self.fault.is_some() {
            return;
        }
        self.checked += 1;
        let seq = e.body.seq;
        if seq != self.next_seq {
            self.fault = Some(if seq > self.next_seq {
                format!(
                    "event seq {} is missing (the log jumps from {} to {seq})",
                    self.next_seq,
                    self.next_seq - 1
                )
            } else {
                format!("event seq {seq} appears out of order")
            });
            return;
        }
        if e.prev_hash != self.prev_hash {
            self.fault = Some(format!(
                "event seq {seq} does not chain to event seq {}",
                seq - 1
            ));
            return;
        }
        if e.hash != self.key.hash(&e.prev_hash, &e.body) {
            self.fault = Some(format!(
                "event seq {seq} ({} of agent '{}') was altered: its HMAC does not match",
                e.body.kind, e.body.agent_name
            ));
            return;
        }
        self.prev_hash = e.hash.clone();
        self.next_seq += 1;
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The last event may have been deleted: compare with the number the
    /// counters say exist.
    pub fn finish(self, expected_events: i64) -> Check {
        let mut offenders: Vec<String> = self.fault.into_iter().collect();
        let seen = self.next_seq - 1;
        if offenders.is_empty() && seen < expected_events {
            offenders.push(format!(
                "the log ends at event seq {seen} but {expected_events} events were counted: the newest were deleted"
            ));
        }
        Check::new(
            "chain_intact",
            &format!("{seen} events chained and HMAC-keyed"),
            "the event log was edited",
            offenders,
        )
    }
}
