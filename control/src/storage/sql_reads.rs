//! The reads, on each SQL backend's sqlx pool, never behind a write. The
//! SQL is the same on SQLite and PostgreSQL (`$N` parameters, `CAST` where
//! PostgreSQL's `SUM` would widen to NUMERIC), so it is written once, here,
//! and expanded for each backend's store and pool type: sqlx's generic
//! executor bounds would cost more lines than the queries themselves.
//! The store must have `reader: $Pool`, `ledger_key: Vec<u8>`,
//! `fn anchor_state(&self) -> Option<AnchorState>` and `const SNAPSHOT:
//! Option<&str>`, the statement that makes a read transaction one snapshot
//! (SQLite's already is; PostgreSQL's READ COMMITTED is not); and the one
//! expression that differs, a field of an event's JSON `details`
//! (`json_field`, `{}` the field's name), spelt as the backend's indexes
//! on such fields are (a query uses an expression index only when it
//! repeats its expression).

#[macro_export]
#[doc(hidden)]
macro_rules! sql_reads {
    ($Store:ty, $Pool:ty, json_field = $json_field:literal) => {
use $crate::storage::rows::{
    AGENT_COLUMNS, AgentRow, CREDENTIAL_COLUMNS, CredentialRow, EVENT_COLUMNS, EventRow, GRANT_COLUMNS, GrantRow, PROCESS_SELECT, ProcessRow,
    RESERVATION_AUDIT_COLUMNS, RESERVATION_COLUMNS, ReservationAuditRow, ReservationRow,
};
use $crate::storage::{
    AgentActivity, AgentRecord, AuditData, CredentialRecord, EventFilter, EventKind, EventRecord, GrantRecord, ProcessRecord,
    ReportStore, ReservationRecord, StatusTotals, StoreError,
};
use aex_core::chain::GENESIS;
use async_trait::async_trait;

pub(super) async fn list_agents(
    reader: &$Pool,
    include_deleted: bool,
) -> Result<Vec<AgentRecord>, StoreError> {
    let live = if include_deleted {
        ""
    } else {
        "WHERE deleted_at_ms IS NULL"
    };
    let rows: Vec<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents {live} ORDER BY created_at_ms, id"
    ))
    .fetch_all(reader)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub(super) async fn agent_by_name(
    reader: &$Pool,
    name: &str,
) -> Result<Option<AgentRecord>, StoreError> {
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 AND deleted_at_ms IS NULL"
    ))
    .bind(name)
    .fetch_optional(reader)
    .await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn agent_by_token(
    reader: &$Pool,
    token_sha256: &str,
) -> Result<Option<AgentRecord>, StoreError> {
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE token_sha256 = $1 AND deleted_at_ms IS NULL"
    ))
    .bind(token_sha256)
    .fetch_optional(reader)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// The text of the field `name` of an event's `details`.
fn json_field(name: &str) -> String {
    $json_field.replace("{}", name)
}

/// `'a', 'b'`: a closed set of kinds, for an `IN`.
fn kinds_in(set: &[EventKind]) -> String {
    set.iter().map(|k| format!("'{}'", k.as_str())).collect::<Vec<_>>().join(", ")
}

/// The newest event that committed to the token MAC `$1`, by the index on
/// that expression (the query repeats the index's expression and
/// predicate, or the database would scan every event).
pub(super) fn token_issued_sql() -> String {
    format!(
        "SELECT seq, ts_ms, kind, agent_id, agent_name FROM events \
         WHERE {} = $1 AND kind IN ({}) ORDER BY seq DESC LIMIT 1",
        json_field("token_mac"),
        kinds_in(aex_core::presented::Retired::ISSUED_BY),
    )
}

/// The denials and refused reports naming the request id `$1`, by the
/// index on that expression (repeated here, predicate and all).
pub(super) fn request_denials_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE {} = $1 AND kind IN ({})",
        json_field("request_id"),
        kinds_in(&[EventKind::Deny, EventKind::ReportRefused]),
    )
}

/// Around a reservation's times, the window its events are looked for in:
/// other control planes' clocks may differ a little, and a reported call's
/// events are written when its report arrives.
const STORY_MARGIN_MS: i64 = 10 * 60_000;

