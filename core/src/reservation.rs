//! Reservations: the worst-case cost of a call held against its agent's
//! budget, closed exactly once. The records, the closing states and the
//! events each step logs are decided here; a store backend makes each step
//! atomic (see `docs/ARCHITECTURE.md`, "Adding a store backend").

use crate::event::{EventKind, NewEvent};
use crate::money::{Pricing, TokenUsage};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    pub id: String,
    pub request_id: String,
    pub agent_id: String,
    pub model: String,
    pub amount_micro: i64,
    pub pricing: Pricing,
    pub input_tokens_bound: u64,
    pub output_tokens_cap: u64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A reservation to take, and the admit event's particulars.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub record: ReservationRecord,
    pub agent_name: String,
    /// What only admission knows (endpoint, stream, whether the output cap
    /// was injected); what the row holds is added by [`admit_event`].
    pub details: serde_json::Value,
    /// The agent's limit on reservations open at once (0: none), checked
    /// by the store in the same step as the budget, so that it holds across
    /// every control plane on the store.
    pub max_open: u32,
    /// The grant a data plane admitted this call from (docs/GRANTS.md): the
    /// amount moves from the grant's unused part to the reservation, so the
    /// agent's `reserved` does not change and the budget is not checked
    /// again (the grant's issue did).
    pub grant_id: Option<String>,
    /// Whether a refusal for the budget is logged (a `deny` event). Not
    /// when the control plane will decide again once it has recalled the
    /// agent's grants: only the decision the client sees is logged.
    pub log_budget_denial: bool,
    /// When the control plane took it: a refused report's event time
    /// (`record.created_at_ms` is when the call was admitted, by a data
    /// plane for a reported one).
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        remaining_micro: i64,
    },
    /// Nothing was reserved; a `deny` event with reason `budget` was logged.
    InsufficientBudget {
        remaining_micro: i64,
    },
    /// The agent already has `max_open` reservations open: nothing was
    /// reserved or logged (admission logs the denial).
    TooManyOpen,
    /// The request id was already admitted: this is that reservation, open.
    AlreadyAdmitted(ReservationRecord),
    /// The request id was admitted before and its reservation is closed
    /// (settled, released or expired): nothing was reserved, and the call
    /// must not go ahead on it.
    AlreadyClosed(ReservationRecord),
    /// The grant named cannot cover it (ended, unknown, another agent's,
    /// or too little left): nothing was reserved or logged.
    GrantNotCovered(String),
}

crate::named::named_set! {
    /// A reservation's state. The names are the stored form.
    ReservationState {
        Open => "open",
        /// Closed with a charge.
        Settled => "settled",
        /// Closed with nothing charged.
        Released => "released",
        /// Nobody settled it before its expiry; the sweeper closed it.
        Expired => "expired",
    }
}

impl ReservationState {
    /// The event that closes a reservation into this state (`None` for open).
    pub fn closing_event(self) -> Option<EventKind> {
        match self {
            ReservationState::Open => None,
            ReservationState::Settled => Some(EventKind::Settle),
            ReservationState::Released => Some(EventKind::Release),
            ReservationState::Expired => Some(EventKind::Expire),
        }
    }
}

crate::named::named_set! {
    /// How a call ended, as its data plane saw it. The names are the
    /// settlement event's reason and the reservation row's `outcome`.
    Outcome {
        Completed => "completed",
        UpstreamError => "upstream_error",
        UpstreamTimeout => "upstream_timeout",
        UpstreamRateLimited => "upstream_rate_limited",
        ClientDisconnected => "client_disconnected",
        CutOff => "cut_off",
        UpstreamRejected => "upstream_rejected",
    }
}

crate::named::named_set! {
    /// What happens to a reservation nobody settled before its expiry. The
    /// names are what an `expire` event's `policy` says.
    ExpiryPolicy {
        /// Charge the reserved amount: the provider may have been paid.
        Charge => "charge",
        /// Give it back.
        Release => "release",
    }
}

/// Why a reservation is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// The call finished (or failed) and its usage is known.
    Finished(Outcome),
    /// Its expiry passed with no settlement.
    Expired,
}

