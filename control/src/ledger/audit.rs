//! `aexctl audit`: the ledger's invariants and the keyed hash chain, as pure
//! functions over data the store hands over. Each check names what failed.

use super::snapshot::AuditData;
use aex_core::event::{EventKind, EventRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    pub offenders: Vec<String>,
}

impl Check {
    pub(super) fn new(
        name: &'static str,
        ok_detail: &str,
        fail_detail: &str,
        offenders: Vec<String>,
    ) -> Self {
        let passed = offenders.is_empty();
        Self {
            name,
            passed,
            detail: if passed { ok_detail } else { fail_detail }.to_string(),
            offenders,
        }
    }
}

/// Refused reports described one by one; the rest are counted.
const REFUSED_LISTED: usize = 20;

/// What the log says, per agent, gathered in the same pass that verifies
/// the chain: the amounts charged and how many events of each kind.
#[derive(Debug)]
pub struct LogTally {
    charged: std::collections::HashMap<String, i64>,
    overrun: std::collections::HashMap<String, i64>,
    /// Occurrences beyond one that aggregated events stand for.
    aggregated_extra: i64,
    agents: super::fold::AgentFold,
    reservations: super::fold::ReservationFold,
    grants: super::fold::GrantFold,
    processes: super::fold::ProcessFold,
    credentials: super::fold::CredentialFold,
    /// Calls served that the ledger refused (`report.refused`): the first
    /// [`REFUSED_LISTED`] described, and how many there are.
    refused_reports: Vec<String>,
    refused_total: usize,
    event_counts: std::collections::HashMap<(String, String), i64>,
}

impl LogTally {
    pub fn new(ledger_key: &[u8]) -> Self {
        Self {
            charged: Default::default(),
            overrun: Default::default(),
            aggregated_extra: 0,
            agents: Default::default(),
            reservations: super::fold::ReservationFold::new(ledger_key),
            grants: Default::default(),
            processes: Default::default(),
            credentials: Default::default(),
            refused_reports: Vec::new(),
            refused_total: 0,
            event_counts: Default::default(),
        }
    }

    pub fn push(&mut self, e: &EventRecord) {
        self.agents.push(e);
        self.reservations.push(e);
        self.grants.push(e);
        self.processes.push(e);
        self.credentials.push(e);
        let b = &e.body;
        let kind = EventKind::parse(&b.kind);
        if matches!(
            kind,
            Some(EventKind::Settle | EventKind::Expire | EventKind::GrantExpired)
        ) {
            let c = self.charged.entry(b.agent_id.clone()).or_default();
            *c = c.saturating_add(b.amount_micro);
        }
        // A call reported after its grant expired takes its amount back
        // out of the expiry's charge (`aex_core::grant::Carve`).
        if kind == Some(EventKind::Admit) && b.details_json.contains(aex_core::grant::UNCHARGED) {
            let back = serde_json::from_str::<serde_json::Value>(&b.details_json)
                .ok()
                .and_then(|d| d[aex_core::grant::UNCHARGED].as_i64())
                .unwrap_or(0);
            let c = self.charged.entry(b.agent_id.clone()).or_default();
            *c = c.saturating_sub(back);
        }
        if kind == Some(EventKind::ReportRefused) {
            self.refused_total += 1;
            if self.refused_reports.len() < REFUSED_LISTED {
                let details =
                    serde_json::from_str::<serde_json::Value>(&b.details_json).unwrap_or_default();
                self.refused_reports.push(format!(
                    "event seq {}: agent '{}' was served call {} (request {}, {} µ reserved) from grant {}, which the ledger refused: {}",
                    b.seq,
                    b.agent_name,
                    b.reservation_id,
                    details["request_id"].as_str().unwrap_or("?"),
                    b.amount_micro,
                    details["grant"].as_str().unwrap_or("?"),
                    details["why"].as_str().unwrap_or("?"),
                ));
            }
        }
        if kind == Some(EventKind::Overrun) {
            let o = self.overrun.entry(b.agent_id.clone()).or_default();
            *o = o.saturating_add(b.amount_micro);
        }
        // An aggregated denial stands for `details.count` of them.
        let count = if kind == Some(EventKind::Deny) && b.agent_id.is_empty() {
            serde_json::from_str::<serde_json::Value>(&b.details_json)
                .ok()
                .and_then(|d| d.get("count").and_then(serde_json::Value::as_i64))
                .unwrap_or(1)
        } else {
            1
        };
        self.aggregated_extra = self.aggregated_extra.saturating_add(count - 1);
        let c = self
            .event_counts
            .entry((
                b.agent_id.clone(),
                // A kind no AEX writes still counts under its own name.
                kind.map_or_else(|| b.kind.clone(), |k| k.counter_name(&b.reason)),
            ))
            .or_default();
        *c = c.saturating_add(count);
    }

