//! The PostgreSQL backend: the conformance suite, each case on a database
//! of its own (`aex_tests::postgres`), skipped loudly without a server.

use super::PgStore;
use crate::storage::conformance::KEY;
use aex_tests::postgres::TestDatabase;

async fn store() -> Option<(TestDatabase, PgStore)> {
    let db = TestDatabase::fresh().await?;
    let store = PgStore::open(db.options(), KEY.to_vec()).await.unwrap();
    Some((db, store))
}

crate::store_conformance!(store);
