//! The decision of a reservation, the same in every store: a store reads
//! what [`ReserveRead`] holds inside the transaction (or under the lock) its
//! write will run in, asks [`decide`], and writes what it answers. The
//! order is the rule: a request id already reserved is answered as it
//! stands (a retry never takes twice); a call a data plane admitted from a
//! grant is carved from it (its budget was checked when the grant was
//! issued); otherwise the agent's limit on open reservations, then its
//! budget.

use crate::agent::Funds;
use crate::event::NewEvent;
use crate::grant::{GrantRecord, carve_call, refused_report_event};
use crate::reservation::{
    NewReservation, ReservationRecord, ReservationState, ReserveOutcome, admit_event,
    budget_denial_event,
};
use std::borrow::Cow;

/// What a store read for one reservation.
#[derive(Debug, Clone, Default)]
pub struct ReserveRead {
    /// The reservation this request id already has, and its state.
    pub existing: Option<(ReservationRecord, ReservationState)>,
    /// The agent's amounts; `None` when no agent (deleted or not) has the id.
    pub funds: Option<Funds>,
    /// The grant the call names, as found (read only for a call from one).
    pub grant: Option<GrantRecord>,
    /// The agent's open reservations ([`counts_open`]).
    pub open: u64,
}

/// Whether [`decide`] needs the agent's count of open reservations.
pub fn counts_open(n: &NewReservation) -> bool {
    n.grant_id.is_none() && n.max_open > 0
}

/// What the store does.
#[derive(Debug, Clone)]
pub enum Reserve<'n> {
    /// Writes nothing, logs `event` if any, and answers `outcome`.
    Answer {
        outcome: ReserveOutcome,
        event: Option<NewEvent>,
    },
    /// A reported call the ledger cannot record: logs `event` unless this
    /// reservation's refusal is already in the chain (a resent report is
    /// refused again, and logged once), and answers
    /// [`ReserveOutcome::GrantNotCovered`] with `why`.
    NotCovered { why: String, event: NewEvent },
    /// No agent has the id: the store's `AgentNotFound`, nothing written.
    UnknownAgent,
    /// Writes the reservation (boxed: the other answers are small).
    Take(Box<Take<'n>>),
}

/// A reservation to write, in one step: the grant's row (for a call from a
/// grant), the agent's amounts, the reservation's row and its admit event.
#[derive(Debug, Clone)]
pub struct Take<'n> {
    /// The reservation as its row and admit event say it (a late report
    /// says so in its details: [`crate::grant::Carve::reservation`]).
    pub reservation: Cow<'n, NewReservation>,
    /// The grant's row after the call, when it came from one.
    pub grant_after: Option<GrantRecord>,
    /// What the agent's `reserved` moves by.
    pub reserved_delta: i64,
    /// What the agent's `spent` moves by.
    pub spent_delta: i64,
    /// The agent's free budget after.
    pub remaining_micro: i64,
    pub event: NewEvent,
}