/// One request's story (`aexctl events --request`): its denials and
/// refused reports, which name the request id (by `events_by_request`),
/// and the events of its reservation — admit, the closing, overruns, what
/// the provider answered — found by the reservation's id among the events
/// of the time it was open (by `events_by_time`: an index on every event's
/// reservation id would cost each admit and settle a write, for a read an
/// operator makes by hand).
pub(super) async fn request_events(
    reader: &$Pool,
    request_id: &str,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut rows: Vec<EventRow> = sqlx::query_as(&request_denials_sql())
        .bind(request_id)
        .fetch_all(reader)
        .await?;
    let reservation: Option<(String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT id, created_at_ms, settled_at_ms FROM reservations WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(reader)
    .await?;
    if let Some((id, created, settled)) = reservation {
        let until = settled.map_or(i64::MAX, |t| t.saturating_add(STORY_MARGIN_MS));
        let mut own: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE ts_ms >= $1 AND ts_ms <= $2 AND reservation_id = $3"
        ))
        .bind(created.saturating_sub(STORY_MARGIN_MS))
        .bind(until)
        .bind(&id)
        .fetch_all(reader)
        .await?;
        rows.append(&mut own);
    }
    rows.sort_by_key(|r| r.seq);
    rows.dedup_by_key(|r| r.seq);
    Ok(rows.into_iter().map(Into::into).collect())
}

/// What the ledger knows of a token no live agent holds: the newest event
/// that committed to it and, for an agent's, the first of the agent's
/// later rotations or deletion (both by index: `events_by_token_mac`,
/// `events_by_agent`).
pub(super) async fn retired_token(
    reader: &$Pool,
    ledger_key: &[u8],
    token_sha256: &str,
) -> Result<Option<aex_core::presented::Retired>, StoreError> {
    use aex_core::presented::Retired;
    let mac = aex_core::chain::token_mac(ledger_key, token_sha256);
    let issued: Option<(i64, i64, String, String, String)> =
        sqlx::query_as(&token_issued_sql())
            .bind(&mac)
            .fetch_optional(reader)
            .await?;
    let Some((seq, ts_ms, kind, agent_id, agent_name)) = issued else {
        return Ok(None);
    };
    let Some(kind) = EventKind::parse(&kind) else {
        return Ok(None);
    };
    let ended: Option<(i64, String)> = sqlx::query_as(&format!(
        "SELECT ts_ms, kind FROM events WHERE agent_id = $1 AND seq > $2 AND kind IN ({}) \
         ORDER BY seq LIMIT 1",
        kinds_in(Retired::ENDED_BY),
    ))
    .bind(&agent_id)
    .bind(seq)
    .fetch_optional(reader)
    .await?;
    let ended = ended.and_then(|(at, k)| EventKind::parse(&k).map(|k| (k, at)));
    Ok(Retired::of(&agent_name, (kind, ts_ms), ended))
}

pub(super) async fn agent_by_id(
    reader: &$Pool,
    id: &str,
) -> Result<Option<AgentRecord>, StoreError> {
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(reader)
    .await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn open_reservations(
    reader: &$Pool,
) -> Result<Vec<ReservationRecord>, StoreError> {
    let rows: Vec<ReservationRow> = sqlx::query_as(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'open' ORDER BY created_at_ms"
    ))
    .fetch_all(reader)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

pub(super) async fn open_reservation(
    reader: &$Pool,
    id: &str,
) -> Result<Option<ReservationRecord>, StoreError> {
    let row: Option<ReservationRow> = sqlx::query_as(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = $1 AND state = 'open'"
    ))
    .bind(id)
    .fetch_optional(reader)
    .await?;
    Ok(row.map(Into::into))
}

/// By the `reservations_open (state, expires_at_ms)` index.
pub(super) async fn due_reservations(
    reader: &$Pool,
    now_ms: i64,
) -> Result<Vec<ReservationRecord>, StoreError> {
    let rows: Vec<ReservationRow> = sqlx::query_as(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations \
         WHERE state = 'open' AND expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT 10000"
    ))
    .bind(now_ms)
    .fetch_all(reader)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

