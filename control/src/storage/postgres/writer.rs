//! Every write to the PostgreSQL ledger from this control plane, on one
//! task with group commit: the operations waiting in its queue run in one
//! transaction (one failing is taken out and the rest run again, see
//! `commit_batch`), committed once, and only then answered — an
//! acknowledged operation is committed, and under load one commit (one
//! fsync with `synchronous_commit = on`) serves many requests.
//!
//! Replicas do not take turns for the work of a batch, only for its last
//! step. A batch first locks the agents its operations touch (advisory
//! locks, in one ascending order, so two replicas never deadlock on each
//! other's rows), runs the operations while batches of other replicas run
//! theirs on other agents, and buffers the events they decide. Then it takes
//! the chain's lock, reads the head, seals every buffered event after it and
//! stores them in one statement, and commits: the chain stays one keyed
//! chain, contiguous from 1 in commit order, and the turn each replica takes
//! is that statement and the commit. See docs/LEDGER.md.

use crate::ledger::anchor::AnchorFile;
use crate::storage::{NewEvent, StoreError};
use aex_core::chain::ChainKey;
use aex_core::event::Head;
use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// At most this many operations share a transaction; more wait for the next.
const MAX_BATCH: usize = 512;

/// The advisory lock that makes one appender of the chain (any constant
/// no other use of the database takes: "aex-chain" in ASCII).
const CHAIN_LOCK: i64 = 0x6165_782d_6368_6169;

/// The first key of every agent's advisory lock ("aexa"); the second is a
/// hash of its id. Two-key locks live apart from one-key ones such as
/// [`CHAIN_LOCK`]; two agents sharing a hash only wait for each other.
const AGENT_LOCK_CLASS: i32 = 0x6165_7861;

/// Whose rows an operation reads and writes: the batch locks those agents
/// before it runs. An operation touches only its owners' rows (and their
/// counters); events for the ledger itself belong to the agent `""`.
#[derive(Debug, Clone)]
pub(super) enum Owner {
    Agent(String),
    AgentNamed(String),
    Reservation(String),
    Process(String),
}

/// One write, run inside the batch's transaction; it may be run again
/// (when another operation of its batch failed), so it reads what it needs
/// each time.
#[async_trait]
pub(super) trait Operation: Send + Sync + 'static {
    type Output: Send + 'static;
    fn owners(&self) -> Vec<Owner>;
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<Self::Output, StoreError>;
}

/// The events a batch decides, sealed and stored when it commits, and the
/// agents it holds locked.
#[derive(Default)]
pub(super) struct Chain {
    pending: Vec<NewEvent>,
    locked: HashSet<String>,
}

impl Chain {
    pub(super) fn append(&mut self, event: &NewEvent) {
        self.pending.push(event.clone());
    }

    pub(super) fn append_all(&mut self, events: &[NewEvent]) {
        self.pending.extend_from_slice(events);
    }

    /// Whether this batch already logged a refused report of the
    /// reservation (its events are stored only at commit).
    pub(super) fn refused(&self, reservation_id: &str) -> bool {
        self.pending.iter().any(|e| {
            e.kind == aex_core::event::EventKind::ReportRefused
                && e.reservation_id == reservation_id
        })
    }

    /// Whether this batch holds `agent_id`'s lock: an operation that found
    /// its agent only after locking (by name) checks it.
    pub(super) fn holds(&self, agent_id: &str) -> bool {
        self.locked.contains(agent_id)
    }
}

