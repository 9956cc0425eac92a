//! A scriptable node agent for testing the operator before (and beside) the real agent: it serves
//! the real agent API over real gRPC with mutual TLS and announces itself with the real Lease, but
//! each step answers what the test scripted (succeed, fail, hold until released, or crash) and every
//! call and every execution is counted, so tests can tell the work was done once.

// Test support: a failed set-up step fails the test that asked for it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_api::{
    identity::{self, Caller},
    tls::TlsMaterial,
    v1::{
        self,
        agent_server::{Agent, AgentServer},
    },
};
use kube::Client;
use node_agent::announce::Announcement;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// The steps of the agent API that a test scripts, one per operation RPC and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    PrepareTarget,
    Checkpoint,
    Transfer,
    StageRestore,
    FinishRestore,
    CommitSource,
    CommitTarget,
    AbortSource,
    AbortTarget,
    CleanupSource,
    CleanupTarget,
    /// A peer agent streamed a checkpoint here.
    Receive,
}

/// Bytes the test agent "checkpoints" and streams to the target agent.
pub const ARCHIVE_BYTES: u64 = 4096;
/// Chunks of a transfer; one is sent every [`CHUNK_INTERVAL`], so a transfer takes about a second.
const CHUNKS: u64 = 16;
const CHUNK_INTERVAL: Duration = Duration::from_millis(60);

/// What a step does when first asked.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Succeed,
    /// Fail the next `times` executions with this message, then succeed.
    Fail {
        message: String,
        times: u32,
    },
    /// Answer RUNNING until [`TestAgent::release`] is called for the step.
    Hold,
    /// Stop serving (connections are refused) when the step is asked.
    Crash,
}

/// Calls and executions of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Requests received.
    pub calls: u32,
    /// Times the work was started.
    pub executions: u32,
}

#[derive(Debug, Default)]
struct State {
    /// Set by a crash: every request fails from then on, streams in flight included.
    crashed: bool,
    /// Reported in the capabilities: whether the node has rxe.
    no_rxe: bool,
    /// Migrations whose checkpoint was streamed (or is being streamed) to the target.
    sent: std::collections::HashSet<String>,
    script: HashMap<Step, Behaviour>,
    counts: HashMap<Step, Count>,
    /// Remembered operations by (migration, step): running or succeeded.
    operations: HashMap<(String, Step), v1::Operation>,
    released: HashMap<Step, bool>,
}

#[derive(Debug, Clone)]
struct Service {
    node: String,
    state: Arc<Mutex<State>>,
    crash: Arc<Notify>,
    /// Used to dial the target agent, as a real agent does.
    tls: TlsMaterial,
}

/// A running test agent for one node.
#[derive(Debug)]
pub struct TestAgent {
    pub node: String,
    pub endpoint: SocketAddr,
    state: Arc<Mutex<State>>,
    crash: Arc<Notify>,
    server: JoinHandle<()>,
    announcer: JoinHandle<()>,
}

impl TestAgent {
    /// Serves on a free loopback port with `tls` and announces itself in `namespace`.
    pub async fn start(client: Client, namespace: &str, node: &str, tls: &TlsMaterial) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let endpoint = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State::default()));
        let crash = Arc::new(Notify::new());
        let service = Service {
            node: node.into(),
            state: state.clone(),
            crash: crash.clone(),
            tls: tls.clone(),
        };
        let server = tonic::transport::Server::builder()
            .tls_config(tls.server())
            .expect("server TLS configuration")
            .add_service(AgentServer::new(service));
        let stop = crash.clone();
        let server = tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            let _ = server
                .serve_with_incoming_shutdown(incoming, stop.notified())
                .await;
        });
        let announcement = Announcement {
            namespace: namespace.into(),
            node: node.into(),
            endpoint: endpoint.to_string(),
            lease: Duration::from_secs(6),
            pod: None,
        };
        announcement
            .renew(&client)
            .await
            .expect("announce the test agent");
        let announcer = tokio::spawn(async move { announcement.keep(client).await });
        Self {
            node: node.into(),
            endpoint,
            state,
            crash,
            server,
            announcer,
        }
    }

    /// Scripts what `step` does from now on.
    pub fn script(&self, step: Step, behaviour: Behaviour) {
        self.with(|s| {
            s.script.insert(step, behaviour);
            s.released.remove(&step);
        });
    }

    /// Lets a held step succeed.
    pub fn release(&self, step: Step) {
        self.with(|s| {
            s.released.insert(step, true);
        });
    }

    /// Makes the agent report a node without an rxe device.
    pub fn without_rxe(&self) {
        self.with(|s| s.no_rxe = true);
    }

    pub fn count(&self, step: Step) -> Count {
        self.with(|s| s.counts.get(&step).copied().unwrap_or_default())
    }

    /// Stops serving (requests in flight fail, new connections are refused) and stops renewing
    /// the Lease, as a crashed agent would.
    pub fn crash(&self) {
        self.with(|s| s.crashed = true);
        self.crash.notify_waiters();
        self.crash.notify_one();
        self.announcer.abort();
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().expect("test agent state");
        f(&mut state)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.server.abort();
        self.announcer.abort();
    }
}

