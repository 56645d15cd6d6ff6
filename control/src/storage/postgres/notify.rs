//! Agent changes between control planes: each write that changes an agent
//! sends `NOTIFY aex_agents, '<agent id>'` in its own transaction, which
//! PostgreSQL delivers to every listener when (and only if) it commits; each
//! control plane listens and re-reads the agent (`AdmissionCore`'s
//! `refresh_agent`), then tells its data planes through their Watch
//! streams.

use crate::storage::{AgentFeed, EVERY_AGENT, StoreError};
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use std::time::Duration;

pub(super) const AGENT_CHANNEL: &str = "aex_agents";

/// Queues the notification for `agent_id`, sent at commit.
pub(super) async fn agent_changed(
    conn: &mut PgConnection,
    agent_id: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(AGENT_CHANNEL)
        .bind(agent_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Starts listening; the feed ends when its receiver is dropped.
pub(super) async fn agent_changes(pool: &PgPool) -> Result<AgentFeed, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(AGENT_CHANNEL).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            // A lost connection is reconnected by the listener on the next
            // call; what was sent meanwhile is lost, so the receiver is told
            // to re-read everything.
            let sent = match listener.try_recv().await {
                Ok(Some(n)) => {
                    backoff = Duration::from_millis(100);
                    tx.send(n.payload().to_string()).await
                }
                Ok(None) => tx.send(EVERY_AGENT.to_string()).await,
                Err(e) => {
                    tracing::warn!(error = %e, "agent change feed interrupted; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    tx.send(EVERY_AGENT.to_string()).await
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
