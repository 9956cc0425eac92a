//! The agent's gRPC facade: who may call what (the operator asks for steps and capabilities, a peer
//! agent may only stream a checkpoint), the checks every step request passes, and the dispatch of
//! each step into the operations table, which runs it at most once (see `agent_api::operations`).

use std::{sync::Arc, time::Instant};

use agent_api::{
    Step,
    identity::{self, Caller},
    steps::StepRequest,
    v1::{self, agent_server::Agent as AgentApi},
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agent::{Agent, pod_ip},
    error::{Error, Result},
    store,
};

/// The agent API over an [`Agent`].
#[derive(Debug, Clone)]
pub struct Service {
    agent: Agent,
    /// Checkpoint streams received at once: a peer cannot make this node take more.
    receiving: Arc<tokio::sync::Semaphore>,
}

/// Checkpoint streams one agent receives at once.
pub const MAX_RECEIVING: usize = 8;
/// How long a stream whose sender was checked waits for one of them.
pub const RECEIVE_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Service {
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            receiving: Arc::new(tokio::sync::Semaphore::new(MAX_RECEIVING)),
        }
    }

    /// What every step RPC does: only the operator may ask, the request must be well formed,
    /// then the step runs (or reports its state) through the operations table.
    async fn step<T>(
        &self,
        request: Request<T>,
        wrap: fn(T) -> StepRequest,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let request = wrap(request.into_inner());
        let step = check(&request)?;
        let uid = request.migration_uid().to_string();
        // A transfer to another node (the first target went after the commit) is another step.
        let to = match &request {
            StepRequest::Transfer(t) => t.target_node.clone(),
            _ => String::new(),
        };
        let agent = self.agent.clone();
        let op = self
            .agent
            .operations()
            .run_to(&uid, step, &to, || perform(agent, step, request))
            .await;
        Ok(Response::new(op))
    }
}

/// The step a request asks for, once it passed the checks that need no state.
fn check(request: &StepRequest) -> Result<Step> {
    let uid = request.migration_uid();
    if !store::valid_uid(uid) {
        return Err(Error::Invalid(format!("{uid:?} is not a migration UID")));
    }
    let step = request
        .step()
        .ok_or_else(|| Error::Invalid("role must be source or target".into()))?;
    match request {
        StepRequest::PrepareTarget(v1::PrepareTargetRequest {
            pod, source_node, ..
        }) => {
            check_pod(pod.as_ref())?;
            if source_node.is_empty() {
                return Err(Error::Invalid(
                    "source_node must name the node the checkpoint comes from".into(),
                ));
            }
        }
        StepRequest::Checkpoint(v1::CheckpointRequest { pod, .. }) => check_pod(pod.as_ref())?,
        StepRequest::Transfer(v1::TransferRequest { target_node, .. })
            if target_node.is_empty() =>
        {
            return Err(Error::Invalid(
                "target_node must name the node the checkpoint goes to".into(),
            ));
        }
        _ => {}
    }
    Ok(step)
}

fn check_pod(pod: Option<&v1::PodRef>) -> Result<()> {
    let invalid = |why: String| Err(Error::Invalid(why));
    let Some(pod) = pod else {
        return invalid("the request names no pod".into());
    };
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return invalid("the pod needs a namespace and a name".into());
    }
    if pod.containers.is_empty() {
        return invalid("the pod has no containers".into());
    }
    if let Some(c) = pod.containers.iter().find(|c| !store::valid_name(&c.name)) {
        return invalid(format!("container name {:?} is not a DNS label", c.name));
    }
    pod_ip(&pod.pod_ip).map(drop)
}

/// Runs one step: its span, its log line and its metric, and its result as an operation.
async fn perform(agent: Agent, step: Step, request: StepRequest) -> v1::Operation {
    let uid = request.migration_uid().to_string();
    let span = info_span!("step", migration = %uid, step = step.name());
    async move {
        let started = Instant::now();
        let result = dispatch(agent.clone(), request).await;
        let took = started.elapsed();
        agent.parts.metrics.step(step, result.is_ok(), took);
        match result {
            Ok(op) => {
                info!(took_ms = took.as_millis() as u64, "step succeeded");
                op
            }
            Err(e) => {
                warn!(error = %e, "step failed");
                let mut op = v1::Operation::failed(&uid, e.to_string());
                op.source_resumed = matches!(e, Error::SourceResumed(_));
                op.rxe_outside_block = matches!(e, Error::RxeOutsideBlock(_));
                op
            }
        }
    }
    .instrument(span)
    .await
}

