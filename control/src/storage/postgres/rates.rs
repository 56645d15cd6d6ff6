//! Requests-per-minute limits shared by every control plane on the
//! database: the GCRA of `admission::limiter` with its arrival time in
//! `rate_limits`, taken in one statement (insert or move the arrival time,
//! only where the limit allows), so that no two replicas can both take the
//! last request of a minute.

use crate::admission::limiter::{Check, Gcra};
use crate::storage::{SharedRates, StoreError};
use async_trait::async_trait;
use sqlx::PgPool;

pub(super) struct PgRates {
    pub(super) pool: PgPool,
}

#[async_trait]
impl SharedRates for PgRates {
    async fn take(&self, key: &str, per_minute: u32, now_ms: i64) -> Result<Check, StoreError> {
        let now_us = now_ms.saturating_mul(1000);
        let interval = Gcra::interval_us(per_minute);
        let burst = Gcra::burst_us(per_minute);
        // Gcra::take in SQL: tat' = max(tat, now) + interval, allowed when
        // tat' - burst <= now. A first request always passes.
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO rate_limits AS r (key, tat_us) VALUES ($1, $2 + $3) \
             ON CONFLICT (key) DO UPDATE SET tat_us = GREATEST(r.tat_us, $2) + $3 \
             WHERE GREATEST(r.tat_us, $2) + $3 - $4 <= $2 \
             RETURNING tat_us",
        )
        .bind(key)
        .bind(now_us)
        .bind(interval)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        // Refused: the wait, from the arrival time as it is now.
        let tat: i64 = sqlx::query_scalar("SELECT tat_us FROM rate_limits WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        let wait = match Gcra::from_tat(tat).take(per_minute, now_ms) {
            Err(wait) => wait,
            // It would pass now (another replica gave one back in between):
            // refused with the shortest wait rather than admitted on a read
            // that is no longer the limiter's state.
            Ok(()) => 1,
        };
        Ok(Err(wait.max(1)))
    }

    async fn give_back(&self, key: &str, per_minute: u32) -> Result<(), StoreError> {
        sqlx::query("UPDATE rate_limits SET tat_us = tat_us - $2 WHERE key = $1")
            .bind(key)
            .bind(Gcra::interval_us(per_minute))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
