//! Money: integer micro-USD for balances, integer pico-USD per token for
//! prices, so that sub-micro prices stay exact. No floats anywhere in
//! accounting; decimals from users and config files are parsed as text.

use std::fmt;

/// Micro-USD (1e-6 USD). Balances, reservations and charges.
pub type Micro = i64;
/// Pico-USD (1e-12 USD). Per-token prices.
pub type Pico = i64;

pub const MICRO_PER_USD: i64 = 1_000_000;
pub const PICO_PER_MICRO: i64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("'{0}' is not a decimal amount; write it like 5, 0.25 or 1.200000")]
    NotANumber(String),
    #[error("'{0}' is negative; amounts must be zero or more")]
    Negative(String),
    #[error("'{input}' has {decimals} decimal places; at most {max} are allowed")]
    TooPrecise {
        input: String,
        decimals: usize,
        max: usize,
    },
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses a non-negative decimal (optionally `$`-prefixed) into an integer
/// number of `10^-scale` units, refusing more than `scale` decimals instead
/// of rounding them away. `parse_scaled("0.004", 6) == Ok(4000)`.
pub fn parse_scaled(input: &str, scale: usize) -> Result<i64, MoneyError> {
    let text = input.trim();
    let text = text.strip_prefix('$').unwrap_or(text);
    if let Some(magnitude) = text.strip_prefix('-') {
        // Only report "negative" for things that would otherwise be numbers.
        if parse_scaled(magnitude, scale).is_ok() {
            return Err(MoneyError::Negative(input.to_string()));
        }
        return Err(MoneyError::NotANumber(input.to_string()));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !all_digits(whole) || !all_digits(frac) {
        return Err(MoneyError::NotANumber(input.to_string()));
    }
    // Trailing zeros carry no precision: 1.2000000 is as exact as 1.2.
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale {
        return Err(MoneyError::TooPrecise {
            input: input.to_string(),
            decimals: frac.len(),
            max: scale,
        });
    }
    let too_large = || MoneyError::TooLarge(input.to_string());
    let unit = 10i64.checked_pow(scale as u32).ok_or_else(too_large)?;
    let whole_value = if whole.is_empty() {
        0
    } else {
        whole.parse::<i64>().map_err(|_| too_large())?
    };
    let frac_value = if frac.is_empty() {
        0
    } else {
        let padded = format!("{frac:0<scale$}");
        padded.parse::<i64>().map_err(|_| too_large())?
    };
    whole_value
        .checked_mul(unit)
        .and_then(|v| v.checked_add(frac_value))
        .ok_or_else(too_large)
}

/// `"1.2"` (USD) → 1 200 000 µ.
pub fn parse_usd(input: &str) -> Result<Micro, MoneyError> {
    parse_scaled(input, 6)
}

/// Renders micro-USD as `$1.200000`.
pub fn usd(micro: Micro) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    format!(
        "{sign}${}.{:06}",
        abs / MICRO_PER_USD as u64,
        abs % MICRO_PER_USD as u64
    )
}

/// Renders micro-USD as `$0.004000 (4000 µ)`: both units, never `$0.00`.
pub fn usd_with_micro(micro: Micro) -> String {
    format!("{} ({micro} µ)", usd(micro))
}

/// An overrun as shown: its amount, or — when a provider's claim filled
/// the counter (it saturates at `i64::MAX` µ rather than wrap) — that it
/// did, never a number that reads as an amount someone was billed.
pub fn overrun_text(micro: Micro) -> String {
    if micro == Micro::MAX {
        "more than AEX can count (a provider reported absurd usage; the counter is saturated)"
            .into()
    } else {
        usd_with_micro(micro)
    }
}

/// Exact per-token prices of a model. Providers bill input read from their
/// prompt cache and input written to it at their own prices (the README's
/// models.yaml prices); a model whose config names neither pays the input
/// price for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pricing {
    pub input_pico_per_token: Pico,
    pub cached_input_pico_per_token: Pico,
    pub cache_write_pico_per_token: Pico,
    pub output_pico_per_token: Pico,
}

/// What a call used, as providers bill it. `input` counts every input token
/// (OpenAI's `prompt_tokens`); `cached_input` (read from the provider's
/// prompt cache) and `cache_write` (written to it) are parts of `input`
/// billed at their own prices. Reasoning tokens are output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl TokenUsage {
    pub fn new(input: u64, output: u64) -> TokenUsage {
        TokenUsage {
            input,
            output,
            ..TokenUsage::default()
        }
    }

    pub fn with_cache(self, cached_input: u64, cache_write: u64) -> TokenUsage {
        TokenUsage {
            cached_input,
            cache_write,
            ..self
        }
    }

    /// The input split into (uncached, cached, written), each part within
    /// what is left of `input`: a provider claiming more cached tokens than
    /// input tokens cannot make the parts add up to more than it billed.
    pub fn input_parts(&self) -> (u64, u64, u64) {
        let cached = self.cached_input.min(self.input);
        let written = self.cache_write.min(self.input - cached);
        (self.input - cached - written, cached, written)
    }
}

