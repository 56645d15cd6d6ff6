//! The data plane's gRPC API: admit, settle, heartbeat, watch (and report,
//! in `report.rs`).

use super::batch::{check_batch_size, each_at_once, item_error};
use super::settle::settle_items;
use crate::admission::engine::{Change, Decision, endpoint_from_pb};
use crate::admission::policy::{Ask, Denial, Endpoint, countable};
use crate::auth::caller;
use crate::clock::now_ms;
use crate::credentials::Caller;
use crate::error::Error;
use crate::service::convert::{models_to_pb, policy_to_pb};
use crate::state::ControlState;
use aex_core::credential::Served;
use aex_core::presented::Problem;
use aex_proto::v1::{self as pb, admission_service_server::AdmissionService};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct AdmissionApi {
    state: Arc<ControlState>,
}

impl AdmissionApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

fn denial_to_pb(d: Denial, agent_name: String) -> pb::AdmitResponse {
    pb::AdmitResponse {
        outcome: Some(pb::admit_response::Outcome::Denied(pb::Denial {
            http_status: u32::from(d.http_status),
            code: d.code.as_str().into(),
            r#type: d.error_type.as_str().into(),
            message: d.message,
            denied_by: d.denied_by.as_str().into(),
            param: d.param.into(),
            retry_after_ms: d.retry_after_ms,
            agent_name,
        })),
    }
}

