//! Settlements, queued and delivered until the control plane answers
//! (settlement is idempotent by reservation id), batched under load.

use super::backoff::{Backoff, retryable, retryable_code};
use super::{Client, InflightGuard};
use aex_proto::v1 as pb;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// A settlement waiting to be sent; it keeps a shutdown waiting until the
/// control plane has acknowledged it.
pub(super) struct PendingSettle {
    pub(super) request: pb::SettleRequest,
    /// Opened in the request's trace; lives until the settlement is acknowledged.
    pub(super) span: tracing::Span,
    pub(super) _inflight: InflightGuard,
}

/// Sends queued settlements, whatever queued up while the previous call was
/// in flight going as one `SettleBatch`: one at a time when calls are
/// sparse, so nothing waits; many per round trip under load. Ends when the
/// `ControlPlane` is dropped and the queue is empty.
pub(super) async fn send_settlements(
    mut client: Client,
    open: Arc<Mutex<HashSet<String>>>,
    mut queue: mpsc::UnboundedReceiver<PendingSettle>,
) {
    const MAX_BATCH: usize = 256;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One settlement stays in its request's trace; a batch gets a span
        // of its own, linked to each request's.
        let span = if let [only] = batch.as_slice() {
            only.span.clone()
        } else {
            let span = tracing::info_span!(
                parent: None,
                "aex.settle_batch",
                otel.kind = "client",
                aex.settlements = batch.len()
            );
            for p in &batch {
                span.follows_from(&p.span);
            }
            span
        };
        let requests = batch.iter().map(|p| &p.request).collect();
        deliver(&mut client, requests).instrument(span).await;
        let mut open = open.lock().expect("open lock");
        for p in &batch {
            open.remove(&p.request.reservation_id);
        }
        drop(open);
        // Dropping them releases their shutdown guards.
        batch.clear();
    }
}

/// Resends until every settlement is acknowledged or refused for good.
async fn deliver(client: &mut Client, mut todo: Vec<&pb::SettleRequest>) {
    use pb::settle_result::Result as Settled;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    while !todo.is_empty() {
        let mut r = tonic::Request::new(pb::SettleBatchRequest {
            settlements: todo.iter().map(|&r| r.clone()).collect(),
        });
        r.set_timeout(Duration::from_secs(5));
        let results = match client.settle_batch(r).await {
            Ok(response) => response.into_inner().results,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                // A control plane older than SettleBatch.
                for request in todo.drain(..) {
                    settle_one(client, request.clone()).await;
                }
                return;
            }
            Err(status) if retryable(&status) => {
                tracing::warn!(%status, settlements = todo.len(), "settlement failed; retrying");
                backoff.wait().await;
                continue;
            }
            Err(status) => {
                tracing::error!(%status, settlements = todo.len(), "settlements refused");
                return;
            }
        };
        let mut results = results.into_iter();
        todo.retain(|request| match results.next().and_then(|r| r.result) {
            Some(Settled::Settled(_)) => false,
            Some(Settled::Error(e)) if retryable_code(e.code) => {
                tracing::warn!(reservation = %request.reservation_id, error = %e.message, "settlement failed; retrying");
                true
            }
            Some(Settled::Error(e)) => {
                tracing::error!(reservation = %request.reservation_id, error = %e.message, "settlement refused");
                false
            }
            // Not answered: safe to send again.
            None => true,
        });
        if !todo.is_empty() {
            backoff.wait().await;
        }
    }
}

/// One settlement through the unary `Settle`, retried like a batch.
async fn settle_one(client: &mut Client, request: pb::SettleRequest) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let mut r = tonic::Request::new(request.clone());
        r.set_timeout(Duration::from_secs(5));
        match client.settle(r).await {
            Ok(_) => return,
            Err(status) if !retryable(&status) => {
                tracing::error!(%status, reservation = %request.reservation_id, "settlement refused");
                return;
            }
            Err(status) => {
                tracing::warn!(%status, reservation = %request.reservation_id, "settlement failed; retrying");
                backoff.wait().await;
            }
        }
    }
}
