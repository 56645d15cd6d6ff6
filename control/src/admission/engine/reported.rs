//! Calls a data plane reports admitting from its grants: each checked, then
//! all of a report recorded as one ledger job — the same reservation and
//! `admit` event a central admission makes, its amount carved from the grant.

use super::{AdmissionEngine, OpenReservation};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::in_order::InOrder;
use crate::storage::{NewReservation, ReservationRecord, ReserveOutcome};
use aex_core::policy::Endpoint;
use serde_json::json;

/// A call a data plane admitted from a grant.
#[derive(Debug, Clone)]
pub struct LocalAdmit {
    pub grant_id: String,
    pub record: ReservationRecord,
    pub output_cap_injected: bool,
    pub endpoint: Endpoint,
    pub stream: bool,
}

/// What recording a locally admitted call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAdmitOutcome {
    Recorded,
    /// By an earlier delivery of the same report.
    AlreadyRecorded,
    /// The grant could not hold it (ended: expired, its remainder already
    /// charged). The call is not recorded apart: the grant's expiry charged
    /// what its data plane might have spent.
    NotCovered(String),
}

/// A call a data plane says it admitted, checked before it is recorded.
fn check_local_admit(a: &LocalAdmit) -> Result<()> {
    let r = &a.record;
    if r.id.is_empty() || r.request_id.is_empty() || a.grant_id.is_empty() {
        return Err(Error::InvalidArgument(
            "a local admission needs its reservation id, request id and grant id".into(),
        ));
    }
    if r.amount_micro < 0
        || r.pricing.input_pico_per_token < 0
        || r.pricing.output_pico_per_token < 0
        || r.pricing.cached_input_pico_per_token < 0
        || r.pricing.cache_write_pico_per_token < 0
    {
        return Err(Error::InvalidArgument(format!(
            "local admission {}: amounts and prices cannot be negative",
            r.id
        )));
    }
    Ok(())
}

impl AdmissionEngine {
    /// Records calls their data plane admitted from a grant: the same
    /// reservation and `admit` event a central admission makes, its amount
    /// carved from the grant. A report's calls are one ledger job, each
    /// answered apart, in order.
    pub async fn admit_from_grants(
        &self,
        admits: Vec<LocalAdmit>,
    ) -> Vec<Result<LocalAdmitOutcome>> {
        let mut results = InOrder::new(admits.len());
        let mut valid = Vec::with_capacity(admits.len());
        for (i, a) in admits.into_iter().enumerate() {
            match check_local_admit(&a) {
                Ok(()) => valid.push((i, a)),
                Err(e) => results.put(i, Err(e)),
            }
        }
        let now = now_ms();
        let reservations = valid
            .iter()
            .map(|(_, a)| NewReservation {
                record: a.record.clone(),
                agent_name: self.agent_name(&a.record.agent_id),
                details: json!({
                    "endpoint": a.endpoint.as_str(), "stream": a.stream,
                    "output_cap_injected": a.output_cap_injected,
                }),
                max_open: 0,
                grant_id: Some(a.grant_id.clone()),
                log_budget_denial: false,
                at_ms: now,
            })
            .collect::<Vec<_>>();
        let names: Vec<String> = reservations.iter().map(|n| n.agent_name.clone()).collect();
        let outcomes = self.store.reserve_many(reservations).await;
        for (((i, a), agent_name), outcome) in valid.into_iter().zip(names).zip(outcomes) {
            results.put(i, self.recorded_from_grant(a, agent_name, outcome));
        }
        results.done()
    }

    /// What the store's answer to a call admitted from a grant means, and
    /// the call made live here when it was recorded.
    pub(super) fn recorded_from_grant(
        &self,
        a: LocalAdmit,
        agent_name: String,
        outcome: std::result::Result<ReserveOutcome, crate::storage::StoreError>,
    ) -> Result<LocalAdmitOutcome> {
        match outcome? {
            ReserveOutcome::Reserved { .. } => {
                let r = &a.record;
                let mut live = self.lock();
                if let Some(agent) = live.agents.get_mut(&r.agent_id) {
                    agent.open += 1;
                }
                live.by_request.insert(r.request_id.clone(), r.id.clone());
                live.open.insert(
                    r.id.clone(),
                    OpenReservation {
                        record: a.record,
                        agent_name,
                        output_cap_injected: a.output_cap_injected,
                        debited_tokens: 0,
                        model_tpm_limit: 0,
                    },
                );
                Ok(LocalAdmitOutcome::Recorded)
            }
            ReserveOutcome::AlreadyAdmitted(_) | ReserveOutcome::AlreadyClosed(_) => {
                Ok(LocalAdmitOutcome::AlreadyRecorded)
            }
            ReserveOutcome::GrantNotCovered(why) => Ok(LocalAdmitOutcome::NotCovered(why)),
            other => Err(Error::Internal(format!(
                "a grant's reservation was answered as a central one: {other:?}"
            ))),
        }
    }
}
