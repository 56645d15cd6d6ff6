//! The grants this data plane holds (docs/GRANTS.md): which
//! agent is busy enough to ask for one, whether a call fits the one it
//! holds, when to renew it and when to give it back. No I/O: every change
//! that the control plane must hear of is returned as [`Report`]s, which
//! the grants desk (`desk.rs`) queues for the reporter under the same lock,
//! and the clock is passed in.

use aex_core::grant::{
    BUSY_CALLS, BUSY_WINDOW, DEADLINE_MARGIN, GrantRecord, GrantRefusal, GrantState, IDLE_RETURN,
    QUIET_AFTER_LIMITS, QUIET_AFTER_REFUSAL,
};
use aex_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Something the control plane must hear of.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Item(pb::ReportItem),
    Close(pb::GrantRef),
    Ask(pb::GrantAsk),
}

/// A grant as held here: the control plane's record of it, carved by the
/// same rule ([`GrantRecord::carved`]), and this data plane's times.
#[derive(Debug, Clone)]
struct Held {
    record: GrantRecord,
    admit_until: Instant,
    renew_after: Instant,
    reservation_ttl_ms: i64,
    /// The agent's budget outside its grants when this one was issued.
    remaining_micro: i64,
    /// A new grant was asked for to take over from this one.
    renewing: bool,
    last_used: Instant,
}

impl Held {
    fn should_renew(&self, now: Instant) -> bool {
        let g = &self.record;
        g.used_micro * 2 >= g.budget_micro
            || g.requests.is_some_and(|r| g.requests_used * 2 >= r)
            || now >= self.renew_after
    }

    fn close(&self) -> Report {
        Report::Close(pb::GrantRef {
            grant_id: self.record.id.clone(),
            agent_id: self.record.agent_id.clone(),
        })
    }
}

/// What the agent's recent calls here looked like.
#[derive(Debug, Clone)]
struct Busy {
    since: Instant,
    calls: u32,
    reserved_micro: i64,
    worst_micro: i64,
}

impl Busy {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            calls: 0,
            reserved_micro: 0,
            worst_micro: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Asking {
    grant_id: String,
    /// The agent's grants were revoked while this ask was out: what it
    /// brings back is given back at once.
    cancelled: bool,
}

/// A call taken from a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carved {
    pub grant_id: String,
    pub reservation_ttl_ms: i64,
    /// What the agent may still spend, as far as this data plane knows.
    pub remaining_micro: i64,
}

#[derive(Default)]
pub struct LocalGrants {
    /// This data plane's id, as the grants it holds name it.
    data_plane: String,
    held: HashMap<String, Held>,
    busy: HashMap<String, Busy>,
    asking: HashMap<String, Asking>,
    quiet_until: HashMap<String, Instant>,
    /// Reservations admitted here and not yet settled: their settlement
    /// goes in a report, after their admit.
    local: HashSet<String>,
    next_tidy: Option<Instant>,
}

impl LocalGrants {
    /// The book of the data plane `data_plane`, holding nothing yet.
    pub fn new(data_plane: &str) -> Self {
        Self {
            data_plane: data_plane.to_string(),
            ..Self::default()
        }
    }

    /// Whether the agent holds a grant that may admit now.
    pub fn holds(&self, agent_id: &str, now: Instant) -> bool {
        self.held.get(agent_id).is_some_and(|g| now < g.admit_until)
    }

    /// Takes a call reserving `amount` from the agent's grant, or says it
    /// does not fit (`None`: admit it centrally). A grant that can no
    /// longer cover such a call, or is past its time, is given back.
    pub fn carve(
        &mut self,
        agent_id: &str,
        amount: i64,
        now: Instant,
        reports: &mut Vec<Report>,
    ) -> Option<Carved> {
        let g = self.held.get_mut(agent_id)?;
        let carved = match g.record.carved(amount) {
            Ok(carve) if now < g.admit_until => carve.after,
            _ => {
                let g = self.held.remove(agent_id).expect("looked up above");
                reports.push(g.close());
                return None;
            }
        };
        g.record = carved;
        g.last_used = now;
        Some(Carved {
            grant_id: g.record.id.clone(),
            reservation_ttl_ms: g.reservation_ttl_ms,
            remaining_micro: g.remaining_micro + g.record.unused_micro(),
        })
    }

