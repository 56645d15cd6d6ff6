//! Reservations as folds of their events: an `admit` opens one, a
//! `settle`, `release` or `expire` closes it, an `overrun` right after adds
//! what the provider reported beyond it. Audit compares every row with what
//! the log says, so a charge moved between reservations, an outcome, token
//! count or state rewritten, or a row deleted or invented is named.
//!
//! Memory stays bounded by the open reservations, not by the history:
//! closed ones are folded into a keyed digest per agent as they close, and
//! the store digests its closed rows the same way. Only an agent whose
//! digests differ is replayed one reservation at a time (from its own
//! events, [`ReservationFold::detailed`]) to name the rows.

use super::derived_key;
use aex_core::event::{EventKind, EventRecord};
use aex_core::money::Pricing;
use aex_core::reservation::ReservationState;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};

/// One reservation as its row describes it and as the log must.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReservationFacts {
    pub id: String,
    pub agent_id: String,
    pub request_id: String,
    pub model: String,
    pub amount_micro: i64,
    pub input_tokens_bound: i64,
    pub output_tokens_cap: i64,
    pub created_at_ms: i64,
    /// `open`, `settled`, `released` or `expired`.
    pub state: String,
    pub settled_at_ms: Option<i64>,
    pub charged_micro: Option<i64>,
    pub outcome: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// Parts of `prompt_tokens` the provider read from or wrote to its
    /// cache (0 when it reported none).
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub overrun_micro: i64,
}

/// A reservation row: its facts, and the prices it settles at. The prices
/// are compared while the reservation is open (closed, its charge is fixed
/// by its logged settlement) and only where the admit event logged them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    pub facts: ReservationFacts,
    pub pricing: Pricing,
}

/// Per agent: how many closed reservations, and the wrapping sum of their
/// keyed MACs — equal for the rows and the log exactly when they hold the
/// same closed reservations (a keyed sum cannot be matched without the key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClosedDigest {
    per_agent: BTreeMap<String, (i64, u128)>,
    key: Vec<u8>,
}

impl ClosedDigest {
    pub fn new(ledger_key: &[u8]) -> Self {
        Self {
            per_agent: BTreeMap::new(),
            key: derived_key(ledger_key, b"aex/reservation-digest/v1"),
        }
    }