async fn dispatch(agent: Agent, request: StepRequest) -> Result<v1::Operation> {
    let role = |r: &v1::StepRequest| agent_api::Role::from_api(r.role());
    match request {
        StepRequest::PrepareTarget(r) => agent.prepare(r).await,
        StepRequest::Checkpoint(r) => agent.checkpoint(r).await,
        StepRequest::Transfer(r) => agent.transfer(r).await,
        StepRequest::StageRestore(r) => agent.stage_restore(r).await,
        StepRequest::FinishRestore(r) => agent.finish_restore(r.migration_uid).await,
        // Not reached: the Memory RPC answers the state itself, without the operations table (it
        // is a question, asked until the memory is in); here for a complete dispatch.
        StepRequest::Memory(r) => agent.memory(&r.migration_uid),
        StepRequest::Commit(r) => match role(&r) {
            Some(role) => agent.commit(r.migration_uid, role).await,
            None => Err(Error::Invalid("role must be source or target".into())),
        },
        StepRequest::Abort(r) => match role(&r) {
            Some(role) => agent.abort(r.migration_uid, role).await,
            None => Err(Error::Invalid("role must be source or target".into())),
        },
        StepRequest::Cleanup(r) => agent.cleanup(r.migration_uid).await,
        StepRequest::Release(r) => agent.release(r.migration_uid).await,
    }
}

/// The frames of a page stream from this (source) agent.
pub type PageStream = tokio_stream::wrappers::ReceiverStream<Result<v1::PageFrame, Status>>;

#[tonic::async_trait]
impl AgentApi for Service {
    type PagesStream = PageStream;

    async fn pages(
        &self,
        request: Request<Streaming<v1::PageFrame>>,
    ) -> Result<Response<PageStream>, Status> {
        // Only an agent, and only the one of the node the checkpoint went to.
        let peer = identity::agent_node(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the page stream named no migration"))?;
        if !store::valid_uid(&first.migration_uid) || !store::valid_name(&first.container) {
            return Err(Status::invalid_argument(
                "the page stream's first frame must name a migration and a container",
            ));
        }
        let (server, limit) = self
            .agent
            .page_server(&peer, &first.migration_uid, &first.container)
            .map_err(|e| match e {
                Error::Invalid(why) => Status::permission_denied(why),
                e => e.status(),
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (uid, container) = (first.migration_uid.clone(), first.container.clone());
        info!(migration = %uid, %container, %peer, "serving pages");
        tokio::spawn(async move {
            if let Err(e) = crate::post_copy::serve(server, first, inbound, tx, limit).await {
                warn!(migration = %uid, %container, error = %e, "the page stream failed");
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn memory(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let uid = request.into_inner().migration_uid;
        if !store::valid_uid(&uid) {
            return Err(Status::invalid_argument(format!(
                "{uid:?} is not a migration UID"
            )));
        }
        Ok(Response::new(self.agent.memory(&uid)?))
    }
    async fn capabilities(
        &self,
        request: Request<v1::CapabilitiesRequest>,
    ) -> Result<Response<v1::NodeCapabilities>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let capabilities = self
            .agent
            .capabilities()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(capabilities))
    }

    async fn receive(
        &self,
        request: Request<Streaming<v1::ReceiveChunk>>,
    ) -> Result<Response<v1::ReceiveResult>, Status> {
        // Only an agent, and only the one of the node the migration's checkpoint comes from
        // (checked against the PrepareTarget request once the stream names its migration).
        let peer = identity::agent_node(&request)?;
        let started = Instant::now();
        match self
            .agent
            .receive(&peer, &self.receiving, request.into_inner())
            .await
        {
            Ok(got) => {
                if got.before {
                    info!(migration = %got.uid, "checkpoint received before: the stream's data is not taken");
                } else {
                    info!(migration = %got.uid, bytes = got.bytes, took_ms = started.elapsed().as_millis() as u64, "checkpoint received and staged");
                }
                Ok(Response::new(v1::ReceiveResult {
                    bytes: got.bytes,
                    archives: got.archives,
                    stream_ms: got.stream.as_millis() as u64,
                    received_before: got.before,
                }))
            }
            Err(e) => {
                warn!(error = %e, "checkpoint refused");
                Err(e.status())
            }
        }
    }

    async fn prepare_target(
        &self,
        r: Request<v1::PrepareTargetRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::PrepareTarget).await
    }

    async fn checkpoint(
        &self,
        r: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Checkpoint).await
    }

    async fn transfer(
        &self,
        r: Request<v1::TransferRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Transfer).await
    }

    async fn stage_restore(
        &self,
        r: Request<v1::StageRestoreRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::StageRestore).await
    }

    async fn finish_restore(
        &self,
        r: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::FinishRestore).await
    }

    async fn commit(&self, r: Request<v1::StepRequest>) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Commit).await
    }

    async fn abort(&self, r: Request<v1::StepRequest>) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Abort).await
    }

    async fn cleanup(
        &self,
        r: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Cleanup).await
    }

    async fn release(
        &self,
        r: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Release).await
    }
}
