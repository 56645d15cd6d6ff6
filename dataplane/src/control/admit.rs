//! Admissions: one unary call when alone, batched (`AdmitBatch`) while
//! others are in flight.

use super::Client;
use aex_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// An admission waiting to be sent, with where to send its answer.
pub(super) struct PendingAdmit {
    pub(super) request: pb::AdmitRequest,
    /// The request's `aex.admit` span, so the control plane's span joins
    /// its trace.
    pub(super) span: tracing::Span,
    pub(super) answer: oneshot::Sender<Result<pb::AdmitResponse, tonic::Status>>,
}

pub(super) async fn admit_unary(
    mut client: Client,
    request: pb::AdmitRequest,
) -> Result<pb::AdmitResponse, tonic::Status> {
    let mut r = tonic::Request::new(request);
    r.set_timeout(Duration::from_secs(5));
    client.admit(r).await.map(tonic::Response::into_inner)
}

/// Sends queued admissions as `AdmitBatch` calls, up to `IN_FLIGHT` at once;
/// what queues up while they are all out goes in the next. The callers
/// retry failures as they would a failed `Admit` (idempotent by request id).
pub(super) async fn send_admissions(
    client: Client,
    mut queue: mpsc::UnboundedReceiver<PendingAdmit>,
) {
    const IN_FLIGHT: usize = 4;
    const MAX_BATCH: usize = 256;
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let client = client.clone();
        tokio::spawn(async move {
            admit_batch(client, batch).await;
            drop(slot);
        });
    }
}

async fn admit_batch(mut client: Client, batch: Vec<PendingAdmit>) {
    use pb::admit_result::Result as Decided;
    if let [_] = batch.as_slice() {
        let only = batch.into_iter().next().expect("one");
        let span = only.span.clone();
        let answer = admit_unary(client, only.request).instrument(span).await;
        let _ = only.answer.send(answer);
        return;
    }
    let span = tracing::info_span!(
        parent: None,
        "aex.admit_batch",
        otel.kind = "client",
        aex.admissions = batch.len()
    );
    let mut requests = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    for p in batch {
        span.follows_from(&p.span);
        requests.push(p.request);
        waiting.push((p.span, p.answer));
    }
    let mut r = tonic::Request::new(pb::AdmitBatchRequest {
        admissions: requests.clone(),
    });
    r.set_timeout(Duration::from_secs(5));
    match client.admit_batch(r).instrument(span).await {
        Ok(response) => {
            let mut results = response.into_inner().results.into_iter();
            for (_, answer) in waiting {
                let _ = answer.send(match results.next().and_then(|r| r.result) {
                    Some(Decided::Decided(d)) => Ok(d),
                    Some(Decided::Error(e)) => {
                        Err(tonic::Status::new(tonic::Code::from_i32(e.code), e.message))
                    }
                    // Retryable: the caller asks again, idempotently.
                    None => Err(tonic::Status::unavailable(
                        "the control plane left this admission unanswered",
                    )),
                });
            }
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            // A control plane older than AdmitBatch: one call each, at once.
            for (request, (span, answer)) in requests.into_iter().zip(waiting) {
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = answer.send(admit_unary(client, request).instrument(span).await);
                });
            }
        }
        Err(status) => {
            for (_, answer) in waiting {
                let _ = answer.send(Err(status.clone()));
            }
        }
    }
}
