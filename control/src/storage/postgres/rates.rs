//! Rate limits shared by every control plane on the database, each taken
//! in one statement so that no two replicas can both take the last of a
//! minute: requests per minute as the GCRA of `aex_core::limiter` with
//! its arrival time in `rate_limits` (insert or move it, only where the
//! limit allows), and tokens per minute as its `TokenBucket` in
//! `token_buckets` (refill and debit, only where the request fits).

//!
//! These writes commit without waiting for the WAL to reach disk
//! (`synchronous_commit = off` on their own sessions): a limiter's state is
//! not a decision about money, and the wait would be one fsync per request.
//! A crash of the database server can lose its last fraction of a second
//! (PostgreSQL flushes within three `wal_writer_delay`s, 0.6 s by default),
//! which forgets that many requests and tokens counted against the limits;
//! budgets, reservations and the chain are untouched by this.

use crate::storage::{SharedRates, StoreError};
use aex_core::limiter::{Check, Gcra, TokenBucket};
use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;

/// The limiters' sessions, connected on first use.
pub(super) fn pool(options: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.clone().options([("synchronous_commit", "off")]))
}

pub(super) struct PgRates {
    pub(super) pool: PgPool,
}

#[async_trait]
impl SharedRates for PgRates {
    async fn take_n(
        &self,
        key: &str,
        per_minute: u32,
        n: u32,
        now_ms: i64,
    ) -> Result<Check, StoreError> {
        let now_us = now_ms.saturating_mul(1000);
        let step = Gcra::interval_us(per_minute).saturating_mul(i64::from(n));
        let burst = Gcra::burst_us(per_minute);
        // Gcra::take_n in SQL: tat' = max(tat, now) + n × interval, allowed
        // when tat' - burst <= now. A first take passes when it fits a burst.
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO rate_limits AS r (key, tat_us) \
             SELECT $1, $2 + $3 WHERE $3 <= $4 \
             ON CONFLICT (key) DO UPDATE SET tat_us = GREATEST(r.tat_us, $2) + $3 \
             WHERE GREATEST(r.tat_us, $2) + $3 - $4 <= $2 \
             RETURNING tat_us",
        )
        .bind(key)
        .bind(now_us)
        .bind(step)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        // Refused: the wait, from the arrival time as it is now.
        let tat: Option<i64> = sqlx::query_scalar("SELECT tat_us FROM rate_limits WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        let wait = match Gcra::from_tat(tat.unwrap_or(i64::MIN)).take_n(per_minute, n, now_ms) {
            Err(wait) => wait,
            // It would pass now (another replica gave some back in
            // between): refused with the shortest wait rather than admitted
            // on a read that is no longer the limiter's state.
            Ok(()) => 1,
        };
        Ok(Err(wait.max(1)))
    }

    async fn headroom(&self, key: &str, per_minute: u32, now_ms: i64) -> Result<u32, StoreError> {
        let tat: Option<i64> = sqlx::query_scalar("SELECT tat_us FROM rate_limits WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(Gcra::from_tat(tat.unwrap_or(i64::MIN)).headroom(per_minute, now_ms))
    }

    async fn give_back_n(&self, key: &str, per_minute: u32, n: u32) -> Result<(), StoreError> {
        sqlx::query("UPDATE rate_limits SET tat_us = tat_us - $2 WHERE key = $1")
            .bind(key)
            .bind(Gcra::interval_us(per_minute).saturating_mul(i64::from(n)))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn take_tokens(
        &self,
        key: &str,
        per_minute: u64,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Check, StoreError> {
        let capacity = TokenBucket::capacity_milli(per_minute);
        let need = TokenBucket::need_milli(per_minute, tokens);
        // TokenBucket::take in SQL: refill by the time elapsed (never back),
        // capped at a full bucket, then debit if the request fits. A first
        // request finds a full bucket. The refill is computed in numeric,
        // where TokenBucket saturates, and capped before it is an int8 again.
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO token_buckets AS b (key, level_milli, last_ms) VALUES ($1, $2 - $3, $4) \
             ON CONFLICT (key) DO UPDATE SET \
                 level_milli = LEAST(b.level_milli + div(GREATEST($4 - b.last_ms, 0)::numeric * $5, 60), $2)::int8 - $3, \
                 last_ms = GREATEST(b.last_ms, $4) \
             WHERE LEAST(b.level_milli + div(GREATEST($4 - b.last_ms, 0)::numeric * $5, 60), $2)::int8 >= $3 \
             RETURNING level_milli",
        )
        .bind(key)
        .bind(capacity)
        .bind(need)
        .bind(now_ms)
        .bind(per_minute as i64)
        .fetch_optional(&self.pool)
        .await?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        // Refused: refilled all the same (as TokenBucket::take does, so the
        // two stay equal to the milli-token), and the wait from there.
        let (level, last): (i64, i64) = sqlx::query_as(
            "UPDATE token_buckets SET \
                 level_milli = LEAST(level_milli + div(GREATEST($2 - last_ms, 0)::numeric * $3, 60), $4)::int8, \
                 last_ms = GREATEST(last_ms, $2) \
             WHERE key = $1 RETURNING level_milli, last_ms",
        )
        .bind(key)
        .bind(now_ms)
        .bind(per_minute as i64)
        .bind(capacity)
        .fetch_one(&self.pool)
        .await?;
        let wait = match TokenBucket::from_state(level, last).take(per_minute, tokens, now_ms) {
            Err(wait) => wait,
            // Another replica refunded in between: refused with the shortest
            // wait rather than admitted on a state that moved.
            Ok(()) => 1,
        };
        Ok(Err(wait.max(1)))
    }

    async fn adjust_tokens(
        &self,
        key: &str,
        per_minute: u64,
        delta: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // TokenBucket::adjust: refill, then take the correction (a refund
        // when negative), never above a full bucket.
        sqlx::query(
            "UPDATE token_buckets SET \
                 level_milli = GREATEST(LEAST(LEAST(level_milli \
                     + div(GREATEST($3 - last_ms, 0)::numeric * $4, 60), $2) \
                     - $5::numeric * 1000, $2), -9223372036854775808)::int8, \
                 last_ms = GREATEST(last_ms, $3) \
             WHERE key = $1",
        )
        .bind(key)
        .bind(TokenBucket::capacity_milli(per_minute))
        .bind(now_ms)
        .bind(per_minute as i64)
        // TokenBucket saturates: so does this (an absurd usage report).
        .bind(delta.clamp(-(i64::MAX / 1000), i64::MAX / 1000))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
