//! Grants (docs/GRANTS.md): budget and request credits the control plane
//! reserves for one data plane for a few seconds, so that a busy agent's calls are admitted there without a
//! round trip. How big a grant is — or whether there is one at all — is
//! decided here, as a pure function of what the ledger and the limiters say
//! now; a store makes the decision atomic with the reservation it sizes.
//!
//! The rules, each a property tested below:
//! - A grant is never more than the data plane's fair share of what is
//!   left after the edge reserve: `(free - edge) / data_planes`, where
//!   `free` is the budget not spent, not reserved by calls and not already
//!   granted. So grants for every data plane together never exceed `free`.
//! - Near the edge there is none: while `free` is within `edge` (a few
//!   worst-case calls per data plane), every call is decided centrally and
//!   the 402 boundary is exact. The same holds for each limit.
//! - A grant covers at least one worst-case call, or it is not given.
//! - It is sized to about one second of the agent's recent spend
//!   ([`PACED_SPEND_MS`]), so an agent that spends little does not lock its
//!   budget away from the other data planes, and a data plane that dies
//!   holding one costs about a second of spend.

mod timing;

pub use timing::*;

use crate::agent::Funds;
use crate::event::{EventKind, NewEvent};
use crate::money::Micro;
use crate::reservation::NewReservation;
use serde_json::json;
use std::borrow::Cow;

/// How many worst-case calls per data plane the edge keeps for central
/// decisions.
pub const EDGE_CALLS_PER_DATA_PLANE: i64 = 4;

/// Headroom over the recent rate of calls: a grant's request credits last
/// its lifetime at twice the pace the agent has been going.
pub const PACE_HEADROOM: i64 = 2;

/// The budget a grant holds: the agent's recent spend over this long. A
/// data plane that dies holding a grant has its unused part charged at the
/// expiry (the calls it served and could not report are unknowable), so
/// this is what a `kill -9` may cost beyond what clients were told. Paced
/// over the 5 s lifetime twice over, that was 110,514 µ (about 493
/// worst-case calls) in issue #31's run; one second of spend, renewed at
/// half use (a report's interval away), keeps a busy agent's calls local
/// and bounds that cost to about a second of its spend.
pub const PACED_SPEND_MS: i64 = 1_000;

/// What the control plane knows when a data plane asks for a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantAsk {
    /// Budget neither spent, nor reserved by open calls, nor granted.
    pub free_micro: Micro,
    /// The worst case of one call of this agent (the largest reservation
    /// its recent calls took, or the one this request would take).
    pub worst_call_micro: Micro,
    /// The agent's spend per second over the recent window (µ/s).
    pub spend_per_s_micro: Micro,
    /// Data planes serving the agent now, the asking one included (≥ 1).
    pub data_planes: u32,
    pub lifetime_ms: i64,
    /// Requests still allowed in the current minute (`None`: no RPM limit).
    pub rpm_headroom: Option<u32>,
    /// The agent's requests per second over the recent window.
    pub calls_per_s: u32,
}

/// What one grant holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSize {
    pub budget_micro: Micro,
    /// Calls it may admit (`None`: as many as its budget covers).
    pub requests: Option<u32>,
}

/// Why no grant was given: the data plane asks centrally meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoGrant {
    /// The budget is near its edge: every call is decided centrally.
    BudgetEdge,
    /// The RPM limit is near its edge for this minute.
    RpmEdge,
    /// The ask itself makes no sense (no data plane, no lifetime).
    Invalid,
}

crate::named::named_set! {
    /// Why a data plane was given no grant, as it is told: its calls of the
    /// agent go to the control plane meanwhile, for longer when waiting
    /// cannot change the answer ([`GrantRefusal::lasts`]). The names are
    /// the metrics' and older data planes' form.
    GrantRefusal {
        /// The budget is near its edge: every call is decided centrally.
        BudgetEdge => "budget_edge",
        /// The RPM limit is near its edge for this minute.
        RpmEdge => "rpm_edge",
        /// The ask itself makes no sense (no data plane, no lifetime).
        Invalid => "invalid",
        /// The agent has a limit grants do not carry (TPM, concurrency).
        Limits => "limits",
        /// The agent cannot be admitted at all (paused, killed, unknown,
        /// or not served by the asking data plane).
        NotAdmissible => "not_admissible",
        /// Its grants were recalled a moment ago.
        Recalled => "recalled",
    }
}