impl Pricing {
    /// One price for all input, cached or not, and one for output (the
    /// seed's form).
    pub const fn flat(input_pico_per_token: Pico, output_pico_per_token: Pico) -> Pricing {
        Pricing {
            input_pico_per_token,
            cached_input_pico_per_token: input_pico_per_token,
            cache_write_pico_per_token: input_pico_per_token,
            output_pico_per_token,
        }
    }

    /// Prices as a stored row, a logged event or a peer may hold them:
    /// cache prices left out (a row admitted before they existed, an event
    /// that logs them only where they differ, an older peer) are the input
    /// price, as that call was priced.
    pub fn with_optional_cache(
        input: Pico,
        output: Pico,
        cached_input: Option<Pico>,
        cache_write: Option<Pico>,
    ) -> Pricing {
        Pricing::flat(input, output)
            .with_cache(cached_input.unwrap_or(input), cache_write.unwrap_or(input))
    }

    pub const fn with_cache(self, cached_input: Pico, cache_write: Pico) -> Pricing {
        Pricing {
            cached_input_pico_per_token: cached_input,
            cache_write_pico_per_token: cache_write,
            ..self
        }
    }

    /// Whether cached input or cache writes have a price of their own.
    pub fn prices_cache(&self) -> bool {
        self.cached_input_pico_per_token != self.input_pico_per_token
            || self.cache_write_pico_per_token != self.input_pico_per_token
    }

    /// Cost of a call in micro-USD, rounded **up** so that AEX never charges
    /// less than the provider's price. Saturates instead of overflowing.
    pub fn cost_micro(&self, usage: TokenUsage) -> Micro {
        let (uncached, cached, written) = usage.input_parts();
        let pico = i128::from(uncached) * i128::from(self.input_pico_per_token)
            + i128::from(cached) * i128::from(self.cached_input_pico_per_token)
            + i128::from(written) * i128::from(self.cache_write_pico_per_token)
            + i128::from(usage.output) * i128::from(self.output_pico_per_token);
        round_up_to_micro(pico)
    }

    /// The most a call of `input` tokens and `output` tokens can cost:
    /// before the call nobody knows which input the provider will find in
    /// its cache or write to it, so every input token is bounded at the
    /// dearest input price (a cache write costs more than plain input at
    /// Anthropic).
    pub fn bound_micro(&self, input: u64, output: u64) -> Micro {
        let input_price = self
            .input_pico_per_token
            .max(self.cached_input_pico_per_token)
            .max(self.cache_write_pico_per_token);
        let pico = i128::from(input) * i128::from(input_price)
            + i128::from(output) * i128::from(self.output_pico_per_token);
        round_up_to_micro(pico)
    }
}

fn round_up_to_micro(pico: i128) -> Micro {
    let micro = (pico + i128::from(PICO_PER_MICRO) - 1) / i128::from(PICO_PER_MICRO);
    micro.clamp(0, i128::from(i64::MAX)) as i64
}

/// What a finished call costs the agent, and what a provider claimed
/// beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    /// Charged to the agent: never more than the reservation, so `spent`
    /// never passes `budget` whatever a provider reports.
    pub charged_micro: Micro,
    /// Reported usage above the reservation: recorded apart, never dropped
    /// and never charged to the budget.
    pub overrun_micro: Micro,
}

/// What a finished call is charged against its reservation: the reported
/// usage up to the reservation, the excess as an overrun; an estimate (the
/// provider never reported usage) also stops at the reservation; a stream
/// cut off at its cap is charged the whole reservation.
pub fn charge(
    pricing: Pricing,
    reserved_micro: Micro,
    usage: TokenUsage,
    usage_reported: bool,
    cut_off: bool,
) -> Charge {
    let reserved_micro = reserved_micro.max(0);
    let cost = pricing.cost_micro(usage);
    let charged_micro = if cut_off {
        reserved_micro
    } else {
        cost.min(reserved_micro)
    };
    let overrun_micro = if usage_reported {
        cost.saturating_sub(reserved_micro).max(0)
    } else {
        0
    };
    Charge {
        charged_micro,
        overrun_micro,
    }
}

/// Displays a price per token as micro-USD with up to 6 decimals.
pub struct PicoPerToken(pub Pico);