    /// How many events the counters stand for: their sum, less the
    /// occurrences aggregated events carry beyond their own one.
    pub fn events_counted(&self, counters_total: i64) -> i64 {
        counters_total.saturating_sub(self.aggregated_extra)
    }

    /// Every agent row against the fold of its events (see `ledger::fold`).
    pub fn agents_match_log(
        &self,
        rows: &[aex_core::agent::AgentRecord],
        ledger_key: &[u8],
    ) -> Check {
        Check::new(
            "agents_match_log",
            "every agent's name, budget, token, policy and state is what its events say",
            "agent rows were edited outside AEX",
            self.agents.compare(rows, ledger_key),
        )
    }

    /// Every supervised process row against the fold of its events.
    pub fn processes_match_log(
        &self,
        rows: &[aex_core::process::ProcessRecord],
        ledger_key: &[u8],
    ) -> Check {
        Check::new(
            "processes_match_log",
            "every supervised process and its token is what its events say",
            "process rows were edited outside AEX",
            self.processes.compare(rows, ledger_key),
        )
    }

    /// Every data-plane credential row against the fold of its events.
    pub fn credentials_match_log(
        &self,
        rows: &[aex_core::credential::CredentialRecord],
        ledger_key: &[u8],
    ) -> Check {
        Check::new(
            "credentials_match_log",
            "every data-plane credential's secret, scope and state is what its events say",
            "data-plane credential rows were edited outside AEX",
            self.credentials.compare(rows, ledger_key),
        )
    }

    /// No call a data plane reported serving was refused by the ledger.
    pub fn reported_calls_recorded(&self) -> Check {
        let mut offenders = self.refused_reports.clone();
        if self.refused_total > offenders.len() {
            offenders.push(format!(
                "and {} more (`aexctl events --json | grep report.refused`)",
                self.refused_total - offenders.len()
            ));
        }
        Check::new(
            "reported_calls_recorded",
            "every call a data plane reported serving from a grant is in the ledger",
            "calls were served that the ledger could not record: their clients were answered and nothing was charged",
            offenders,
        )
    }

    /// Every grant row against the fold of its events.
    pub fn grants_match_log(&self, rows: &[aex_core::grant::GrantRecord]) -> Check {
        Check::new(
            "grants_match_log",
            "every grant row is what its issue, admits and end say",
            "grant rows were deleted, invented or edited",
            self.grants.compare(rows),
        )
    }

    /// The open reservation rows against the fold one by one, the closed
    /// ones by digest: the offenders so far, and the agents whose closed
    /// reservations differ (replay them with [`reservations_replayed`]).
    pub fn reservations_against(&mut self, data: &AuditData) -> (Vec<String>, Vec<String>) {
        let fold = std::mem::replace(
            &mut self.reservations,
            super::fold::ReservationFold::new(&[]),
        );
        fold.compare(&data.open_reservation_rows, &data.closed_reservations)
    }

    /// Hands the tally to the invariants.
    pub fn into_data(self, data: &mut AuditData) {
        data.charged = self.charged;
        data.overrun_logged = self.overrun;
        data.event_counts = self.event_counts;
    }
}

/// One agent's reservations replayed from its own events (read with its
/// rows in one snapshot): the rows that differ, by reservation id.
pub fn reservations_replayed(
    ledger_key: &[u8],
    rows: &[crate::ledger::fold::ReservationRow],
    events: &[EventRecord],
) -> Vec<String> {
    let mut fold = super::fold::ReservationFold::detailed(ledger_key);
    for e in events {
        fold.push(e);
    }
    fold.compare_detailed(rows)
}

/// The check over every reservation, from the offenders found.
pub fn reservations_match_log(mut offenders: Vec<String>) -> Check {
    offenders.sort();
    offenders.dedup();
    Check::new(
        "reservations_match_log",
        "every reservation row is what its admit and settlement events say",
        "reservation rows were deleted, invented or edited",
        offenders,
    )
}

