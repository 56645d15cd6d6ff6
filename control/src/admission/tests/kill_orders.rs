//! Kill orders found on processes' rows (given through any control plane
//! on the store) reach the supervisor of that process only, once per
//! control plane: a row left running with an old order must not kill the
//! agent's later processes.

use crate::admission::engine::AdmissionEngine;
use crate::storage::testing::conformance::{new_agent, process};
use crate::storage::testing::memory::MemoryStore;
use crate::storage::{ProcessState, Store};
use std::sync::Arc;

#[tokio::test]
async fn an_order_on_a_row_reaches_that_process_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(vec![3; 32]));
    let agent = store.create_agent(new_agent("runner", "h")).await.unwrap();
    let admission = AdmissionEngine::load(store.clone(), 60_000).await.unwrap();
    let mut orders = admission.kill_orders();
    // An old process, ordered killed through another control plane, whose
    // row stayed running; then a new one.
    store
        .start_process(process(&agent, "proc_old", "t_old"))
        .await
        .unwrap();
    store
        .request_kill(&agent.id, "budget exhausted")
        .await
        .unwrap();
    store
        .start_process(process(&agent, "proc_new", "t_new"))
        .await
        .unwrap();
    admission.refresh_agent(&agent.id).await.unwrap();
    admission.refresh_agent(&agent.id).await.unwrap();
    admission
        .refresh_agent(crate::storage::EVERY_AGENT)
        .await
        .unwrap();
    let order = orders.try_recv().expect("the order on the old row");
    assert_eq!(order.process_id.as_deref(), Some("proc_old"));
    assert_eq!(order.reason, "budget exhausted");
    assert!(
        orders.try_recv().is_err(),
        "passed on once, for that process only"
    );
    // Both rows' tokens sign in here, as they would on any replica.
    assert!(admission.authenticate_only("t_new").is_ok());
    assert!(admission.authenticate_only("t_old").is_ok());
    // Ended: its token no longer does.
    store
        .end_process(
            "proc_old",
            ProcessState::Killed,
            None,
            "killed",
            crate::clock::now_ms(),
        )
        .await
        .unwrap();
    admission.refresh_agent(&agent.id).await.unwrap();
    assert!(admission.authenticate_only("t_old").is_err());
}