impl GrantRefusal {
    /// The answer will not change while the agent and the ask stay as
    /// they are: asking again soon is pointless.
    pub fn lasts(self) -> bool {
        matches!(self, GrantRefusal::Limits | GrantRefusal::Invalid)
    }
}

impl From<NoGrant> for GrantRefusal {
    fn from(no: NoGrant) -> Self {
        match no {
            NoGrant::BudgetEdge => GrantRefusal::BudgetEdge,
            NoGrant::RpmEdge => GrantRefusal::RpmEdge,
            NoGrant::Invalid => GrantRefusal::Invalid,
        }
    }
}

fn fair_share(free: i64, edge: i64, data_planes: i64) -> i64 {
    (free - edge).max(0) / data_planes
}

/// Sizes a grant, or says why there is none.
pub fn size(ask: &GrantAsk) -> Result<GrantSize, NoGrant> {
    if ask.data_planes == 0 || ask.lifetime_ms <= 0 || ask.worst_call_micro <= 0 {
        return Err(NoGrant::Invalid);
    }
    let planes = i64::from(ask.data_planes);
    let worst = ask.worst_call_micro;
    let edge = worst
        .saturating_mul(EDGE_CALLS_PER_DATA_PLANE)
        .saturating_mul(planes);
    let share = fair_share(ask.free_micro, edge, planes);
    if share < worst {
        return Err(NoGrant::BudgetEdge);
    }
    // About a second of the agent's pace; never below one worst-case
    // call, never above the fair share.
    let paced = ask
        .spend_per_s_micro
        .max(0)
        .saturating_mul(PACED_SPEND_MS.min(ask.lifetime_ms))
        / 1000;
    let budget_micro = paced.clamp(worst, share);

    let requests = match ask.rpm_headroom {
        None => None,
        Some(headroom) => Some(request_share(
            headroom,
            ask.data_planes,
            ask.calls_per_s,
            ask.lifetime_ms,
        )?),
    };
    Ok(GrantSize {
        budget_micro,
        requests,
    })
}

/// The request credits of a grant: the fair share among `data_planes` of
/// the RPM headroom after the edge, paced to the agent's calls over the
/// lifetime (with headroom), at least one.
pub fn request_share(
    headroom: u32,
    data_planes: u32,
    calls_per_s: u32,
    lifetime_ms: i64,
) -> Result<u32, NoGrant> {
    if data_planes == 0 || lifetime_ms <= 0 {
        return Err(NoGrant::Invalid);
    }
    let edge = (EDGE_CALLS_PER_DATA_PLANE as u32).saturating_mul(data_planes);
    let share = headroom.saturating_sub(edge) / data_planes;
    if share == 0 {
        return Err(NoGrant::RpmEdge);
    }
    let paced = (u64::from(calls_per_s) * lifetime_ms as u64 * PACE_HEADROOM as u64 / 1000)
        .min(u64::from(u32::MAX)) as u32;
    Ok(paced.clamp(1, share))
}

crate::named::named_set! {
    /// A grant's state. The names are the stored form.
    GrantState {
        /// Its data plane may admit calls from it until its deadline.
        Open => "open",
        /// Its data plane gave back what it did not use.
        Returned => "returned",
        /// Its deadline passed without its data plane giving it back: the
        /// unreported remainder was charged (or released, by policy).
        Expired => "expired",
    }
}