    pub fn add(&mut self, f: &ReservationFacts) {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        let opt = |v: Option<i64>| v.map_or(String::new(), |v| v.to_string());
        for text in [
            f.id.as_str(),
            &f.agent_id,
            &f.request_id,
            &f.model,
            &f.amount_micro.to_string(),
            &f.input_tokens_bound.to_string(),
            &f.output_tokens_cap.to_string(),
            &f.created_at_ms.to_string(),
            &f.state,
            &opt(f.settled_at_ms),
            &opt(f.charged_micro),
            f.outcome.as_deref().unwrap_or(""),
            &opt(f.prompt_tokens),
            &opt(f.completion_tokens),
            &f.cached_input_tokens.to_string(),
            &f.cache_write_tokens.to_string(),
            &f.overrun_micro.to_string(),
        ] {
            field(text.as_bytes());
        }
        let bytes = mac.finalize().into_bytes();
        let value = u128::from_be_bytes(bytes[..16].try_into().expect("16 of 32 bytes"));
        let entry = self.per_agent.entry(f.agent_id.clone()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.wrapping_add(value);
    }

    /// Agents whose closed reservations differ between `self` and `other`.
    pub fn differing_agents(&self, other: &ClosedDigest) -> Vec<String> {
        let mut agents: Vec<&String> = self
            .per_agent
            .keys()
            .chain(other.per_agent.keys())
            .collect();
        agents.sort();
        agents.dedup();
        agents
            .into_iter()
            .filter(|a| self.per_agent.get(*a) != other.per_agent.get(*a))
            .cloned()
            .collect()
    }
}

#[derive(Debug)]
struct Open {
    facts: ReservationFacts,
    /// None: admitted before admit events logged prices.
    pricing: Option<Pricing>,
}

#[derive(Debug)]
pub struct ReservationFold {
    open: HashMap<String, Open>,
    /// Closed a moment ago: an `overrun` event may follow it.
    just_closed: Option<ReservationFacts>,
    closed: ClosedDigest,
    /// Replaying one agent: every closed reservation kept, by id.
    kept: Option<BTreeMap<String, ReservationFacts>>,
    problems: Vec<String>,
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Token counts are stored saturated (providers' values are untrusted).
fn stored_tokens(v: &Value) -> i64 {
    v.as_u64()
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ReservationFold {
    pub fn new(ledger_key: &[u8]) -> Self {
        Self {
            open: HashMap::new(),
            just_closed: None,
            closed: ClosedDigest::new(ledger_key),
            kept: None,
            problems: Vec::new(),
        }
    }

    /// A fold that keeps every reservation, to name rows one by one: fed
    /// one agent's events (see the module comment).
    pub fn detailed(ledger_key: &[u8]) -> Self {
        Self {
            kept: Some(BTreeMap::new()),
            ..Self::new(ledger_key)
        }
    }

    fn flush(&mut self) {
        if let Some(f) = self.just_closed.take() {
            self.closed.add(&f);
            if let Some(kept) = &mut self.kept {
                kept.insert(f.id.clone(), f);
            }
        }
    }

    pub fn push(&mut self, e: &EventRecord) {
        let b = &e.body;
        let kind = EventKind::parse(&b.kind);
        if kind == Some(EventKind::Overrun)
            && let Some(f) = &mut self.just_closed
            && f.id == b.reservation_id
        {
            f.overrun_micro = f.overrun_micro.saturating_add(b.amount_micro);
            return;
        }
        let closing_state = match kind {
            Some(EventKind::Admit) => None,
            Some(EventKind::Settle) => Some(ReservationState::Settled.as_str()),
            Some(EventKind::Release) => Some(ReservationState::Released.as_str()),
            Some(EventKind::Expire) => Some(ReservationState::Expired.as_str()),
            Some(EventKind::Overrun) => {
                self.problems.push(format!(
                    "event seq {} records an overrun of reservation {} apart from its settlement",
                    b.seq, b.reservation_id
                ));
                return;
            }
            _ => return,
        };
        self.flush();
        let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
        let Some(state) = closing_state else {
            let pricing = match (
                details["input_pico_per_token"].as_i64(),
                details["output_pico_per_token"].as_i64(),
            ) {
                // Cache prices are logged only where they differ from the
                // input price (see `admit_event`).
                (Some(input), Some(output)) => Some(Pricing::with_optional_cache(
                    input,
                    output,
                    details["cached_input_pico_per_token"].as_i64(),
                    details["cache_write_pico_per_token"].as_i64(),
                )),
                _ => None,
            };
            let facts = ReservationFacts {
                id: b.reservation_id.clone(),
                agent_id: b.agent_id.clone(),
                request_id: details["request_id"].as_str().unwrap_or("").to_string(),
                model: details["model"].as_str().unwrap_or("").to_string(),
                amount_micro: b.amount_micro,
                input_tokens_bound: int(&details["input_tokens_bound"]),
                output_tokens_cap: int(&details["output_tokens_cap"]),
                created_at_ms: b.ts_ms,
                state: "open".to_string(),
                ..Default::default()
            };
            let id = facts.id.clone();
            if self
                .open
                .insert(id.clone(), Open { facts, pricing })
                .is_some()
            {
                self.problems
                    .push(format!("reservation {id} is admitted twice in the log"));
            }
            return;
        };
        let Some(Open { mut facts, .. }) = self.open.remove(&b.reservation_id) else {
            self.problems.push(format!(
                "event seq {} ({}) closes reservation {}, which the log has not open",
                b.seq, b.kind, b.reservation_id
            ));
            return;
        };
        facts.state = state.to_string();
        facts.settled_at_ms = Some(b.ts_ms);
        facts.charged_micro = Some(b.amount_micro);
        facts.outcome = Some(b.reason.clone());
        facts.prompt_tokens = Some(stored_tokens(&details["prompt_tokens"]));
        facts.completion_tokens = Some(stored_tokens(&details["completion_tokens"]));
        facts.cached_input_tokens = stored_tokens(&details["cached_input_tokens"]);
        facts.cache_write_tokens = stored_tokens(&details["cache_write_tokens"]);
        self.just_closed = Some(facts);
    }

    /// Compares the rows with the fold: `open_rows` one by one, closed
    /// ones by digest. Returns the offenders and the agents whose closed
    /// reservations differ (to replay with [`Self::detailed`]).
    pub fn compare(
        mut self,
        open_rows: &[ReservationRow],
        closed_rows: &ClosedDigest,
    ) -> (Vec<String>, Vec<String>) {
        self.flush();
        let mut offenders = std::mem::take(&mut self.problems);
        for row in open_rows {
            match self.open.remove(&row.facts.id) {
                None => offenders.push(format!(
                    "reservation {} (agent id {}) is open but the log has no such open reservation: invented or reopened",
                    row.facts.id, row.facts.agent_id
                )),
                Some(logged) => {
                    let mut differs = field_differences(&row.facts, &logged.facts);
                    if let Some(p) = logged.pricing
                        && p != row.pricing
                    {
                        differs.push(format!(
                            "prices are {:?} but the log says {p:?}",
                            row.pricing
                        ));
                    }
                    if !differs.is_empty() {
                        offenders.push(format!(
                            "reservation {}: {}",
                            row.facts.id,
                            differs.join("; ")
                        ));
                    }
                }
            }
        }
        let mut still_open: Vec<&String> = self.open.keys().collect();
        still_open.sort();
        for id in still_open {
            offenders.push(format!(
                "reservation {id} is open in the log but its row is gone or was closed without an event"
            ));
        }
        (offenders, self.closed.differing_agents(closed_rows))
    }

    /// One agent replayed: every row of it against the log, by id.
    pub fn compare_detailed(mut self, rows: &[ReservationRow]) -> Vec<String> {
        self.flush();
        let mut offenders = std::mem::take(&mut self.problems);
        let mut kept = self.kept.take().unwrap_or_default();
        for row in rows {
            let logged = kept
                .remove(&row.facts.id)
                .or_else(|| self.open.remove(&row.facts.id).map(|o| o.facts));
            match logged {
                None => offenders.push(format!(
                    "reservation {} ({}) has a row the log does not account for: invented",
                    row.facts.id, row.facts.state
                )),
                Some(logged) => {
                    let differs = field_differences(&row.facts, &logged);
                    if !differs.is_empty() {
                        offenders.push(format!(
                            "reservation {}: {}",
                            row.facts.id,
                            differs.join("; ")
                        ));
                    }
                }
            }
        }
        for id in kept.keys().chain(self.open.keys()) {
            offenders.push(format!(
                "reservation {id} is in the log but its row was deleted"
            ));
        }
        offenders
    }
}

fn field_differences(row: &ReservationFacts, log: &ReservationFacts) -> Vec<String> {
    let mut differs = Vec::new();
    let mut check = |what: &str, row_value: String, log_value: String| {
        if row_value != log_value {
            differs.push(format!(
                "{what} is {row_value} but the log says {log_value}"
            ));
        }
    };
    let opt = |v: Option<i64>| v.map_or("none".to_string(), |v| v.to_string());
    check("agent", row.agent_id.clone(), log.agent_id.clone());
    check("request_id", row.request_id.clone(), log.request_id.clone());
    check("model", row.model.clone(), log.model.clone());
    check(
        "amount_micro",
        row.amount_micro.to_string(),
        log.amount_micro.to_string(),
    );
    check(
        "input_tokens_bound",
        row.input_tokens_bound.to_string(),
        log.input_tokens_bound.to_string(),
    );
    check(
        "output_tokens_cap",
        row.output_tokens_cap.to_string(),
        log.output_tokens_cap.to_string(),
    );
    check(
        "created_at_ms",
        row.created_at_ms.to_string(),
        log.created_at_ms.to_string(),
    );
    check("state", row.state.clone(), log.state.clone());
    check(
        "settled_at_ms",
        opt(row.settled_at_ms),
        opt(log.settled_at_ms),
    );
    check(
        "charged_micro",
        opt(row.charged_micro),
        opt(log.charged_micro),
    );
    check(
        "outcome",
        row.outcome.clone().unwrap_or_default(),
        log.outcome.clone().unwrap_or_default(),
    );
    check(
        "prompt_tokens",
        opt(row.prompt_tokens),
        opt(log.prompt_tokens),
    );
    check(
        "completion_tokens",
        opt(row.completion_tokens),
        opt(log.completion_tokens),
    );
    check(
        "cached_input_tokens",
        row.cached_input_tokens.to_string(),
        log.cached_input_tokens.to_string(),
    );
    check(
        "cache_write_tokens",
        row.cache_write_tokens.to_string(),
        log.cache_write_tokens.to_string(),
    );
    check(
        "overrun_micro",
        row.overrun_micro.to_string(),
        log.overrun_micro.to_string(),
    );
    differs
}

#[cfg(test)]
mod tests {
    use super::*;
    use aex_core::chain::EventBody;

    const KEY: &[u8] = b"k";

    fn event(
        seq: i64,
        kind: &str,
        rsv: &str,
        amount: i64,
        reason: &str,
        details: Value,
    ) -> EventRecord {
        EventRecord {
            body: EventBody {
                seq,
                ts_ms: 1000 + seq,
                kind: kind.into(),
                agent_id: "agt_1".into(),
                agent_name: "a".into(),
                reservation_id: rsv.into(),
                amount_micro: amount,
                reason: reason.into(),
                details_json: details.to_string(),
            },
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn log() -> Vec<EventRecord> {
        let admit = |seq, rsv: &str| {
            event(
                seq,
                "admit",
                rsv,
                100,
                "",
                serde_json::json!({
                    "request_id": format!("req_{rsv}"), "model": "m", "input_tokens_bound": 10,
                    "output_tokens_cap": 20, "input_pico_per_token": 5, "output_pico_per_token": 7,
                    "cached_input_pico_per_token": 1,
                }),
            )
        };
        let tokens = serde_json::json!({"prompt_tokens": 3, "completion_tokens": 4,
            "cached_input_tokens": 2});
        vec![
            admit(1, "r1"),
            admit(2, "r2"),
            admit(3, "r3"),
            event(4, "settle", "r1", 60, "completed", tokens.clone()),
            event(
                5,
                "overrun",
                "r1",
                9,
                "usage_above_reservation",
                serde_json::json!({}),
            ),
            event(6, "release", "r2", 0, "upstream_rejected", tokens),
        ]
    }

    /// The rows AEX itself would have written for [`log`].
    fn rows() -> Vec<ReservationRow> {
        let base = |id: &str, seq: i64| ReservationFacts {
            id: id.into(),
            agent_id: "agt_1".into(),
            request_id: format!("req_{id}"),
            model: "m".into(),
            amount_micro: 100,
            input_tokens_bound: 10,
            output_tokens_cap: 20,
            created_at_ms: 1000 + seq,
            state: "open".into(),
            ..Default::default()
        };
        let closed = |mut f: ReservationFacts,
                      state: &str,
                      at: i64,
                      charge: i64,
                      outcome: &str,
                      overrun: i64| {
            f.state = state.into();
            f.settled_at_ms = Some(1000 + at);
            f.charged_micro = Some(charge);
            f.outcome = Some(outcome.into());
            f.prompt_tokens = Some(3);
            f.completion_tokens = Some(4);
            f.cached_input_tokens = 2;
            f.overrun_micro = overrun;
            f
        };
        // No cache write price logged: it is the input price.
        let pricing = Pricing::flat(5, 7).with_cache(1, 5);
        [
            closed(base("r1", 1), "settled", 4, 60, "completed", 9),
            closed(base("r2", 2), "released", 6, 0, "upstream_rejected", 0),
            base("r3", 3),
        ]
        .into_iter()
        .map(|facts| ReservationRow { facts, pricing })
        .collect()
    }

    fn audit(rows: &[ReservationRow]) -> Vec<String> {
        let mut fold = ReservationFold::new(KEY);
        for e in log() {
            fold.push(&e);
        }
        let mut digest = ClosedDigest::new(KEY);
        for r in rows.iter().filter(|r| r.facts.state != "open") {
            digest.add(&r.facts);
        }
        let open: Vec<ReservationRow> = rows
            .iter()
            .filter(|r| r.facts.state == "open")
            .cloned()
            .collect();
        let (mut offenders, agents) = fold.compare(&open, &digest);
        for agent in agents {
            let mut detailed = ReservationFold::detailed(KEY);
            for e in log().iter().filter(|e| e.body.agent_id == agent) {
                detailed.push(e);
            }
            let theirs: Vec<ReservationRow> = rows
                .iter()
                .filter(|r| r.facts.agent_id == agent)
                .cloned()
                .collect();
            offenders.extend(detailed.compare_detailed(&theirs));
        }
        offenders
    }

    #[test]
    fn rows_written_by_aex_match_their_log() {
        assert_eq!(audit(&rows()), Vec::<String>::new());
    }

    #[test]
    fn every_edit_of_a_row_is_named_by_reservation() {
        type Edit = fn(&mut Vec<ReservationRow>);
        let edits: [(&str, Edit, &str); 11] = [
            (
                "charge moved",
                |r| {
                    r[0].facts.charged_micro = Some(0);
                    r[1].facts.charged_micro = Some(60);
                },
                "reservation r1: charged_micro is 0",
            ),
            (
                "state flipped",
                |r| r[1].facts.state = "settled".into(),
                "reservation r2: state is settled",
            ),
            (
                "tokens rewritten",
                |r| r[0].facts.completion_tokens = Some(1),
                "completion_tokens is 1",
            ),
            (
                "cached tokens rewritten",
                |r| r[0].facts.cached_input_tokens = 3,
                "reservation r1: cached_input_tokens is 3 but the log says 2",
            ),
            (
                "cache writes invented",
                |r| r[1].facts.cache_write_tokens = 1,
                "reservation r2: cache_write_tokens is 1 but the log says 0",
            ),
            (
                "open row's cached input repriced",
                |r| r[2].pricing.cached_input_pico_per_token = 5,
                "prices are",
            ),
            (
                "overrun erased",
                |r| r[0].facts.overrun_micro = 0,
                "overrun_micro is 0 but the log says 9",
            ),
            (
                "closed row deleted",
                |r| {
                    r.remove(1);
                },
                "reservation r2 is in the log but its row was deleted",
            ),
            (
                "open row deleted",
                |r| {
                    r.remove(2);
                },
                "reservation r3 is open in the log",
            ),
            (
                "open row reprices",
                |r| r[2].pricing.output_pico_per_token = 0,
                "prices are",
            ),
            (
                "row invented",
                |r| {
                    let mut extra = r[0].clone();
                    extra.facts.id = "r9".into();
                    r.push(extra);
                },
                "reservation r9 (settled) has a row the log does not account for",
            ),
        ];
        for (what, edit, expected) in edits {
            let mut rows = rows();
            edit(&mut rows);
            let offenders = audit(&rows);
            assert!(
                offenders.iter().any(|o| o.contains(expected)),
                "{what}: {offenders:?}"
            );
        }
    }

    #[test]
    fn a_settlement_of_nothing_open_is_named() {
        let mut fold = ReservationFold::new(KEY);
        for e in log() {
            fold.push(&e);
        }
        fold.push(&event(
            7,
            "settle",
            "r1",
            60,
            "completed",
            serde_json::json!({}),
        ));
        let (offenders, _) = fold.compare(&[], &ClosedDigest::new(KEY));
        assert!(
            offenders
                .iter()
                .any(|o| o.contains("closes reservation r1")),
            "{offenders:?}"
        );
    }
}
