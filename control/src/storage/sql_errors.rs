//! sqlx's errors, on either SQL backend, mapped once into the
//! backend-neutral [`StoreError`].

use crate::storage::StoreError;
use sqlx::error::ErrorKind;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(db) => match db.kind() {
                ErrorKind::UniqueViolation
                | ErrorKind::CheckViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation => StoreError::Conflict(e.to_string()),
                // PostgreSQL: serialization_failure, deadlock_detected,
                // lock_not_available, too_many_connections, admin_shutdown and
                // the like; nothing happened, and trying again is safe.
                _ if db.code().is_some_and(|c| {
                    matches!(&*c, "40001" | "40P01" | "55P03" | "53300" | "57P01")
                }) =>
                {
                    StoreError::Unavailable(e.to_string())
                }
                _ => StoreError::Backend(Box::new(e)),
            },
            _ => StoreError::Backend(Box::new(e)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Backend(format!("database migration failed: {e}").into())
    }
}