/// A grant as its row holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub id: String,
    pub agent_id: String,
    /// The data plane holding it (its `--id`, or the id it chose at start).
    pub data_plane: String,
    pub budget_micro: Micro,
    /// What calls admitted from it took (each an ordinary reservation).
    pub used_micro: Micro,
    /// Request credits taken from the agent's RPM limiter (`None`: the
    /// grant is not limited in requests).
    pub requests: Option<u32>,
    pub requests_used: u32,
    pub created_at_ms: i64,
    pub deadline_ms: i64,
    pub state: GrantState,
    /// What its end charged (an expiry under the `charge` policy), else 0.
    pub charged_micro: Micro,
}

impl GrantRecord {
    /// What it still holds in the agent's `reserved`.
    pub fn unused_micro(&self) -> Micro {
        if self.state == GrantState::Open {
            (self.budget_micro - self.used_micro).max(0)
        } else {
            0
        }
    }

    /// Whether a call reserving `amount` may be recorded as admitted from
    /// it. An expired grant still covers the calls its data plane admitted
    /// before the deadline and could not report in time (a control plane
    /// down, a report late under load): they were served, so they are
    /// recorded (see [`GrantRecord::carved`]). A returned grant covers
    /// nothing more: its data plane reports every call before the return.
    pub fn covers(&self, amount: Micro) -> Result<(), NotCovered> {
        if self.state == GrantState::Returned {
            return Err(NotCovered::Ended(self.state));
        }
        if amount < 0 || amount > self.budget_micro - self.used_micro {
            return Err(NotCovered::Budget {
                unused_micro: self.budget_micro - self.used_micro,
            });
        }
        if let Some(requests) = self.requests
            && self.requests_used >= requests
        {
            return Err(NotCovered::Requests);
        }
        Ok(())
    }

    /// A call reserving `amount` admitted from it: the grant after, and
    /// what the agent's amounts move by.
    ///
    /// From an open grant the amount moves from the grant's unused part to
    /// the reservation: the agent's `reserved` does not change. From an
    /// expired one (a late report), the unused part already left
    /// `reserved`, and the expiry charged it (by the `charge` policy)
    /// because calls like this one might have been served unreported: the
    /// call's amount comes back out of that charge into `reserved`, where
    /// its settlement charges what it really cost. Only what the expiry
    /// charged can come back; the rest (the `release` policy) is taken
    /// from the budget, since the call was served either way.
    pub fn carved(&self, amount: Micro) -> Result<Carve, NotCovered> {
        self.covers(amount)?;
        let late = self.state == GrantState::Expired;
        let uncharged_micro = if late {
            amount.min(self.charged_micro).max(0)
        } else {
            0
        };
        Ok(Carve {
            after: GrantRecord {
                used_micro: self.used_micro + amount,
                requests_used: self.requests_used + 1,
                charged_micro: self.charged_micro - uncharged_micro,
                ..self.clone()
            },
            late,
            reserved_delta: if late { amount } else { 0 },
            uncharged_micro,
        })
    }

    /// How this grant ends, or `None` if it had already ended.
    pub fn end(&self, end: GrantEnd, agent_name: &str, now_ms: i64) -> Option<GrantEnding> {
        if self.state != GrantState::Open {
            return None;
        }
        let unused = self.unused_micro();
        let (state, charged, kind, reason) = match end {
            GrantEnd::Returned => (
                GrantState::Returned,
                0,
                EventKind::GrantReturned,
                "returned",
            ),
            GrantEnd::Expired { charge: true } => (
                GrantState::Expired,
                unused,
                EventKind::GrantExpired,
                "charge",
            ),
            GrantEnd::Expired { charge: false } => {
                (GrantState::Expired, 0, EventKind::GrantExpired, "release")
            }
        };
        let after = GrantRecord {
            state,
            charged_micro: charged,
            ..self.clone()
        };
        // A return's amount is what went back to the budget; an expiry's is
        // what it charged (what it released is in the details).
        let amount = if kind == EventKind::GrantReturned {
            unused
        } else {
            charged
        };
        let event = NewEvent::about(now_ms, kind, &self.agent_id, agent_name)
            .reservation(&self.id)
            .amount(amount)
            .reason(reason)
            .details(json!({
                "data_plane": self.data_plane,
                "used_micro": self.used_micro,
                "requests_used": self.requests_used,
                "unused_micro": unused,
            }));
        Some(GrantEnding {
            after,
            reserved_delta: -unused,
            spent_delta: charged,
            event,
        })
    }