pub(super) async fn open_grants(
    reader: &$Pool,
    agent_id: Option<&str>,
) -> Result<Vec<GrantRecord>, StoreError> {
    let rows: Vec<GrantRow> = sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} FROM grants WHERE state = 'open' AND ($1 IS NULL OR agent_id = $1) \
         ORDER BY created_at_ms, id"
    ))
    .bind(agent_id)
    .fetch_all(reader)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub(super) async fn list_credentials(
    reader: &$Pool,
    include_revoked: bool,
) -> Result<Vec<CredentialRecord>, StoreError> {
    let live = if include_revoked {
        ""
    } else {
        "WHERE revoked_at_ms IS NULL"
    };
    let rows: Vec<CredentialRow> = sqlx::query_as(&format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials {live} ORDER BY created_at_ms, id"
    ))
    .fetch_all(reader)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub(super) async fn list_processes(
    reader: &$Pool,
    include_ended: bool,
) -> Result<Vec<ProcessRecord>, StoreError> {
    let filter = if include_ended {
        ""
    } else {
        "WHERE p.state = 'running'"
    };
    let rows: Vec<ProcessRow> = sqlx::query_as(&format!(
        "{PROCESS_SELECT} {filter} ORDER BY p.started_at_ms"
    ))
    .fetch_all(reader)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

#[async_trait]
impl ReportStore for $Store {
    async fn list_events(&self, f: EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        if let Some(request_id) = &f.request_id {
            let events = request_events(&self.reader, request_id).await?;
            return Ok(f.keep(events));
        }
        let limit = f.page_size();
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE seq > $1 AND ts_ms >= $2 AND ($3 = '' OR agent_name = $3) \
             ORDER BY seq LIMIT $4"
        ))
        .bind(f.after_seq)
        .bind(f.since_ms)
        .bind(f.agent_name.unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn audit_data(&self, now_ms: i64) -> Result<AuditData, StoreError> {
        // One read transaction: agents, counters and the last event seq are
        // one snapshot even while requests keep settling. The log itself is
        // tallied as it is verified (one pass instead of two GROUP BY scans,
        // which took 4 s each over 1M events).
        // Before the snapshot: the anchor is written after each commit, so
        // the snapshot reaches at least the head it names.
        let anchor = self.anchor_state();
        let mut tx = self.reader.begin().await?;
        if let Some(snapshot) = Self::SNAPSHOT {
            sqlx::query(snapshot).execute(&mut *tx).await?;
        }
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at_ms, id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let mut data = AuditData {
            agents: rows
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            now_ms,
            ..Default::default()
        };
        let rows: Vec<GrantRow> =
            sqlx::query_as(&format!("SELECT {GRANT_COLUMNS} FROM grants ORDER BY created_at_ms, id"))
                .fetch_all(&mut *tx)
                .await?;
        data.grants = rows
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?;
        let rows: Vec<CredentialRow> = sqlx::query_as(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at_ms, id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        data.credentials = rows
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, CAST(SUM(amount_micro) AS BIGINT) FROM reservations WHERE state = 'open' GROUP BY agent_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        data.open_reserved = rows.into_iter().collect();
        data.overdue = sqlx::query_as(
            "SELECT id, agent_id, expires_at_ms FROM reservations WHERE state = 'open' AND expires_at_ms < $1",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT agent_id, name, value FROM counters")
                .fetch_all(&mut *tx)
                .await?;
        data.counters = rows.into_iter().map(|(a, n, v)| ((a, n), v)).collect();
        let (last_seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        data.last_seq = last_seq.unwrap_or(0);
        let rows: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations WHERE state = 'open'"
        ))
        .fetch_all(&mut *tx)
        .await?;
        data.open_reservation_rows = rows.into_iter().map(Into::into).collect();
        // In pages, by key: the history can hold millions of rows.
        data.closed_reservations = $crate::ledger::fold::ClosedDigest::new(&self.ledger_key);
        let mut after_id = String::new();
        loop {
            let page: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
                "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations \
                 WHERE id > $1 AND state <> 'open' ORDER BY id LIMIT 10000"
            ))
            .bind(&after_id)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = page.last() else { break };
            after_id = last.id.clone();
            for row in page {
                data.closed_reservations
                    .add(&$crate::ledger::fold::ReservationRow::from(row).facts);
            }
        }
        let rows: Vec<ProcessRow> = sqlx::query_as(PROCESS_SELECT).fetch_all(&mut *tx).await?;
        data.processes = rows.into_iter().map(Into::into).collect();
        if let Some(a) = anchor.as_ref().and_then(|s| s.anchor()) {
            data.hash_at_anchor = if a.seq == 0 {
                Some(GENESIS.to_string())
            } else {
                sqlx::query_scalar("SELECT hash FROM events WHERE seq = $1")
                    .bind(a.seq)
                    .fetch_optional(&mut *tx)
                    .await?
            };
        }
        data.anchor = anchor;
        tx.commit().await?;
        Ok(data)
    }

    async fn reservation_history(
        &self,
        agent_id: &str,
    ) -> Result<(Vec<$crate::ledger::fold::ReservationRow>, Vec<EventRecord>), StoreError> {
        let mut tx = self.reader.begin().await?;
        if let Some(snapshot) = Self::SNAPSHOT {
            sqlx::query(snapshot).execute(&mut *tx).await?;
        }
        let rows: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations WHERE agent_id = $1"
        ))
        .bind(agent_id)
        .fetch_all(&mut *tx)
        .await?;
        let kinds = EventKind::ALL
            .iter()
            .filter(|k| k.is_about_reservations())
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let events: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE agent_id = $1 AND kind IN ({kinds}) ORDER BY seq"
        ))
        .bind(agent_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            rows.into_iter().map(Into::into).collect(),
            events.into_iter().map(Into::into).collect(),
        ))
    }

    async fn status_totals(&self) -> Result<StatusTotals, StoreError> {
        // Summed here, saturating: SQLite's SUM fails outright on overflow,
        // PostgreSQL's widens to NUMERIC,
        // and one absurd value must not take `status` down.
        let amounts: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT budget_micro, spent_micro, reserved_micro, overrun_micro \
             FROM agents WHERE deleted_at_ms IS NULL",
        )
        .fetch_all(&self.reader)
        .await?;
        let total = |pick: fn(&(i64, i64, i64, i64)) -> i64| {
            amounts.iter().map(pick).fold(0i64, i64::saturating_add)
        };
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, value FROM counters")
            .fetch_all(&self.reader)
            .await?;
        let mut counters = std::collections::HashMap::<String, i64>::new();
        for (name, value) in rows {
            let c = counters.entry(name).or_default();
            *c = c.saturating_add(value);
        }
        let (open,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM reservations WHERE state = 'open'")
                .fetch_one(&self.reader)
                .await?;
        let (running,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM processes WHERE state = 'running'")
                .fetch_one(&self.reader)
                .await?;
        Ok(StatusTotals {
            running_processes: running as u64,
            agents: amounts.len() as u32,
            total_budget_micro: total(|a| a.0),
            total_spent_micro: total(|a| a.1),
            total_reserved_micro: total(|a| a.2),
            total_overrun_micro: total(|a| a.3),
            counters,
            open_reservations: open as u64,
        })
    }

    async fn activity(
        &self,
        window_start_ms: i64,
        minute_start_ms: i64,
    ) -> Result<std::collections::HashMap<String, AgentActivity>, StoreError> {
        let mut out: std::collections::HashMap<String, AgentActivity> = Default::default();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, CAST(SUM(amount_micro) AS BIGINT) FROM events \
             WHERE ts_ms >= $1 AND kind IN ('settle', 'expire') GROUP BY agent_id",
        )
        .bind(window_start_ms)
        .fetch_all(&self.reader)
        .await?;
        for (agent, charged) in rows {
            out.entry(agent).or_default().charged_in_window = charged;
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, COUNT(*) FROM events WHERE ts_ms >= $1 AND kind = 'admit' GROUP BY agent_id",
        )
        .bind(minute_start_ms)
        .fetch_all(&self.reader)
        .await?;
        for (agent, n) in rows {
            out.entry(agent).or_default().admitted_last_minute = n as u32;
        }
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT agent_id, name, value FROM counters WHERE name = 'admit' OR name LIKE 'deny:%'",
        )
        .fetch_all(&self.reader)
        .await?;
        for (agent, name, value) in rows {
            let a = out.entry(agent).or_default();
            if name == "admit" {
                a.admitted += value;
            } else {
                a.denied += value;
            }
        }
        Ok(out)
    }
}

    };
}
