//! Supervised processes (`aexctl run`): each gets its own token for as long
//! as it runs, and its supervisor is told when to kill it.

use crate::clock::now_ms;
use crate::error::Error;
use crate::service::convert::agent_to_pb;
use crate::state::ControlState;
use crate::storage::{AgentState, ProcessRecord, ProcessState, StoreError};
use aex_core::secrets::{new_agent_token, new_id, token_sha256};
use aex_proto::v1::{self as pb, process_service_server::ProcessService};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct ProcessesApi {
    state: Arc<ControlState>,
}

impl ProcessesApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

pub fn process_to_pb(p: &ProcessRecord) -> pb::ProcessRecord {
    pb::ProcessRecord {
        process_id: p.id.clone(),
        agent_name: p.agent_name.clone(),
        pid: p.pid,
        command: p.command.clone(),
        host: p.host.clone(),
        state: match p.state() {
            Some(ProcessState::Running) => pb::ProcessState::Running,
            Some(ProcessState::Killed) => pb::ProcessState::Killed,
            Some(ProcessState::Lost) => pb::ProcessState::Lost,
            Some(ProcessState::Exited) | None => pb::ProcessState::Exited,
        } as i32,
        started_at_ms: p.started_at_ms,
        ended_at_ms: p.ended_at_ms,
        exit_code: p.exit_code,
        reason: p.reason.clone(),
    }
}

type OrderStream = Pin<Box<dyn Stream<Item = Result<pb::ProcessOrder, Status>> + Send>>;

/// Ends a process and revokes its token.
async fn end(
    state: &ControlState,
    id: &str,
    how: ProcessState,
    code: Option<i32>,
    reason: &str,
) -> Result<Option<ProcessRecord>, Error> {
    let ended = state
        .store
        .end_process(id, how, code, reason, now_ms())
        .await?;
    if let Some(p) = &ended {
        state.admission.revoke_process_token(&p.token_sha256);
    }
    Ok(ended)
}

#[tonic::async_trait]
impl ProcessService for ProcessesApi {
    async fn start_process(
        &self,
        request: Request<pb::StartProcessRequest>,
    ) -> Result<Response<pb::ProcessStarted>, Status> {
        let r = request.into_inner();
        let agent = self
            .state
            .store
            .agent_by_name(&r.agent_name)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::from(StoreError::AgentNotFound(r.agent_name.clone())))?;
        if agent.state != AgentState::Active {
            return Err(Status::failed_precondition(format!(
                "agent '{}' is paused; resume it with `aexctl agent resume {}` before running it",
                agent.name, agent.name
            )));
        }
        let token = new_agent_token();
        let process = ProcessRecord {
            id: new_id("proc"),
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            token_sha256: token_sha256(&token),
            pid: r.pid,
            command: r.command.chars().take(500).collect(),
            host: r.host,
            state: ProcessState::Running.as_str().into(),
            started_at_ms: now_ms(),
            ended_at_ms: None,
            exit_code: None,
            reason: String::new(),
            kill_reason: None,
        };
        let process = self
            .state
            .store
            .start_process(process)
            .await
            .map_err(Error::from)?;
        self.state
            .admission
            .add_process_token(&process.token_sha256, &agent.id);
        Ok(Response::new(pb::ProcessStarted {
            process_id: process.id,
            token,
            agent: Some(agent_to_pb(&agent)),
        }))
    }

    type SuperviseProcessStream = OrderStream;

    async fn supervise_process(
        &self,
        request: Request<pb::ProcessRef>,
    ) -> Result<Response<Self::SuperviseProcessStream>, Status> {
        let r = request.into_inner();
        // Subscribe before reading the row: an order given in between is
        // then either on the row or on the channel.
        let mut orders = self.state.admission.kill_orders();
        let process = self
            .state
            .store
            .list_processes(false)
            .await
            .map_err(Error::from)?
            .into_iter()
            .find(|p| p.id == r.process_id)
            .ok_or_else(|| Status::not_found(format!("no running process {}", r.process_id)))?;
        if r.pid != 0 && r.pid != process.pid {
            self.state
                .store
                .set_process_pid(&process.id, r.pid)
                .await
                .map_err(Error::from)?;
        }
        let (tx, rx) = mpsc::channel(4);
        if let Some(reason) = process.kill_reason.clone() {
            let _ = tx.send(Ok(pb::ProcessOrder { kill: true, reason })).await;
        }
        // Already nothing left to spend: no point letting it start.
        if self
            .state
            .admission
            .exhausted(&process.agent_name)
            .await
            .map_err(Status::from)?
        {
            let _ = tx
                .send(Ok(pb::ProcessOrder {
                    kill: true,
                    reason: "budget exhausted".into(),
                }))
                .await;
        }
        let state = self.state.clone();
        let stopping = ControlState::stopping(state.shutting_down.subscribe());
        tokio::spawn(async move {
            tokio::pin!(stopping);
            loop {
                tokio::select! {
                    // The control plane is stopping: the supervisor reconnects
                    // to the next one; the process is not lost.
                    _ = &mut stopping => return,
                    _ = tx.closed() => {
                        // The supervisor went away without reporting an exit.
                        if let Err(e) = end(&state, &process.id, ProcessState::Lost, None, "supervisor disconnected").await {
                            tracing::error!(error = %e, "could not mark a process lost");
                        }
                        return;
                    }
                    order = orders.recv() => match order {
                        Ok(o) if o.agent_id == process.agent_id
                            && o.process_id.as_ref().is_none_or(|id| id == &process.id) => {
                            let order = pb::ProcessOrder { kill: true, reason: o.reason };
                            if tx.send(Ok(order)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn process_exited(
        &self,
        request: Request<pb::ProcessExit>,
    ) -> Result<Response<pb::ProcessRecord>, Status> {
        let r = request.into_inner();
        let how = if r.killed {
            ProcessState::Killed
        } else {
            ProcessState::Exited
        };
        let ended = end(
            &self.state,
            &r.process_id,
            how,
            Some(r.exit_code),
            &r.reason,
        )
        .await?;
        match ended {
            Some(p) => Ok(Response::new(process_to_pb(&p))),
            None => Err(Status::not_found(format!(
                "no running process {}",
                r.process_id
            ))),
        }
    }

    async fn list_processes(
        &self,
        request: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let all = request.into_inner().include_ended;
        let processes = self
            .state
            .store
            .list_processes(all)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListProcessesResponse {
            processes: processes.iter().map(process_to_pb).collect(),
        }))
    }
}
