//! Admitting from a grant: the control plane's own admission plan
//! (`aex_core::policy`), run here on the policy and models the watch
//! stream sent, and the call carved from the agent's grant. Anything the
//! grant cannot settle alone — a denial, a call too big for what is left,
//! a model with a shared tokens-per-minute limit, a process token — goes
//! to the control plane as before, which is where every 402 and 429 is
//! decided.

use super::ControlPlane;
use super::grants::{LocalGrants, Report};
use super::report::{BacklogGuard, Queued};
use aex_core::policy::{Ask, Endpoint, admissible, plan};
use aex_proto::convert::{caller_from_pb, endpoint_from_pb};
use aex_proto::v1 as pb;
use std::time::Instant;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ControlPlane {
    /// The call admitted from the agent's grant, or `None`: ask centrally.
    pub(super) fn admit_from_grant(&self, r: &pb::AdmitRequest) -> Option<pb::AdmitResponse> {
        if !self.settings.grants {
            return None;
        }
        let endpoint = endpoint_from_pb(r.endpoint())?;
        if endpoint == Endpoint::Models {
            return None;
        }
        let policy = self.cache.policy_by_token(&r.token_sha256)?;
        let started = Instant::now();
        if !self
            .grants
            .lock()
            .expect("grants lock")
            .holds(&policy.agent_id, started)
        {
            return None;
        }
        if self.settings.metrics.report_backlog.get() >= self.settings.max_backlog {
            // Backpressure: the ledger is behind (or out of reach); the
            // control plane admits only what it records.
            self.settings.metrics.held_back.inc();
            return None;
        }
        let caller = caller_from_pb(&policy)?;
        let now = now_ms();
        admissible(&caller, now).ok()?;
        let models = self.cache.plan_models();
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
        let plan = plan(&caller, &models, &ask).ok()?;
        let model = models.models.get(&r.model)?;
        if model.max_tokens_per_minute > 0 {
            return None;
        }
        let remaining;
        let reservation_id = aex_core::secrets::new_id("rsv");
        let expires_at_ms = {
            // The carve and its report are one step under the lock: a
            // grant given back after it (a close queued by another thread)
            // is queued after the call, so the control plane records the
            // call before it ends the grant.
            let mut grants = self.grants.lock().expect("grants lock");
            let mut reports = Vec::new();
            let carved = grants.carve(&policy.agent_id, plan.reserve_micro, started, &mut reports);
            for report in reports {
                self.report(report);
            }
            let carved = carved?;
            let expires_at_ms = now + carved.reservation_ttl_ms;
            grants.mark_local(&reservation_id);
            self.report(Report::Item(pb::ReportItem {
                item: Some(pb::report_item::Item::Admitted(pb::LocalAdmission {
                    grant_id: carved.grant_id,
                    reservation_id: reservation_id.clone(),
                    request_id: r.request_id.clone(),
                    agent_id: policy.agent_id.clone(),
                    model: r.model.clone(),
                    reserved_micro: plan.reserve_micro,
                    input_tokens_bound: plan.input_tokens_bound,
                    output_tokens_cap: plan.output_tokens_cap,
                    output_cap_injected: plan.output_cap_injected,
                    input_pico_per_token: model.pricing.input_pico_per_token,
                    output_pico_per_token: model.pricing.output_pico_per_token,
                    cached_input_pico_per_token: Some(model.pricing.cached_input_pico_per_token),
                    cache_write_pico_per_token: Some(model.pricing.cache_write_pico_per_token),
                    created_at_ms: now,
                    expires_at_ms,
                    endpoint: r.endpoint,
                    stream: r.stream,
                })),
            }));
            remaining = carved.remaining_micro;
            self.note_call_locked(&mut grants, &policy.agent_id, plan.reserve_micro);
            expires_at_ms
        };
        self.open
            .lock()
            .expect("open lock")
            .insert(reservation_id.clone());
        let admission = pb::Admission {
            reservation_id,
            agent_id: policy.agent_id.clone(),
            agent_name: policy.name.clone(),
            reserved_micro: plan.reserve_micro,
            output_tokens_cap: plan.output_tokens_cap,
            output_cap_injected: plan.output_cap_injected,
            remaining_micro: remaining,
            expires_at_ms,
            provider: model.provider.clone(),
            provider_model: model.provider_model.clone(),
            input_pico_per_token: model.pricing.input_pico_per_token,
            output_pico_per_token: model.pricing.output_pico_per_token,
            cached_input_pico_per_token: Some(model.pricing.cached_input_pico_per_token),
            cache_write_pico_per_token: Some(model.pricing.cache_write_pico_per_token),
        };
        self.settings
            .metrics
            .admissions
            .with_label_values(&["local"])
            .inc();
        Some(pb::AdmitResponse {
            outcome: Some(pb::admit_response::Outcome::Admitted(admission)),
        })
    }

    /// Counts an admitted call of the agent, which may ask for a grant.
    pub(super) fn note_call(&self, agent_id: &str, reserved_micro: i64) {
        if !self.settings.grants || agent_id.is_empty() {
            return;
        }
        let mut grants = self.grants.lock().expect("grants lock");
        self.note_call_locked(&mut grants, agent_id, reserved_micro);
    }

    /// [`Self::note_call`], with the grants lock already held.
    fn note_call_locked(&self, grants: &mut LocalGrants, agent_id: &str, reserved_micro: i64) {
        let mut reports = Vec::new();
        let now = Instant::now();
        grants.tidy(now, &mut reports);
        grants.note_call(
            agent_id,
            reserved_micro,
            now,
            || aex_core::secrets::new_id("grt"),
            &mut reports,
        );
        for report in reports {
            self.report(report);
        }
    }

    /// Queues something the control plane must hear of, in order. Called
    /// with the grants lock held wherever the order matters (a call before
    /// the return of its grant), so that the queue's order is the lock's.
    pub(super) fn report(&self, report: Report) {
        // An ask need not hold a shutdown; calls and returns must arrive.
        let inflight = (!matches!(report, Report::Ask(_))).then(|| self.inflight.enter());
        let backlog = matches!(report, Report::Item(_))
            .then(|| BacklogGuard::enter(&self.settings.metrics.report_backlog));
        let queued = Queued {
            report,
            queued_at: tokio::time::Instant::now(),
            _inflight: inflight,
            _backlog: backlog,
        };
        if self.reports.send(queued).is_err() {
            // Only if the reporter panicked; the grants then expire at
            // their deadline and are charged by the expiry policy.
            tracing::error!("the reporter has stopped");
        }
    }

    /// What a change on the watch stream does to grants: a changed or
    /// removed agent's are given back, a recall's too (and none is asked
    /// for a while), and every grant on a models change or a new snapshot
    /// (changes may have been missed).
    pub(super) fn grants_see(&self, change: &pb::watch_event::Change) {
        use pb::watch_event::Change;
        let mut reports = Vec::new();
        {
            let mut grants = self.grants.lock().expect("grants lock");
            let now = Instant::now();
            match change {
                Change::Snapshot(_) | Change::Models(_) => grants.drop_all(&mut reports),
                Change::AgentUpserted(a) => {
                    grants.drop_agent(&a.agent_id, now, false, &mut reports)
                }
                Change::AgentRemoved(id) => grants.drop_agent(id, now, false, &mut reports),
                Change::GrantsRevoked(id) => grants.drop_agent(id, now, true, &mut reports),
                Change::SnapshotPart(_) => {}
            }
        }
        let revoked = reports.len() as u64;
        if matches!(change, pb::watch_event::Change::GrantsRevoked(_)) {
            self.settings
                .metrics
                .grants
                .with_label_values(&["revoked"])
                .inc_by(revoked);
        }
        for report in reports {
            self.report(report);
        }
    }

    /// Gives every grant back, for a shutdown: the reports hold the drain
    /// until the control plane has them.
    pub fn return_grants(&self) {
        let mut reports = Vec::new();
        let mut grants = self.grants.lock().expect("grants lock");
        grants.drop_all(&mut reports);
        for report in reports {
            self.report(report);
        }
    }
}