fn name_of(data: &AuditData, agent_id: &str) -> String {
    data.agents
        .iter()
        .find(|a| a.id == agent_id)
        .map(|a| format!("agent '{}'", a.name))
        .unwrap_or_else(|| format!("agent id {agent_id}"))
}

/// Agents whose stored amount (`stored`) differs from the sum `source`
/// holds for them, one line each.
fn amounts_disagree(
    data: &AuditData,
    stored: fn(&aex_core::agent::AgentRecord) -> i64,
    expected: &std::collections::HashMap<String, i64>,
    what: &str,
    source: &str,
) -> Vec<String> {
    data.agents
        .iter()
        .filter_map(|a| {
            let sum = expected.get(&a.id).copied().unwrap_or(0);
            (stored(a) != sum).then(|| {
                format!(
                    "agent '{}': {what} {} µ but {source} sum to {sum} µ",
                    a.name,
                    stored(a)
                )
            })
        })
        .collect()
}

/// The chain reaches the head anchored outside the database, and no start
/// ever found it short of one (see `ledger::anchor`).
fn head_anchored(data: &AuditData) -> Check {
    use super::anchor::AnchorState;
    let mut offenders = Vec::new();
    let anchored = match &data.anchor {
        None => None,
        Some(AnchorState::Missing) => {
            offenders.push(
                "the head anchor file (AEX_HOME/ledger.head) is missing: it was deleted"
                    .to_string(),
            );
            None
        }
        Some(AnchorState::Invalid(why)) => {
            offenders.push(format!("the head anchor is forged or damaged: {why}"));
            None
        }
        Some(AnchorState::Damaged { newest, why }) => {
            offenders.push(format!("the head anchor is damaged: {why}"));
            Some(newest)
        }
        Some(AnchorState::Present(a)) => Some(a),
    };
    if let Some(a) = anchored {
        if data.last_seq < a.seq {
            offenders.push(if data.last_seq == 0 {
                format!("the database was wiped: it has no events, the anchor says the chain reached event {}", a.seq)
            } else {
                format!(
                    "the log ends at event {} but the anchor says it reached event {}: events {}..{} were removed",
                    data.last_seq, a.seq, data.last_seq + 1, a.seq
                )
            });
        } else if data.hash_at_anchor.as_deref() != Some(a.hash.as_str()) {
            offenders.push(format!(
                "event {} is not the one the anchor recorded: the chain was replaced from there",
                a.seq
            ));
        }
    }
    let mismatches = data
        .event_counts
        .get(&(
            String::new(),
            EventKind::LedgerHeadMismatch.as_str().to_string(),
        ))
        .copied()
        .unwrap_or(0);
    if mismatches > 0 {
        offenders.push(format!(
            "{mismatches} start(s) found the database short of its anchored head (ledger.head_mismatch events: `aexctl events --json | grep head_mismatch`)"
        ));
    }
    Check::new(
        "head_anchored",
        if data.anchor.is_some() {
            "the log reaches the head anchored outside the database"
        } else {
            "no head anchor kept by this store"
        },
        "the log does not reach its anchored head: events were removed or replaced",
        offenders,
    )
}