    /// The event that logs this grant's issue.
    pub fn issued_event(&self, agent_name: &str, replaces: Option<&str>) -> NewEvent {
        let mut details = json!({
            "data_plane": self.data_plane,
            "deadline_ms": self.deadline_ms,
            "requests": self.requests,
        });
        if let Some(old) = replaces {
            details["replaces"] = json!(old);
        }
        NewEvent::about(
            self.created_at_ms,
            EventKind::GrantIssued,
            &self.agent_id,
            agent_name,
        )
        .reservation(&self.id)
        .amount(self.budget_micro)
        .details(details)
    }
}

/// A call carved from a grant, as a store applies it (in the same step as
/// the reservation it opens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carve {
    /// The grant's row after the call.
    pub after: GrantRecord,
    /// The grant had expired before the call was reported.
    pub late: bool,
    /// What the agent's `reserved` moves by.
    pub reserved_delta: Micro,
    /// What comes back out of the expiry's charge: the agent's `spent`
    /// moves by minus this.
    pub uncharged_micro: Micro,
}

impl Carve {
    /// The reservation as admitted: a late one says so in its admit event,
    /// with what it took back from the expiry's charge (audit folds it).
    pub fn reservation<'a>(&self, n: &'a NewReservation) -> Cow<'a, NewReservation> {
        if !self.late {
            return Cow::Borrowed(n);
        }
        let mut late = n.clone();
        let mut details = match std::mem::take(&mut late.details) {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        details.insert(LATE.into(), json!(true));
        details.insert(UNCHARGED.into(), json!(self.uncharged_micro));
        late.details = serde_json::Value::Object(details);
        Cow::Owned(late)
    }
}

/// The admit event's details of a call reported after its grant expired:
/// `late: true`, and the part of its amount taken back from the expiry's
/// charge.
pub const LATE: &str = "late";
pub const UNCHARGED: &str = "uncharged_micro";

/// The grant `grant_id` (as the store found it, if at all) after a call of
/// `agent_id` reserving `amount` was carved from it, or why it cannot be:
/// the message a refused report item carries.
pub fn carve_call(
    found: Option<&GrantRecord>,
    grant_id: &str,
    agent_id: &str,
    amount: Micro,
) -> Result<Carve, String> {
    let grant = found.ok_or_else(|| format!("no grant {grant_id}"))?;
    if grant.agent_id != agent_id {
        return Err(format!("grant {grant_id} is not agent {agent_id}'s"));
    }
    grant
        .carved(amount)
        .map_err(|why| format!("grant {grant_id}: {why}"))
}

/// The event that records a reported call the ledger refused ([`carve_call`]
/// said why): the call was served, so the refusal is kept in the chain,
/// with what the call reserved and the request id its client saw, for
/// audit to name. Logged once per reservation, however often its report is
/// resent.
pub fn refused_report_event(n: &NewReservation, grant_id: &str, why: &str, now: i64) -> NewEvent {
    let r = &n.record;
    NewEvent::about(now, EventKind::ReportRefused, &r.agent_id, &n.agent_name)
        .reservation(&r.id)
        .amount(r.amount_micro)
        .reason("not_covered")
        .details(json!({"request_id": r.request_id, "grant": grant_id, "why": why}))
}

/// What ending a grant writes: its row, its agent's amounts, its event.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantEnding {
    pub after: GrantRecord,
    pub reserved_delta: Micro,
    pub spent_delta: Micro,
    pub event: NewEvent,
}

/// How a grant ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEnd {
    /// Its data plane gave back what it did not use.
    Returned,
    /// Its deadline passed; `charge`: the expired-reservation policy
    /// charges the unreported remainder (the provider may have been paid).
    Expired { charge: bool },
}

