//! SQLite's reads: the shared SQL (`storage/sql_reads.rs`) on its sqlx
//! reader pool.

crate::sql_reads!(
    super::SqliteStore,
    sqlx::SqlitePool,
    json_field = "json_extract(details, '$.{}')"
);