/// One admission, as `Admit` and each item of `AdmitBatch` decide it.
async fn admit_one(
    state: &ControlState,
    served: &Served,
    r: pb::AdmitRequest,
) -> Result<pb::AdmitResponse, Status> {
    let endpoint = endpoint_from_pb(r.endpoint())
        .ok_or_else(|| Status::invalid_argument("endpoint is required"))?;
    if r.request_id.is_empty() {
        return Err(Status::invalid_argument("request_id is required"));
    }
    let ask = Ask {
        endpoint,
        model: &r.model,
        stream: r.stream,
        uses_tools: r.uses_tools,
        uses_function_calling: r.uses_function_calling,
        uses_vision: r.uses_vision,
        input_tokens_bound: r.input_tokens_bound,
        requested_output_tokens: r.requested_output_tokens,
        output_multiplier: r.output_multiplier,
        unbounded_input: aex_core::policy::UnboundedInput::from_wire(&r.unbounded_input),
    };
    let admission = &state.admission;
    if let Some(problem) = Problem::from_wire(&r.credential_problem) {
        // No token to look up: the 401 says what the request lacks.
        let d = problem.denial();
        admission
            .log_denial(&d, "", "", &ask, &r.request_id, "")
            .await;
        return Ok(denial_to_pb(d, String::new()));
    }
    if matches!(endpoint, Endpoint::Models | Endpoint::CountTokens) {
        // Listing models needs a valid token only, counting tokens a model
        // the agent may use too; nothing to reserve.
        let mut known = admission.authenticate_only(&r.token_sha256);
        if known
            .as_ref()
            .is_err_and(|d| d.denied_by == aex_core::denial::Rule::Auth)
            && admission
                .learn_token(&r.token_sha256)
                .await
                .map_err(Status::from)?
        {
            known = admission.authenticate_only(&r.token_sha256);
        }
        let models = state.models();
        let counted = |agent: &aex_core::agent::AgentRecord| match endpoint {
            Endpoint::CountTokens => countable(&agent.into(), &models, &ask)
                .map(|m| Some((m.provider.clone(), m.provider_model.clone()))),
            _ => Ok(None),
        };
        return Ok(match known {
            Ok(agent) => match served.check(&agent.name).and_then(|()| counted(&agent)) {
                Ok(route) => {
                    let (provider, provider_model) = route.unwrap_or_default();
                    pb::AdmitResponse {
                        outcome: Some(pb::admit_response::Outcome::Admitted(pb::Admission {
                            remaining_micro: agent.budget_micro
                                - agent.spent_micro
                                - agent.reserved_micro,
                            agent_id: agent.id,
                            agent_name: agent.name,
                            provider,
                            provider_model,
                            ..Default::default()
                        })),
                    }
                }
                Err(d) => {
                    admission
                        .log_denial(
                            &d,
                            &agent.id,
                            &agent.name,
                            &ask,
                            &r.request_id,
                            &r.token_sha256,
                        )
                        .await;
                    denial_to_pb(d, agent.name)
                }
            },
            Err(mut d) => {
                if d.denied_by == aex_core::denial::Rule::Auth
                    && let Some(retired) = admission.retired_denial(&r.token_sha256).await
                {
                    d = retired;
                }
                admission
                    .log_denial(&d, "", "", &ask, &r.request_id, &r.token_sha256)
                    .await;
                denial_to_pb(d, String::new())
            }
        });
    }
    let models = state.models();
    let started = std::time::Instant::now();
    let decision = admission
        .admit(
            &models,
            &r.request_id,
            &r.token_sha256,
            &ask,
            served,
            r.waits_for_slot,
        )
        .await
        .map_err(Status::from)?;
    let metrics = &state.metrics;
    metrics
        .admit_seconds
        .observe(started.elapsed().as_secs_f64());
    match &decision {
        Decision::Admitted(a) => {
            admission.note_serving(&a.agent_id, &r.data_plane, now_ms());
            metrics
                .admissions
                .with_label_values(&["admitted", ""])
                .inc()
        }
        Decision::Denied { denial, .. } => metrics
            .admissions
            .with_label_values(&["denied", denial.denied_by.as_str()])
            .inc(),
    }
    Ok(match decision {
        Decision::Admitted(a) => pb::AdmitResponse {
            outcome: Some(pb::admit_response::Outcome::Admitted(pb::Admission {
                reservation_id: a.reservation_id,
                agent_id: a.agent_id,
                agent_name: a.agent_name,
                reserved_micro: a.reserved_micro,
                output_tokens_cap: a.output_tokens_cap,
                output_cap_injected: a.output_cap_injected,
                remaining_micro: a.remaining_micro,
                expires_at_ms: a.expires_at_ms,
                provider: a.provider,
                provider_model: a.provider_model,
                input_pico_per_token: a.pricing.input_pico_per_token,
                output_pico_per_token: a.pricing.output_pico_per_token,
                cached_input_pico_per_token: Some(a.pricing.cached_input_pico_per_token),
                cache_write_pico_per_token: Some(a.pricing.cache_write_pico_per_token),
            })),
        },
        Decision::Denied { denial, agent_name } => denial_to_pb(denial, agent_name),
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AdmissionService for AdmissionApi {
    async fn admit(
        &self,
        request: Request<pb::AdmitRequest>,
    ) -> Result<Response<pb::AdmitResponse>, Status> {
        let served = caller(&request).served;
        admit_one(&self.state, &served, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn admit_batch(
        &self,
        request: Request<pb::AdmitBatchRequest>,
    ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
        let served = caller(&request).served;
        let admissions = request.into_inner().admissions;
        check_batch_size(admissions.len(), "AdmitBatch")?;
        let results = each_at_once(&self.state, admissions, |state, r| {
            let served = served.clone();
            async move { admit_one(&state, &served, r).await }
        })
        .await?
        .into_iter()
        .map(|decided| pb::AdmitResult {
            result: Some(match decided {
                Ok(r) => pb::admit_result::Result::Decided(r),
                Err(status) => pb::admit_result::Result::Error(item_error(&status)),
            }),
        })
        .collect();
        Ok(Response::new(pb::AdmitBatchResponse { results }))
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let served = caller(&request).served;
        settle_items(&self.state, &served, vec![request.into_inner()])
            .await
            .pop()
            .expect("one settlement, one answer")
            .map(Response::new)
    }

    async fn settle_batch(
        &self,
        request: Request<pb::SettleBatchRequest>,
    ) -> Result<Response<pb::SettleBatchResponse>, Status> {
        let served = caller(&request).served;
        let settlements = request.into_inner().settlements;
        check_batch_size(settlements.len(), "SettleBatch")?;
        let results = settle_items(&self.state, &served, settlements)
            .await
            .into_iter()
            .map(|settled| pb::SettleResult {
                result: Some(match settled {
                    Ok(r) => pb::settle_result::Result::Settled(r),
                    Err(status) => pb::settle_result::Result::Error(item_error(&status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::SettleBatchResponse { results }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let served = caller(&request).served;
        let ids = request.into_inner().reservation_ids;
        self.state
            .admission
            .check_serves_reservations(&served, &ids)
            .await
            .map_err(Status::from)?;
        let (expires_at_ms, closed) = self
            .state
            .admission
            .heartbeat(&ids)
            .await
            .map_err(|e: Error| Status::from(e))?;
        Ok(Response::new(pb::HeartbeatResponse {
            expires_at_ms,
            closed_reservation_ids: closed,
        }))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let served = caller(&request).served;
        super::report::report(&self.state, &served, request.into_inner())
            .await
            .map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller: Caller = caller(&request);
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            // Counts this data plane as connected while the stream lives.
            struct Connected(Arc<ControlState>);
            impl Drop for Connected {
                fn drop(&mut self) {
                    self.0
                        .data_planes
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            state
                .data_planes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _connected = Connected(state.clone());
            let stopping = ControlState::stopping(state.shutting_down.subscribe());
            tokio::pin!(stopping);
            let mut credentials = state.credentials.changes();
            let served = &caller.served;
            loop {
                // (Re)start with a full snapshot: at connect, and whenever this
                // receiver fell behind and may have missed a change.
                let (mut agents, mut changes) = state.admission.subscribe();
                // A scoped data plane sees its own agents only: their ids,
                // to pass on their removals and recalls and nothing else's.
                agents.retain(|a| served.serves(&a.name));
                let mut shown: std::collections::HashSet<String> =
                    agents.iter().map(|a| a.id.clone()).collect();
                for page in snapshot_pages(&agents) {
                    if tx.send(Ok(page)).await.is_err() {
                        return;
                    }
                }
                let models = pb::WatchEvent {
                    change: Some(pb::watch_event::Change::Models(models_to_pb(
                        &state.models(),
                        now_ms(),
                    ))),
                };
                if tx.send(Ok(models)).await.is_err() {
                    return;
                }
                loop {
                    let received = tokio::select! {
                        _ = tx.closed() => return,
                        _ = &mut stopping => return,
                        Ok(()) = credentials.changed() => {
                            if state.credentials.still_valid(&caller) {
                                continue;
                            }
                            let _ = tx
                                .send(Err(Status::unauthenticated(format!(
                                    "the data-plane credential '{}' was revoked",
                                    served.credential()
                                ))))
                                .await;
                            return;
                        }
                        r = changes.recv() => r,
                    };
                    let event = match received {
                        Ok(Change::AgentUpserted(a)) => {
                            if !served.serves(&a.name) {
                                continue;
                            }
                            shown.insert(a.id.clone());
                            pb::watch_event::Change::AgentUpserted(policy_to_pb(&a))
                        }
                        Ok(Change::AgentRemoved(id)) => {
                            if !shown.remove(&id) {
                                continue;
                            }
                            pb::watch_event::Change::AgentRemoved(id)
                        }
                        Ok(Change::Models(m)) => {
                            pb::watch_event::Change::Models(models_to_pb(&m, now_ms()))
                        }
                        Ok(Change::GrantsRevoked(agent_id)) => {
                            if !shown.contains(&agent_id) {
                                continue;
                            }
                            pb::watch_event::Change::GrantsRevoked(agent_id)
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if tx
                        .send(Ok(pb::WatchEvent {
                            change: Some(event),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Agents per page of a watch snapshot. A policy is about 200 bytes on the
/// wire, so a page is about 200 KB: far below the 4 MiB a gRPC message may
/// carry by default, which one message for 23,001 agents passed (issue
/// #31), and small enough that a data plane's receive buffer stays small.
pub const SNAPSHOT_PAGE: usize = 1_000;

/// The full state as watch events: pages, then the snapshot that ends them
/// (the last page, or an empty one when there are no agents).
fn snapshot_pages(agents: &[crate::storage::AgentRecord]) -> Vec<pb::WatchEvent> {
    use pb::watch_event::Change;
    let mut pages: Vec<pb::PolicySnapshot> = agents
        .chunks(SNAPSHOT_PAGE)
        .map(|page| pb::PolicySnapshot {
            agents: page.iter().map(policy_to_pb).collect(),
        })
        .collect();
    let last = pages.pop().unwrap_or_default();
    pages
        .into_iter()
        .map(Change::SnapshotPart)
        .chain(std::iter::once(Change::Snapshot(last)))
        .map(|change| pb::WatchEvent {
            change: Some(change),
        })
        .collect()
}