impl Service {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, Status> {
        let state = self
            .state
            .lock()
            .map_err(|_| Status::internal("state poisoned"))?;
        if state.crashed {
            return Err(Status::unavailable(format!(
                "agent on {} crashed",
                self.node
            )));
        }
        Ok(state)
    }

    fn operate(&self, uid: &str, step: Step) -> Result<v1::Operation, Status> {
        let mut state = self.lock()?;
        let key = (uid.to_string(), step);
        state.counts.entry(step).or_default().calls += 1;
        let behaviour = state
            .script
            .get(&step)
            .cloned()
            .unwrap_or(Behaviour::Succeed);
        if let Some(op) = state.operations.get(&key).cloned() {
            // A failure is reported once and forgotten: asking again tries again.
            if op.state() == v1::State::Failed {
                state.operations.remove(&key);
                return Ok(op);
            }
            // Asked again: report the remembered operation, finishing a released hold.
            if op.state() == v1::State::Running
                && state.released.get(&step).copied().unwrap_or(false)
            {
                let done = succeeded(uid, step);
                state.operations.insert(key, done.clone());
                return Ok(done);
            }
            return Ok(op);
        }
        state.counts.entry(step).or_default().executions += 1;
        let op = match behaviour {
            Behaviour::Succeed => succeeded(uid, step),
            Behaviour::Fail { message, times } => {
                if times > 1 {
                    state.script.insert(
                        step,
                        Behaviour::Fail {
                            message: message.clone(),
                            times: times - 1,
                        },
                    );
                } else {
                    state.script.insert(step, Behaviour::Succeed);
                }
                // A failure is reported, not remembered: asking again tries again.
                return Ok(v1::Operation::failed(uid, message));
            }
            Behaviour::Hold if state.released.get(&step).copied().unwrap_or(false) => {
                succeeded(uid, step)
            }
            Behaviour::Hold => {
                let mut op = v1::Operation::running(uid);
                op.bytes_done = 1;
                op.bytes_total = 4;
                op
            }
            Behaviour::Crash => {
                state.crashed = true;
                self.crash.notify_waiters();
                self.crash.notify_one();
                return Err(Status::unavailable(format!(
                    "agent on {} crashed",
                    self.node
                )));
            }
        };
        state.operations.insert(key, op.clone());
        Ok(op)
    }

    fn step(
        &self,
        request: Request<v1::StepRequest>,
        source: Step,
        target: Step,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let r = request.into_inner();
        let step = if r.role() == v1::Role::Source {
            source
        } else {
            target
        };
        self.operate(&r.migration_uid, step).map(Response::new)
    }
}

impl Service {
    fn remember(&self, uid: &str, step: Step, op: v1::Operation) {
        if let Ok(mut state) = self.state.lock() {
            state.operations.insert((uid.to_string(), step), op);
        }
    }

    /// Streams [`ARCHIVE_BYTES`] in chunks to the agent at `endpoint`, recording progress and the
    /// outcome as the Transfer operation of `uid`.
    async fn send(self, uid: String, endpoint: String) {
        let progress = self.clone();
        let progress_uid = uid.clone();
        let chunk = ARCHIVE_BYTES / CHUNKS;
        let chunks = tokio_stream::StreamExt::then(tokio_stream::iter(0..CHUNKS), move |i| {
            let (service, uid) = (progress.clone(), progress_uid.clone());
            async move {
                tokio::time::sleep(CHUNK_INTERVAL).await;
                let mut running = v1::Operation::running(&uid);
                running.bytes_done = i * chunk;
                running.bytes_total = ARCHIVE_BYTES;
                service.remember(&uid, Step::Transfer, running);
                v1::ReceiveChunk {
                    migration_uid: uid,
                    container: "app".into(),
                    offset: i * chunk,
                    data: vec![0u8; usize::try_from(chunk).unwrap_or(0)],
                    ..Default::default()
                }
            }
        });
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{endpoint}"))
                .map_err(|e| e.to_string())?
                .tls_config(self.tls.client())
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("connecting to the target agent {endpoint}: {e}"))?;
            v1::agent_client::AgentClient::new(channel)
                .receive(chunks)
                .await
                .map_err(|s| format!("streaming to the target agent: {}", s.message()))
        }
        .await;
        let op = match result {
            Ok(received) if received.get_ref().bytes == ARCHIVE_BYTES => {
                self.remember(&uid, Step::Transfer, succeeded(&uid, Step::Transfer));
                return;
            }
            Ok(received) => v1::Operation::failed(
                &uid,
                format!(
                    "the target received {} of {ARCHIVE_BYTES} bytes",
                    received.get_ref().bytes
                ),
            ),
            Err(message) => v1::Operation::failed(&uid, message),
        };
        // A failed transfer may be asked for again, and then streams again.
        if let Ok(mut state) = self.state.lock() {
            state.sent.remove(&uid);
        }
        self.remember(&uid, Step::Transfer, op);
    }
}