/// FNV-1a: stable across processes and versions, which the lock key must be.
fn agent_lock_key(agent_id: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in agent_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// Finds the agents behind `owners` and locks them, in ascending key order
/// (the one order every replica uses). Returns the agents locked and the
/// transaction's id (see [`commit_outcome`]).
async fn lock_owners(
    conn: &mut PgConnection,
    owners: &[Owner],
) -> Result<(HashSet<String>, String), StoreError> {
    let mut agents: HashSet<String> = HashSet::new();
    let (mut reservations, mut processes, mut names) = (vec![], vec![], vec![]);
    for owner in owners {
        match owner {
            Owner::Agent(id) => {
                agents.insert(id.clone());
            }
            Owner::AgentNamed(name) => names.push(name.clone()),
            Owner::Reservation(id) => reservations.push(id.clone()),
            Owner::Process(id) => processes.push(id.clone()),
        }
    }
    if !(reservations.is_empty() && processes.is_empty() && names.is_empty()) {
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT agent_id FROM reservations WHERE id = ANY($1) \
             UNION SELECT agent_id FROM processes WHERE id = ANY($2) \
             UNION SELECT id FROM agents WHERE name = ANY($3) AND deleted_at_ms IS NULL",
        )
        .bind(&reservations)
        .bind(&processes)
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        agents.extend(found);
    }
    let keys: Vec<i32> = agents
        .iter()
        .map(|a| agent_lock_key(a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // unnest yields the array in order, so the locks are taken in it; the
    // count makes the locks run before the id is returned.
    let xid: String = sqlx::query_scalar(
        "WITH locked AS (SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k) \
         SELECT pg_current_xact_id()::text FROM (SELECT COUNT(*) FROM locked) AS taken",
    )
    .bind(AGENT_LOCK_CLASS)
    .bind(&keys)
    .fetch_one(&mut *conn)
    .await?;
    Ok((agents, xid))
}

/// Whether a batch whose COMMIT got no answer (the connection broke)
/// committed, asked on a connection of its own: if it did, its operations
/// must be answered as done, not as unavailable (a reservation answered
/// unavailable but committed stays open, to be charged at its expiry for a
/// call that never went out). Waits while transaction `xid` is in progress;
/// then a batch that appended events committed exactly when its head event
/// (`seq` and keyed hash, which no other batch can write) is in the chain,
/// which holds even after a server crash that let the id be given out
/// again; one without events goes by the id's status. `None` when it
/// cannot be known in time, which is answered unavailable.
async fn commit_outcome(
    options: &PgConnectOptions,
    xid: &str,
    head: Option<&Head>,
) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut conn) = PgConnection::connect_with(options).await {
            let status: Result<Option<String>, _> =
                sqlx::query_scalar("SELECT pg_xact_status($1::xid8)::text")
                    .bind(xid)
                    .fetch_one(&mut conn)
                    .await;
            let in_progress = matches!(
                status.as_ref().ok().and_then(Option::as_deref),
                Some("in progress")
            );
            let outcome = match (in_progress, head) {
                (true, _) => None,
                (false, Some(head)) => sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE seq = $1 AND hash = $2)",
                )
                .bind(head.seq)
                .bind(&head.hash)
                .fetch_one(&mut conn)
                .await
                .ok(),
                (false, None) => match status.ok().flatten().as_deref() {
                    Some("committed") => Some(true),
                    Some("aborted") => Some(false),
                    _ => None,
                },
            };
            let _ = conn.close().await;
            if outcome.is_some() {
                return outcome;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Takes the chain's turn and stores the batch's events after its head in
/// one statement, with their counters. Returns the new head.
async fn seal_and_store(
    conn: &mut PgConnection,
    key: &ChainKey,
    events: &[NewEvent],
) -> Result<Option<Head>, StoreError> {
    if events.is_empty() {
        return Ok(None);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHAIN_LOCK)
        .execute(&mut *conn)
        .await?;
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let mut head = head.map_or_else(Head::genesis, |(seq, hash)| Head { seq, hash });
    let n = events.len();
    let mut columns = EventColumns::with_capacity(n);
    // Sorted, so that the counter rows are locked in one order by everyone.
    let mut counters: BTreeMap<(String, String), i64> = BTreeMap::new();
    for event in events {
        columns.push(head.seal(key, event));
        *counters
            .entry((event.agent_id.clone(), event.counter_name()))
            .or_default() += event.count;
    }
    let (agents, names, values): (Vec<String>, Vec<String>, Vec<i64>) =
        counters.into_iter().map(|((a, n), v)| (a, n, v)).fold(
            (vec![], vec![], vec![]),
            |(mut a, mut n, mut v), (x, y, z)| {
                a.push(x);
                n.push(y);
                v.push(z);
                (a, n, v)
            },
        );
    sqlx::query(
        "WITH stored AS (INSERT INTO events (seq, ts_ms, kind, agent_id, agent_name, \
         reservation_id, amount_micro, reason, details, prev_hash, hash) \
         SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::text[])) \
         INSERT INTO counters (agent_id, name, value) \
         SELECT * FROM unnest($12::text[], $13::text[], $14::int8[]) \
         ON CONFLICT (agent_id, name) DO UPDATE SET value = counters.value + EXCLUDED.value",
    )
    .bind(&columns.seq)
    .bind(&columns.ts_ms)
    .bind(&columns.kind)
    .bind(&columns.agent_id)
    .bind(&columns.agent_name)
    .bind(&columns.reservation_id)
    .bind(&columns.amount_micro)
    .bind(&columns.reason)
    .bind(&columns.details)
    .bind(&columns.prev_hash)
    .bind(&columns.hash)
    .bind(&agents)
    .bind(&names)
    .bind(&values)
    .execute(&mut *conn)
    .await?;
    Ok(Some(head))
}

/// Sealed events as column arrays, for one `unnest` insert.
#[derive(Default)]
struct EventColumns {
    seq: Vec<i64>,
    ts_ms: Vec<i64>,
    kind: Vec<String>,
    agent_id: Vec<String>,
    agent_name: Vec<String>,
    reservation_id: Vec<String>,
    amount_micro: Vec<i64>,
    reason: Vec<String>,
    details: Vec<String>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
}

impl EventColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            seq: Vec::with_capacity(n),
            ts_ms: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    fn push(&mut self, sealed: aex_core::event::EventRecord) {
        let b = sealed.body;
        self.seq.push(b.seq);
        self.ts_ms.push(b.ts_ms);
        self.kind.push(b.kind);
        self.agent_id.push(b.agent_id);
        self.agent_name.push(b.agent_name);
        self.reservation_id.push(b.reservation_id);
        self.amount_micro.push(b.amount_micro);
        self.reason.push(b.reason);
        self.details.push(b.details_json);
        self.prev_hash.push(sealed.prev_hash);
        self.hash.push(sealed.hash);
    }
}

