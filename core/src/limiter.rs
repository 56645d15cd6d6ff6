//! Smooth rate limiters with exact retry times. Pure: every call takes `now`
//! in milliseconds, so tests drive time by hand.

/// Requests per minute as a GCRA (a token bucket of `rpm` requests that
/// refills one request every `60 s / rpm`): a burst of up to `rpm` passes at
/// once, then requests pass at the steady rate, and a refused caller learns
/// exactly when the next one will pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Gcra {
    /// Theoretical arrival time of the next request, in µs.
    tat_us: i64,
}

impl Default for Gcra {
    fn default() -> Self {
        Self { tat_us: i64::MIN }
    }
}

/// `Err(wait_ms)`: refused; the earliest retry that can pass is `wait_ms` away.
pub type Check = Result<(), u64>;

impl Gcra {
    /// The limiter as a shared store holds it: its theoretical arrival
    /// time, in µs.
    pub fn from_tat(tat_us: i64) -> Self {
        Self { tat_us }
    }

    pub fn tat_us(&self) -> i64 {
        self.tat_us
    }

    pub fn interval_us(per_minute: u32) -> i64 {
        // At least 1 µs: above 60 M/min the quotient is 0, which left no
        // burst at all, and two calls whose clock readings crossed (threads
        // read the time before taking the lock) refused each other.
        (60_000_000 / i64::from(per_minute.max(1))).max(1)
    }

    /// Admits one request if the limit allows, recording it.
    /// How far ahead of now the arrival time may run: a whole minute's
    /// requests at once.
    pub fn burst_us(per_minute: u32) -> i64 {
        Self::interval_us(per_minute) * i64::from(per_minute.max(1))
    }

    pub fn take(&mut self, per_minute: u32, now_ms: i64) -> Check {
        self.take_n(per_minute, 1, now_ms)
    }

    /// Admits `n` requests at once if the limit allows them all (a grant's
    /// request credits, docs/GRANTS.md), recording them.
    pub fn take_n(&mut self, per_minute: u32, n: u32, now_ms: i64) -> Check {
        let now_us = now_ms.saturating_mul(1000);
        let interval = Self::interval_us(per_minute);
        let burst_us = Self::burst_us(per_minute);
        let tat = self.tat_us.max(now_us);
        let new_tat = tat.saturating_add(interval.saturating_mul(i64::from(n)));
        let allowed_at = new_tat - burst_us;
        if allowed_at > now_us {
            // Round up so that a retry at exactly this many ms passes.
            let wait_us = allowed_at - now_us;
            return Err((wait_us as u64).div_ceil(1000));
        }
        self.tat_us = new_tat;
        Ok(())
    }

    /// How many requests would pass now, taken at once.
    pub fn headroom(&self, per_minute: u32, now_ms: i64) -> u32 {
        let now_us = now_ms.saturating_mul(1000);
        let room = now_us + Self::burst_us(per_minute) - self.tat_us.max(now_us);
        (room.max(0) / Self::interval_us(per_minute)).min(i64::from(u32::MAX)) as u32
    }

    /// Gives back a request that was taken but not used (e.g. refused later
    /// for its budget), so that it does not count against the rate.
    pub fn give_back(&mut self, per_minute: u32) {
        self.give_back_n(per_minute, 1);
    }

    pub fn give_back_n(&mut self, per_minute: u32, n: u32) {
        if self.tat_us != i64::MIN {
            self.tat_us -= Self::interval_us(per_minute) * i64::from(n);
        }
    }
}

/// Tokens per minute: a bucket of `per_minute` tokens refilling continuously.
/// Admission debits the request's input bound and must fit in what is left;
/// settlement corrects the debit to the real usage (refunding an
/// over-estimate, or putting the bucket into debt for output tokens, which
/// later requests wait out).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenBucket {
    /// Tokens available, in thousandths of a token (for exact refill).
    level_milli: i64,
    last_ms: i64,
    initialised: bool,
}

