//! Tokens this control plane has not heard of yet (issue #31, finding 10).
//! Over a shared database an agent created through one control plane
//! reaches the others by the change feed, a moment later; a data plane fed
//! by another one sent its first calls there and got 401s (11 of 17 in the
//! issue's run), which SDKs do not retry. So before refusing a token it
//! does not know, a control plane on a shared store asks the store once —
//! a bounded number of times a second, and never again for a while for a
//! token the store did not know either, so a spray of made-up tokens costs
//! the database little. The same bounded lookups ask the ledger what became
//! of a token no agent holds (issue #33: rotated, its agent deleted, a
//! run's), so its 401 can say so.

use super::AdmissionEngine;
use crate::clock::now_ms;
use crate::error::Result;
use aex_core::expiring::Expiring;
use aex_core::policy::Denial;
use aex_core::presented::Retired;
use std::collections::HashMap;

/// Store lookups of unknown tokens per second, across all of them: far
/// above the rate of agents being created, far below what would load the
/// database.
const LOOKUPS_PER_SECOND: u32 = 50;

/// A token the store did not know is not looked up again for this long.
const MISS_TTL_MS: i64 = 2_000;

/// Misses remembered at most (the expired, then all, forgotten past it).
const MISSES_KEPT: usize = 10_000;

/// Retired tokens remembered (all forgotten past it). What became of one
/// never changes, so an agent looping on its old token costs one lookup.
const RETIRED_KEPT: usize = 1_024;

#[derive(Debug)]
pub(super) struct TokenLookups {
    window_start_ms: i64,
    in_window: u32,
    misses: Expiring<i64>,
    /// Tokens the ledger knew nothing of either (`retired_token`).
    unretired: Expiring<i64>,
    retired: HashMap<String, Retired>,
}

impl Default for TokenLookups {
    fn default() -> Self {
        Self {
            window_start_ms: 0,
            in_window: 0,
            misses: Expiring::new(MISSES_KEPT),
            unretired: Expiring::new(MISSES_KEPT),
            retired: HashMap::new(),
        }
    }
}

impl TokenLookups {
    /// Whether to ask the store about `token` now.
    fn may_look_up(&mut self, token: &str, now: i64) -> bool {
        if self.misses.contains(token, now) {
            return false;
        }
        self.within_rate(now)
    }

    /// Whether to ask the ledger what became of `token` now.
    fn may_look_up_retired(&mut self, token: &str, now: i64) -> bool {
        if self.unretired.contains(token, now) {
            return false;
        }
        self.within_rate(now)
    }

    fn retired(&mut self, token: &str, retired: &Retired) {
        if self.retired.len() >= RETIRED_KEPT {
            self.retired.clear();
        }
        self.retired.insert(token.to_string(), retired.clone());
    }

    /// One budget of store lookups a second, whatever they are for.
    fn within_rate(&mut self, now: i64) -> bool {
        if now - self.window_start_ms >= 1_000 {
            self.window_start_ms = now;
            self.in_window = 0;
        }
        if self.in_window >= LOOKUPS_PER_SECOND {
            return false;
        }
        self.in_window += 1;
        true
    }

    fn missed(&mut self, token: &str, now: i64) {
        self.misses.insert(token, now + MISS_TTL_MS, now);
    }
}

impl AdmissionEngine {
    /// Learns the agent of a token this control plane does not know, if
    /// another control plane on the shared store created it; returns
    /// whether it did (deciding again may then admit).
    pub async fn learn_token(&self, token_sha256: &str) -> Result<bool> {
        if self.shared_rates.is_none() || token_sha256.is_empty() {
            return Ok(false);
        }
        {
            let live = self.lock();
            if live.by_token.contains_key(token_sha256)
                || live.process_tokens.contains_key(token_sha256)
            {
                return Ok(false);
            }
        }
        let now = now_ms();
        if !self.token_lookups().may_look_up(token_sha256, now) {
            return Ok(false);
        }
        match self.store.agent_by_token(token_sha256).await? {
            Some(agent) => {
                self.refresh_agent(&agent.id).await?;
                Ok(true)
            }
            None => {
                self.token_lookups().missed(token_sha256, now);
                Ok(false)
            }
        }
    }

    /// The 401 for a token no agent here holds, saying what became of it
    /// when the ledger knows (rotated, its agent deleted, a run's); `None`
    /// when it does not, or may not be asked now (the lookups are bounded
    /// as `learn_token`'s are), or fails (the plain 401 is still true).
    pub async fn retired_denial(&self, token_sha256: &str) -> Option<Denial> {
        if token_sha256.is_empty() {
            return None;
        }
        let now = now_ms();
        {
            let mut lookups = self.token_lookups();
            if let Some(known) = lookups.retired.get(token_sha256) {
                return Some(known.denial());
            }
            if !lookups.may_look_up_retired(token_sha256, now) {
                return None;
            }
        }
        match self.store.retired_token(token_sha256).await {
            Ok(Some(retired)) => {
                self.token_lookups().retired(token_sha256, &retired);
                Some(retired.denial())
            }
            Ok(None) => {
                self.token_lookups()
                    .unretired
                    .insert(token_sha256, now + MISS_TTL_MS, now);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not look up what became of an unknown token");
                None
            }
        }
    }

    fn token_lookups(&self) -> std::sync::MutexGuard<'_, TokenLookups> {
        self.token_lookups.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_bounded_per_second_and_misses_not_repeated() {
        let mut l = TokenLookups::default();
        assert!(l.may_look_up("a", 10_000));
        l.missed("a", 10_000);
        assert!(!l.may_look_up("a", 11_000), "a miss is remembered");
        assert!(l.may_look_up("a", 12_001), "and forgotten");
        let granted = (0..200)
            .filter(|i| l.may_look_up(&format!("t{i}"), 12_500))
            .count();
        assert_eq!(granted, LOOKUPS_PER_SECOND as usize - 1);
        assert!(l.may_look_up("fresh", 13_001), "a new second");
        for i in 0..MISSES_KEPT + 5 {
            l.missed(&format!("m{i}"), 20_000);
        }
        assert!(l.misses.len() <= MISSES_KEPT);
    }
}
