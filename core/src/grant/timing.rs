//! The grant protocol's times, shared by both planes: the control plane
//! issues and refuses by them, the data plane asks, admits, reports and
//! gives back by them. Each is a trade between a round trip per call and
//! budget held away from the agent's other data planes.

use std::time::Duration;

/// How long a grant lasts: long enough that a busy agent renews it a few
/// times a second at most, short enough that a data plane killed with a
/// grant locks its part of the budget away for seconds, not minutes.
pub const LIFETIME_MS: i64 = 5_000;

/// How often a data plane reports the calls it admitted from grants (and
/// their settlements, the grants it gives back and the ones it asks for),
/// while there are any.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// A grant stops admitting this long before the control plane's deadline,
/// so the reports of its last calls (sent every [`REPORT_INTERVAL`])
/// arrive while it is still open, even across a slow link.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(1_500);

/// An agent is worth a grant once it made this many calls on a data plane
/// within [`BUSY_WINDOW`]: below that, a round trip per call costs less
/// than the grant's own writes (an issue and a return, each a ledger event).
pub const BUSY_CALLS: u32 = 20;
pub const BUSY_WINDOW: Duration = Duration::from_secs(2);

/// A grant no call used for this long goes back: what it holds is then
/// free for the agent's other data planes.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);

/// After a refusal or a recall the agent's calls are decided centrally this
/// long: its data planes ask for no grant, and the control plane that
/// recalled refuses any asked for meanwhile (the agent is near an edge).
pub const QUIET_AFTER_REFUSAL: Duration = Duration::from_secs(2);

/// For an agent whose limits grants do not carry: that will not change soon.
pub const QUIET_AFTER_LIMITS: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_leaves_its_last_reports_time_to_arrive() {
        let lifetime = Duration::from_millis(LIFETIME_MS as u64);
        // Many report intervals between the last admit and the deadline,
        // and most of the lifetime left to admit in.
        assert!(DEADLINE_MARGIN >= REPORT_INTERVAL * 10);
        assert!(DEADLINE_MARGIN * 2 < lifetime);
        // An idle grant goes back well before its deadline.
        assert!(IDLE_RETURN < lifetime - DEADLINE_MARGIN);
        assert!(QUIET_AFTER_REFUSAL < QUIET_AFTER_LIMITS);
    }
}
