use crate::service::convert::event_to_pb;
use crate::state::ControlState;
use crate::storage::EventFilter;
use aex_proto::v1::{self as pb, ledger_service_server::LedgerService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct LedgerApi {
    state: Arc<ControlState>,
}

impl LedgerApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl LedgerService for LedgerApi {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = request.into_inner();
        let events = self
            .state
            .store
            .list_events(EventFilter {
                agent_name: Some(r.agent_name).filter(|n| !n.is_empty()),
                after_seq: r.after_seq,
                since_ms: r.since_ms,
                limit: r.limit,
            })
            .await
            .map_err(crate::error::Error::from)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
        }))
    }
}
