//! The typed client of an agent: one call per [`Step`], whatever RPC carries it, plus the node's
//! capabilities. The operator drives migrations with it and the runtime tests drive real agents
//! with it; a peer agent streams checkpoints through [`Client::raw`].

use tonic::{Status, transport::Channel};

use crate::{
    steps::{Step, StepArgs, StepRequest},
    v1::{self, agent_client::AgentClient},
};

/// Largest message a client takes from an agent or sends to one (a checkpoint chunk is 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// HTTP/2 flow-control window of one stream between agents (and the operator): a few chunks of
/// a checkpoint in flight, so that the link, not the window, sets the pace.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window of one connection.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Client {
    inner: AgentClient<Channel>,
}

impl Client {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: AgentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Asks for `step` of the migration in `args`.
    pub async fn step(&mut self, step: Step, args: &StepArgs) -> Result<v1::Operation, Status> {
        self.send(args.request(step)).await
    }

    /// Sends a step request as it is (tests send malformed ones on purpose).
    pub async fn send(&mut self, request: StepRequest) -> Result<v1::Operation, Status> {
        let c = &mut self.inner;
        let response = match request {
            StepRequest::PrepareTarget(r) => c.prepare_target(r).await,
            StepRequest::Checkpoint(r) => c.checkpoint(r).await,
            StepRequest::Transfer(r) => c.transfer(r).await,
            StepRequest::StageRestore(r) => c.stage_restore(r).await,
            StepRequest::FinishRestore(r) => c.finish_restore(r).await,
            StepRequest::Memory(r) => c.memory(r).await,
            StepRequest::Commit(r) => c.commit(r).await,
            StepRequest::Abort(r) => c.abort(r).await,
            StepRequest::Cleanup(r) => c.cleanup(r).await,
            StepRequest::Release(r) => c.release(r).await,
        }?;
        Ok(response.into_inner())
    }

    /// What the agent reports about its node.
    pub async fn capabilities(&mut self) -> Result<v1::NodeCapabilities, Status> {
        Ok(self
            .inner
            .capabilities(v1::CapabilitiesRequest {})
            .await?
            .into_inner())
    }

    /// The generated client, for the checkpoint stream (`Receive`).
    pub fn raw(&mut self) -> &mut AgentClient<Channel> {
        &mut self.inner
    }
}
