use crate::audit::{Audit, audit_store};
use crate::clock::now_ms;
use crate::error::Error;
use crate::service::convert::event_to_pb;
use crate::state::ControlState;
use crate::storage::{EventFilter, EventKind};
use aex_proto::v1::{self as pb, ledger_service_server::LedgerService};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

/// Denials that are policy refusals (403s), as opposed to limits.
const POLICY_REASONS: &[&str] = &[
    "model",
    "streaming",
    "tools",
    "function_calling",
    "vision",
    "scope",
    "paused",
];

pub struct LedgerApi {
    state: Arc<ControlState>,
}

impl LedgerApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }

    async fn audit(&self) -> Result<pb::AuditReport, Error> {
        let started = std::time::Instant::now();
        let Audit {
            checks,
            events_checked,
            overruns,
        } = audit_store(self.state.store.as_ref(), &self.state.ledger_key).await?;
        Ok(pb::AuditReport {
            checks: checks
                .into_iter()
                .map(|c| pb::AuditCheck {
                    name: c.name.into(),
                    passed: c.passed,
                    detail: c.detail,
                    offenders: c.offenders,
                })
                .collect(),
            events_checked,
            overruns,
            duration_ms: started.elapsed().as_millis() as i64,
        })
    }

    async fn status(&self) -> Result<pb::Status, Error> {
        let t = self.state.store.status_totals().await?;
        let counter =
            |kind: EventKind| t.counters.get(kind.as_str()).copied().unwrap_or(0).max(0) as u64;
        let mut denials_by_reason: std::collections::HashMap<String, u64> = t
            .counters
            .iter()
            .filter_map(|(name, v)| {
                Some((name.strip_prefix("deny:")?.to_string(), (*v).max(0) as u64))
            })
            .collect();
        // Unknown tokens' denials are written in batches; count the ones
        // still in memory too, so status agrees with what clients saw.
        let pending = self.state.admission.pending_unauthenticated();
        if pending > 0 {
            *denials_by_reason
                .entry(aex_core::denial::Rule::Auth.as_str().into())
                .or_default() += pending;
        }
        let policy_violations = POLICY_REASONS
            .iter()
            .map(|r| denials_by_reason.get(*r).copied().unwrap_or(0))
            .sum();
        Ok(pb::Status {
            agents: t.agents,
            total_budget_micro: t.total_budget_micro,
            total_spent_micro: t.total_spent_micro,
            total_reserved_micro: t.total_reserved_micro,
            total_remaining_micro: t
                .total_budget_micro
                .saturating_sub(t.total_spent_micro)
                .saturating_sub(t.total_reserved_micro),
            requests_served: counter(EventKind::Admit),
            denials_by_reason,
            upstream_denials: counter(EventKind::UpstreamDenied),
            upstream_errors: counter(EventKind::UpstreamError),
            policy_violations,
            overruns: counter(EventKind::Overrun),
            open_reservations: t.open_reservations,
            expired_reservations: counter(EventKind::Expire),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at_ms: self.state.started_at_ms,
            database: self.state.database.clone(),
            data_planes: self.state.data_planes.load(Ordering::Relaxed),
            processes_active: t.running_processes as u32,
            processes_killed: counter(EventKind::ProcessKilled),
            total_overrun_micro: t.total_overrun_micro,
        })
    }

    async fn metrics(&self, window_seconds: u32) -> Result<pb::MetricsReport, Error> {
        let window = if window_seconds == 0 {
            300
        } else {
            window_seconds
        };
        let now = now_ms();
        let agents = self.state.store.list_agents(false).await?;
        let activity = self
            .state
            .store
            .activity(now - i64::from(window) * 1000, now - 60_000)
            .await?;
        let rows = agents
            .into_iter()
            .map(|a| {
                let act = activity.get(&a.id).cloned().unwrap_or_default();
                let burn = act.charged_in_window as f64 / f64::from(window);
                let remaining = a.remaining_micro();
                pb::AgentMetrics {
                    budget_micro: a.budget_micro,
                    spent_micro: a.spent_micro,
                    remaining_micro: remaining,
                    burn_rate_micro_per_second: burn,
                    seconds_to_exhaustion: (burn > 0.0).then(|| remaining.max(0) as f64 / burn),
                    requests_last_minute: act.admitted_last_minute,
                    last_activity_at_ms: a.last_activity_at_ms,
                    requests_served: act.admitted.max(0) as u64,
                    denials: act.denied.max(0) as u64,
                    rpm_limit: a.rpm,
                    name: a.name,
                }
            })
            .collect();
        Ok(pb::MetricsReport {
            agents: rows,
            window_seconds: window,
        })
    }
}

#[tonic::async_trait]
impl LedgerService for LedgerApi {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = request.into_inner();
        let events = self
            .state
            .store
            .list_events(EventFilter {
                agent_name: Some(r.agent_name).filter(|n| !n.is_empty()),
                after_seq: r.after_seq,
                since_ms: r.since_ms,
                limit: r.limit,
                request_id: Some(r.request_id).filter(|id| !id.is_empty()),
            })
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
        }))
    }

    async fn audit(
        &self,
        _: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditReport>, Status> {
        Ok(Response::new(LedgerApi::audit(self).await?))
    }

    async fn get_status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        Ok(Response::new(self.status().await?))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::MetricsReport>, Status> {
        Ok(Response::new(
            self.metrics(request.into_inner().window_seconds).await?,
        ))
    }
}
