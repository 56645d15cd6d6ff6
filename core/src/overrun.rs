//! Overruns that stop an agent (README, "Observability"; issue #31). A reservation is a
//! true upper bound of what an honest provider bills (every input token
//! bounded by the body's bytes at the dearest input price, the output by
//! the one cap sent upstream), so usage reported past it is a provider
//! ignoring the cap, an input the body could not bound, or a lie. AEX
//! never charges an overrun to the budget (it is recorded apart), so
//! without a consequence a provider could bill an agent's owner without
//! limit: 39,998,200 µ in 40 calls on a $0.01 agent in the run.
//! Past a small allowance the agent is paused, with the reason in its
//! event; an admin resumes it once the provider is trusted again.

use crate::agent::{AgentRecord, AgentState, AgentWrite};
use crate::event::{EventKind, NewEvent};
use crate::money::Micro;
use serde_json::json;

/// How much overrun an agent may accumulate before it is paused: a share
/// of its budget, and never less than a floor (tokenizers and chat
/// templates can put an honest provider a few tokens past a tiny call's
/// bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverrunLimit {
    /// Share of the agent's budget, in percent (0: only the floor).
    pub percent_of_budget: u32,
    pub floor_micro: Micro,
}

impl OverrunLimit {
    /// 1% of the budget, at least $0.001: one lying answer of any size on
    /// a small agent, a handful of tokens on a large one.
    pub const DEFAULT: OverrunLimit = OverrunLimit {
        percent_of_budget: 1,
        floor_micro: 1_000,
    };

    /// Never pauses (for deployments that alert on the metric instead).
    pub const OFF: OverrunLimit = OverrunLimit {
        percent_of_budget: 0,
        floor_micro: Micro::MAX,
    };

    /// The overrun an agent with this budget may accumulate.
    pub fn allowance_micro(&self, budget_micro: Micro) -> Micro {
        let share = i128::from(budget_micro.max(0)) * i128::from(self.percent_of_budget) / 100;
        (share.min(i128::from(Micro::MAX)) as Micro).max(self.floor_micro.max(1))
    }

    /// Whether an overrun of `added` that took the agent's total to
    /// `total` crossed a multiple of its allowance: the first crossing
    /// pauses it, and after a resume each further allowance's worth does
    /// again, so a provider that keeps lying keeps being stopped while one
    /// rare honest overrun of a few µ never does.
    pub fn crossed(&self, budget_micro: Micro, total: Micro, added: Micro) -> bool {
        if added <= 0 || self.floor_micro == Micro::MAX {
            return false;
        }
        let allowance = self.allowance_micro(budget_micro);
        let before = total.saturating_sub(added).max(0);
        before / allowance < total.max(0) / allowance
    }
}

/// The reason an `agent.paused` event gives when overruns paused it.
pub const REASON: &str = "overruns";

/// The agent paused for its overruns, if the overrun of `added` µ just
/// settled (already in `current.overrun_micro`) crossed its allowance and
/// it is active; `None` otherwise.
pub fn pause_for_overruns(
    current: &AgentRecord,
    limit: OverrunLimit,
    added: Micro,
    now: i64,
) -> Option<AgentWrite> {
    if current.state != AgentState::Active
        || !limit.crossed(current.budget_micro, current.overrun_micro, added)
    {
        return None;
    }
    let mut a = current.clone();
    a.state = AgentState::Paused;
    a.updated_at_ms = now;
    let event = NewEvent::about(now, EventKind::AgentPaused, &a.id, &a.name)
        .reason(REASON)
        .details(json!({
            "overrun_micro": a.overrun_micro,
            "allowance_micro": limit.allowance_micro(a.budget_micro),
            "budget_micro": a.budget_micro,
        }));
    Some(AgentWrite {
        events: vec![event],
        agent: a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_allowance_is_a_share_of_the_budget_above_a_floor() {
        let l = OverrunLimit::DEFAULT;
        assert_eq!(l.allowance_micro(10_000), 1_000, "a $0.01 agent: the floor");
        assert_eq!(l.allowance_micro(10_000_000), 100_000, "$10: 1%");
        assert_eq!(l.allowance_micro(-5), 1_000);
        assert_eq!(l.allowance_micro(Micro::MAX), Micro::MAX / 100);
    }

    #[test]
    fn the_first_crossing_pauses_and_each_allowance_after_a_resume() {
        let l = OverrunLimit::DEFAULT;
        // The issue's $0.01 agent: the first lying answer pauses it.
        assert!(l.crossed(10_000, 999_950, 999_950));
        // A few honest µ past a tiny call's bound never do.
        assert!(!l.crossed(10_000, 3, 3));
        assert!(!l.crossed(10_000, 999, 996));
        assert!(l.crossed(10_000, 1_000, 1));
        // Resumed at 1,500 µ: the next crossing is at 2,000.
        assert!(!l.crossed(10_000, 1_900, 400));
        assert!(l.crossed(10_000, 2_100, 200));
        assert!(!l.crossed(10_000, 2_100, 0));
        assert!(!OverrunLimit::OFF.crossed(10_000, Micro::MAX, Micro::MAX));
    }

    proptest! {
        /// However overruns arrive, an agent is paused once its total
        /// reaches an allowance, never while under one, and at most once
        /// per allowance it adds up to.
        #[test]
        fn pauses_match_allowances_crossed(
            budget in 0i64..100_000_000,
            overruns in proptest::collection::vec(0i64..50_000, 0..40),
        ) {
            let l = OverrunLimit::DEFAULT;
            let allowance = l.allowance_micro(budget);
            let mut total = 0i64;
            let mut pauses = 0i64;
            for o in overruns {
                total += o;
                pauses += i64::from(l.crossed(budget, total, o));
            }
            prop_assert!(pauses <= total / allowance);
            prop_assert_eq!(pauses > 0, total >= allowance);
        }
    }
}
