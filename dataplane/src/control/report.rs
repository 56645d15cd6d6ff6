//! The reporter: one ordered channel to the control plane for everything
//! grants do (docs/GRANTS.md). Calls admitted from grants, their
//! settlements, grants given back and grants asked for are sent as one
//! `Report` at a time, at most every [`REPORT_INTERVAL`] while there are any (at
//! once when idle, or when [`MAX_ITEMS`] queued up), and resent until
//! answered: every item is idempotent, and because one report is out at a
//! time, a call's admit always reaches the control plane before its
//! settlement and before its grant is given back.

use super::backoff::{Backoff, retryable, retryable_code};
use super::desk::{self, Desk};
use super::grants::Report;
use super::{Client, InflightGuard};
use crate::metrics::Metrics;
use aex_core::grant::REPORT_INTERVAL;
use aex_proto::v1 as pb;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const MAX_ITEMS: usize = 1024;

/// Past this many calls and settlements queued and not yet acknowledged,
/// no call is admitted from a grant (it goes to the control plane, which
/// answers only once it has recorded it): admission never runs more than
/// this far ahead of the ledger. Eight full reports: at the heaviest load
/// this machine takes (about 17k items/s offered, 15k/s recorded, issue
/// #31) about half a second of recording, several times what a report
/// every [`REPORT_INTERVAL`] holds in steady state, so it holds calls back only
/// when the ledger falls behind or cannot be reached.
pub const MAX_BACKLOG: i64 = 8 * MAX_ITEMS as i64;

/// Counts a queued item until it is acknowledged (or refused for good):
/// the item's report holds it, so every way a report ends is counted.
pub(super) struct BacklogGuard(prometheus::IntGauge);

impl BacklogGuard {
    pub(super) fn enter(backlog: &prometheus::IntGauge) -> Self {
        backlog.inc();
        Self(backlog.clone())
    }
}

impl Drop for BacklogGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A report waiting to be sent; what must reach the control plane keeps a
/// shutdown waiting until it has.
pub(super) struct Queued {
    pub(super) report: Report,
    pub(super) queued_at: Instant,
    pub(super) _inflight: Option<InflightGuard>,
    /// Calls and settlements only: what backpressure counts.
    pub(super) _backlog: Option<BacklogGuard>,
}

pub(super) struct Reporter {
    pub(super) client: Client,
    /// The grants desk, for the grants its answers and its timer give
    /// back: through the desk, so they follow every call queued before.
    /// Weak: the desk holds the queue's sender, and the reporter stops
    /// once the data plane drops both.
    pub(super) desk: Weak<Mutex<Desk>>,
    pub(super) data_plane: String,
    pub(super) open: Arc<Mutex<HashSet<String>>>,
    pub(super) metrics: Arc<Metrics>,
}

impl Reporter {
    /// Runs until the `ControlPlane` is dropped and nothing is left.
    pub(super) async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut pending: Vec<Queued> = Vec::new();
        let mut last_sent = Instant::now() - REPORT_INTERVAL;
        loop {
            while pending.is_empty() {
                // Idle: a grant past its time still goes back on time,
                // instead of being charged at its deadline.
                tokio::select! {
                    q = queue.recv() => match q {
                        Some(q) => pending.push(q),
                        None => return,
                    },
                    _ = tokio::time::sleep(REPORT_INTERVAL) => self.tidy(),
                }
            }
            let due = last_sent + REPORT_INTERVAL;
            while pending.len() < MAX_ITEMS {
                tokio::select! {
                    q = queue.recv() => match q {
                        Some(q) => pending.push(q),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(due) => break,
                }
            }
            let batch: Vec<Queued> = pending.drain(..pending.len().min(MAX_ITEMS)).collect();
            last_sent = Instant::now();
            let again = self.deliver(batch).await;
            // Older than anything still queued: first in the next report.
            pending.splice(0..0, again);
        }
    }