fn succeeded(uid: &str, step: Step) -> v1::Operation {
    let mut op = v1::Operation::succeeded(uid);
    op.duration_ms = 25;
    match step {
        Step::Checkpoint => {
            op.archives = vec![v1::ContainerArchive {
                name: "app".into(),
                bytes: ARCHIVE_BYTES,
                digest: "sha256:test".into(),
            }];
            op.bytes_done = ARCHIVE_BYTES;
            op.bytes_total = ARCHIVE_BYTES;
        }
        Step::Transfer => {
            op.bytes_done = ARCHIVE_BYTES;
            op.bytes_total = ARCHIVE_BYTES;
            op.location = format!("/var/lib/kube-migros/checkpoints/{uid}");
        }
        Step::StageRestore => {
            op.staged = vec![v1::StagedContainer {
                name: "app".into(),
                image: format!("localhost/checkpoint/{uid}/app"),
            }];
        }
        _ => {}
    }
    op
}

#[tonic::async_trait]
impl Agent for Service {
    async fn capabilities(
        &self,
        request: Request<v1::CapabilitiesRequest>,
    ) -> Result<Response<v1::NodeCapabilities>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let rxe_present = !self.lock()?.no_rxe;
        Ok(Response::new(v1::NodeCapabilities {
            node_name: self.node.clone(),
            runtime_name: "test".into(),
            runtime_version: "0".into(),
            criu_version: "0".into(),
            rxe_present,
            free_bytes: 1 << 40,
            restore_backends: vec!["cri-checkpoint-image".into()],
        }))
    }

    async fn prepare_target(
        &self,
        request: Request<v1::PrepareTargetRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        self.operate(&request.into_inner().migration_uid, Step::PrepareTarget)
            .map(Response::new)
    }

    async fn checkpoint(
        &self,
        request: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        self.operate(&request.into_inner().migration_uid, Step::Checkpoint)
            .map(Response::new)
    }

    async fn transfer(
        &self,
        request: Request<v1::TransferRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let r = request.into_inner();
        let op = self.operate(&r.migration_uid, Step::Transfer)?;
        // A transfer the script lets succeed is really streamed to the target agent, once.
        if op.state() == v1::State::Succeeded && self.lock()?.sent.insert(r.migration_uid.clone()) {
            let mut running = v1::Operation::running(&r.migration_uid);
            running.bytes_total = ARCHIVE_BYTES;
            self.remember(&r.migration_uid, Step::Transfer, running.clone());
            tokio::spawn(self.clone().send(r.migration_uid, r.target_endpoint));
            return Ok(Response::new(running));
        }
        Ok(Response::new(op))
    }

    async fn receive(
        &self,
        request: Request<Streaming<v1::ReceiveChunk>>,
    ) -> Result<Response<v1::ReceiveResult>, Status> {
        identity::require(&request, &[Caller::Agent])?;
        {
            let mut state = self.lock()?;
            let count = state.counts.entry(Step::Receive).or_default();
            count.calls += 1;
            count.executions += 1;
        }
        let mut stream = request.into_inner();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await? {
            // A crashed agent stops taking data in the middle of a stream.
            drop(self.lock()?);
            bytes += chunk.data.len() as u64;
        }
        Ok(Response::new(v1::ReceiveResult {
            bytes,
            archives: Vec::new(),
        }))
    }

    async fn stage_restore(
        &self,
        request: Request<v1::StageRestoreRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        self.operate(&request.into_inner().migration_uid, Step::StageRestore)
            .map(Response::new)
    }

    async fn finish_restore(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(request, Step::FinishRestore, Step::FinishRestore)
    }

    async fn commit(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(request, Step::CommitSource, Step::CommitTarget)
    }

    async fn abort(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(request, Step::AbortSource, Step::AbortTarget)
    }

    async fn cleanup(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step(request, Step::CleanupSource, Step::CleanupTarget)
    }
}
