//! PostgreSQL's reads: the shared SQL (`storage/sql_reads.rs`) on its pool.

crate::sql_reads!(
    super::PgStore,
    sqlx::PgPool,
    json_field = "((details::jsonb) ->> '{}')"
);
