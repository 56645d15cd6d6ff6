//! Agent changes between control planes (the agent, or its supervised
//! processes: started, ended, ordered killed): each write that changes one
//! sends `NOTIFY aex_agents, '<agent id>'` in its own transaction, which
//! PostgreSQL delivers to every listener when (and only if) it commits; each
//! control plane listens and re-reads the agent (`AdmissionEngine`'s
//! `refresh_agent`), then tells its data planes through their Watch
//! streams.

use crate::storage::{ChangeFeed, StoreChange, StoreError};
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

/// The payload that says models.yaml was reloaded (agent ids start `agt_`).
const MODELS_RELOADED: &str = "~models";

/// Tells every listener, this one's included, that models.yaml was reloaded.
pub(super) async fn models_reloaded(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(AGENT_CHANNEL)
        .bind(MODELS_RELOADED)
        .execute(pool)
        .await?;
    Ok(())
}

/// The prefix of the payload that recalls an agent's grants.
const GRANTS_RECALLED: &str = "~recall:";

/// Tells every listener that the agent's grants are recalled.
pub(super) async fn grants_recalled(pool: &PgPool, agent_id: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(AGENT_CHANNEL)
        .bind(format!("{GRANTS_RECALLED}{agent_id}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// The payload that says a data-plane credential was issued or revoked.
const CREDENTIALS: &str = "~credentials";

/// Queues the notification that credentials changed, sent at commit.
pub(super) async fn credentials_changed(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(AGENT_CHANNEL)
        .bind(CREDENTIALS)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn change(payload: &str) -> StoreChange {
    if let Some(agent_id) = payload.strip_prefix(GRANTS_RECALLED) {
        return StoreChange::GrantsRecalled(agent_id.to_string());
    }
    match payload {
        MODELS_RELOADED => StoreChange::ModelsReloaded,
        CREDENTIALS => StoreChange::Credentials,
        agent_id => StoreChange::Agent(agent_id.to_string()),
    }
}

/// Starts listening; the feed ends when its receiver is dropped.
pub(super) async fn changes(pool: &PgPool) -> Result<ChangeFeed, StoreError> {
    let mut listener = subscribe(pool).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let pool = pool.clone();
    tokio::spawn(async move {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if tx.send(change(n.payload())).await.is_err() {
                        return;
                    }
                    continue;
                }
                // The connection was lost (None) or could not be made again
                // (Err): what was sent meanwhile is lost. Subscribe afresh,
                // and only then ask for everything to be re-read, so that no
                // change falls between the two.
                Ok(None) => tracing::warn!("agent change feed lost its connection; resubscribing"),
                Err(e) => {
                    tracing::warn!(error = %e, "agent change feed interrupted; resubscribing")
                }
            }
            let mut backoff = Duration::from_millis(100);
            listener = loop {
                if tx.is_closed() {
                    return;
                }
                match subscribe(&pool).await {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot resubscribe to agent changes; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            if tx.send(StoreChange::Everything).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

async fn subscribe(pool: &PgPool) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(AGENT_CHANNEL).await?;
    Ok(listener)
}
