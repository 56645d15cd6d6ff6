use crate::service::convert::models_to_pb;
use crate::state::ControlState;
use crate::storage::now_ms;
use aex_proto::v1::{self as pb, model_service_server::ModelService};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tonic::{Request, Response, Status};

pub struct ModelsApi {
    state: Arc<ControlState>,
    loaded_at_ms: AtomicI64,
}

impl ModelsApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self {
            state,
            loaded_at_ms: AtomicI64::new(now_ms()),
        }
    }
}

#[tonic::async_trait]
impl ModelService for ModelsApi {
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ModelConfig>, Status> {
        let models = self.state.models();
        Ok(Response::new(models_to_pb(
            &models,
            self.loaded_at_ms.load(Ordering::Relaxed),
        )))
    }

    async fn reload_models(
        &self,
        _: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ModelConfig>, Status> {
        let models = self.state.reload_models()?;
        let now = now_ms();
        self.loaded_at_ms.store(now, Ordering::Relaxed);
        Ok(Response::new(models_to_pb(&models, now)))
    }
}