    /// Counts a call of the agent (admitted either way) and asks for a
    /// grant when it is busy and holds none, or renews the one it holds.
    pub fn note_call(
        &mut self,
        agent_id: &str,
        reserved_micro: i64,
        now: Instant,
        new_id: impl FnOnce() -> String,
        reports: &mut Vec<Report>,
    ) {
        let busy = self
            .busy
            .entry(agent_id.to_string())
            .or_insert_with(|| Busy::new(now));
        if now.duration_since(busy.since) >= BUSY_WINDOW {
            *busy = Busy::new(now);
        }
        busy.calls += 1;
        busy.reserved_micro += reserved_micro.max(0);
        busy.worst_micro = busy.worst_micro.max(reserved_micro);
        if busy.calls < BUSY_CALLS
            || busy.worst_micro <= 0
            || self.asking.contains_key(agent_id)
            || self.quiet_until.get(agent_id).is_some_and(|t| now < *t)
        {
            return;
        }
        let renewal = match self.held.get_mut(agent_id) {
            Some(g) if g.renewing || !g.should_renew(now) => return,
            Some(g) => {
                g.renewing = true;
                true
            }
            None => false,
        };
        let elapsed_ms = now.duration_since(busy.since).as_millis().max(100) as i64;
        let grant_id = new_id();
        reports.push(Report::Ask(pb::GrantAsk {
            grant_id: grant_id.clone(),
            agent_id: agent_id.to_string(),
            worst_call_micro: busy.worst_micro,
            spend_per_s_micro: busy.reserved_micro.saturating_mul(1000) / elapsed_ms,
            calls_per_s: (i64::from(busy.calls) * 1000 / elapsed_ms) as u32,
            renewal,
        }));
        self.asking.insert(
            agent_id.to_string(),
            Asking {
                grant_id,
                cancelled: false,
            },
        );
    }

    /// A grant the control plane issued: it takes over from the one the
    /// agent held (given back), unless the agent's grants were revoked
    /// meanwhile (then it is given back itself).
    pub fn install(&mut self, g: &pb::Grant, now: Instant, reports: &mut Vec<Report>) {
        let asked = self.asking.remove(&g.agent_id);
        let close_new = pb::GrantRef {
            grant_id: g.grant_id.clone(),
            agent_id: g.agent_id.clone(),
        };
        match asked {
            Some(a) if a.grant_id == g.grant_id && !a.cancelled => {}
            other => {
                // Revoked while asked for, or an answer to an ask already
                // forgotten: never admitted from.
                if let Some(a) = other
                    && a.grant_id != g.grant_id
                {
                    self.asking.insert(g.agent_id.clone(), a);
                }
                reports.push(Report::Close(close_new));
                return;
            }
        }
        let lifetime_ms = (g.deadline_ms - g.created_at_ms).max(0) as u64;
        let lifetime = Duration::from_millis(lifetime_ms);
        let held = Held {
            record: GrantRecord {
                id: g.grant_id.clone(),
                agent_id: g.agent_id.clone(),
                data_plane: self.data_plane.clone(),
                budget_micro: g.budget_micro,
                used_micro: 0,
                requests: (g.requests > 0).then_some(g.requests),
                requests_used: 0,
                created_at_ms: g.created_at_ms,
                deadline_ms: g.deadline_ms,
                state: GrantState::Open,
                charged_micro: 0,
            },
            admit_until: now + lifetime.saturating_sub(DEADLINE_MARGIN),
            renew_after: now + lifetime / 2,
            reservation_ttl_ms: g.reservation_ttl_ms,
            remaining_micro: g.remaining_micro,
            renewing: false,
            last_used: now,
        };
        if let Some(old) = self.held.insert(g.agent_id.clone(), held) {
            reports.push(old.close());
        }
    }

    /// The control plane gave no grant: the agent's calls go central for
    /// a while.
    pub fn refused(&mut self, r: &pb::GrantRefused, now: Instant) {
        if self
            .asking
            .get(&r.agent_id)
            .is_some_and(|a| a.grant_id == r.grant_id)
        {
            self.asking.remove(&r.agent_id);
        }
        let lasts = aex_proto::convert::refusal_from_pb(r).is_some_and(GrantRefusal::lasts);
        let quiet = if lasts {
            QUIET_AFTER_LIMITS
        } else {
            QUIET_AFTER_REFUSAL
        };
        self.quiet_until.insert(r.agent_id.clone(), now + quiet);
        if let Some(g) = self.held.get_mut(&r.agent_id) {
            // Keeps admitting from the grant it has until its time is up.
            g.renewing = false;
            g.renew_after = now + quiet;
        }
    }

