//! What every batched RPC (`AdmitBatch`, `SettleBatch`, `Report`) shares:
//! the bound on its items, and how one item's error is told apart from the
//! others' answers.

use crate::state::ControlState;
use aex_proto::v1 as pb;
use std::sync::Arc;
use tonic::Status;

pub(super) const MAX_BATCH_ITEMS: usize = 1024;

pub(super) fn check_batch_size(items: usize, rpc: &str) -> Result<(), Status> {
    if items > MAX_BATCH_ITEMS {
        return Err(Status::invalid_argument(format!(
            "{items} items in one call; send at most {MAX_BATCH_ITEMS} per {rpc}"
        )));
    }
    Ok(())
}

/// Runs `one` on every item at once, so the ledger writer commits their
/// writes together, and returns the results in the items' order.
pub(super) async fn each_at_once<I, O, F, Fut>(
    state: &Arc<ControlState>,
    items: Vec<I>,
    one: F,
) -> Result<Vec<Result<O, Status>>, Status>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Arc<ControlState>, I) -> Fut,
    Fut: std::future::Future<Output = Result<O, Status>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let done = one(state.clone(), item);
        running.spawn(async move { (i, done.await) });
    }
    let mut results: Vec<Option<Result<O, Status>>> = (0..running.len()).map(|_| None).collect();
    while let Some(done) = running.join_next().await {
        let (i, result) =
            done.map_err(|e| Status::internal(format!("a batch item's task failed: {e}")))?;
        results[i] = Some(result);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every task answered"))
        .collect())
}

pub(super) fn item_error(status: &Status) -> pb::ItemError {
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}
