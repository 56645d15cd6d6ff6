//! The grants desk: the book of grants this data plane holds
//! (`grants.rs`) and the outbox of reports to the control plane, behind one
//! lock. Every method that changes the book queues the reports the change
//! calls for before it returns, so the queue's order is the book's: a call
//! carved from a grant is queued before that grant is given back, whichever
//! thread gives it back — the order the control plane needs to record the
//! call before it ends the grant (docs/GRANTS.md). Nothing outside this
//! file can change the book without queueing what it says.

use super::grants::{Carved, LocalGrants, Report};
use super::inflight::Inflight;
use super::report::{BacklogGuard, Queued};
use aex_proto::v1 as pb;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::mpsc;

/// Where reports go: the reporter's queue (`report.rs`).
pub(super) struct Outbox {
    queue: mpsc::UnboundedSender<Queued>,
    inflight: Arc<Inflight>,
    backlog: prometheus::IntGauge,
}

/// Who a report keeps waiting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waits {
    /// A call, its settlement or a grant given back on the serving path: a
    /// shutdown waits until the control plane has it (an ask need not).
    Shutdown,
    /// What the reporter's own timers and answers give back (an idle
    /// grant, a renewal's old one): a shutdown gives every grant back
    /// anyway.
    Nobody,
}

impl Outbox {
    fn send(&self, report: Report, waits: Waits) {
        let inflight = (waits == Waits::Shutdown && !matches!(report, Report::Ask(_)))
            .then(|| self.inflight.enter());
        let backlog = matches!(report, Report::Item(_)).then(|| BacklogGuard::enter(&self.backlog));
        let queued = Queued {
            report,
            queued_at: tokio::time::Instant::now(),
            _inflight: inflight,
            _backlog: backlog,
        };
        if self.queue.send(queued).is_err() {
            // Only if the reporter panicked; the grants then expire at
            // their deadline and are charged by the expiry policy.
            tracing::error!("the reporter has stopped");
        }
    }
}

pub(super) struct Desk {
    book: LocalGrants,
    outbox: Outbox,
}

/// The desk as the serving path holds it. The reporter holds it weakly:
/// when the data plane's `ControlPlane` goes, so do the desk and the
/// queue's last sender, and the reporter drains what is left and stops.
pub(super) type SharedDesk = Arc<Mutex<Desk>>;

pub(super) fn open(
    data_plane: &str,
    queue: mpsc::UnboundedSender<Queued>,
    inflight: Arc<Inflight>,
    backlog: prometheus::IntGauge,
) -> SharedDesk {
    Arc::new(Mutex::new(Desk {
        book: LocalGrants::new(data_plane),
        outbox: Outbox {
            queue,
            inflight,
            backlog,
        },
    }))
}

pub(super) fn lock(desk: &Mutex<Desk>) -> MutexGuard<'_, Desk> {
    desk.lock().expect("grants desk lock")
}

impl Desk {
    fn queue(&self, reports: Vec<Report>, waits: Waits) {
        for report in reports {
            self.outbox.send(report, waits);
        }
    }

    /// Whether the agent holds a grant that may admit now.
    pub(super) fn holds(&self, agent_id: &str, now: Instant) -> bool {
        self.book.holds(agent_id, now)
    }

    /// Carves a call reserving `amount` from the agent's grant and queues
    /// its admit (`admitted` writes it), or gives back a grant that cannot
    /// cover it (`None`: admit it centrally). Either way the call is
    /// counted towards the agent's next grant.
    pub(super) fn carve(
        &mut self,
        agent_id: &str,
        amount: i64,
        reservation_id: &str,
        now: Instant,
        admitted: impl FnOnce(&Carved) -> pb::LocalAdmission,
    ) -> Option<Carved> {
        let mut reports = Vec::new();
        let carved = self.book.carve(agent_id, amount, now, &mut reports);
        if let Some(c) = &carved {
            self.book.mark_local(reservation_id);
            reports.push(Report::Item(pb::ReportItem {
                item: Some(pb::report_item::Item::Admitted(admitted(c))),
            }));
            self.note(agent_id, amount, now, &mut reports);
        }
        self.queue(reports, Waits::Shutdown);
        carved
    }