/// One queued operation: applied inside the batch's transaction, answered
/// after its commit.
#[async_trait]
trait Job: Send {
    fn owners(&self) -> Vec<Owner>;
    /// False if it failed (the batch is then run again without it).
    async fn apply(&mut self, conn: &mut PgConnection, chain: &mut Chain) -> bool;
    /// Whether its failure may pass if run again (a deadlock PostgreSQL
    /// broke, a lock wait that timed out, an agent replaced meanwhile).
    fn failed_transiently(&self) -> bool;
    fn answer(self: Box<Self>, commit: Result<(), &str>);
}

struct Pending<O: Operation> {
    op: O,
    result: Option<Result<O::Output, StoreError>>,
    reply: oneshot::Sender<Result<O::Output, StoreError>>,
}

#[async_trait]
impl<O: Operation> Job for Pending<O> {
    fn owners(&self) -> Vec<Owner> {
        self.op.owners()
    }

    async fn apply(&mut self, conn: &mut PgConnection, chain: &mut Chain) -> bool {
        let result = self.op.run(conn, chain).await;
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn failed_transiently(&self) -> bool {
        matches!(self.result, Some(Err(StoreError::Unavailable(_))))
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
    /// `anchor`: this control plane's copy of the head outside the
    /// database, written after each commit of its own (`ledger::anchor`).
    pub(super) async fn start(
        options: PgConnectOptions,
        ledger_key: Vec<u8>,
        anchor: Option<Arc<AnchorFile>>,
    ) -> Result<Self, StoreError> {
        // A writer that stalls holding a lock (a replica cut off mid-batch)
        // must not hold every replica's writes for long: its session gives
        // the lock up, and a batch waits for it only so long.
        let options = options.options([
            ("idle_in_transaction_session_timeout", "10s"),
            ("lock_timeout", "10s"),
            ("statement_timeout", "30s"),
        ]);
        let conn = PgConnection::connect_with(&options).await?;
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(conn, options, ChainKey::new(&ledger_key), anchor, rx));
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
    anchor: Option<Arc<AnchorFile>>,
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
        let committed =
            commit_batch(&mut conn, &options, &key, &mut batch, anchor.as_deref()).await;
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

/// Runs every job in one transaction, commits, anchors, then answers.
/// Optimistic: no savepoint per job (two round trips each); a job that
/// fails takes the transaction down with it, so the batch is rolled back
/// and run again without it (its error is its answer). Failures are rare (a
/// taken name, a reused id), so a batch almost always commits on its first
/// pass. If the COMMIT fails, the database is asked whether the transaction
/// committed anyway (its answer lost with the connection): if so the jobs
/// get their results, else every job gets the error (none of them
/// happened). Err: the connection should be checked before the next batch.
async fn commit_batch(
    conn: &mut PgConnection,
    options: &PgConnectOptions,
    key: &ChainKey,
    batch: &mut Vec<Box<dyn Job>>,
    anchor: Option<&AnchorFile>,
) -> Result<(), ()> {
    let owners: Vec<Owner> = batch.iter().flat_map(|job| job.owners()).collect();
    let mut failed = vec![false; batch.len()];
    // A COMMIT that failed leaves the connection suspect, even when the
    // transaction turned out to have committed.
    let mut commit_failed = false;
    let mut retries = 0u32;
    let committed = loop {
        let pass = async {
            let mut tx = Connection::begin(&mut *conn).await?;
            let (locked, xid) = lock_owners(&mut tx, &owners).await?;
            let mut chain = Chain {
                pending: Vec::new(),
                locked,
            };
            for (i, job) in batch.iter_mut().enumerate() {
                if !failed[i] && !job.apply(&mut tx, &mut chain).await {
                    tx.rollback().await?;
                    return Ok::<_, StoreError>(Err((i, job.failed_transiently())));
                }
            }
            let head = seal_and_store(&mut tx, key, &chain.pending).await?;
            if let Err(e) = tx.commit().await {
                commit_failed = true;
                tracing::warn!(error = %e, "a batch's COMMIT failed; asking the database whether it committed");
                if commit_outcome(options, &xid, head.as_ref()).await != Some(true) {
                    return Err(e.into());
                }
                tracing::warn!("the batch had committed: its operations are answered as done");
            }
            Ok(Ok(head))
        }
        .await;
        match pass {
            // Run the whole batch again (a few times) for a job that may
            // pass then; else without it.
            Ok(Err((_, true))) if retries < 3 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(5 << retries)).await;
            }
            Ok(Err((i, _))) => failed[i] = true,
            Ok(Ok(head)) => break Ok(head),
            Err(e) => break Err(e),
        }
    };
    match committed {
        Ok(head) => {
            // Anchored before anyone is answered: every decision this
            // control plane acknowledges is covered by its anchor.
            if let (Some(anchor), Some(head)) = (anchor, head)
                && let Err(e) = anchor.write(head.seq, &head.hash)
            {
                tracing::error!(error = %e, "cannot write the ledger head anchor");
            }
            for job in batch.drain(..) {
                job.answer(Ok(()));
            }
            if commit_failed { Err(()) } else { Ok(()) }
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

#[cfg(test)]
mod tests {
    use super::agent_lock_key;

    #[test]
    fn agent_lock_keys_are_stable_across_builds() {
        // The key is shared by every replica, of any version, on the
        // database: it must never change.
        assert_eq!(agent_lock_key(""), 0x811c_9dc5_u32 as i32);
        assert_eq!(agent_lock_key("agt_1"), agent_lock_key("agt_1"));
        assert_ne!(agent_lock_key("agt_1"), agent_lock_key("agt_2"));
    }
}