impl Closing {
    /// What the ledger calls it: the settlement event's reason and the
    /// row's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Closing::Finished(outcome) => outcome.as_str(),
            Closing::Expired => "expired",
        }
    }
}

/// An event logged with a settlement (an overrun, an upstream denial or
/// error), after the settlement's own.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraEvent {
    pub kind: EventKind,
    pub reason: String,
    pub details: serde_json::Value,
}

/// How a reservation ends.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation_id: String,
    /// The agent the reservation belongs to, as the caller knows it: a
    /// store may lock its rows by it before it reads the reservation (the
    /// reservation's own row still decides, and a different one is refused).
    pub agent_id: String,
    pub agent_name: String,
    pub closing: Closing,
    /// What to charge; never more than the reservation (see [`Settlement::charge_within`]).
    pub charge_micro: i64,
    /// Reported usage beyond the reservation (not charged).
    pub overrun_micro: i64,
    pub usage: TokenUsage,
    pub extra_events: Vec<ExtraEvent>,
    /// The settlement event's particulars; the token counts are added by
    /// [`Settlement::events`].
    pub details: serde_json::Value,
    /// When it was closed: its events' time and the row's `settled_at_ms`
    /// (the caller's clock, not the store's).
    pub at_ms: i64,
}

/// A reservation as a store read it to settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub agent_id: String,
    pub amount_micro: i64,
    pub state: ReservationState,
}

/// What a store does with a settlement ([`Settlement::decide`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Writes nothing and answers this.
    Answer(SettleOutcome),
    /// The reservation is another agent's than the settlement names:
    /// refused (the store's error), nothing written.
    AnotherAgent,
    /// Closes the reservation (found open inside the transaction or lock
    /// the write runs in), moves the agent's amounts and logs the events.
    Close(Close),
}

/// A reservation's close, as every store writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    pub agent_id: String,
    /// What leaves the agent's `reserved`.
    pub reserved_micro: i64,
    /// What the agent's `spent` takes ([`Settlement::charge_within`]).
    pub charge_micro: i64,
    /// What the agent's overrun total takes ([`Settlement::overrun`]).
    pub overrun_micro: i64,
    pub state: ReservationState,
    pub events: Vec<NewEvent>,
}

impl Settlement {
    /// Decides this settlement from the reservation the store found: once
    /// closed, a reservation stays as it is however often it is settled.
    pub fn decide(&self, found: Option<Held>) -> Settle {
        let Some(held) = found else {
            return Settle::Answer(SettleOutcome::UnknownReservation);
        };
        if held.agent_id != self.agent_id {
            return Settle::AnotherAgent;
        }
        if held.state != ReservationState::Open {
            return Settle::Answer(SettleOutcome::AlreadyClosed);
        }
        let charge = self.charge_within(held.amount_micro);
        Settle::Close(Close {
            events: self.events(&held.agent_id, charge, self.at_ms),
            state: self.final_state(charge),
            agent_id: held.agent_id,
            reserved_micro: held.amount_micro,
            charge_micro: charge,
            overrun_micro: self.overrun(),
        })
    }

    /// The charge as applied to a reservation of `reserved_micro`: never
    /// negative, never more than was reserved, so spent stays within budget.
    pub fn charge_within(&self, reserved_micro: i64) -> i64 {
        self.charge_micro.clamp(0, reserved_micro.max(0))
    }

    /// The overrun recorded: never negative.
    pub fn overrun(&self) -> i64 {
        self.overrun_micro.max(0)
    }

    /// The state this settlement closes the reservation into, given the
    /// charge as applied: decided here only.
    pub fn final_state(&self, charge_micro: i64) -> ReservationState {
        match self.closing {
            Closing::Expired => ReservationState::Expired,
            Closing::Finished(_) if charge_micro == 0 => ReservationState::Released,
            Closing::Finished(_) => ReservationState::Settled,
        }
    }