    /// Counts a call admitted centrally, which may ask for a grant.
    pub(super) fn note_call(&mut self, agent_id: &str, reserved_micro: i64, now: Instant) {
        let mut reports = Vec::new();
        self.note(agent_id, reserved_micro, now, &mut reports);
        self.queue(reports, Waits::Shutdown);
    }

    fn note(&mut self, agent_id: &str, reserved_micro: i64, now: Instant, out: &mut Vec<Report>) {
        self.book.tidy(now, out);
        self.book.note_call(
            agent_id,
            reserved_micro,
            now,
            || aex_core::secrets::new_id("grt"),
            out,
        );
    }

    /// Queues the settlement of a call admitted here from a grant, after
    /// its admit; a call admitted centrally is handed back.
    pub(super) fn settle(&mut self, request: pb::SettleRequest) -> Option<pb::SettleRequest> {
        if !self.book.take_local(&request.reservation_id) {
            return Some(request);
        }
        let item = Report::Item(pb::ReportItem {
            item: Some(pb::report_item::Item::Settled(request)),
        });
        self.queue(vec![item], Waits::Shutdown);
        None
    }

    /// What a change on the watch stream does to grants: a changed or
    /// removed agent's are given back, a recall's too (and none is asked
    /// for a while), and every grant on a models change or a new snapshot
    /// (changes may have been missed). Returns how many went back.
    pub(super) fn see(&mut self, change: &pb::watch_event::Change, now: Instant) -> usize {
        use pb::watch_event::Change;
        let mut reports = Vec::new();
        match change {
            Change::Snapshot(_) | Change::Models(_) => self.book.drop_all(&mut reports),
            Change::AgentUpserted(a) => self.book.drop_agent(&a.agent_id, now, false, &mut reports),
            Change::AgentRemoved(id) => self.book.drop_agent(id, now, false, &mut reports),
            Change::GrantsRevoked(id) => self.book.drop_agent(id, now, true, &mut reports),
            Change::SnapshotPart(_) => {}
        }
        let returned = reports.len();
        self.queue(reports, Waits::Shutdown);
        returned
    }

    /// Gives every grant back, for a shutdown.
    pub(super) fn return_all(&mut self) {
        let mut reports = Vec::new();
        self.book.drop_all(&mut reports);
        self.queue(reports, Waits::Shutdown);
    }

    /// Gives back the grants past their time or idle (the reporter's timer).
    pub(super) fn tidy(&mut self, now: Instant) {
        let mut reports = Vec::new();
        self.book.tidy(now, &mut reports);
        self.queue(reports, Waits::Nobody);
    }

