//! Admitting from a grant: the control plane's own admission plan
//! (`aex_core::policy`), run here on the policy and models the watch
//! stream sent, and the call carved from the agent's grant. Anything the
//! grant cannot settle alone — a denial, a call too big for what is left,
//! a model with a shared tokens-per-minute limit, a process token — goes
//! to the control plane as before, which is where every 402 and 429 is
//! decided. The carve and the report of the call are one step of the
//! grants desk (`desk.rs`).

use super::ControlPlane;
use super::desk;
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
        if matches!(endpoint, Endpoint::Models | Endpoint::CountTokens) {
            return None;
        }
        let policy = self.cache.policy_by_token(&r.token_sha256)?;
        let started = Instant::now();
        if !desk::lock(&self.desk).holds(&policy.agent_id, started) {
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
        let reservation_id = aex_core::secrets::new_id("rsv");
        let carved = desk::lock(&self.desk).carve(
            &policy.agent_id,
            plan.reserve_micro,
            &reservation_id,
            started,
            |carved| pb::LocalAdmission {
                grant_id: carved.grant_id.clone(),
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
                expires_at_ms: now + carved.reservation_ttl_ms,
                endpoint: r.endpoint,
                stream: r.stream,
            },
        )?;
        let (remaining, expires_at_ms) = (carved.remaining_micro, now + carved.reservation_ttl_ms);
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
        desk::lock(&self.desk).note_call(agent_id, reserved_micro, Instant::now());
    }

    /// What a change on the watch stream does to grants ([`desk::Desk::see`]).
    pub(super) fn grants_see(&self, change: &pb::watch_event::Change) {
        let returned = desk::lock(&self.desk).see(change, Instant::now());
        if matches!(change, pb::watch_event::Change::GrantsRevoked(_)) {
            self.settings
                .metrics
                .grants
                .with_label_values(&["revoked"])
                .inc_by(returned as u64);
        }
    }

    /// Gives every grant back, for a shutdown: the reports hold the drain
    /// until the control plane has them.
    pub fn return_grants(&self) {
        desk::lock(&self.desk).return_all();
    }
}
