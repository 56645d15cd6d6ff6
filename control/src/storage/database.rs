//! Which database holds the ledger: the SQLite file (the embedded default)
//! or a PostgreSQL server shared by several control planes.

use super::StoreError;
use super::postgres::{self, PgStore};
use super::sqlite::SqliteStore;
use aex_core::home::Home;
use sqlx::postgres::PgConnectOptions;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(Box<PgConnectOptions>),
}

impl Database {
    /// `--database-url` when given (`postgres://…`, or `sqlite:PATH`), else
    /// the SQLite file `--db` names, else `AEX_HOME/aex.db`.
    pub fn choose(home: &Home, url: Option<&str>, db: Option<PathBuf>) -> Result<Self, StoreError> {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Database::Postgres(Box::new(postgres::connect_options(u)?)))
            }
            Some(u) if u.starts_with("sqlite:") => Ok(Database::Sqlite(PathBuf::from(
                u.trim_start_matches("sqlite:").trim_start_matches("//"),
            ))),
            Some(_) => Err(StoreError::Invalid(
                "--database-url must start with postgres:// (or sqlite: for a file); \
                 leave it unset for the embedded SQLite ledger in AEX_HOME"
                    .into(),
            )),
            None => Ok(Database::Sqlite(db.unwrap_or_else(|| home.db_path()))),
        }
    }

    /// For `status` and logs: the file, or the server and database (never
    /// the password).
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(o) => format!(
                "postgresql://{}:{}/{}",
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("")
            ),
        }
    }

    /// Opens the store (migrating it first), its head anchored in AEX_HOME
    /// (`ledger.head`, or `ledger-<hash>.head` for another file or a
    /// PostgreSQL database).
    pub async fn open(
        &self,
        home: &Home,
        ledger_key: Vec<u8>,
    ) -> Result<Arc<dyn super::Store>, StoreError> {
        Ok(match self {
            Database::Sqlite(path) => Arc::new(
                SqliteStore::open_anchored(path, ledger_key, &home.ledger_head_path(path)).await?,
            ),
            Database::Postgres(options) => {
                // This control plane's own anchor, named for the database.
                let anchor = home.ledger_head_path(std::path::Path::new(&self.describe()));
                Arc::new(PgStore::open((**options).clone(), ledger_key, Some(&anchor)).await?)
            }
        })
    }

    /// Applies pending migrations; how many.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        match self {
            Database::Sqlite(path) => super::sqlite::migrate(path).await,
            Database::Postgres(options) => postgres::migrate(options).await,
        }
    }
}
