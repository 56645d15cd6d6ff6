//! The ledger's events as the domain decides them: their kinds, what each
//! carries, and how one is sealed onto the chain. A store backend writes what
//! [`Head::seal`] returns as it is, so an event hashes byte for byte the same
//! whatever database holds it.

use crate::chain::{ChainKey, EventBody, GENESIS};
use std::fmt;

/// Every kind of event the ledger holds. The strings are the stored form
/// (and part of what is hashed): never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    AgentCreated,
    AgentUpdated,
    AgentToppedUp,
    AgentTokenRotated,
    /// A commitment to the token of an agent created before the chain
    /// committed to tokens (written once, at the first start that could).
    AgentBaseline,
    AgentPaused,
    AgentResumed,
    AgentKilled,
    AgentDeleted,
    Admit,
    Deny,
    Settle,
    Release,
    Expire,
    /// Reported usage above the reservation: recorded, never charged.
    Overrun,
    UpstreamDenied,
    UpstreamError,
    ProcessStarted,
    ProcessExited,
    ProcessKilled,
    ProcessLost,
    LedgerAnchored,
    LedgerHeadMismatch,
    /// Budget and request credits reserved for one data plane (SPEC §4.3).
    GrantIssued,
    /// A grant's data plane gave back its unused part.
    GrantReturned,
    /// A grant's deadline passed without its data plane giving it back.
    GrantExpired,
    /// A data-plane credential scoped to some agents (`aex_core::credential`).
    CredentialIssued,
    CredentialRevoked,
    /// A call a data plane reported admitting from a grant that the ledger
    /// could not record (`aex_core::grant::refused_report_event`): its
    /// client was served and nothing was charged, which audit names.
    ReportRefused,
}

impl EventKind {
    pub const ALL: [EventKind; 29] = [
        EventKind::AgentCreated,
        EventKind::AgentUpdated,
        EventKind::AgentToppedUp,
        EventKind::AgentTokenRotated,
        EventKind::AgentBaseline,
        EventKind::AgentPaused,
        EventKind::AgentResumed,
        EventKind::AgentKilled,
        EventKind::AgentDeleted,
        EventKind::Admit,
        EventKind::Deny,
        EventKind::Settle,
        EventKind::Release,
        EventKind::Expire,
        EventKind::Overrun,
        EventKind::UpstreamDenied,
        EventKind::UpstreamError,
        EventKind::ProcessStarted,
        EventKind::ProcessExited,
        EventKind::ProcessKilled,
        EventKind::ProcessLost,
        EventKind::LedgerAnchored,
        EventKind::LedgerHeadMismatch,
        EventKind::GrantIssued,
        EventKind::GrantReturned,
        EventKind::GrantExpired,
        EventKind::CredentialIssued,
        EventKind::CredentialRevoked,
        EventKind::ReportRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AgentCreated => "agent.created",
            EventKind::AgentUpdated => "agent.updated",
            EventKind::AgentToppedUp => "agent.topped_up",
            EventKind::AgentTokenRotated => "agent.token_rotated",
            EventKind::AgentBaseline => "agent.baseline",
            EventKind::AgentPaused => "agent.paused",
            EventKind::AgentResumed => "agent.resumed",
            EventKind::AgentKilled => "agent.killed",
            EventKind::AgentDeleted => "agent.deleted",
            EventKind::Admit => "admit",
            EventKind::Deny => "deny",
            EventKind::Settle => "settle",
            EventKind::Release => "release",
            EventKind::Expire => "expire",
            EventKind::Overrun => "overrun",
            EventKind::UpstreamDenied => "upstream_denied",
            EventKind::UpstreamError => "upstream_error",
            EventKind::ProcessStarted => "process.started",
            EventKind::ProcessExited => "process.exited",
            EventKind::ProcessKilled => "process.killed",
            EventKind::ProcessLost => "process.lost",
            EventKind::LedgerAnchored => "ledger.anchored",
            EventKind::LedgerHeadMismatch => "ledger.head_mismatch",
            EventKind::GrantIssued => "grant.issued",
            EventKind::GrantReturned => "grant.returned",
            EventKind::GrantExpired => "grant.expired",
            EventKind::CredentialIssued => "credential.issued",
            EventKind::CredentialRevoked => "credential.revoked",
            EventKind::ReportRefused => "report.refused",
        }
    }

    /// The kind a stored string names; `None` for a string no AEX writes
    /// (audit reports those rather than guessing).
    pub fn parse(s: &str) -> Option<Self> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

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

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
        for kind in EventKind::ALL {
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
