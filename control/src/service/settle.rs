//! Settlements as the data plane's RPCs ask for them (`Settle`,
//! `SettleBatch`, a report's settled calls): checked against the caller's
//! scope, then settled as one ledger job, each answered apart.

use crate::admission::engine::{Outcome, SettleInput};
use crate::in_order::InOrder;
use crate::state::ControlState;
use aex_core::credential::Served;
use aex_proto::v1 as pb;
use tonic::Status;

/// Settlements, as `Settle`, `SettleBatch` and `Report` make them: one
/// ledger job for all, each answered apart, in order.
pub(super) async fn settle_items(
    state: &ControlState,
    served: &Served,
    requests: Vec<pb::SettleRequest>,
) -> Vec<Result<pb::SettleResponse, Status>> {
    let mut results = InOrder::new(requests.len());
    let (mut settling, mut inputs) = (Vec::new(), Vec::new());
    for (i, r) in requests.into_iter().enumerate() {
        match settle_input(state, served, r).await {
            Ok(Some(input)) => {
                settling.push((i, input.outcome));
                inputs.push(input);
            }
            // Never admitted, or already closed: nothing to release.
            Ok(None) => results.put(
                i,
                Ok(pb::SettleResponse {
                    already_settled: true,
                    ..Default::default()
                }),
            ),
            Err(status) => results.put(i, Err(status)),
        }
    }
    let settled = state.admission.settle_many(inputs).await;
    for ((i, outcome), settled) in settling.into_iter().zip(settled) {
        results.put(
            i,
            settled
                .map(|settled| settled_to_pb(state, outcome, &settled))
                .map_err(Status::from),
        );
    }
    results.done()
}

/// The settlement a data plane asks for, checked; `None` when its request
/// id names no open reservation.
async fn settle_input(
    state: &ControlState,
    served: &Served,
    mut r: pb::SettleRequest,
) -> Result<Option<SettleInput>, Status> {
    if r.reservation_id.is_empty() && !r.request_id.is_empty() {
        match state.admission.reservation_for_request(&r.request_id) {
            Some(id) => r.reservation_id = id,
            None => return Ok(None),
        }
    }
    if r.reservation_id.is_empty() {
        return Err(Status::invalid_argument(
            "reservation_id or request_id is required",
        ));
    }
    state
        .admission
        .check_serves_reservations(served, std::slice::from_ref(&r.reservation_id))
        .await
        .map_err(Status::from)?;
    Ok(Some(SettleInput {
        outcome: aex_proto::convert::outcome_from_pb(r.outcome()),
        reservation_id: r.reservation_id,
        usage: aex_core::money::TokenUsage::new(r.prompt_tokens, r.completion_tokens)
            .with_cache(r.cached_input_tokens, r.cache_write_tokens),
        usage_reported: r.usage_reported,
        upstream_status: r.upstream_status,
        upstream_retry_after_ms: r.upstream_retry_after_ms,
    }))
}

/// A settlement's answer, counted in the metrics.
fn settled_to_pb(
    state: &ControlState,
    outcome: Outcome,
    settled: &crate::admission::engine::Settled,
) -> pb::SettleResponse {
    if !settled.already_settled {
        let metrics = &state.metrics;
        metrics
            .settlements
            .with_label_values(&[outcome.as_str()])
            .inc();
        metrics
            .charged_micro
            .inc_by(settled.charged_micro.max(0) as u64);
        if settled.stopped_for_overruns {
            metrics
                .agents_stopped
                .with_label_values(&[aex_core::overrun::REASON])
                .inc();
        }
    }
    pb::SettleResponse {
        charged_micro: settled.charged_micro,
        remaining_micro: settled.remaining_micro,
        already_settled: settled.already_settled,
        overrun: settled.overrun_micro > 0,
        overrun_micro: settled.overrun_micro,
    }
}
