//! How a call ended, what it costs, and its settlement: token counts and
//! the charge are computed once per call (a buffered call shows them in
//! its headers before it settles) by the rule the control plane applies,
//! so `x-aex-cost-micro` and the ledger agree.

use super::{Call, Gateway};
use crate::metering::{Metered, meter};
use crate::sse::Usage;
use aex_core::money::{Charge, TokenUsage, charge};
use aex_core::reservation::Outcome;
use aex_proto::v1 as pb;
use std::time::{Duration, Instant};

/// How the call to the provider went, for settlement.
pub(super) struct Finished {
    /// When the request left for the provider.
    pub upstream_started: Option<Instant>,
    /// From sending to the provider until its last byte (None: not reached).
    pub upstream_time: Option<Duration>,
    pub outcome: Outcome,
    pub usage: Option<Usage>,
    pub output_bytes: u64,
    pub upstream_status: u16,
    pub upstream_retry_after_ms: u64,
    accounted: Option<Accounted>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Accounted {
    outcome: Outcome,
    pub metered: Metered,
    pub charge: Charge,
}

impl Finished {
    pub fn new() -> Self {
        Self {
            upstream_started: None,
            upstream_time: None,
            outcome: Outcome::Completed,
            usage: None,
            output_bytes: 0,
            upstream_status: 0,
            upstream_retry_after_ms: 0,
            accounted: None,
        }
    }

    /// The provider's part is over: its time is measured to now.
    pub fn upstream_done(&mut self) {
        self.upstream_time = self.upstream_started.map(|t| t.elapsed());
    }

    /// The call's token counts and charge. Computed once: later calls get
    /// the same unless the outcome changed since (a client gone after its
    /// headers were sent), which the charge depends on.
    pub fn account(&mut self, call: &Call<'_>) -> Accounted {
        let (outcome, usage, output_bytes) = (self.outcome, self.usage, self.output_bytes);
        if self.accounted.is_some_and(|a| a.outcome != outcome) {
            self.accounted = None;
        }
        *self.accounted.get_or_insert_with(|| {
            let metered = meter(
                outcome,
                usage,
                output_bytes,
                call.inspected.estimated_prompt_tokens(),
                self.upstream_started.is_some(),
            );
            let a = call.admission;
            let charge = charge(
                aex_proto::convert::pricing_from_pb(
                    a.input_pico_per_token,
                    a.output_pico_per_token,
                    a.cached_input_pico_per_token,
                    a.cache_write_pico_per_token,
                ),
                a.reserved_micro,
                TokenUsage::new(metered.prompt_tokens, metered.completion_tokens)
                    .with_cache(metered.cached_input_tokens, metered.cache_write_tokens),
                metered.usage_reported,
                outcome == Outcome::CutOff,
            );
            Accounted {
                outcome,
                metered,
                charge,
            }
        })
    }
}

impl Gateway {
    /// Counts the call in the metrics and queues its settlement.
    pub(super) fn settle(&self, call: &Call<'_>, f: &mut Finished, model_label: &str) {
        let Accounted {
            metered, charge, ..
        } = f.account(call);
        self.metrics
            .spent_micro
            .with_label_values(&[model_label])
            .inc_by(charge.charged_micro.max(0) as u64);
        if charge.overrun_micro > 0 {
            self.metrics
                .overrun_micro
                .with_label_values(&[model_label])
                .inc_by(charge.overrun_micro as u64);
        }
        let failure = match f.outcome {
            Outcome::UpstreamRateLimited => Some("rate_limited"),
            Outcome::UpstreamError => Some("error"),
            Outcome::UpstreamTimeout => Some("timeout"),
            _ => None,
        };
        if let Some(kind) = failure {
            self.metrics
                .upstream_errors
                .with_label_values(&[&call.admission.provider, kind])
                .inc();
        }
        self.control.settle(pb::SettleRequest {
            reservation_id: call.admission.reservation_id.clone(),
            outcome: aex_proto::convert::outcome_to_pb(f.outcome) as i32,
            prompt_tokens: metered.prompt_tokens,
            completion_tokens: metered.completion_tokens,
            cached_input_tokens: metered.cached_input_tokens,
            cache_write_tokens: metered.cache_write_tokens,
            usage_reported: metered.usage_reported,
            upstream_status: u32::from(f.upstream_status),
            upstream_retry_after_ms: f.upstream_retry_after_ms,
            request_id: String::new(),
        });
    }
}
