//! Every write to the PostgreSQL ledger from this control plane, on one
//! task with group commit: the operations waiting in its queue run in one
//! transaction (one failing is taken out and the rest run again, see
//! `commit_batch`), committed once, and only then answered — an acknowledged operation is
//! committed, and under load one commit (one fsync with
//! `synchronous_commit = on`) serves many requests.
//!
//! Each batch first takes a transaction-scoped advisory lock, the chain's
//! one appender across every control plane on the database: it reads the
//! head after taking it and appends after it. Replicas therefore take turns
//! per batch; while one commits, the others gather their next batch.

use crate::storage::{NewEvent, StoreError};
use aex_core::chain::ChainKey;
use aex_core::event::Head;
use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// At most this many operations share a transaction; more wait for the next.
const MAX_BATCH: usize = 512;

/// The advisory lock that makes one appender of the chain (any constant
/// no other use of the database takes: "aex-chain" in ASCII).
const CHAIN_LOCK: i64 = 0x6165_782d_6368_6169;

/// One write, run inside the batch's transaction; it may be run again
/// (when another operation of its batch failed), so it reads what it needs
/// each time.
#[async_trait]
pub(super) trait Operation: Send + Sync + 'static {
    type Output: Send + 'static;
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain<'_>,
    ) -> Result<Self::Output, StoreError>;
}

/// The chain as the writer appends to it: the one place an event is written.
pub(super) struct Chain<'k> {
    key: &'k ChainKey,
    head: Head,
}

impl<'k> Chain<'k> {
    /// The chain as the database holds it now (under the chain lock).
    async fn read(conn: &mut PgConnection, key: &'k ChainKey) -> Result<Self, StoreError> {
        let head: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *conn)
                .await?;
        Ok(Self {
            key,
            head: head.map_or_else(Head::genesis, |(seq, hash)| Head { seq, hash }),
        })
    }

    /// Seals `event` after the head, stores it and bumps its counter.
    pub(super) async fn append(
        &mut self,
        conn: &mut PgConnection,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let sealed = self.head.seal(self.key, event);
        let b = &sealed.body;
        // One statement, one round trip: the event and its counter.
        sqlx::query(
            "WITH stored AS (INSERT INTO events (seq, ts_ms, kind, agent_id, agent_name, \
             reservation_id, amount_micro, reason, details, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)) \
             INSERT INTO counters (agent_id, name, value) VALUES ($4, $12, $13) \
             ON CONFLICT (agent_id, name) DO UPDATE SET value = counters.value + EXCLUDED.value",
        )
        .bind(b.seq)
        .bind(b.ts_ms)
        .bind(&b.kind)
        .bind(&b.agent_id)
        .bind(&b.agent_name)
        .bind(&b.reservation_id)
        .bind(b.amount_micro)
        .bind(&b.reason)
        .bind(&b.details_json)
        .bind(&sealed.prev_hash)
        .bind(&sealed.hash)
        .bind(event.counter_name())
        .bind(event.count)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    pub(super) async fn append_all(
        &mut self,
        conn: &mut PgConnection,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        for event in events {
            self.append(conn, event).await?;
        }
        Ok(())
    }
}

/// One queued operation: applied inside the batch's transaction, answered
/// after its commit.
#[async_trait]
trait Job: Send {
    /// False if it failed (the batch is then run again without it).
    async fn apply(&mut self, conn: &mut PgConnection, chain: &mut Chain<'_>) -> bool;
    fn answer(self: Box<Self>, commit: Result<(), &str>);
}

struct Pending<O: Operation> {
    op: O,
    result: Option<Result<O::Output, StoreError>>,
    reply: oneshot::Sender<Result<O::Output, StoreError>>,
}

#[async_trait]
impl<O: Operation> Job for Pending<O> {
    async fn apply(&mut self, conn: &mut PgConnection, chain: &mut Chain<'_>) -> bool {
        let result = self.op.run(conn, chain).await;
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, commit: Result<(), &str>) {
        let result = match (commit, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable("the operation was not run".into())),
            (Err(why), _) => Err(StoreError::Unavailable(why.to_string())),
        };
        // A caller that gave up is fine to ignore: its operation is
        // committed either way, and idempotent on retry.
        let _ = self.reply.send(result);
    }
}

/// Handle to the writer task; the task ends when every handle is gone.
#[derive(Clone)]
pub(super) struct LedgerWriter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl LedgerWriter {
    pub(super) async fn start(
        options: PgConnectOptions,
        ledger_key: Vec<u8>,
    ) -> Result<Self, StoreError> {
        // A writer that stalls holding the chain lock (a replica cut off
        // mid-batch) must not hold every replica's writes for long: its
        // session gives the lock up, and a batch waits for it only so long.
        let options = options.options([
            ("idle_in_transaction_session_timeout", "10s"),
            ("lock_timeout", "10s"),
            ("statement_timeout", "30s"),
        ]);
        let conn = PgConnection::connect_with(&options).await?;
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(conn, options, ChainKey::new(&ledger_key), rx));
        Ok(Self { jobs })
    }

    /// Runs `op` in the next batch and answers once that committed.
    pub(super) async fn write<O: Operation>(&self, op: O) -> Result<O::Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Pending {
            op,
            result: None,
            reply,
        });
        let gone = || StoreError::Unavailable("the ledger writer has stopped".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(
    mut conn: PgConnection,
    options: PgConnectOptions,
    key: ChainKey,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = commit_batch(&mut conn, &key, &mut batch).await;
        if committed.is_err() && conn.ping().await.is_err() {
            // The database restarted or the connection broke: the batch was
            // answered unavailable (nothing of it happened), and the next
            // one gets a fresh connection.
            conn = reconnect(&options).await;
        }
    }
}

/// Waits for the database to come back; a caller meanwhile waits in the
/// queue, and gives up on its own deadline.
async fn reconnect(options: &PgConnectOptions) -> PgConnection {
    let mut backoff = Duration::from_millis(100);
    loop {
        match PgConnection::connect_with(options).await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::error!(error = %e, "the ledger's database is unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs every job in one transaction, commits, then answers. Optimistic:
/// no savepoint per job (two round trips each); a job that fails takes the
/// transaction down with it, so the batch is rolled back and run again
/// without it (its error is its answer). Failures are rare (a taken name, a
/// reused id), so a batch almost always commits on its first pass. If the
/// commit fails, every job gets the error: none of them happened.
async fn commit_batch(
    conn: &mut PgConnection,
    key: &ChainKey,
    batch: &mut Vec<Box<dyn Job>>,
) -> Result<(), ()> {
    let mut failed = vec![false; batch.len()];
    let committed = loop {
        let pass = async {
            let mut tx = Connection::begin(&mut *conn).await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(CHAIN_LOCK)
                .execute(&mut *tx)
                .await?;
            let mut chain = Chain::read(&mut tx, key).await?;
            for (i, job) in batch.iter_mut().enumerate() {
                if !failed[i] && !job.apply(&mut tx, &mut chain).await {
                    tx.rollback().await?;
                    return Ok::<Option<usize>, StoreError>(Some(i));
                }
            }
            tx.commit().await?;
            Ok(None)
        }
        .await;
        match pass {
            Ok(Some(i)) => failed[i] = true,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match committed {
        Ok(()) => {
            for job in batch.drain(..) {
                job.answer(Ok(()));
            }
            Ok(())
        }
        Err(e) => {
            let why = e.to_string();
            for job in batch.drain(..) {
                job.answer(Err(&why));
            }
            Err(())
        }
    }
}
