//! `Report`: what a data plane did with its grants, and the grants it asks
//! for (docs/GRANTS.md). Admits are recorded before settlements, so a call
//! admitted and finished between two reports is settled after its admit;
//! each phase is one job of the ledger writer, whatever its size.

use super::batch::{check_batch_size, item_error};
use super::settle::settle_items;
use crate::admission::engine::{
    GrantAnswer, GrantRequest, LocalAdmit, LocalAdmitOutcome, endpoint_from_pb,
};
use crate::in_order::InOrder;
use crate::state::ControlState;
use crate::storage::ReservationRecord;
use aex_core::credential::Served;
use aex_core::grant::GrantRefusal;
use aex_proto::v1 as pb;
use std::sync::Arc;
use tonic::Status;

pub(super) async fn report(
    state: &Arc<ControlState>,
    served: &Served,
    r: pb::ReportRequest,
) -> Result<pb::ReportResponse, Status> {
    check_batch_size(r.items.len(), "Report")?;
    if r.data_plane.is_empty() {
        return Err(Status::invalid_argument(
            "data_plane is required: the data plane's id, named in grant events",
        ));
    }
    let metrics = &state.metrics;
    metrics.report_items.observe(r.items.len() as f64);

    let mut admits = Vec::new();
    let mut settles = Vec::new();
    for (i, item) in r.items.into_iter().enumerate() {
        match item.item {
            Some(pb::report_item::Item::Admitted(a)) => admits.push((i, a)),
            Some(pb::report_item::Item::Settled(s)) => settles.push((i, s)),
            None => {
                return Err(Status::invalid_argument(format!(
                    "report item {i} is empty"
                )));
            }
        }
    }
    let mut results = InOrder::new(admits.len() + settles.len());

    let (admit_at, admits): (Vec<usize>, Vec<pb::LocalAdmission>) = admits.into_iter().unzip();
    let admit_ids: Vec<String> = admits.iter().map(|a| a.reservation_id.clone()).collect();
    let recorded = record_admits(state, served, admits).await;
    // A settlement of a call whose admit failed here is sent again with it:
    // settled now, it would find no reservation and be lost.
    let mut not_admitted = std::collections::HashSet::new();
    for ((i, done), id) in admit_at.into_iter().zip(recorded).zip(admit_ids) {
        let result = match done {
            Ok(()) => pb::report_item_result::Result::Admitted(true),
            Err(status) => {
                not_admitted.insert(id);
                pb::report_item_result::Result::Error(item_error(&status))
            }
        };
        results.put(i, result);
    }
    let (waiting, settles): (Vec<_>, Vec<_>) = settles
        .into_iter()
        .partition(|(_, s)| not_admitted.contains(&s.reservation_id));
    for (i, _) in waiting {
        results.put(
            i,
            pb::report_item_result::Result::Error(item_error(&Status::unavailable(
                "its admit was not recorded; send both again",
            ))),
        );
    }

    let (settle_at, settles): (Vec<usize>, Vec<pb::SettleRequest>) = settles.into_iter().unzip();
    let settled = settle_items(state, served, settles).await;
    for (i, done) in settle_at.into_iter().zip(settled) {
        let result = match done {
            Ok(s) => pb::report_item_result::Result::Settled(s),
            Err(status) => pb::report_item_result::Result::Error(item_error(&status)),
        };
        results.put(i, result);
    }

    for g in &r.close {
        // Its grant stays open and expires at its deadline, like the grant
        // of a data plane that vanished.
        if state
            .admission
            .check_serves_agent(served, &g.agent_id)
            .await
            .is_err()
        {
            continue;
        }
        state
            .admission
            .return_grant(&g.grant_id, &g.agent_id)
            .await
            .map_err(Status::from)?;
        metrics.grants.with_label_values(&["returned"]).inc();
    }

    let mut grants = Vec::new();
    let mut refused = Vec::new();
    for ask in r.asks {
        // A data plane asks again while it holds a grant of the agent.
        let renewal = ask.renewal;
        if let Err(e) = state
            .admission
            .check_serves_agent(served, &ask.agent_id)
            .await
        {
            tracing::warn!(data_plane = %r.data_plane, error = %e, "a grant asked for an agent its data plane does not serve");
            refused.push(grant_refused(
                ask.grant_id,
                ask.agent_id,
                GrantRefusal::NotAdmissible,
            ));
            continue;
        }
        let answer = state
            .admission
            .request_grant(
                &r.data_plane,
                GrantRequest {
                    grant_id: ask.grant_id.clone(),
                    agent_id: ask.agent_id.clone(),
                    worst_call_micro: ask.worst_call_micro,
                    spend_per_s_micro: ask.spend_per_s_micro,
                    calls_per_s: ask.calls_per_s,
                },
            )
            .await
            .map_err(Status::from)?;
        match answer {
            GrantAnswer::Issued {
                grant,
                remaining_micro,
            } => {
                metrics
                    .grants
                    .with_label_values(&[if renewal { "renewed" } else { "issued" }])
                    .inc();
                grants.push(pb::Grant {
                    grant_id: grant.id,
                    agent_id: grant.agent_id,
                    budget_micro: grant.budget_micro,
                    requests: grant.requests.unwrap_or(0),
                    deadline_ms: grant.deadline_ms,
                    reservation_ttl_ms: state.admission.reservation_ttl_ms(),
                    remaining_micro,
                    created_at_ms: grant.created_at_ms,
                });
            }
            GrantAnswer::Refused(why) => {
                metrics
                    .grants
                    .with_label_values(&[&format!("refused_{}", why.as_str())])
                    .inc();
                refused.push(grant_refused(ask.grant_id, ask.agent_id, why));
            }
        }
    }
    Ok(pb::ReportResponse {
        results: results
            .done()
            .into_iter()
            .map(|result| pb::ReportItemResult {
                result: Some(result),
            })
            .collect(),
        grants,
        refused,
    })
}