    /// The events that log this settlement of a reservation of `agent_id`:
    /// its own (with the charge and the token counts its row stores), then
    /// the extra ones, of which an overrun carries its amount so audit can
    /// total it.
    pub fn events(&self, agent_id: &str, charge_micro: i64, now: i64) -> Vec<NewEvent> {
        let mut details = match &self.details {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        details.insert("prompt_tokens".into(), json!(self.usage.input));
        details.insert("completion_tokens".into(), json!(self.usage.output));
        // Only when the provider reported them, so a ledger without cache
        // prices reads as it always did.
        if self.usage.cached_input > 0 {
            details.insert("cached_input_tokens".into(), json!(self.usage.cached_input));
        }
        if self.usage.cache_write > 0 {
            details.insert("cache_write_tokens".into(), json!(self.usage.cache_write));
        }
        let kind = self
            .final_state(charge_micro)
            .closing_event()
            .expect("a settlement closes");
        let event = |kind: EventKind, reason: &str, details: serde_json::Value, amount: i64| {
            NewEvent::about(now, kind, agent_id, &self.agent_name)
                .reservation(&self.reservation_id)
                .amount(amount)
                .reason(reason)
                .details(details)
        };
        let mut events = vec![event(
            kind,
            self.closing.as_str(),
            serde_json::Value::Object(details),
            charge_micro,
        )];
        for extra in &self.extra_events {
            let amount = if extra.kind == EventKind::Overrun {
                self.overrun()
            } else {
                0
            };
            events.push(event(
                extra.kind,
                &extra.reason,
                extra.details.clone(),
                amount,
            ));
        }
        events
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled {
        charged_micro: i64,
        remaining_micro: i64,
    },
    /// Settled, released or expired before; nothing changed.
    AlreadyClosed,
    UnknownReservation,
}

/// The admit event says everything its reservation row holds (what audit
/// replays), whatever the caller added: the record's values win over the
/// caller's details of the same name.
pub fn admit_event(n: &NewReservation) -> NewEvent {
    let r = &n.record;
    let mut details = match &n.details {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    for (k, v) in [
        ("request_id", json!(r.request_id)),
        ("model", json!(r.model)),
        ("input_tokens_bound", json!(r.input_tokens_bound)),
        ("output_tokens_cap", json!(r.output_tokens_cap)),
        (
            "input_pico_per_token",
            json!(r.pricing.input_pico_per_token),
        ),
        (
            "output_pico_per_token",
            json!(r.pricing.output_pico_per_token),
        ),
    ] {
        details.insert(k.to_string(), v);
    }
    if r.pricing.prices_cache() {
        details.insert(
            "cached_input_pico_per_token".into(),
            json!(r.pricing.cached_input_pico_per_token),
        );
        details.insert(
            "cache_write_pico_per_token".into(),
            json!(r.pricing.cache_write_pico_per_token),
        );
    }
    if let Some(grant) = &n.grant_id {
        details.insert("grant".to_string(), json!(grant));
    }
    NewEvent::about(
        r.created_at_ms,
        EventKind::Admit,
        &r.agent_id,
        &n.agent_name,
    )
    .reservation(&r.id)
    .amount(r.amount_micro)
    .details(serde_json::Value::Object(details))
}

/// The denial logged when the budget does not cover the reservation.
/// (`n.details` names the endpoint, as admission gave it.)
pub fn budget_denial_event(n: &NewReservation, remaining_micro: i64) -> NewEvent {
    let r = &n.record;
    let endpoint = n.details["endpoint"].as_str().unwrap_or("");
    NewEvent::about(r.created_at_ms, EventKind::Deny, &r.agent_id, &n.agent_name)
        .reason(crate::denial::Rule::Budget.as_str())
        .details(budget_denial_details(r, endpoint, remaining_micro))
}

/// What the `deny` event of a reservation the budget refused says: the
/// call's particulars (`denial::deny_details`), what it needed and what
/// was left.
pub fn budget_denial_details(
    r: &ReservationRecord,
    endpoint: &str,
    remaining_micro: i64,
) -> serde_json::Value {
    let mut details = crate::denial::deny_details(
        &r.request_id,
        402,
        crate::denial::DenialCode::BudgetExceeded,
        endpoint,
        &r.model,
    );
    details.insert("needed_micro".into(), json!(r.amount_micro));
    details.insert("remaining_micro".into(), json!(remaining_micro));
    serde_json::Value::Object(details)
}

/// A refused request, for the ledger.
#[derive(Debug, Clone)]
pub struct DenialRecord {
    pub agent_id: String,
    pub agent_name: String,
    pub reason: String,
    pub details: serde_json::Value,
    /// Denials this record stands for: 1, or a window of unauthenticated
    /// ones aggregated into one event (`details.count` says so too).
    pub count: u64,
    /// When it was refused: its event's time.
    pub at_ms: i64,
}

impl DenialRecord {
    pub fn event(&self) -> NewEvent {
        let mut event = NewEvent::about(
            self.at_ms,
            EventKind::Deny,
            &self.agent_id,
            &self.agent_name,
        )
        .reason(&self.reason)
        .details(self.details.clone());
        event.count = i64::try_from(self.count.max(1)).unwrap_or(i64::MAX);
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settlement(closing: Closing, charge: i64) -> Settlement {
        Settlement {
            reservation_id: "rsv_1".into(),
            agent_id: "agt_1".into(),
            agent_name: "dev".into(),
            closing,
            charge_micro: charge,
            overrun_micro: 7,
            usage: TokenUsage::new(3, 4),
            extra_events: vec![ExtraEvent {
                kind: EventKind::Overrun,
                reason: "usage_above_reservation".into(),
                details: json!({}),
            }],
            details: json!({"model": "m"}),
            at_ms: 9,
        }
    }

    #[test]
    fn the_closing_state_follows_the_charge_as_applied() {
        let s = settlement(Closing::Finished(Outcome::Completed), 500);
        assert_eq!(s.charge_within(100), 100);
        assert_eq!(s.final_state(100), ReservationState::Settled);
        assert_eq!(s.final_state(0), ReservationState::Released);
        assert_eq!(
            settlement(Closing::Finished(Outcome::Completed), -5).charge_within(100),
            0
        );
        let e = settlement(Closing::Expired, 100);
        assert_eq!(e.final_state(100), ReservationState::Expired);
        assert_eq!(e.final_state(0), ReservationState::Expired);
    }

    #[test]
    fn a_reservation_closes_once_and_only_as_its_own_agent() {
        let s = settlement(Closing::Finished(Outcome::Completed), 500);
        let held = |agent: &str, state| Held {
            agent_id: agent.into(),
            amount_micro: 100,
            state,
        };
        assert_eq!(
            s.decide(None),
            Settle::Answer(SettleOutcome::UnknownReservation)
        );
        assert_eq!(
            s.decide(Some(held("agt_2", ReservationState::Open))),
            Settle::AnotherAgent
        );
        for closed in [
            ReservationState::Settled,
            ReservationState::Released,
            ReservationState::Expired,
        ] {
            assert_eq!(
                s.decide(Some(held("agt_1", closed))),
                Settle::Answer(SettleOutcome::AlreadyClosed)
            );
        }
        let Settle::Close(close) = s.decide(Some(held("agt_1", ReservationState::Open))) else {
            panic!("closes")
        };
        assert_eq!(
            (
                close.reserved_micro,
                close.charge_micro,
                close.overrun_micro
            ),
            (100, 100, 7)
        );
        assert_eq!(close.state, ReservationState::Settled);
        assert!(close.events.iter().all(|e| e.ts_ms == 9));
    }

    #[test]
    fn a_settlement_logs_itself_then_its_extras() {
        let events = settlement(Closing::Finished(Outcome::Completed), 40).events("agt_1", 40, 9);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Settle);
        assert_eq!(events[0].amount_micro, 40);
        assert_eq!(events[0].reason, "completed");
        assert_eq!(events[0].details["prompt_tokens"], 3);
        assert_eq!(events[0].details["model"], "m");
        assert_eq!(events[1].kind, EventKind::Overrun);
        assert_eq!(events[1].amount_micro, 7);
        assert!(
            events
                .iter()
                .all(|e| e.reservation_id == "rsv_1" && e.ts_ms == 9)
        );
    }
}
