//! When a concurrency slot may free (issue #33): a call refused for its
//! agent's concurrency is told to come back when the oldest of the agent's
//! calls in flight is expected to end, by how long the agent's calls have
//! been taking, instead of a fixed second (an SDK's two retries a second
//! apart ran out long before a slot freed). Pure: the clock is passed in.

/// What a refused call is told when nothing better is known: no call of
/// the agent has finished yet, none of its calls in flight is known here
/// (another control plane holds them), or they already run past their
/// usual length.
pub const UNKNOWN_WAIT_MS: u64 = 1_000;

/// The shortest wait told: a round trip to ask again.
const MIN_WAIT_MS: u64 = 50;

/// The longest wait told: `Retry-After`'s bound for every limit.
const MAX_WAIT_MS: u64 = 60_000;

/// The weight of the newest call's length in the smoothed one: recent calls
/// dominate (an agent's calls change with its task), and one outlier moves
/// the estimate by a fifth of its difference.
const WEIGHT: f64 = 0.2;

/// How long an agent's calls take, from admission to settlement, smoothed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallDurations {
    smoothed_ms: Option<f64>,
}

impl CallDurations {
    /// A call of the agent settled `duration_ms` after it was admitted.
    pub fn record(&mut self, duration_ms: i64) {
        let d = duration_ms.max(0) as f64;
        self.smoothed_ms = Some(match self.smoothed_ms {
            None => d,
            Some(s) => s + WEIGHT * (d - s),
        });
    }

    /// The usual length of the agent's calls, once one has finished.
    pub fn typical_ms(&self) -> Option<i64> {
        self.smoothed_ms.map(|s| s.round() as i64)
    }

    /// How long until the first of the calls admitted at `started` (Unix
    /// ms) is expected to end.
    pub fn slot_wait_ms(&self, started: impl IntoIterator<Item = i64>, now: i64) -> u64 {
        let (Some(typical), Some(oldest)) = (self.typical_ms(), started.into_iter().min()) else {
            return UNKNOWN_WAIT_MS;
        };
        let left = oldest.saturating_add(typical).saturating_sub(now);
        if left <= 0 {
            return UNKNOWN_WAIT_MS;
        }
        (left as u64).clamp(MIN_WAIT_MS, MAX_WAIT_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_oldest_calls_expected_end() {
        let mut d = CallDurations::default();
        assert_eq!(
            d.slot_wait_ms([1_000], 1_500),
            UNKNOWN_WAIT_MS,
            "no history"
        );
        d.record(2_000);
        assert_eq!(d.typical_ms(), Some(2_000));
        // Calls admitted at 10.0 s and 10.8 s; at 10.5 s the first has 1.5 s left.
        assert_eq!(d.slot_wait_ms([10_800, 10_000], 10_500), 1_500);
        assert_eq!(
            d.slot_wait_ms([], 10_500),
            UNKNOWN_WAIT_MS,
            "none known here"
        );
        assert_eq!(d.slot_wait_ms([10_000], 12_500), UNKNOWN_WAIT_MS, "overdue");
        assert_eq!(d.slot_wait_ms([10_000], 11_990), MIN_WAIT_MS);
        d.record(1_000_000);
        assert_eq!(d.slot_wait_ms([10_000], 10_000), MAX_WAIT_MS);
    }

    #[test]
    fn recent_calls_weigh_most() {
        let mut d = CallDurations::default();
        d.record(1_000);
        d.record(2_000);
        assert_eq!(d.typical_ms(), Some(1_200));
        for _ in 0..40 {
            d.record(5_000);
        }
        assert!((4_990..=5_000).contains(&d.typical_ms().unwrap()));
        d.record(-5);
        assert!(d.typical_ms().unwrap() < 5_000);
    }
}