/// Decides reservation `n` from what the store read.
pub fn decide(n: &NewReservation, read: ReserveRead) -> Reserve<'_> {
    let r = &n.record;
    if let Some((existing, state)) = read.existing {
        let outcome = if state == ReservationState::Open {
            ReserveOutcome::AlreadyAdmitted(existing)
        } else {
            ReserveOutcome::AlreadyClosed(existing)
        };
        return Reserve::Answer {
            outcome,
            event: None,
        };
    }
    let Some(funds) = read.funds else {
        return Reserve::UnknownAgent;
    };
    if let Some(grant_id) = &n.grant_id {
        return match carve_call(read.grant.as_ref(), grant_id, &r.agent_id, r.amount_micro) {
            Err(why) => Reserve::NotCovered {
                event: refused_report_event(n, grant_id, &why, n.at_ms),
                why,
            },
            Ok(carve) => {
                let reservation = carve.reservation(n);
                Reserve::Take(Box::new(Take {
                    event: admit_event(&reservation),
                    reservation,
                    reserved_delta: carve.reserved_delta,
                    spent_delta: -carve.uncharged_micro,
                    remaining_micro: funds.free_micro - carve.reserved_delta
                        + carve.uncharged_micro,
                    grant_after: Some(carve.after),
                }))
            }
        };
    }
    if counts_open(n) && read.open >= u64::from(n.max_open) {
        return Reserve::Answer {
            outcome: ReserveOutcome::TooManyOpen,
            event: None,
        };
    }
    if !funds.live || funds.free_micro < r.amount_micro {
        return Reserve::Answer {
            outcome: ReserveOutcome::InsufficientBudget {
                remaining_micro: funds.free_micro,
            },
            event: n
                .log_budget_denial
                .then(|| budget_denial_event(n, funds.free_micro)),
        };
    }
    Reserve::Take(Box::new(Take {
        event: admit_event(n),
        reservation: Cow::Borrowed(n),
        grant_after: None,
        reserved_delta: r.amount_micro,
        spent_delta: 0,
        remaining_micro: funds.free_micro - r.amount_micro,
    }))
}

