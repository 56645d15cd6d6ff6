//! A database of its own for each PostgreSQL test, on the server
//! `AEX_TEST_DATABASE_URL` names (`.ci/run` sets it; without it the test is
//! reported skipped), dropped when the guard goes.

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct TestDatabase {
    server_url: String,
    name: String,
}

impl TestDatabase {
    /// A fresh, empty database, or `None` (reported skipped) without a server.
    pub async fn fresh() -> Option<Self> {
        let server_url = crate::test_database_url()?;
        let name = unique_name();
        let mut conn = connect(&server_url).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE on the test server");
        let _ = conn.close().await;
        Some(Self { server_url, name })
    }

    /// The test server's address and credentials (`AEX_TEST_DATABASE_URL`);
    /// panics without it (call after [`TestDatabase::fresh`] returned one).
    pub fn server_options() -> PgConnectOptions {
        PgConnectOptions::from_str(&crate::test_database_url().expect("AEX_TEST_DATABASE_URL"))
            .expect("a PostgreSQL URL")
    }

    /// How many deadlocks the server detected (and broke) in this database,
    /// read after its statistics had time to be flushed (within a second).
    pub async fn deadlocks(&self) -> i64 {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let mut conn = connect(&self.url()).await;
        let n = sqlx::query_scalar(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_database");
        let _ = conn.close().await;
        n
    }

    /// A new database holding a copy of this one as it is now (sessions
    /// still on it are ended first: PostgreSQL copies only an idle one).
    pub async fn copy(&self) -> TestDatabase {
        let name = unique_name();
        self.create_from(&name).await;
        TestDatabase {
            server_url: self.server_url.clone(),
            name,
        }
    }

    /// Replaces this database with a copy of `source`, under the same name.
    pub async fn reset_from(&self, source: &TestDatabase) {
        let mut conn = connect(&self.server_url).await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .expect("DROP DATABASE on the test server");
        let _ = conn.close().await;
        source.create_from(&self.name).await;
    }

    async fn create_from(&self, name: &str) {
        let mut conn = connect(&self.server_url).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut conn)
        .await
        .expect("ending the sessions on the template");
        // A session just ended may still be on its way out.
        let mut tries = 0;
        loop {
            match sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {}", self.name))
                .execute(&mut conn)
                .await
            {
                Ok(_) => break,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("CREATE DATABASE {name} TEMPLATE {}: {e}", self.name),
            }
        }
        let _ = conn.close().await;
    }

    /// The server's URL with this database in its path.
    pub fn url(&self) -> String {
        let (base, query) = match self.server_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (self.server_url.as_str(), String::new()),
        };
        let authority_end = base
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| base[start..].find('/').map(|j| start + j))
            .unwrap_or(base.len());
        format!("{}/{}{query}", &base[..authority_end], self.name)
    }

    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url()).expect("a PostgreSQL URL")
    }
}

fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    format!(
        "aex_test_{}_{nanos}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to AEX_TEST_DATABASE_URL's server: {e}"))
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.server_url.clone(), self.name.clone());
        // Its own thread and runtime: a drop cannot await, and the test's
        // runtime may be shutting down. FORCE ends the sessions still open.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async {
                    let mut conn = PgConnection::connect(&url).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_goes_in_the_path() {
        let db = |server: &str| {
            let d = super::TestDatabase {
                server_url: server.into(),
                name: "x".into(),
            };
            let url = d.url();
            std::mem::forget(d);
            url
        };
        assert_eq!(db("postgres://u@h:5432/test"), "postgres://u@h:5432/x");
        assert_eq!(db("postgres://u@h:5432"), "postgres://u@h:5432/x");
        assert_eq!(
            db("postgres://u:p@h/test?sslmode=disable"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
