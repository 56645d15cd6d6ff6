use crate::service::convert::models_to_pb;
use crate::state::ControlState;
use aex_proto::v1::{self as pb, model_service_server::ModelService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ModelsApi {
    state: Arc<ControlState>,
}

impl ModelsApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
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
            self.state.models_loaded_at_ms(),
        )))
    }

    async fn reload_models(
        &self,
        _: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ModelConfig>, Status> {
        let models = self.state.reload_models()?;
        // Every other control plane on the database reloads its own file.
        if let Err(e) = self.state.store.announce_models_reloaded().await {
            return Err(Status::unavailable(format!(
                "models.yaml was reloaded on this control plane, but the others could not be told ({e}); \
                 run `aexctl models reload` against each of them"
            )));
        }
        Ok(Response::new(models_to_pb(
            &models,
            self.state.models_loaded_at_ms(),
        )))
    }
}