    /// Stops admitting from the agent's grant and gives it back: its
    /// policy changed, it was removed, or the control plane recalled it
    /// (`quiet`: then it asks for none for a while).
    pub fn drop_agent(
        &mut self,
        agent_id: &str,
        now: Instant,
        quiet: bool,
        reports: &mut Vec<Report>,
    ) {
        if let Some(g) = self.held.remove(agent_id) {
            reports.push(g.close());
        }
        if let Some(a) = self.asking.get_mut(agent_id) {
            a.cancelled = true;
        }
        if quiet {
            self.quiet_until
                .insert(agent_id.to_string(), now + QUIET_AFTER_REFUSAL);
        }
    }

    /// Gives every grant back (the models changed, the watch stream
    /// reconnected, or the data plane is stopping).
    pub fn drop_all(&mut self, reports: &mut Vec<Report>) {
        for (_, g) in self.held.drain() {
            reports.push(g.close());
        }
        for a in self.asking.values_mut() {
            a.cancelled = true;
        }
    }

    /// Gives back the grants past their time or idle; forgets idle agents. At most
    /// every 100 ms, however often it is called.
    pub fn tidy(&mut self, now: Instant, reports: &mut Vec<Report>) {
        if self.next_tidy.is_some_and(|t| now < t) {
            return;
        }
        self.next_tidy = Some(now + Duration::from_millis(100));
        let ended: Vec<String> = self
            .held
            .iter()
            .filter(|(_, g)| now >= g.admit_until || now.duration_since(g.last_used) >= IDLE_RETURN)
            .map(|(a, _)| a.clone())
            .collect();
        for agent_id in ended {
            let g = self.held.remove(&agent_id).expect("listed above");
            reports.push(g.close());
        }
        self.busy
            .retain(|_, b| now.duration_since(b.since) < BUSY_WINDOW * 2);
        self.quiet_until.retain(|_, t| now < *t);
    }

    pub fn mark_local(&mut self, reservation_id: &str) {
        self.local.insert(reservation_id.to_string());
    }

    /// Whether the reservation was admitted here from a grant (and is
    /// forgotten now: its settlement is being reported).
    pub fn take_local(&mut self, reservation_id: &str) -> bool {
        self.local.remove(reservation_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, agent: &str, budget: i64) -> pb::Grant {
        pb::Grant {
            grant_id: id.into(),
            agent_id: agent.into(),
            budget_micro: budget,
            requests: 0,
            deadline_ms: 5_000,
            reservation_ttl_ms: 60_000,
            remaining_micro: 1_000,
            created_at_ms: 0,
        }
    }

    fn busy(g: &mut LocalGrants, agent: &str, calls: u32, now: Instant) -> Vec<Report> {
        static IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mut reports = Vec::new();
        for _ in 0..calls {
            g.note_call(
                agent,
                10,
                now,
                || {
                    format!(
                        "g{}",
                        IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    )
                },
                &mut reports,
            );
        }
        reports
    }

    fn asked_id(reports: &[Report]) -> String {
        match reports {
            [Report::Ask(a)] => a.grant_id.clone(),
            other => panic!("expected one ask, got {other:?}"),
        }
    }

    #[test]
    fn an_agent_is_asked_for_once_it_is_busy_and_once_only() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        assert!(busy(&mut g, "a", BUSY_CALLS - 1, now).is_empty());
        let reports = busy(&mut g, "a", 5, now);
        let id = asked_id(&reports);
        match &reports[0] {
            Report::Ask(a) => {
                assert_eq!(a.worst_call_micro, 10);
                assert!(a.spend_per_s_micro > 0);
            }
            _ => unreachable!(),
        }
        // Not again while the ask is out.
        assert!(busy(&mut g, "a", 50, now).is_empty());
        let mut reports = Vec::new();
        g.install(&grant(&id, "a", 100), now, &mut reports);
        assert!(reports.is_empty());
        assert!(g.holds("a", now));
    }