    /// Installs the grants a report's answer issued (giving back those they
    /// take over from) and notes its refusals.
    pub(super) fn apply(&mut self, response: &pb::ReportResponse, now: Instant) {
        let mut reports = Vec::new();
        for g in &response.grants {
            self.book.install(g, now, &mut reports);
        }
        for r in &response.refused {
            self.book.refused(r, now);
        }
        self.queue(reports, Waits::Nobody);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aex_core::grant::BUSY_CALLS;
    use std::collections::HashMap;

    fn desk() -> (SharedDesk, mpsc::UnboundedReceiver<Queued>) {
        let (queue, received) = mpsc::unbounded_channel();
        let backlog = prometheus::IntGauge::new("backlog", "test").unwrap();
        (open("dp", queue, Arc::default(), backlog), received)
    }

    fn admission(agent: &str, reservation: &str, c: &Carved) -> pb::LocalAdmission {
        pb::LocalAdmission {
            grant_id: c.grant_id.clone(),
            reservation_id: reservation.into(),
            agent_id: agent.into(),
            reserved_micro: 10,
            ..Default::default()
        }
    }

    /// Asks for and installs a grant for `agent`: its id.
    fn grant(desk: &SharedDesk, rx: &mut mpsc::UnboundedReceiver<Queued>, agent: &str) -> String {
        let now = Instant::now();
        for _ in 0..BUSY_CALLS {
            lock(desk).note_call(agent, 10, now);
        }
        let id = match rx.try_recv().map(|q| q.report) {
            Ok(Report::Ask(a)) => a.grant_id,
            other => panic!("expected an ask: {other:?}"),
        };
        let response = pb::ReportResponse {
            grants: vec![pb::Grant {
                grant_id: id.clone(),
                agent_id: agent.into(),
                budget_micro: 1_000_000,
                deadline_ms: 60_000,
                reservation_ttl_ms: 60_000,
                ..Default::default()
            }],
            ..Default::default()
        };
        lock(desk).apply(&response, now);
        id
    }

    /// Threads carving calls from an agent's grant while others give it
    /// back (a recall, a policy change, a shutdown): in the queue, every
    /// call carved from a grant comes before that grant's return.
    #[test]
    fn a_grant_is_given_back_only_after_every_call_carved_from_it() {
        for round in 0..20 {
            let (desk, mut rx) = desk();
            let first = grant(&desk, &mut rx, "a");
            lock(&desk)
                .carve("a", 10, "rsv-first", Instant::now(), |c| {
                    admission("a", "rsv-first", c)
                })
                .expect("the grant covers a call");
            let carvers: Vec<_> = (0..3)
                .map(|t| {
                    let desk = desk.clone();
                    std::thread::spawn(move || {
                        for n in 0..200 {
                            let reservation = format!("rsv-{t}-{n}");
                            lock(&desk).carve("a", 10, &reservation, Instant::now(), |c| {
                                admission("a", &reservation, c)
                            });
                        }
                    })
                })
                .collect();
            let giver = {
                let desk = desk.clone();
                std::thread::spawn(move || {
                    for n in 0..50 {
                        let change = match n % 3 {
                            0 => pb::watch_event::Change::GrantsRevoked("a".into()),
                            1 => pb::watch_event::Change::AgentRemoved("a".into()),
                            _ => pb::watch_event::Change::Models(Default::default()),
                        };
                        lock(&desk).see(&change, Instant::now());
                        std::thread::yield_now();
                    }
                })
            };
            for c in carvers {
                c.join().unwrap();
            }
            giver.join().unwrap();
            lock(&desk).return_all();
            drop(desk);
            let mut returned: HashMap<String, usize> = HashMap::new();
            let mut carved = 0;
            let mut position = 0;
            while let Ok(q) = rx.try_recv() {
                position += 1;
                match q.report {
                    Report::Item(pb::ReportItem {
                        item: Some(pb::report_item::Item::Admitted(a)),
                    }) => {
                        carved += 1;
                        assert!(
                            !returned.contains_key(&a.grant_id),
                            "round {round}: a call of {} queued after its return",
                            a.grant_id
                        );
                    }
                    Report::Close(g) => {
                        assert!(
                            returned.insert(g.grant_id.clone(), position).is_none(),
                            "round {round}: {} given back twice",
                            g.grant_id
                        );
                    }
                    _ => {}
                }
            }
            assert!(carved > 0, "round {round}: the grant admitted nothing");
            assert!(returned.contains_key(&first), "round {round}");
        }
    }

    #[test]
    fn a_local_call_is_settled_by_report_and_a_central_one_handed_back() {
        let (desk, mut rx) = desk();
        grant(&desk, &mut rx, "a");
        let mut d = lock(&desk);
        d.carve("a", 10, "rsv-1", Instant::now(), |c| {
            admission("a", "rsv-1", c)
        })
        .unwrap();
        let settle = |id: &str| pb::SettleRequest {
            reservation_id: id.into(),
            ..Default::default()
        };
        assert_eq!(d.settle(settle("rsv-1")), None);
        assert_eq!(d.settle(settle("rsv-1")), Some(settle("rsv-1")), "once");
        assert_eq!(d.settle(settle("rsv-central")), Some(settle("rsv-central")));
        drop(d);
        let kinds: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|q| match q.report {
                Report::Item(pb::ReportItem {
                    item: Some(pb::report_item::Item::Admitted(_)),
                }) => "admitted",
                Report::Item(_) => "settled",
                Report::Close(_) => "close",
                Report::Ask(_) => "ask",
            })
            .collect();
        assert_eq!(kinds, ["admitted", "settled"]);
    }
}
