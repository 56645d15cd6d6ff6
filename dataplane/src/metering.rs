//! What a finished call is settled with: the provider's usage checked
//! against what was actually delivered, or an estimate when it reported
//! none. Pure.

use crate::sse::Usage;
use crate::tokens::estimated_tokens;
use aex_core::reservation::Outcome;

/// No token of a byte-level BPE vocabulary in real use averages this many
/// bytes of text: a stream past `MAX_BYTES_PER_TOKEN × cap` bytes has
/// certainly passed its cap, and usage claiming fewer tokens than
/// `bytes / MAX_BYTES_PER_TOKEN` is not believed.
pub const MAX_BYTES_PER_TOKEN: u64 = 12;

/// Output text beyond which a stream has certainly passed `cap` tokens.
pub fn cut_off_bytes(cap: u64) -> u64 {
    cap.saturating_mul(MAX_BYTES_PER_TOKEN).saturating_add(64)
}

/// The token counts a call is settled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Parts of `prompt_tokens` the provider read from its cache and wrote
    /// to it (0 for an estimate).
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    /// The provider reported usage (the counts are not AEX's estimate).
    pub usage_reported: bool,
}

/// `output_bytes` is the generated text delivered to the client (streamed,
/// or in the body); `estimated_prompt_tokens` is the request's rough count;
/// `reached_provider`: the request was sent to the provider.
pub fn meter(
    outcome: Outcome,
    usage: Option<Usage>,
    output_bytes: u64,
    estimated_prompt_tokens: u64,
    reached_provider: bool,
) -> Metered {
    let nothing = Metered {
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        usage_reported: false,
    };
    if outcome == Outcome::UpstreamRejected {
        // The provider refused the request itself; providers do not bill that.
        return nothing;
    }
    let delivered_floor = output_bytes.div_ceil(MAX_BYTES_PER_TOKEN);
    match usage {
        // A provider may not report less than what it visibly delivered.
        Some(u) => Metered {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens.max(delivered_floor),
            cached_input_tokens: u.cached_input_tokens,
            cache_write_tokens: u.cache_write_tokens,
            usage_reported: true,
        },
        // Whatever ended the call, what reached the client was generated and
        // paid for: estimate it (the control plane caps an estimate at the
        // reservation).
        None if output_bytes > 0 || outcome == Outcome::Completed => Metered {
            prompt_tokens: estimated_prompt_tokens,
            completion_tokens: estimated_tokens(output_bytes),
            ..nothing
        },
        None if outcome == Outcome::CutOff => Metered {
            prompt_tokens: estimated_prompt_tokens,
            ..nothing
        },
        // Abandoned, or timed out, before the first byte of the answer: the
        // provider had the request and may bill its prompt (issue #31), so
        // the prompt is charged (an estimate, capped by the reservation).
        None if reached_provider
            && matches!(
                outcome,
                Outcome::ClientDisconnected | Outcome::UpstreamTimeout
            ) =>
        {
            Metered {
                prompt_tokens: estimated_prompt_tokens,
                ..nothing
            }
        }
        None => nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: Usage = Usage {
        prompt_tokens: 10,
        completion_tokens: 5,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
    };

    #[test]
    fn honest_usage_is_taken_as_reported() {
        let m = meter(Outcome::Completed, Some(USAGE), 20, 99, true);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (10, 5));
        assert!(m.usage_reported);
    }

    /// Regression (hardening #3): a tiny usage report for 2 MB of streamed
    /// text was charged 3 µ.
    #[test]
    fn usage_below_what_was_delivered_is_not_believed() {
        let m = meter(Outcome::Completed, Some(USAGE), 2_000_000, 99, true);
        assert_eq!(
            m.completion_tokens,
            2_000_000u64.div_ceil(MAX_BYTES_PER_TOKEN)
        );
    }

    /// Regression (hardening #8): a stream that failed mid-way was charged 0
    /// although the client got output; a provider's 4xx was charged.
    #[test]
    fn failures_are_charged_what_was_delivered_and_refusals_nothing() {
        let m = meter(Outcome::UpstreamError, None, 400, 30, true);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (30, 100));
        let m = meter(Outcome::UpstreamRejected, Some(USAGE), 400, 30, true);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (0, 0));
        // Never sent: nothing to bill.
        let m = meter(Outcome::ClientDisconnected, None, 0, 30, false);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (0, 0));
        let m = meter(Outcome::UpstreamError, None, 0, 30, true);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (0, 0));
    }

    /// Issue #31: a call abandoned (or timed out) before the answer's
    /// first byte was charged 0, though the provider had its prompt.
    #[test]
    fn a_prompt_the_provider_received_is_charged() {
        for outcome in [Outcome::ClientDisconnected, Outcome::UpstreamTimeout] {
            let m = meter(outcome, None, 0, 30, true);
            assert_eq!(
                (m.prompt_tokens, m.completion_tokens),
                (30, 0),
                "{outcome:?}"
            );
            assert!(!m.usage_reported);
        }
    }

    #[test]
    fn the_cut_off_is_past_any_honest_stream() {
        assert_eq!(cut_off_bytes(0), 64);
        assert_eq!(cut_off_bytes(10), 184);
        assert_eq!(cut_off_bytes(u64::MAX), u64::MAX);
        // A stream cut at the line is charged at least its cap.
        let cap = 100;
        let m = meter(Outcome::CutOff, None, cut_off_bytes(cap) + 1, 0, true);
        assert!(m.completion_tokens > cap);
    }
}