/// Every invariant except the chain (see [`super::verify::ChainVerifier`]).
/// Returns the checks and the agents with recorded overruns (provider-reported usage
/// beyond a reservation, never charged).
pub fn invariants(data: &AuditData) -> (Vec<Check>, Vec<String>) {
    let mut checks = Vec::new();

    // No exception for overruns: a charge never passes its reservation.
    let over: Vec<String> = data
        .agents
        .iter()
        .filter(|a| a.spent_micro > a.budget_micro)
        .map(|a| {
            format!(
                "agent '{}': spent {} µ > budget {} µ",
                a.name, a.spent_micro, a.budget_micro
            )
        })
        .collect();
    checks.push(Check::new(
        "spent_within_budget",
        "no agent spent more than its budget",
        "agents spent more than their budget",
        over,
    ));

    let negative: Vec<String> = data
        .agents
        .iter()
        .filter(|a| {
            a.budget_micro < 0 || a.spent_micro < 0 || a.reserved_micro < 0 || a.overrun_micro < 0
        })
        .map(|a| {
            format!(
                "agent '{}': budget {} spent {} reserved {} overrun {}",
                a.name, a.budget_micro, a.spent_micro, a.reserved_micro, a.overrun_micro
            )
        })
        .collect();
    checks.push(Check::new(
        "no_negative_values",
        "no negative budget, spend or reservation",
        "negative values",
        negative,
    ));

    // What is held for calls: open reservations and open grants' unused
    // parts (docs/LEDGER.md, `reserved_matches_open_reservations`).
    let mut held = data.open_reserved.clone();
    for g in &data.grants {
        let h = held.entry(g.agent_id.clone()).or_default();
        *h = h.saturating_add(g.unused_micro());
    }
    checks.push(Check::new(
        "reserved_matches_open_reservations",
        "every agent's reserved amount equals its open reservations and grants",
        "reserved amounts disagree with open reservations and grants",
        amounts_disagree(
            data,
            |a| a.reserved_micro,
            &held,
            "reserved",
            "open reservations and grants' unused parts",
        ),
    ));
    checks.push(Check::new(
        "spent_matches_settle_events",
        "every agent's spend equals the sum of its settle events",
        "spend disagrees with the event log",
        amounts_disagree(
            data,
            |a| a.spent_micro,
            &data.charged,
            "spent",
            "settle events",
        ),
    ));
    checks.push(Check::new(
        "overruns_match_events",
        "every agent's recorded overrun equals its overrun events",
        "recorded overruns disagree with the event log",
        amounts_disagree(
            data,
            |a| a.overrun_micro,
            &data.overrun_logged,
            "overrun",
            "overrun events",
        ),
    ));

    checks.push(head_anchored(data));

    let overdue: Vec<String> = data
        .overdue
        .iter()
        .map(|(id, agent, at)| {
            format!(
                "reservation {id} of {} expired at {at} and is still open",
                name_of(data, agent)
            )
        })
        .collect();
    checks.push(Check::new(
        "no_reservation_past_ttl",
        "no open reservation is past its TTL",
        "reservations outlived their TTL",
        overdue,
    ));
    let overdue_grants: Vec<String> = data
        .grants
        .iter()
        .filter(|g| g.state == aex_core::grant::GrantState::Open && g.deadline_ms < data.now_ms)
        .map(|g| {
            format!(
                "grant {} of {} (data plane {}) passed its deadline {} and is still open",
                g.id,
                name_of(data, &g.agent_id),
                g.data_plane,
                g.deadline_ms
            )
        })
        .collect();
    checks.push(Check::new(
        "no_grant_past_deadline",
        "no open grant is past its deadline",
        "grants outlived their deadline",
        overdue_grants,
    ));

    let mut keys: Vec<&(String, String)> = data
        .counters
        .keys()
        .chain(data.event_counts.keys())
        .collect();
    keys.sort();
    keys.dedup();
    let counters: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let counted = data.counters.get(k).copied().unwrap_or(0);
            let logged = data.event_counts.get(k).copied().unwrap_or(0);
            (counted != logged).then(|| {
                format!(
                    "{}: counter {} = {counted}, events = {logged}",
                    name_of(data, &k.0),
                    k.1
                )
            })
        })
        .collect();
    checks.push(Check::new(
        "counters_match_events",
        "denial and request counters equal the events in the log",
        "counters disagree with the event log",
        counters,
    ));

    let overruns = data
        .agents
        .iter()
        .filter(|a| a.overrun_micro > 0)
        .map(|a| {
            format!(
                "agent '{}' ({} not charged)",
                a.name,
                aex_core::money::overrun_text(a.overrun_micro)
            )
        })
        .collect();
    (checks, overruns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::verify::ChainVerifier;
    use aex_core::agent::{AgentRecord, AgentState, Caps, Scope};
    use aex_core::chain::{EventBody, GENESIS, chain_hash};

    fn events(key: &[u8], n: i64) -> Vec<EventRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let body = EventBody {
                    seq,
                    ts_ms: seq,
                    kind: "settle".into(),
                    agent_name: "a".into(),
                    amount_micro: 5,
                    ..Default::default()
                };
                let hash = chain_hash(key, &prev, &body);
                let e = EventRecord {
                    body,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn the_tally_sums_charges_and_counts_events_per_kind() {
        let mut evs = events(&[1; 32], 3);
        evs[2].body.kind = "deny".into();
        evs[2].body.reason = "rpm".into();
        let mut tally = LogTally::new(b"k");
        for e in &evs {
            tally.push(e);
        }
        let mut data = AuditData::default();
        tally.into_data(&mut data);
        // Two settles of 5 µ (agent id "" in these events); the deny charges nothing.
        assert_eq!(data.charged.get(""), Some(&10));
        assert_eq!(
            data.event_counts.get(&("".into(), "settle".into())),
            Some(&2)
        );
        assert_eq!(
            data.event_counts.get(&("".into(), "deny:rpm".into())),
            Some(&1)
        );
    }

    fn verify(key: &[u8], evs: &[EventRecord], expected: i64) -> Check {
        let mut v = ChainVerifier::new(key);
        for e in evs {
            v.push(e);
        }
        v.finish(expected)
    }

    #[test]
    fn an_intact_chain_passes_and_every_edit_is_named() {
        let key = [9u8; 32];
        let evs = events(&key, 5);
        assert!(verify(&key, &evs, 5).passed);
        // Deleted in the middle.
        let mut gap = evs.clone();
        gap.remove(2);
        assert!(verify(&key, &gap, 5).offenders[0].contains("event seq 3 is missing"));
        // Deleted at the end.
        assert!(verify(&key, &evs[..4], 5).offenders[0].contains("newest were deleted"));
        // Rewritten with a recomputed *unkeyed* hash.
        let mut forged = evs.clone();
        forged[1].body.amount_micro = 1;
        forged[1].hash = chain_hash(b"", &forged[1].prev_hash, &forged[1].body);
        assert!(verify(&key, &forged, 5).offenders[0].contains("event seq 2"));
        // The wrong key fails from the first event.
        assert!(!verify(b"other", &evs, 5).passed);
    }

    fn agent(id: &str, budget: i64, spent: i64, reserved: i64) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            name: id.into(),
            token_sha256: String::new(),
            token_prefix: String::new(),
            token_expires_at_ms: None,
            token_ttl_seconds: 0,
            budget_micro: budget,
            spent_micro: spent,
            reserved_micro: reserved,
            overrun_micro: 0,
            rpm: 1,
            tpm: 0,
            max_concurrent: 0,
            allowed_models: vec![],
            caps: Caps::default(),
            scope: Scope::Execution,
            state: AgentState::Active,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_activity_at_ms: None,
            deleted_at_ms: None,
        }
    }

    #[test]
    fn invariants_name_the_agent() {
        let mut d = AuditData {
            agents: vec![agent("ok", 100, 40, 10), agent("bad", 100, 150, 0)],
            ..Default::default()
        };
        d.open_reserved.insert("ok".into(), 10);
        d.charged.insert("ok".into(), 40);
        d.charged.insert("bad".into(), 150);
        for id in ["ok", "bad"] {
            d.event_counts.insert((id.into(), "admit".into()), 1);
            d.counters.insert((id.into(), "admit".into()), 1);
        }
        let (checks, overruns) = invariants(&d);
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["spent_within_budget"]);
        assert!(checks[0].offenders[0].contains("agent 'bad'"));
        assert!(overruns.is_empty());
        // Regression (hardening #3): a recorded overrun used to excuse a
        // spend past the budget. It no longer does: it is listed apart.
        d.agents[1].overrun_micro = 70;
        d.overrun_logged.insert("bad".into(), 70);
        let (checks, overruns) = invariants(&d);
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["spent_within_budget"]);
        assert_eq!(overruns, ["agent 'bad' ($0.000070 (70 µ) not charged)"]);
        d.agents[1].spent_micro = 100;
        d.charged.insert("bad".into(), 100);
        d.overrun_logged.insert("bad".into(), 69);
        let (checks, _) = invariants(&d);
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            failed,
            ["overruns_match_events"],
            "an edited overrun is named"
        );
        d.overrun_logged.insert("bad".into(), 70);
        let (checks, _) = invariants(&d);
        assert!(checks.iter().all(|c| c.passed), "{checks:?}");
        // Tampered spend and a counter without its events.
        d.agents[0].spent_micro = 41;
        d.counters.insert(("ok".into(), "deny:rpm".into()), 3);
        let (checks, _) = invariants(&d);
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            failed,
            ["spent_matches_settle_events", "counters_match_events"]
        );
    }
}