/// Why a call cannot be admitted from a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCovered {
    Ended(GrantState),
    Budget { unused_micro: Micro },
    Requests,
}

impl std::fmt::Display for NotCovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotCovered::Ended(state) => write!(f, "the grant is {}", state.as_str()),
            NotCovered::Budget { unused_micro } => {
                write!(f, "the grant has only {unused_micro} µ unused")
            }
            NotCovered::Requests => f.write_str("the grant has no request credit left"),
        }
    }
}

/// A grant to issue: the store fills in what only it knows atomically (the
/// free budget, the data planes holding grants of the agent) and sizes it
/// with [`size`].
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub data_plane: String,
    pub created_at_ms: i64,
    pub deadline_ms: i64,
    /// Request credits already taken from the agent's RPM limiter for it.
    pub requests: Option<u32>,
    /// The ask, but for `free_micro` (the store's); `data_planes` is at
    /// least the store's count of data planes holding the agent's grants.
    pub ask: GrantAsk,
    /// A grant of the same data plane and agent to end (returned) first, in
    /// the same step: a renewal.
    pub replaces: Option<String>,
}

impl NewGrant {
    /// Decides it from what the store read: the agent's amounts (`None`:
    /// no agent has the id) and the other data planes holding its open
    /// grants. A deleted agent, like an unknown one, gets none.
    pub fn decide(&self, funds: Option<Funds>, other_data_planes: u32) -> GrantOutcome {
        match funds {
            Some(f) if f.live => match self.size(f.free_micro, other_data_planes) {
                Ok(grant) => GrantOutcome::Issued(grant),
                Err(no) => GrantOutcome::Refused(no),
            },
            _ => GrantOutcome::Refused(NoGrant::Invalid),
        }
    }

    /// Sizes it from what the store read: `free_micro` of the agent, and
    /// the other data planes holding open grants of it.
    pub fn size(&self, free_micro: Micro, other_data_planes: u32) -> Result<GrantRecord, NoGrant> {
        let ask = GrantAsk {
            free_micro,
            // The asker's count (the data planes serving the agent) when it
            // knows more than the store's holders.
            data_planes: (other_data_planes + 1).max(self.ask.data_planes),
            rpm_headroom: None,
            ..self.ask.clone()
        };
        let sized = size(&ask)?;
        Ok(GrantRecord {
            id: self.id.clone(),
            agent_id: self.agent_id.clone(),
            data_plane: self.data_plane.clone(),
            budget_micro: sized.budget_micro,
            used_micro: 0,
            requests: self.requests,
            requests_used: 0,
            created_at_ms: self.created_at_ms,
            deadline_ms: self.deadline_ms,
            state: GrantState::Open,
            charged_micro: 0,
        })
    }
}

