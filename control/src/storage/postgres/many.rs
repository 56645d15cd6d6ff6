//! Many operations as one job of the writer: a data plane's report carries
//! up to a thousand calls, and as a job each (with its task and its answer)
//! they cost the control plane more than the writes themselves.
//!
//! Optimistic, like the batch they join (`writer::commit_batch`): no
//! savepoint per operation (two round trips each). One that fails takes its
//! job out of the batch, rolled back; it is answered with its error, and the
//! others are sent again as a job. Failures are rare (a reused id, a
//! settlement naming another agent), so a report almost always commits in
//! one pass.

use super::writer::{Chain, LedgerWriter, Operation, Owner};
use crate::in_order::InOrder;
use crate::storage::{StoreError, each_or_all};
use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The operations at `run` of `ops`, in order; `failed_at` tells the sender
/// which of them failed (its position in `run`), `usize::MAX` for none.
struct Many<O> {
    ops: Arc<Vec<O>>,
    run: Vec<usize>,
    failed_at: Arc<AtomicUsize>,
}

#[async_trait]
impl<O: Operation> Operation for Many<O> {
    type Output = Vec<O::Output>;

    fn owners(&self) -> Vec<Owner> {
        self.run
            .iter()
            .flat_map(|&i| self.ops[i].owners())
            .collect()
    }

    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<Vec<O::Output>, StoreError> {
        // Run again when another job of the batch failed: start clean.
        self.failed_at.store(usize::MAX, Ordering::Relaxed);
        let mut done = Vec::with_capacity(self.run.len());
        for (at, &i) in self.run.iter().enumerate() {
            match self.ops[i].run(conn, chain).await {
                Ok(output) => done.push(output),
                Err(e) => {
                    self.failed_at.store(at, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(done)
    }
}

impl LedgerWriter {
    /// Runs every one of `ops` in order, committed together, each answered
    /// with its own result.
    pub(super) async fn write_many<O: Operation>(
        &self,
        ops: Vec<O>,
    ) -> Vec<Result<O::Output, StoreError>> {
        let ops = Arc::new(ops);
        let mut results = InOrder::new(ops.len());
        let mut left: Vec<usize> = (0..ops.len()).collect();
        while !left.is_empty() {
            let failed_at = Arc::new(AtomicUsize::new(usize::MAX));
            let job = Many {
                ops: ops.clone(),
                run: left.clone(),
                failed_at: failed_at.clone(),
            };
            let done = self.write(job).await;
            match (done, failed_at.load(Ordering::Relaxed)) {
                (Ok(outputs), _) => {
                    for (i, output) in left.drain(..).zip(outputs) {
                        results.put(i, Ok(output));
                    }
                }
                (Err(e), at) if at < left.len() => {
                    let i = left.remove(at);
                    results.put(i, Err(e));
                }
                // The job failed as a whole (its commit, the writer gone).
                (Err(e), _) => {
                    let each = each_or_all(Err(e), left.len());
                    for (i, result) in left.drain(..).zip(each) {
                        results.put(i, result);
                    }
                }
            }
        }
        results.done()
    }
}
