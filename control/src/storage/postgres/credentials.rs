//! Data-plane credentials on PostgreSQL: the same steps as
//! `sqlite/credentials.rs`, each an operation of the writer's batch. Their
//! events are the ledger's own (no agent), so an operation owns the agent
//! `""`, as the anchor's events do. Each change is announced to every
//! control plane at commit (`notify.rs`), so a revocation reaches all of
//! them at once.

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{CREDENTIAL_COLUMNS, CredentialRow, stored_agents};
use crate::storage::{CredentialRecord, CredentialWrite, StoreError};
use async_trait::async_trait;
use sqlx::postgres::PgConnection;

pub(super) struct Insert(pub CredentialWrite);

#[async_trait]
impl Operation for Insert {
    type Output = CredentialRecord;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(String::new())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<CredentialRecord, StoreError> {
        let c = &self.0.credential;
        let inserted = sqlx::query(&format!(
            "INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.secret_sha256)
        .bind(&c.secret_prefix)
        .bind(stored_agents(c))
        .bind(c.created_at_ms)
        .bind(c.revoked_at_ms)
        .execute(&mut *conn)
        .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            return Err(StoreError::duplicate_credential(&c.name));
        }
        inserted?;
        chain.append_all(&self.0.events);
        super::notify::credentials_changed(conn).await?;
        Ok(c.clone())
    }
}

pub(super) struct Revoke {
    pub name: String,
    pub now_ms: i64,
}

#[async_trait]
impl Operation for Revoke {
    type Output = Option<CredentialRecord>;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(String::new())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let row: Option<CredentialRow> = sqlx::query_as(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
             WHERE name = $1 AND revoked_at_ms IS NULL FOR UPDATE"
        ))
        .bind(&self.name)
        .fetch_optional(&mut *conn)
        .await?;
        let current: Option<CredentialRecord> = row.map(TryInto::try_into).transpose()?;
        let Some(w) = current.and_then(|c| aex_core::credential::revoke(&c, self.now_ms)) else {
            return Ok(None);
        };
        sqlx::query("UPDATE credentials SET revoked_at_ms = $2 WHERE id = $1")
            .bind(&w.credential.id)
            .bind(w.credential.revoked_at_ms)
            .execute(&mut *conn)
            .await?;
        chain.append_all(&w.events);
        super::notify::credentials_changed(conn).await?;
        Ok(Some(w.credential))
    }
}