    /// Sends one report until it is answered; returns what must go in
    /// the next: items the control plane could not record this time (in
    /// their order), and the grants its answer calls to give back.
    async fn deliver(&mut self, batch: Vec<Queued>) -> Vec<Queued> {
        let oldest = batch.iter().map(|q| q.queued_at).min();
        let mut request = pb::ReportRequest {
            data_plane: self.data_plane.clone(),
            ..Default::default()
        };
        let mut items = Vec::new();
        for q in batch {
            match &q.report {
                Report::Item(item) => {
                    request.items.push(item.clone());
                    items.push(q);
                }
                Report::Close(g) => request.close.push(g.clone()),
                Report::Ask(a) => request.asks.push(a.clone()),
            }
        }
        self.metrics
            .report_items
            .observe((request.items.len() + request.close.len() + request.asks.len()) as f64);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let response = loop {
            let mut r = tonic::Request::new(request.clone());
            r.set_timeout(Duration::from_secs(5));
            match self.client.report(r).await {
                Ok(response) => break response.into_inner(),
                Err(status) if retryable(&status) => {
                    tracing::warn!(%status, items = request.items.len(), "report failed; retrying");
                    backoff.wait().await;
                }
                Err(status) => {
                    // A bug on one side or the other, not something a
                    // retry mends: the grants involved expire at their
                    // deadline and are charged by the expiry policy.
                    tracing::error!(%status, items = request.items.len(), "report refused");
                    return Vec::new();
                }
            }
        };
        if let Some(oldest) = oldest {
            self.metrics
                .report_lag
                .observe(oldest.elapsed().as_secs_f64());
        }
        let again = self.retry_failed(items, &response.results);
        self.apply_grants(&request, &response);
        again
    }

    /// The items to send again (failures worth a retry); settled ones are
    /// no longer open.
    fn retry_failed(&self, items: Vec<Queued>, results: &[pb::ReportItemResult]) -> Vec<Queued> {
        use pb::report_item_result::Result as Done;
        let mut again = Vec::new();
        let mut open = self.open.lock().expect("open lock");
        for (i, q) in items.into_iter().enumerate() {
            let Report::Item(item) = &q.report else {
                continue;
            };
            let reservation = match &item.item {
                Some(pb::report_item::Item::Admitted(a)) => &a.reservation_id,
                Some(pb::report_item::Item::Settled(s)) => &s.reservation_id,
                None => continue,
            };
            match results.get(i).and_then(|r| r.result.as_ref()) {
                Some(Done::Settled(_)) => {
                    open.remove(reservation);
                }
                Some(Done::Admitted(_)) => {}
                Some(Done::Error(e)) if retryable_code(e.code) => {
                    tracing::warn!(reservation = %reservation, error = %e.message, "report item failed; retrying");
                    again.push(q);
                }
                Some(Done::Error(e)) => {
                    // An admit whose grant ended (its expiry charged what it
                    // held), or a settlement refused as a single Settle
                    // would be: nothing a retry changes.
                    tracing::error!(reservation = %reservation, error = %e.message, "report item refused");
                    open.remove(reservation);
                }
                // Not answered: safe to send again.
                None => again.push(q),
            }
        }
        again
    }

    fn tidy(&self) {
        if let Some(d) = self.desk.upgrade() {
            desk::lock(&d).tidy(std::time::Instant::now());
        }
    }

    /// Installs the grants issued (queuing the returns of those they take
    /// over from) and notes the refusals.
    fn apply_grants(&self, request: &pb::ReportRequest, response: &pb::ReportResponse) {
        if let Some(d) = self.desk.upgrade() {
            desk::lock(&d).apply(response, std::time::Instant::now());
        }
        let grants = &self.metrics.grants;
        grants
            .with_label_values(&["installed"])
            .inc_by(response.grants.len() as u64);
        grants
            .with_label_values(&["refused"])
            .inc_by(response.refused.len() as u64);
        grants
            .with_label_values(&["returned"])
            .inc_by(request.close.len() as u64);
    }
}
