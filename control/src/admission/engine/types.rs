//! What the engine answers and tells: decisions, settlements, expiry sweeps,
//! the changes data planes watch and the kill orders supervisors follow.

use super::*;

/// What the watch stream tells data planes.
#[derive(Debug, Clone)]
pub enum Change {
    AgentUpserted(Box<AgentRecord>),
    AgentRemoved(String),
    Models(Arc<ModelsConfig>),
    /// Every data plane must give back the agent's grants (see
    /// `grants.rs`: a central decision near its edge needs them).
    GrantsRevoked(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub pricing: aex_core::money::Pricing,
    pub reservation_id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub reserved_micro: i64,
    pub output_tokens_cap: u64,
    pub output_cap_injected: bool,
    pub remaining_micro: i64,
    pub expires_at_ms: i64,
    pub provider: String,
    pub provider_model: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted(Admitted),
    Denied { denial: Denial, agent_name: String },
}

#[derive(Debug, Clone)]
pub struct SettleInput {
    pub reservation_id: String,
    pub outcome: Outcome,
    pub usage: aex_core::money::TokenUsage,
    pub usage_reported: bool,
    pub upstream_status: u32,
    pub upstream_retry_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub charged_micro: i64,
    pub remaining_micro: i64,
    pub already_settled: bool,
    /// Reported usage beyond the reservation, recorded apart (0: none).
    pub overrun_micro: i64,
    /// The agent's overruns crossed their allowance: it is now paused.
    pub stopped_for_overruns: bool,
}

impl Settled {
    /// Closed before (or never open): nothing charged now.
    pub const ALREADY: Self = Self {
        charged_micro: 0,
        remaining_micro: 0,
        already_settled: true,
        overrun_micro: 0,
        stopped_for_overruns: false,
    };
}

/// What one expiry sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpirySweep {
    pub expired: usize,
    /// Reservations that could not be settled: (id, why).
    pub failed: Vec<(String, String)>,
}

/// An order to the supervisors of an agent's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillOrder {
    pub agent_id: String,
    /// One process of the agent (an order found on its row), or `None`
    /// for every process the agent has now.
    pub process_id: Option<String>,
    pub reason: String,
}