impl Take<'_> {
    /// What the store answers once it has written the take.
    pub fn outcome(&self) -> ReserveOutcome {
        ReserveOutcome::Reserved {
            remaining_micro: self.remaining_micro,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::grant::{GrantState, LATE};
    use crate::money::Pricing;
    use serde_json::json;

    fn call(amount: i64) -> NewReservation {
        NewReservation {
            record: ReservationRecord {
                id: "rsv_1".into(),
                request_id: "req_1".into(),
                agent_id: "agt_1".into(),
                model: "m".into(),
                amount_micro: amount,
                pricing: Pricing::default(),
                input_tokens_bound: 10,
                output_tokens_cap: 10,
                created_at_ms: 1_000,
                expires_at_ms: 61_000,
            },
            agent_name: "dev".into(),
            details: json!({}),
            max_open: 2,
            grant_id: None,
            log_budget_denial: true,
            at_ms: 77,
        }
    }

    fn grant(state: GrantState, budget: i64, used: i64, charged: i64) -> GrantRecord {
        GrantRecord {
            id: "grt_1".into(),
            agent_id: "agt_1".into(),
            data_plane: "dp".into(),
            budget_micro: budget,
            used_micro: used,
            requests: None,
            requests_used: 0,
            created_at_ms: 0,
            deadline_ms: 10_000,
            state,
            charged_micro: charged,
        }
    }

    fn funds(free: i64) -> Option<Funds> {
        Some(Funds {
            free_micro: free,
            live: true,
        })
    }

    fn outcome(d: Reserve<'_>) -> ReserveOutcome {
        match d {
            Reserve::Answer { outcome, .. } => outcome,
            Reserve::Take(t) => t.outcome(),
            other => panic!("not an outcome: {other:?}"),
        }
    }

    #[test]
    fn a_retry_is_answered_before_any_limit() {
        let n = call(500);
        let existing = n.record.clone();
        for (state, expected) in [
            (
                ReservationState::Open,
                ReserveOutcome::AlreadyAdmitted(existing.clone()),
            ),
            (
                ReservationState::Settled,
                ReserveOutcome::AlreadyClosed(existing.clone()),
            ),
        ] {
            // Out of budget, at its limit of open calls, and even gone.
            let read = ReserveRead {
                existing: Some((existing.clone(), state)),
                funds: None,
                grant: None,
                open: 9,
            };
            assert_eq!(outcome(decide(&n, read)), expected);
        }
    }

    #[test]
    fn the_limit_on_open_calls_comes_before_the_budget() {
        let n = call(500);
        let read = |open, free| ReserveRead {
            funds: funds(free),
            open,
            ..Default::default()
        };
        assert_eq!(outcome(decide(&n, read(2, 0))), ReserveOutcome::TooManyOpen);
        assert_eq!(
            outcome(decide(&n, read(1, 499))),
            ReserveOutcome::InsufficientBudget {
                remaining_micro: 499
            }
        );
        assert_eq!(
            outcome(decide(&n, read(1, 500))),
            ReserveOutcome::Reserved { remaining_micro: 0 }
        );
        let unlimited = NewReservation {
            max_open: 0,
            ..call(500)
        };
        assert!(!counts_open(&unlimited));
        assert!(matches!(
            decide(&unlimited, read(1_000, 500)),
            Reserve::Take(_)
        ));
    }

    #[test]
    fn a_budget_refusal_is_logged_only_when_asked() {
        let read = || ReserveRead {
            funds: funds(10),
            ..Default::default()
        };
        let Reserve::Answer { event, .. } = decide(&call(500), read()) else {
            panic!("refused")
        };
        let event = event.expect("logged");
        assert_eq!(event.kind, EventKind::Deny);
        assert_eq!(event.details["remaining_micro"], 10);
        let quiet = NewReservation {
            log_budget_denial: false,
            ..call(500)
        };
        assert!(matches!(
            decide(&quiet, read()),
            Reserve::Answer { event: None, .. }
        ));
    }

    #[test]
    fn a_deleted_agent_admits_nothing_and_an_unknown_one_is_not_found() {
        let n = call(1);
        let deleted = ReserveRead {
            funds: Some(Funds {
                free_micro: 1_000,
                live: false,
            }),
            ..Default::default()
        };
        assert_eq!(
            outcome(decide(&n, deleted)),
            ReserveOutcome::InsufficientBudget {
                remaining_micro: 1_000
            }
        );
        assert!(matches!(
            decide(&n, ReserveRead::default()),
            Reserve::UnknownAgent
        ));
    }

    #[test]
    fn a_call_from_a_grant_moves_nothing_in_reserved_and_skips_the_limits() {
        let n = NewReservation {
            grant_id: Some("grt_1".into()),
            ..call(300)
        };
        let read = ReserveRead {
            funds: funds(0),
            grant: Some(grant(GrantState::Open, 1_000, 0, 0)),
            open: 99,
            ..Default::default()
        };
        let Reserve::Take(t) = decide(&n, read) else {
            panic!("taken")
        };
        assert_eq!(
            (t.reserved_delta, t.spent_delta, t.remaining_micro),
            (0, 0, 0)
        );
        assert_eq!(t.grant_after.as_ref().unwrap().used_micro, 300);
        assert_eq!(t.event.details["grant"], "grt_1");
    }

    #[test]
    fn a_late_call_comes_back_out_of_its_expired_grant_charge() {
        let n = NewReservation {
            grant_id: Some("grt_1".into()),
            ..call(300)
        };
        let read = ReserveRead {
            funds: funds(100),
            grant: Some(grant(GrantState::Expired, 1_000, 0, 200)),
            ..Default::default()
        };
        let Reserve::Take(t) = decide(&n, read) else {
            panic!("taken")
        };
        // 300 into reserved, 200 of it out of the expiry's charge.
        assert_eq!((t.reserved_delta, t.spent_delta), (300, -200));
        assert_eq!(t.remaining_micro, 100 - 300 + 200);
        assert_eq!(t.event.details[LATE], true);
    }

    #[test]
    fn a_report_its_grant_cannot_cover_is_refused_with_its_event() {
        let n = NewReservation {
            grant_id: Some("grt_1".into()),
            ..call(300)
        };
        let read = ReserveRead {
            funds: funds(1_000),
            grant: Some(grant(GrantState::Returned, 1_000, 0, 0)),
            ..Default::default()
        };
        let Reserve::NotCovered { why, event } = decide(&n, read) else {
            panic!("refused")
        };
        assert_eq!(why, "grant grt_1: the grant is returned");
        assert_eq!(event.kind, EventKind::ReportRefused);
        assert_eq!(event.ts_ms, 77);
    }
}