impl fmt::Display for PicoPerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / PICO_PER_MICRO;
        let frac = self.0 % PICO_PER_MICRO;
        if frac == 0 {
            write!(f, "{whole} µ/token")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{whole}.{} µ/token", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_usd_amounts_exactly() {
        assert_eq!(parse_usd("5"), Ok(5_000_000));
        assert_eq!(parse_usd("1.2"), Ok(1_200_000));
        assert_eq!(parse_usd("0.004"), Ok(4_000));
        assert_eq!(parse_usd("$2.01"), Ok(2_010_000)); // the first AEX made this 2 009 999
        assert_eq!(parse_usd(".5"), Ok(500_000));
        assert_eq!(parse_usd("3."), Ok(3_000_000));
        assert_eq!(parse_usd("0.000001"), Ok(1));
        assert_eq!(parse_usd("1.2000000000"), Ok(1_200_000));
        assert_eq!(parse_usd("0"), Ok(0));
    }

    #[test]
    fn refuses_bad_usd_amounts() {
        assert!(matches!(parse_usd("-1"), Err(MoneyError::Negative(_))));
        assert!(matches!(parse_usd("-0.5"), Err(MoneyError::Negative(_))));
        for bad in [
            "NaN", "nan", "inf", "", ".", "1e3", "1,5", "abc", "--1", "1.2.3", " ",
        ] {
            assert!(
                matches!(parse_usd(bad), Err(MoneyError::NotANumber(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_usd("0.0000001"),
            Err(MoneyError::TooPrecise {
                input: "0.0000001".into(),
                decimals: 7,
                max: 6
            })
        );
        assert!(matches!(
            parse_usd("99999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn displays_both_units_never_rounding_to_zero() {
        assert_eq!(usd_with_micro(4_000), "$0.004000 (4000 µ)");
        assert_eq!(usd(1_200_000), "$1.200000");
        assert_eq!(usd(0), "$0.000000");
        assert_eq!(usd(-1), "-$0.000001");
        assert_eq!(PicoPerToken(150_000).to_string(), "0.15 µ/token");
        assert_eq!(PicoPerToken(2_000_000).to_string(), "2 µ/token");
    }

    #[test]
    fn a_saturated_overrun_is_not_shown_as_an_amount() {
        assert_eq!(overrun_text(4_100), "$0.004100 (4100 µ)");
        let saturated = overrun_text(Micro::MAX);
        assert!(
            saturated.contains("saturated") && !saturated.contains('$'),
            "{saturated}"
        );
    }

    #[test]
    fn cost_rounds_up_to_whole_micro() {
        let p = Pricing::flat(150_000, 600_000); // $0.15 and $0.60 / Mtok
        assert_eq!(p.cost_micro(TokenUsage::new(0, 0)), 0);
        assert_eq!(p.cost_micro(TokenUsage::new(1, 0)), 1); // 0.15 µ rounds up
        assert_eq!(p.cost_micro(TokenUsage::new(10, 0)), 2); // 1.5 µ
        assert_eq!(p.cost_micro(TokenUsage::new(1_000_000, 1_000_000)), 750_000);
        let seed = Pricing::flat(1_000_000, 2_000_000);
        assert_eq!(seed.cost_micro(TokenUsage::new(11, 7)), 25);
        assert_eq!(
            seed.cost_micro(TokenUsage::new(u64::MAX, u64::MAX)),
            i64::MAX
        );
    }

    #[test]
    fn cached_input_and_cache_writes_at_their_own_prices() {
        // Anthropic's Sonnet: $3 input, $0.30 cache read, $3.75 cache write, $15 output / Mtok.
        let p = Pricing::flat(3_000_000, 15_000_000).with_cache(300_000, 3_750_000);
        assert!(p.prices_cache());
        assert!(!Pricing::flat(3, 4).prices_cache());
        // 30,000 input tokens of which 28,000 came from the cache and 1,000 were written.
        let usage = TokenUsage::new(30_000, 200).with_cache(28_000, 1_000);
        assert_eq!(usage.input_parts(), (1_000, 28_000, 1_000));
        // 1,000 × 3 + 28,000 × 0.3 + 1,000 × 3.75 + 200 × 15 = 3,000 + 8,400 + 3,750 + 3,000 µ
        assert_eq!(p.cost_micro(usage), 18_150);
        assert_eq!(
            p.cost_micro(TokenUsage::new(30_000, 200)),
            93_000,
            "no cache: full price"
        );
        // The bound takes the dearest input price: every token might be a cache write.
        assert_eq!(p.bound_micro(30_000, 200), 30_000 * 375 / 100 + 3_000);
        assert_eq!(Pricing::flat(1_000_000, 2_000_000).bound_micro(11, 7), 25);
    }

    #[test]
    fn a_provider_cannot_claim_more_cache_than_input() {
        let usage = TokenUsage::new(10, 0).with_cache(50, 50);
        assert_eq!(usage.input_parts(), (0, 10, 0));
        let usage = TokenUsage::new(10, 0).with_cache(4, 50);
        assert_eq!(usage.input_parts(), (0, 4, 6));
        let usage = TokenUsage::new(u64::MAX, u64::MAX).with_cache(u64::MAX, u64::MAX);
        let p = Pricing::flat(1, 1).with_cache(i64::MAX, i64::MAX);
        assert_eq!(p.cost_micro(usage), i64::MAX, "saturates, never wraps");
    }

    #[test]
    fn charge_rules() {
        let p = Pricing::flat(1_000_000, 2_000_000);
        let c = |charged_micro, overrun_micro| Charge {
            charged_micro,
            overrun_micro,
        };
        assert_eq!(
            charge(p, 100, TokenUsage::new(10, 10), true, false),
            c(30, 0)
        );
        assert_eq!(
            charge(p, 100, TokenUsage::new(10, 100), true, false),
            c(100, 110),
            "an overrun stops at the reservation and is kept apart"
        );
        assert_eq!(
            charge(p, 100, TokenUsage::new(10, 100), false, false),
            c(100, 0),
            "estimates capped"
        );
        assert_eq!(
            charge(p, 100, TokenUsage::new(1, 1), false, true),
            c(100, 0),
            "cut off: whole bound"
        );
        assert_eq!(charge(p, 100, TokenUsage::new(0, 0), false, false), c(0, 0));
        assert_eq!(
            charge(p, 1_000, TokenUsage::new(u64::MAX, u64::MAX), true, false),
            c(1_000, i64::MAX - 1_000),
            "a provider reporting u64::MAX tokens saturates, never wraps"
        );
    }

    proptest! {
        #[test]
        fn usd_display_round_trips(micro in 0i64..=i64::MAX) {
            let shown = usd(micro);
            prop_assert_eq!(parse_usd(&shown), Ok(micro));
        }

        #[test]
        fn cost_is_the_smallest_micro_covering_the_exact_price(
            inp in 0u64..10_000_000, out in 0u64..10_000_000,
            ip in 0i64..10_000_000_000, op in 0i64..10_000_000_000,
        ) {
            let p = Pricing::flat(ip, op);
            let exact = i128::from(inp) * i128::from(ip) + i128::from(out) * i128::from(op);
            let charged = i128::from(p.cost_micro(TokenUsage::new(inp, out))) * i128::from(PICO_PER_MICRO);
            prop_assert!(charged >= exact);
            prop_assert!(charged - exact < i128::from(PICO_PER_MICRO));
        }

        #[test]
        fn cost_is_monotonic(a in 0u64..1_000_000, b in 0u64..1_000_000, extra in 0u64..1000) {
            let p = Pricing::flat(333_333, 1_234_567);
            prop_assert!(p.cost_micro(TokenUsage::new(a + extra, b)) >= p.cost_micro(TokenUsage::new(a, b)));
            prop_assert!(p.cost_micro(TokenUsage::new(a, b + extra)) >= p.cost_micro(TokenUsage::new(a, b)));
        }

        /// Whatever a provider reports, the charge is within the
        /// reservation and charge + overrun is the reported cost.
        #[test]
        fn charge_never_passes_the_reservation(
            reserved in 0i64..10_000_000, inp in any::<u64>(), out in any::<u64>(),
            reported in any::<bool>(), cut_off in any::<bool>(),
        ) {
            let p = Pricing::flat(1_000_000, 2_000_000);
            let c = charge(p, reserved, TokenUsage::new(inp, out), reported, cut_off);
            prop_assert!((0..=reserved).contains(&c.charged_micro));
            prop_assert!(c.overrun_micro >= 0);
            if reported && !cut_off {
                prop_assert_eq!(
                    i128::from(c.charged_micro) + i128::from(c.overrun_micro),
                    i128::from(p.cost_micro(TokenUsage::new(inp, out)))
                );
            }
        }

        /// Whatever the cache split a provider reports, the cost is within
        /// the bound the reservation took for the same tokens.
        #[test]
        fn the_bound_covers_every_cache_split(
            input in 0u64..10_000_000, output in 0u64..10_000_000,
            cached in any::<u64>(), written in any::<u64>(),
            ip in 0i64..10_000_000_000, cp in 0i64..10_000_000_000,
            wp in 0i64..10_000_000_000, op in 0i64..10_000_000_000,
        ) {
            let p = Pricing::flat(ip, op).with_cache(cp, wp);
            let usage = TokenUsage::new(input, output).with_cache(cached, written);
            let (u, c, w) = usage.input_parts();
            prop_assert_eq!(u + c + w, input);
            prop_assert!(p.cost_micro(usage) <= p.bound_micro(input, output));
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = parse_usd(&s);
        }
    }
}
