//! What an audit reads from a store, in one snapshot (`ReportStore::audit_data`
//! in `storage`); the checks over it are pure (`audit`, `fold`).

use super::anchor::AnchorState;
use super::fold;
use aex_core::agent::AgentRecord;
use aex_core::credential::CredentialRecord;
use aex_core::grant::GrantRecord;
use aex_core::process::ProcessRecord;

/// Raw material for `aexctl audit`; the checks themselves are pure
/// (`ledger::audit`).
#[derive(Debug, Clone, Default)]
pub struct AuditData {
    /// Every agent, deleted ones included.
    pub agents: Vec<AgentRecord>,
    /// Sum of open reservations per agent id.
    pub open_reserved: std::collections::HashMap<String, i64>,
    /// Sum of charged amounts (settle and expire events) per agent id.
    /// Filled from the log by [`super::audit::LogTally`] while the
    /// chain is verified, not by the store.
    pub charged: std::collections::HashMap<String, i64>,
    /// Sum of overrun events' amounts per agent id (filled by the tally).
    pub overrun_logged: std::collections::HashMap<String, i64>,
    /// Open reservations past their expiry: (reservation id, agent id, expired at).
    pub overdue: Vec<(String, String, i64)>,
    /// (agent id, counter name) → value, from the counters table.
    pub counters: std::collections::HashMap<(String, String), i64>,
    /// (agent id, counter name) → events of that kind in the log (filled
    /// by the tally, like `charged`).
    pub event_counts: std::collections::HashMap<(String, String), i64>,
    /// The anchor file as read just before the snapshot (None: the store
    /// keeps no anchor), and the hash of the event at its seq in the snapshot.
    pub anchor: Option<AnchorState>,
    /// The open reservation rows, compared one by one with the log.
    pub open_reservation_rows: Vec<fold::ReservationRow>,
    /// The closed reservation rows, digested per agent (see
    /// `ledger::fold::reservations`): the history is never held in memory.
    pub closed_reservations: fold::ClosedDigest,
    /// Every supervised process, ended ones included.
    pub processes: Vec<ProcessRecord>,
    /// Every grant, ended ones included.
    pub grants: Vec<GrantRecord>,
    /// Every data-plane credential, revoked ones included.
    pub credentials: Vec<CredentialRecord>,
    /// When the snapshot was read (deadlines are checked against it).
    pub now_ms: i64,
    pub hash_at_anchor: Option<String>,
    /// The newest event when the rest was read: everything above is one
    /// snapshot, and the audit checks the log up to this event.
    pub last_seq: i64,
}