/// What a store answers to [`NewGrant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    Issued(GrantRecord),
    /// No grant (nothing written but the replaced grant's end, if any).
    Refused(NoGrant),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask() -> GrantAsk {
        GrantAsk {
            free_micro: 1_000_000,
            worst_call_micro: 1_000,
            spend_per_s_micro: 10_000,
            data_planes: 3,
            lifetime_ms: 5_000,
            rpm_headroom: None,
            calls_per_s: 10,
        }
    }

    #[test]
    fn only_a_live_agent_is_granted_anything() {
        let g = NewGrant {
            id: "gnt_1".into(),
            agent_id: "agt_1".into(),
            agent_name: "a".into(),
            data_plane: "dp".into(),
            created_at_ms: 0,
            deadline_ms: 5_000,
            requests: None,
            ask: ask(),
            replaces: None,
        };
        let funds = |live| {
            Some(Funds {
                free_micro: 1_000_000,
                live,
            })
        };
        assert!(matches!(g.decide(funds(true), 2), GrantOutcome::Issued(_)));
        for gone in [funds(false), None] {
            assert_eq!(g.decide(gone, 2), GrantOutcome::Refused(NoGrant::Invalid));
        }
    }

    #[test]
    fn a_busy_agent_far_from_its_edge_gets_its_pace() {
        // 10,000 µ/s × 1 s = 10,000 µ, within the share (332,000): what a
        // crashed data plane holding it could cost.
        let g = size(&ask()).unwrap();
        assert_eq!(g.budget_micro, 10_000);
        assert_eq!(g.requests, None);
    }

    #[test]
    fn near_the_edge_every_call_is_central() {
        // 3 planes × 4 calls = 12 worst-case calls of edge, plus 3 × 1 for a
        // grant each: 15,000 µ is the least that grants anything.
        let at = |free| {
            size(&GrantAsk {
                free_micro: free,
                ..ask()
            })
        };
        assert_eq!(at(14_999), Err(NoGrant::BudgetEdge));
        assert_eq!(at(15_000).unwrap().budget_micro, 1_000);
        assert_eq!(at(0), Err(NoGrant::BudgetEdge));
        assert_eq!(at(-5), Err(NoGrant::BudgetEdge));
    }

    #[test]
    fn an_idle_agent_gets_one_worst_case_call() {
        let g = size(&GrantAsk {
            spend_per_s_micro: 0,
            ..ask()
        })
        .unwrap();
        assert_eq!(g.budget_micro, 1_000);
    }

    #[test]
    fn limits_near_their_edge_give_no_grant() {
        let rpm = |headroom| {
            size(&GrantAsk {
                rpm_headroom: Some(headroom),
                ..ask()
            })
        };
        assert_eq!(rpm(14), Err(NoGrant::RpmEdge));
        assert_eq!(rpm(15).unwrap().requests, Some(1));
        // 10 calls/s × 5 s × 2 = 100, within the share of 600 - 12 over 3.
        assert_eq!(rpm(600).unwrap().requests, Some(100));
    }

    #[test]
    fn nonsense_asks_get_nothing() {
        for bad in [
            GrantAsk {
                data_planes: 0,
                ..ask()
            },
            GrantAsk {
                lifetime_ms: 0,
                ..ask()
            },
            GrantAsk {
                worst_call_micro: 0,
                ..ask()
            },
        ] {
            assert_eq!(size(&bad), Err(NoGrant::Invalid));
        }
    }

    fn asks() -> impl Strategy<Value = GrantAsk> {
        (
            -1_000i64..10_000_000_000,
            1i64..10_000_000,
            0i64..100_000_000,
            1u32..200,
            1i64..60_000,
            proptest::option::of(0u32..100_000),
            0u32..10_000,
        )
            .prop_map(|(free, worst, rate, planes, life, rpm, cps)| GrantAsk {
                free_micro: free,
                worst_call_micro: worst,
                spend_per_s_micro: rate,
                data_planes: planes,
                lifetime_ms: life,
                rpm_headroom: rpm,
                calls_per_s: cps,
            })
    }

    fn open_grant() -> GrantRecord {
        GrantRecord {
            id: "gnt_1".into(),
            agent_id: "agt_1".into(),
            data_plane: "dp1".into(),
            budget_micro: 1_000,
            used_micro: 100,
            requests: Some(10),
            requests_used: 1,
            created_at_ms: 0,
            deadline_ms: 5_000,
            state: GrantState::Open,
            charged_micro: 0,
        }
    }

    #[test]
    fn a_call_from_an_open_grant_moves_within_reserved() {
        let c = open_grant().carved(300).unwrap();
        assert_eq!((c.after.used_micro, c.after.requests_used), (400, 2));
        assert_eq!((c.late, c.reserved_delta, c.uncharged_micro), (false, 0, 0));
        assert_eq!(
            open_grant().carved(901),
            Err(NotCovered::Budget { unused_micro: 900 })
        );
    }

    /// A call served from a grant whose report arrived after the grant
    /// expired is recorded, its amount taken back from what the expiry
    /// charged for exactly such calls; the rest of that charge stays.
    #[test]
    fn a_late_report_takes_its_call_back_out_of_the_expiry_charge() {
        let g = open_grant();
        let ending = g
            .end(GrantEnd::Expired { charge: true }, "a", 6_000)
            .unwrap();
        assert_eq!(ending.spent_delta, 900);
        let expired = ending.after;
        let c = expired.carved(300).unwrap();
        assert!(c.late);
        assert_eq!((c.reserved_delta, c.uncharged_micro), (300, 300));
        assert_eq!(
            (c.after.used_micro, c.after.charged_micro, c.after.state),
            (400, 600, GrantState::Expired)
        );
        // Never more than the grant held, whatever the data plane says.
        assert_eq!(
            c.after.carved(601),
            Err(NotCovered::Budget { unused_micro: 600 })
        );
        // Released by policy: the call is still recorded, from the budget.
        let released = g
            .end(GrantEnd::Expired { charge: false }, "a", 6_000)
            .unwrap()
            .after;
        let c = released.carved(300).unwrap();
        assert_eq!((c.reserved_delta, c.uncharged_micro), (300, 0));
        // A returned grant: its data plane reported everything before.
        let returned = g.end(GrantEnd::Returned, "a", 6_000).unwrap().after;
        assert_eq!(
            returned.carved(1),
            Err(NotCovered::Ended(GrantState::Returned))
        );
    }

    #[test]
    fn a_late_admit_says_so_in_its_event() {
        let expired = open_grant()
            .end(GrantEnd::Expired { charge: true }, "a", 6_000)
            .unwrap()
            .after;
        let n = NewReservation {
            record: crate::reservation::ReservationRecord {
                id: "rsv_1".into(),
                request_id: "req_1".into(),
                agent_id: "agt_1".into(),
                model: "m".into(),
                amount_micro: 300,
                pricing: crate::money::Pricing::flat(1, 1),
                input_tokens_bound: 1,
                output_tokens_cap: 1,
                created_at_ms: 4_000,
                expires_at_ms: 64_000,
            },
            agent_name: "a".into(),
            details: json!({"stream": false}),
            max_open: 0,
            grant_id: Some("gnt_1".into()),
            log_budget_denial: false,
            at_ms: 7_000,
        };
        let on_time = open_grant().carved(300).unwrap();
        assert!(matches!(on_time.reservation(&n), Cow::Borrowed(_)));
        let late = expired.carved(300).unwrap();
        let event = crate::reservation::admit_event(&late.reservation(&n));
        assert_eq!(event.details[LATE], json!(true));
        assert_eq!(event.details[UNCHARGED], json!(300));
        assert_eq!(event.details["stream"], json!(false));
        assert_eq!(event.details["grant"], json!("gnt_1"));
    }

    proptest! {
        /// Every data plane taking its grant at once still leaves the
        /// edge, and every grant covers at least one worst-case call.
        #[test]
        fn grants_for_every_data_plane_fit_and_leave_the_edge(a in asks()) {
            if let Ok(g) = size(&a) {
                let planes = i64::from(a.data_planes);
                let edge = a.worst_call_micro * EDGE_CALLS_PER_DATA_PLANE * planes;
                prop_assert!(g.budget_micro >= a.worst_call_micro);
                prop_assert!(g.budget_micro * planes + edge <= a.free_micro);
                if let (Some(r), Some(h)) = (g.requests, a.rpm_headroom) {
                    prop_assert!(r >= 1);
                    prop_assert!(r * a.data_planes < h);
                }
            }
        }

        /// Less free budget never means a bigger grant.
        #[test]
        fn less_free_budget_never_grants_more(a in asks(), less in 0i64..1_000_000_000) {
            let poorer = GrantAsk { free_micro: a.free_micro - less, ..a.clone() };
            match (size(&a), size(&poorer)) {
                (Ok(rich), Ok(poor)) => prop_assert!(poor.budget_micro <= rich.budget_micro),
                (Err(NoGrant::BudgetEdge), Ok(_)) => prop_assert!(false, "poorer got a grant"),
                _ => {}
            }
        }
    }
}
