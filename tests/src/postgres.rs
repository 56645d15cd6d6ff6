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
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos();
        let name = format!(
            "aex_test_{}_{nanos}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = connect(&server_url).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE on the test server");
        let _ = conn.close().await;
        Some(Self { server_url, name })
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