/// A refused ask, in both forms: by name for data planes older than `why`.
fn grant_refused(grant_id: String, agent_id: String, why: GrantRefusal) -> pb::GrantRefused {
    pb::GrantRefused {
        grant_id,
        agent_id,
        reason: why.as_str().to_string(),
        why: aex_proto::convert::refusal_to_pb(why) as i32,
    }
}

/// The calls a report says were admitted from grants: each checked, then
/// all recorded as one ledger job; answered in order.
async fn record_admits(
    state: &ControlState,
    served: &Served,
    admits: Vec<pb::LocalAdmission>,
) -> Vec<Result<(), Status>> {
    let mut results = InOrder::new(admits.len());
    let (mut recording, mut locals) = (Vec::new(), Vec::new());
    for (i, a) in admits.into_iter().enumerate() {
        match local_admit(state, served, a).await {
            Ok(local) => {
                recording.push(i);
                locals.push(local);
            }
            Err(status) => results.put(i, Err(status)),
        }
    }
    let outcomes = state.admission.admit_from_grants(locals).await;
    for (i, outcome) in recording.into_iter().zip(outcomes) {
        results.put(i, admit_recorded(state, outcome.map_err(Status::from)));
    }
    results.done()
}

/// A call a data plane admitted, as the ledger records it; refused when the
/// data plane does not serve its agent.
async fn local_admit(
    state: &ControlState,
    served: &Served,
    a: pb::LocalAdmission,
) -> Result<LocalAdmit, Status> {
    let endpoint = endpoint_from_pb(a.endpoint())
        .ok_or_else(|| Status::invalid_argument("a local admission's endpoint is required"))?;
    state
        .admission
        .check_serves_agent(served, &a.agent_id)
        .await
        .map_err(Status::from)?;
    Ok(LocalAdmit {
        grant_id: a.grant_id,
        record: ReservationRecord {
            id: a.reservation_id,
            request_id: a.request_id,
            agent_id: a.agent_id,
            model: a.model,
            amount_micro: a.reserved_micro,
            pricing: aex_proto::convert::pricing_from_pb(
                a.input_pico_per_token,
                a.output_pico_per_token,
                a.cached_input_pico_per_token,
                a.cache_write_pico_per_token,
            ),
            input_tokens_bound: a.input_tokens_bound,
            output_tokens_cap: a.output_tokens_cap,
            created_at_ms: a.created_at_ms,
            expires_at_ms: a.expires_at_ms,
        },
        output_cap_injected: a.output_cap_injected,
        endpoint,
        stream: a.stream,
    })
}

/// What the data plane is told of a call it reported, counted.
fn admit_recorded(
    state: &ControlState,
    outcome: Result<LocalAdmitOutcome, Status>,
) -> Result<(), Status> {
    match outcome? {
        LocalAdmitOutcome::Recorded => {
            state
                .metrics
                .admissions
                .with_label_values(&["admitted_from_grant", ""])
                .inc();
            Ok(())
        }
        LocalAdmitOutcome::AlreadyRecorded => Ok(()),
        // Not retryable. Served and not recorded: the refusal is in the
        // chain (`report.refused`), where audit names it.
        LocalAdmitOutcome::NotCovered(why) => {
            state
                .metrics
                .admissions
                .with_label_values(&["refused_from_grant", ""])
                .inc();
            tracing::error!(reason = %why, "a call a data plane served from a grant was refused by the ledger (recorded as report.refused; `aexctl audit` names it)");
            Err(Status::failed_precondition(why))
        }
    }
}