    #[test]
    fn calls_are_carved_until_the_grant_cannot_cover_one_and_then_it_goes_back() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        let mut reports = Vec::new();
        g.install(&grant(&id, "a", 25), now, &mut reports);
        assert!(g.carve("a", 10, now, &mut reports).is_some());
        let second = g.carve("a", 10, now, &mut reports).unwrap();
        assert_eq!(second.remaining_micro, 1_000 + 5);
        assert!(reports.is_empty());
        assert_eq!(g.carve("a", 10, now, &mut reports), None);
        assert_eq!(
            reports,
            vec![Report::Close(pb::GrantRef {
                grant_id: id,
                agent_id: "a".into()
            })]
        );
        assert!(!g.holds("a", now));
    }

    #[test]
    fn a_grant_stops_admitting_before_its_deadline() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        let mut reports = Vec::new();
        g.install(&grant(&id, "a", 1_000), now, &mut reports);
        let late = now + Duration::from_millis(5_000) - DEADLINE_MARGIN;
        assert!(
            g.carve("a", 1, late - Duration::from_millis(1), &mut reports)
                .is_some()
        );
        assert_eq!(g.carve("a", 1, late, &mut reports), None);
        assert_eq!(reports.len(), 1, "given back: {reports:?}");
    }

    #[test]
    fn an_idle_grant_goes_back() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        let mut reports = Vec::new();
        g.install(&grant(&id, "a", 1_000), now, &mut reports);
        g.tidy(now + IDLE_RETURN / 2, &mut reports);
        assert!(reports.is_empty());
        g.tidy(now + IDLE_RETURN, &mut reports);
        assert_eq!(reports.len(), 1);
        assert!(!g.holds("a", now + IDLE_RETURN));
    }

    #[test]
    fn a_half_used_grant_is_renewed_and_the_new_one_takes_over() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let first = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        let mut reports = Vec::new();
        g.install(&grant(&first, "a", 40), now, &mut reports);
        for _ in 0..2 {
            g.carve("a", 10, now, &mut reports).unwrap();
        }
        let second = asked_id(&busy(&mut g, "a", 1, now));
        assert_ne!(first, second);
        // The old one admits while the new one is asked for.
        assert!(g.carve("a", 10, now, &mut reports).is_some());
        g.install(&grant(&second, "a", 40), now, &mut reports);
        assert_eq!(
            reports,
            vec![Report::Close(pb::GrantRef {
                grant_id: first,
                agent_id: "a".into()
            })]
        );
        assert_eq!(
            g.carve("a", 10, now, &mut reports).unwrap().grant_id,
            second
        );
    }

    #[test]
    fn a_grant_revoked_while_asked_for_is_given_back_on_arrival() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        let mut reports = Vec::new();
        g.drop_agent("a", now, true, &mut reports);
        assert!(reports.is_empty());
        g.install(&grant(&id, "a", 100), now, &mut reports);
        assert_eq!(reports.len(), 1);
        assert!(!g.holds("a", now));
        // Quiet for a while after a recall.
        assert!(busy(&mut g, "a", 100, now).is_empty());
        let later = now + QUIET_AFTER_REFUSAL;
        assert_eq!(busy(&mut g, "a", BUSY_CALLS, later).len(), 1);
    }

    #[test]
    fn a_refusal_keeps_the_agent_central_for_a_while() {
        let now = Instant::now();
        let mut g = LocalGrants::default();
        let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
        g.refused(
            &pb::GrantRefused {
                grant_id: id,
                agent_id: "a".into(),
                reason: "budget_edge".into(),
                ..Default::default()
            },
            now,
        );
        assert!(busy(&mut g, "a", 100, now).is_empty());
        assert_eq!(
            busy(&mut g, "a", BUSY_CALLS, now + QUIET_AFTER_REFUSAL).len(),
            1
        );
    }

    /// A refusal waiting cannot change keeps the agent central longer,
    /// told by the enum (or, from an older control plane, by name only).
    #[test]
    fn a_lasting_refusal_keeps_the_agent_central_longer_in_either_form() {
        let by_enum = |id: String| pb::GrantRefused {
            grant_id: id,
            agent_id: "a".into(),
            reason: String::new(),
            why: pb::GrantRefusal::Limits as i32,
        };
        let by_name = |id: String| pb::GrantRefused {
            grant_id: id,
            agent_id: "a".into(),
            reason: "limits".into(),
            why: 0,
        };
        for refused in [by_enum, by_name] {
            let now = Instant::now();
            let mut g = LocalGrants::default();
            let id = asked_id(&busy(&mut g, "a", BUSY_CALLS, now));
            g.refused(&refused(id), now);
            let after_refusal = now + QUIET_AFTER_REFUSAL;
            assert!(busy(&mut g, "a", BUSY_CALLS, after_refusal).is_empty());
            assert_eq!(
                busy(&mut g, "a", BUSY_CALLS, now + QUIET_AFTER_LIMITS).len(),
                1
            );
        }
    }

    #[test]
    fn settlements_of_local_calls_are_recognised_once() {
        let mut g = LocalGrants::default();
        g.mark_local("rsv-1");
        assert!(g.take_local("rsv-1"));
        assert!(!g.take_local("rsv-1"));
        assert!(!g.take_local("rsv-central"));
    }
}
