//! Data-plane credentials on SQLite, run by the writer thread inside its
//! batch's transaction like every other write (`writes.rs`); what to write
//! is the domain's (`aex_core::credential`).

use super::errors::is_unique_violation;
use super::writer::Chain;
use crate::storage::rows::{CREDENTIAL_COLUMNS, CredentialRow, stored_agents};
use crate::storage::{CredentialRecord, CredentialWrite, StoreError};
use rusqlite::{Connection, OptionalExtension, params};

pub(super) fn insert(
    conn: &Connection,
    chain: &mut Chain<'_>,
    w: &CredentialWrite,
) -> Result<CredentialRecord, StoreError> {
    let c = &w.credential;
    let inserted = conn
        .prepare_cached(&format!(
            "INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))?
        .execute(params![
            c.id,
            c.name,
            c.secret_sha256,
            c.secret_prefix,
            stored_agents(c),
            c.created_at_ms,
            c.revoked_at_ms,
        ]);
    match inserted {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::duplicate_credential(&c.name)),
        other => other?,
    };
    chain.append_all(conn, &w.events)?;
    Ok(c.clone())
}

pub(super) fn revoke(
    conn: &Connection,
    chain: &mut Chain<'_>,
    name: &str,
    now: i64,
) -> Result<Option<CredentialRecord>, StoreError> {
    let current: Option<CredentialRecord> = conn
        .prepare_cached(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE name = ?1 AND revoked_at_ms IS NULL"
        ))?
        .query_row([name], CredentialRow::from_rusqlite)
        .optional()?
        .map(TryInto::try_into)
        .transpose()?;
    let Some(w) = current.and_then(|c| aex_core::credential::revoke(&c, now)) else {
        return Ok(None);
    };
    conn.prepare_cached("UPDATE credentials SET revoked_at_ms = ?2 WHERE id = ?1")?
        .execute(params![w.credential.id, w.credential.revoked_at_ms])?;
    chain.append_all(conn, &w.events)?;
    Ok(Some(w.credential))
}
