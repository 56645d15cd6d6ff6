//! The ledger's events as the domain decides them: their kinds, what each
//! carries, and how one is sealed onto the chain. A store backend writes what
//! [`Head::seal`] returns as it is, so an event hashes byte for byte the same
//! whatever database holds it.

use crate::chain::{ChainKey, EventBody, GENESIS};

crate::named::named_set! {
    /// Every kind of event the ledger holds. The names are the stored form
    /// (and part of what is hashed): never rename one. A name no AEX writes
    /// parses to `None` (audit reports those rather than guessing).
    EventKind {
        AgentCreated => "agent.created",
        AgentUpdated => "agent.updated",
        AgentToppedUp => "agent.topped_up",
        AgentTokenRotated => "agent.token_rotated",
        /// A commitment to the token of an agent created before the chain
        /// committed to tokens (written once, at the first start that could).
        AgentBaseline => "agent.baseline",
        AgentPaused => "agent.paused",
        AgentResumed => "agent.resumed",
        AgentKilled => "agent.killed",
        AgentDeleted => "agent.deleted",
        Admit => "admit",
        Deny => "deny",
        Settle => "settle",
        Release => "release",
        Expire => "expire",
        /// Reported usage above the reservation: recorded, never charged.
        Overrun => "overrun",
        UpstreamDenied => "upstream_denied",
        UpstreamError => "upstream_error",
        ProcessStarted => "process.started",
        ProcessExited => "process.exited",
        ProcessKilled => "process.killed",
        ProcessLost => "process.lost",
        LedgerAnchored => "ledger.anchored",
        LedgerHeadMismatch => "ledger.head_mismatch",
        /// Budget and request credits reserved for one data plane (docs/GRANTS.md).
        GrantIssued => "grant.issued",
        /// A grant's data plane gave back its unused part.
        GrantReturned => "grant.returned",
        /// A grant's deadline passed without its data plane giving it back.
        GrantExpired => "grant.expired",
        /// A data-plane credential scoped to some agents (`aex_core::credential`).
        CredentialIssued => "credential.issued",
        CredentialRevoked => "credential.revoked",
        /// A call a data plane reported admitting from a grant that the ledger
        /// could not record (`aex_core::grant::refused_report_event`): its
        /// client was served and nothing was charged, which audit names.
        ReportRefused => "report.refused",
    }
}

impl EventKind {
    /// Events that open or close a reservation, or say what its usage was.
    pub fn is_about_reservations(self) -> bool {
        matches!(
            self,
            EventKind::Admit
                | EventKind::Settle
                | EventKind::Release
                | EventKind::Expire
                | EventKind::Overrun
        )
    }

    /// The per-agent counter an event of this kind bumps: the kind, and for
    /// denials the rule too (`deny:rpm`).
    pub fn counter_name(self, reason: &str) -> String {
        match self {
            EventKind::Deny => format!("deny:{reason}"),
            other => other.as_str().to_string(),
        }
    }
}

/// An event the domain decided to log; the store puts it on the chain with
/// [`Head::seal`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub ts_ms: i64,
    pub kind: EventKind,
    pub agent_id: String,
    pub agent_name: String,
    pub reservation_id: String,
    pub amount_micro: i64,
    pub reason: String,
    pub details: serde_json::Value,
    /// How many occurrences it stands for (its counter's increment): 1, or
    /// the denials an aggregated event sums up.
    pub count: i64,
}

impl NewEvent {
    /// An event about `agent_id`, with no amount, reason or details yet.
    pub fn about(ts_ms: i64, kind: EventKind, agent_id: &str, agent_name: &str) -> Self {
        Self {
            ts_ms,
            kind,
            agent_id: agent_id.to_string(),
            agent_name: agent_name.to_string(),
            reservation_id: String::new(),
            amount_micro: 0,
            reason: String::new(),
            details: serde_json::json!({}),
            count: 1,
        }
    }

    /// An event about the ledger itself (no agent).
    pub fn ledger(ts_ms: i64, kind: EventKind, reason: &str, details: serde_json::Value) -> Self {
        Self::about(ts_ms, kind, "", "")
            .reason(reason)
            .details(details)
    }

    pub fn amount(mut self, micro: i64) -> Self {
        self.amount_micro = micro;
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = reason.to_string();
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    pub fn reservation(mut self, id: &str) -> Self {
        self.reservation_id = id.to_string();
        self
    }

    /// The counter this event bumps, by [`NewEvent::count`].
    pub fn counter_name(&self) -> String {
        self.kind.counter_name(&self.reason)
    }
}

/// An event as the chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub body: EventBody,
    pub prev_hash: String,
    pub hash: String,
}

/// The chain's newest event: where the next one is appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }

    /// Appends `event` after this head: its body, the hash chaining it, and
    /// this head moved to it. The one place an event's stored form is made.
    pub fn seal(&mut self, key: &ChainKey, event: &NewEvent) -> EventRecord {
        let body = EventBody {
            seq: self.seq + 1,
            ts_ms: event.ts_ms,
            kind: event.kind.as_str().to_string(),
            agent_id: event.agent_id.clone(),
            agent_name: event.agent_name.clone(),
            reservation_id: event.reservation_id.clone(),
            amount_micro: event.amount_micro,
            reason: event.reason.clone(),
            details_json: event.details.to_string(),
        };
        let hash = key.hash(&self.hash, &body);
        let prev_hash = std::mem::replace(&mut self.hash, hash.clone());
        self.seq = body.seq;
        EventRecord {
            body,
            prev_hash,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_stored_name() {
        for &kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        let names: std::collections::HashSet<_> =
            EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), EventKind::ALL.len(), "names are distinct");
        assert_eq!(EventKind::parse("agent.renamed"), None);
    }

    #[test]
    fn sealing_chains_each_event_to_the_last() {
        let key = ChainKey::new(&[7; 32]);
        let mut head = Head::genesis();
        let first = head.seal(
            &key,
            &NewEvent::about(1, EventKind::AgentCreated, "agt_1", "dev").amount(5),
        );
        let second = head.seal(&key, &NewEvent::about(2, EventKind::Deny, "agt_1", "dev"));
        assert_eq!((first.body.seq, second.body.seq), (1, 2));
        assert_eq!(first.prev_hash, GENESIS);
        assert_eq!(second.prev_hash, first.hash);
        assert_eq!(head.hash, second.hash);
        assert_eq!(
            first.hash,
            crate::chain::chain_hash(&[7; 32], GENESIS, &first.body)
        );
        assert_eq!(first.body.details_json, "{}");
    }

    #[test]
    fn denials_count_per_rule() {
        let deny = NewEvent::about(0, EventKind::Deny, "a", "a").reason("rpm");
        assert_eq!(deny.counter_name(), "deny:rpm");
        assert_eq!(
            NewEvent::about(0, EventKind::Admit, "a", "a").counter_name(),
            "admit"
        );
    }
}
