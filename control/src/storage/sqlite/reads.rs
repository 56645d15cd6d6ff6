//! SQLite's reads: the shared SQL (`storage/sql_reads.rs`) on its sqlx
//! reader pool.

crate::sql_reads!(
    super::SqliteStore,
    sqlx::SqlitePool,
    token_mac = "json_extract(details, '$.token_mac')"
);
