//! Waiting on the control plane: which failures are worth another try, and
//! the one backoff rule every retrying loop uses.

use std::time::Duration;

/// Failures that may pass when tried again (the control plane restarting,
/// a connection dropped); not refusals or bugs.
pub(super) fn retryable(status: &tonic::Status) -> bool {
    retryable_code(status.code() as i32)
}

pub(super) fn retryable_code(code: i32) -> bool {
    matches!(
        tonic::Code::from_i32(code),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// Doubling delays between tries, from `first` up to `max`.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The delay the next [`Backoff::wait`] sleeps.
    pub(super) fn delay(&self) -> Duration {
        self.next
    }

    /// The delay to sleep now; the one after is twice as long, up to `max`.
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// Back to the first delay (the control plane answered again).
    pub(super) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_and_start_over_on_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(25), ms(150));
        let delays: Vec<_> = (0..5).map(|_| b.advance()).collect();
        assert_eq!(delays, [ms(25), ms(50), ms(100), ms(150), ms(150)]);
        b.reset();
        assert_eq!(b.delay(), ms(25));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(retryable(&tonic::Status::unavailable("restarting")));
        assert!(retryable(&tonic::Status::deadline_exceeded("slow")));
        assert!(!retryable(&tonic::Status::permission_denied("no")));
        assert!(!retryable(&tonic::Status::invalid_argument("bad")));
    }
}