impl TokenBucket {
    /// A bucket as a shared store keeps it (see `storage::SharedRates`).
    pub fn from_state(level_milli: i64, last_ms: i64) -> Self {
        Self {
            level_milli,
            last_ms,
            initialised: true,
        }
    }

    pub fn level_milli(&self) -> i64 {
        self.level_milli
    }

    /// A full bucket, in thousandths of a token.
    pub fn capacity_milli(per_minute: u64) -> i64 {
        (per_minute as i64).saturating_mul(1000)
    }

    /// What a request of `tokens` must find in the bucket: never more than
    /// a full one.
    pub fn need_milli(per_minute: u64, tokens: u64) -> i64 {
        (tokens.min(per_minute) as i64) * 1000
    }

    fn refill(&mut self, per_minute: u64, now_ms: i64) {
        let capacity = Self::capacity_milli(per_minute);
        if !self.initialised {
            self.level_milli = capacity;
            self.last_ms = now_ms;
            self.initialised = true;
            return;
        }
        let elapsed = (now_ms - self.last_ms).max(0);
        // per_minute tokens per 60 000 ms = per_minute / 60 milli-tokens per ms.
        let gained = elapsed.saturating_mul(per_minute as i64) / 60;
        self.level_milli = self.level_milli.saturating_add(gained).min(capacity);
        // Never back: readings that cross (threads, replicas' clocks) must
        // not refill the same milliseconds twice.
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Admits if `tokens` fit (a request larger than a whole minute needs
    /// a full bucket, so it is never refused forever), debiting them.
    pub fn take(&mut self, per_minute: u64, tokens: u64, now_ms: i64) -> Check {
        self.refill(per_minute, now_ms);
        let need = Self::need_milli(per_minute, tokens);
        if self.level_milli < need {
            let deficit = (need - self.level_milli) as u64;
            // milli-tokens / (per_minute / 60 milli-tokens per ms), rounded up.
            let wait_ms = (deficit * 60).div_ceil(per_minute.max(1));
            return Err(wait_ms.max(1));
        }
        self.level_milli -= need;
        Ok(())
    }

    /// Corrects an earlier debit by `delta` tokens (positive: used more than
    /// debited; negative: refund).
    pub fn adjust(&mut self, per_minute: u64, delta: i64, now_ms: i64) {
        self.refill(per_minute, now_ms);
        let capacity = Self::capacity_milli(per_minute);
        self.level_milli = self
            .level_milli
            .saturating_sub(delta.saturating_mul(1000))
            .min(capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_huge_rpm_never_refuses_even_when_clock_readings_cross() {
        let mut g = Gcra::default();
        for i in 0..10_000i64 {
            // Readings taken on several threads arrive slightly out of order.
            let now = 1_000_000 + i / 10 - (i % 3);
            assert_eq!(g.take(4_000_000_000, now), Ok(()), "call {i}");
        }
    }

    #[test]
    fn gcra_allows_a_burst_of_rpm_then_the_steady_rate() {
        let mut g = Gcra::default();
        let t0 = 1_000_000;
        for i in 0..120 {
            assert_eq!(g.take(120, t0), Ok(()), "request {i}");
        }
        // The 121st waits exactly one interval (500 ms at 120 RPM).
        assert_eq!(g.take(120, t0), Err(500));
        assert_eq!(g.take(120, t0 + 499), Err(1));
        assert_eq!(g.take(120, t0 + 500), Ok(()));
        assert_eq!(g.take(120, t0 + 500), Err(500));
    }

    #[test]
    fn gcra_credits_taken_at_once_are_what_single_requests_would_take() {
        let mut bulk = Gcra::default();
        assert_eq!(bulk.headroom(60, 0), 60);
        assert_eq!(bulk.take_n(60, 61, 0), Err(1_000));
        bulk.take_n(60, 50, 0).unwrap();
        assert_eq!(bulk.headroom(60, 0), 10);
        let mut one_by_one = Gcra::default();
        for _ in 0..50 {
            one_by_one.take(60, 0).unwrap();
        }
        assert_eq!(bulk, one_by_one);
        bulk.give_back_n(60, 20);
        assert_eq!(bulk.headroom(60, 0), 30);
        // One more each second.
        assert_eq!(bulk.headroom(60, 1_000), 31);
    }

    #[test]
    fn gcra_give_back_restores_capacity() {
        let mut g = Gcra::default();
        assert_eq!(g.take(1, 0), Ok(()));
        assert_eq!(g.take(1, 0), Err(60_000));
        g.give_back(1);
        assert_eq!(g.take(1, 0), Ok(()));
    }

    #[test]
    fn token_bucket_requests_must_fit_and_wait_exactly() {
        let mut b = TokenBucket::default();
        assert_eq!(b.take(600, 500, 0), Ok(())); // 100 left
        // 400 more tokens at 10 tokens/s: 40 s.
        assert_eq!(b.take(600, 500, 0), Err(40_000));
        assert_eq!(b.take(600, 500, 39_999), Err(1));
        assert_eq!(b.take(600, 500, 40_000), Ok(()));
        // Settlement puts output tokens on the bill: debt delays the next.
        let mut b = TokenBucket::default();
        b.take(600, 100, 0).unwrap();
        b.adjust(600, 600, 0); // used 700 in all: 100 in debt
        assert_eq!(b.take(600, 1, 0), Err(10_100));
        // ...and refunds an over-estimate.
        let mut b = TokenBucket::default();
        b.take(600, 600, 0).unwrap();
        assert!(b.take(600, 1, 0).is_err());
        b.adjust(600, -590, 0);
        assert_eq!(b.take(600, 1, 0), Ok(()));
        // Bigger than a minute's worth: passes with a full bucket.
        let mut b = TokenBucket::default();
        assert_eq!(b.take(600, 10_000, 0), Ok(()));
    }

    proptest! {
        /// Over any window, GCRA never admits more than rpm + window·rpm/60s.
        #[test]
        fn gcra_never_exceeds_the_rate(
            rpm in 1u32..600,
            gaps in proptest::collection::vec(0i64..2_000, 1..400),
        ) {
            let mut g = Gcra::default();
            let mut now = 10_000_000i64;
            let start = now;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                if g.take(rpm, now).is_ok() {
                    admitted += 1;
                }
            }
            let window_ms = (now - start) as u64;
            let bound = u64::from(rpm) + (window_ms * u64::from(rpm)).div_ceil(60_000);
            prop_assert!(admitted <= bound, "{admitted} > {bound}");
        }

        /// The headroom is exactly what can be taken at once.
        #[test]
        fn gcra_headroom_is_what_passes_at_once(
            rpm in 1u32..1000,
            taken in 0u32..1000,
            later in 0i64..120_000,
        ) {
            let mut g = Gcra::default();
            let start = 1_000_000;
            for _ in 0..taken { let _ = g.take(rpm, start); }
            let now = start + later;
            let room = g.headroom(rpm, now);
            prop_assert!(g.clone().take_n(rpm, room + 1, now).is_err());
            prop_assert!(g.take_n(rpm, room, now).is_ok());
        }

        /// A refused request retried after exactly the advertised wait passes.
        #[test]
        fn gcra_retry_after_is_exact(rpm in 1u32..1000, burst in 0u32..50) {
            let mut g = Gcra::default();
            let now = 5_000_000;
            for _ in 0..rpm + burst { let _ = g.take(rpm, now); }
            if let Err(wait) = g.take(rpm, now) {
                let mut early = g.clone();
                if wait > 1 {
                    prop_assert!(early.take(rpm, now + wait as i64 - 1).is_err());
                }
                prop_assert!(g.take(rpm, now + wait as i64).is_ok());
            }
        }
    }
}
