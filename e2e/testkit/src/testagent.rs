//! A scriptable node agent for testing the operator: it serves the real agent API over real gRPC
//! with mutual TLS, announces itself with the real agent Lease and keeps the real operations table
//! (`agent_api::operations`, the same rule as the node agent: a step runs once, a failure is
//! reported once), but each step does what the test scripted (succeed, fail, hold until released,
//! or crash) and every call and every execution is counted, so tests can tell the work was done
//! once. A transfer the script lets succeed really streams bytes to the target agent.

// Test support: a failed set-up step fails the test that asked for it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_api::{
    Step,
    client::Client as AgentClient,
    identity::{self, Caller},
    operations::Operations,
    steps::StepRequest,
    tls::{Served, TlsMaterial},
    v1::{self, agent_server::AgentServer},
};
use kube::Client;
use node_agent::lease::AgentLease;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming};

/// What a test scripts: a step of the agent API, or a peer streaming a checkpoint here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scripted {
    Step(Step),
    /// A peer agent streamed a checkpoint here.
    Receive,
}

impl From<Step> for Scripted {
    fn from(step: Step) -> Self {
        Scripted::Step(step)
    }
}

/// Bytes the test agent "checkpoints" and streams to the target agent.
pub const ARCHIVE_BYTES: u64 = 4096;
/// Chunks of a transfer; one is sent every [`CHUNK_INTERVAL`] (unless the test says otherwise:
/// [`TestAgent::with_chunk_interval`]), so a transfer takes about a second.
const CHUNKS: u64 = 16;
const CHUNK_INTERVAL: Duration = Duration::from_millis(60);
/// Steps that end within this answer their result; held ones answer RUNNING after it.
const QUICK_ANSWER: Duration = Duration::from_millis(100);
/// How long the test agent's checkpoint takes (the operator records what the agent measured).
pub const CHECKPOINT_TIME: Duration = Duration::from_millis(25);
/// Post-copy: the memory a test agent's restored pod fetches from its source.
pub const MEMORY_BYTES: u64 = 1 << 20;

/// What a step does when first asked.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Succeed,
    /// Fail the next `times` executions with this message, then succeed.
    Fail {
        message: String,
        times: u32,
    },
    /// Run (answering RUNNING) until [`TestAgent::release`] is called for the step.
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
    /// Reported in the capabilities: the restore backends (`None`: the checkpoint-image one).
    backends: Option<Vec<String>>,
    /// Reported in the capabilities: what the node offers the strategies beyond stop-and-copy.
    strategies: Vec<v1::StrategyRequirements>,
    /// Time between two chunks of a transfer this agent sends (`None`: [`CHUNK_INTERVAL`]).
    chunk_interval: Option<Duration>,
    script: HashMap<Scripted, Behaviour>,
    counts: HashMap<Scripted, Count>,
    released: HashMap<Step, bool>,
    /// The restore backend each migration was prepared with (it decides what staging answers).
    prepared: HashMap<String, String>,
    /// The source node each migration was prepared with: only its agent may stream to this one.
    sources: HashMap<String, String>,
    /// The steps asked for with post-copy (a lazy checkpoint; a restore fetching its memory).
    post_copy: Vec<Step>,
}

#[derive(Debug, Clone)]
struct Service {
    node: String,
    state: Arc<Mutex<State>>,
    operations: Arc<Operations>,
    /// Wakes held steps when one is released, and stops the server on a crash.
    released: Arc<Notify>,
    crash: Arc<Notify>,
    /// Used to dial the target agent, as a real agent does.
    tls: TlsMaterial,
}

/// A running test agent for one node.
#[derive(Debug)]
pub struct TestAgent {
    pub node: String,
    pub endpoint: SocketAddr,
    service: Service,
    server: JoinHandle<()>,
    lease: JoinHandle<()>,
}

impl TestAgent {
    /// Serves on a free loopback port with `tls` and announces itself in `namespace`.
    pub async fn start(client: Client, namespace: &str, node: &str, tls: &TlsMaterial) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let endpoint = listener.local_addr().expect("local address");
        let service = Service {
            node: node.into(),
            state: Arc::default(),
            operations: Operations::new(QUICK_ANSWER),
            released: Arc::default(),
            crash: Arc::default(),
            tls: tls.clone(),
        };
        // Served as the node agent serves: its certificate must name `node`.
        let served = Served::new(tls.clone()).expect("the test agent's certificate");
        let config = served.server_config().expect("server TLS configuration");
        let server =
            tonic::transport::Server::builder().add_service(AgentServer::new(service.clone()));
        let stop = service.crash.clone();
        let server = tokio::spawn(async move {
            let incoming = agent_api::tls::incoming(listener, config);
            let _ = server
                .serve_with_incoming_shutdown(incoming, stop.notified())
                .await;
        });
        let lease = AgentLease {
            namespace: namespace.into(),
            node: node.into(),
            endpoint: endpoint.to_string(),
            lease: Duration::from_secs(6),
            pod: None,
            // A test agent keeps no checkpoints.
            kept: tokio::sync::watch::channel(Vec::new()).1,
        };
        lease.renew(&client).await.expect("announce the test agent");
        let lease = tokio::spawn(async move { lease.keep(client).await });
        Self {
            node: node.into(),
            endpoint,
            service,
            server,
            lease,
        }
    }

    /// Scripts what `step` does from now on.
    pub fn script(&self, step: impl Into<Scripted>, behaviour: Behaviour) {
        let step = step.into();
        self.service.with(|s| {
            s.script.insert(step, behaviour);
            if let Scripted::Step(step) = step {
                s.released.remove(&step);
            }
        });
    }

    /// Lets a held step succeed.
    pub fn release(&self, step: Step) {
        self.service.with(|s| s.released.insert(step, true));
        self.service.released.notify_waiters();
    }

    /// Makes the agent report a node without an rxe device.
    pub fn without_rxe(&self) {
        self.service.with(|s| s.no_rxe = true);
    }

    /// Makes the agent report these restore backends (the default: `cri-checkpoint-image`).
    pub fn with_backends(&self, backends: &[&str]) {
        let backends = backends.iter().map(|b| b.to_string()).collect();
        self.service.with(|s| s.backends = Some(backends));
    }

    /// Makes the agent report that its node has what `strategy` needs, or lacks `missing`.
    pub fn with_strategy(&self, strategy: &str, missing: Option<&str>) {
        let requirements = v1::StrategyRequirements {
            name: strategy.into(),
            met: missing.is_none(),
            missing: missing.unwrap_or_default().into(),
        };
        self.service.with(|s| {
            s.strategies.retain(|r| r.name != strategy);
            s.strategies.push(requirements);
        });
    }

    /// Makes the transfers this agent sends take [`CHUNKS`] times `interval`.
    pub fn with_chunk_interval(&self, interval: Duration) {
        self.service.with(|s| s.chunk_interval = Some(interval));
    }

    /// Whether `step` was asked for with post-copy: a checkpoint leaving the memory to a page
    /// server, a StageRestore naming where the memory comes from.
    pub fn asked_post_copy(&self, step: Step) -> bool {
        self.service.with(|s| s.post_copy.contains(&step))
    }

    pub fn count(&self, step: impl Into<Scripted>) -> Count {
        let step = step.into();
        self.service
            .with(|s| s.counts.get(&step).copied().unwrap_or_default())
    }

    /// Stops serving (requests in flight fail, new connections are refused) and stops renewing
    /// the Lease, as a crashed agent would.
    pub fn crash(&self) {
        self.service.crash();
        self.lease.abort();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.server.abort();
        self.lease.abort();
    }
}

impl Service {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().expect("test agent state");
        f(&mut state)
    }

    fn crash(&self) {
        self.with(|s| s.crashed = true);
        self.crash.notify_waiters();
        self.crash.notify_one();
    }

    /// Fails like a crashed agent once the test crashed this one.
    fn alive(&self) -> Result<(), Status> {
        if self.with(|s| s.crashed) {
            return Err(Status::unavailable(format!(
                "agent on {} crashed",
                self.node
            )));
        }
        Ok(())
    }

    /// A step request: counted, then run through the operations table with the scripted work.
    async fn step<T>(
        &self,
        request: Request<T>,
        wrap: fn(T) -> StepRequest,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        self.alive()?;
        let request = wrap(request.into_inner());
        let step = request
            .step()
            .ok_or_else(|| Status::invalid_argument("role must be source or target"))?;
        let post_copy = match &request {
            StepRequest::Checkpoint(r) => r.post_copy,
            StepRequest::StageRestore(r) => r.post_copy.is_some(),
            _ => false,
        };
        let behaviour = self.with(|s| {
            if post_copy {
                s.post_copy.push(step);
            }
            s.counts.entry(step.into()).or_default().calls += 1;
            s.script.get(&step.into()).cloned()
        });
        if matches!(behaviour, Some(Behaviour::Crash)) {
            self.crash();
            return Err(Status::unavailable(format!(
                "agent on {} crashed",
                self.node
            )));
        }
        let uid = request.migration_uid().to_string();
        // As the node agent does: a transfer to another node is another step.
        let to = match &request {
            StepRequest::Transfer(t) => t.target_node.clone(),
            _ => String::new(),
        };
        let this = self.clone();
        let op = self
            .operations
            .run_to(&uid, step, &to, || this.work(step, request))
            .await;
        Ok(Response::new(op))
    }

    /// The scripted work of `step`, counted as one execution.
    fn work(
        self,
        step: Step,
        request: StepRequest,
    ) -> impl Future<Output = v1::Operation> + Send + 'static {
        let behaviour = self.with(|s| {
            s.counts.entry(step.into()).or_default().executions += 1;
            let behaviour = s.script.get(&step.into()).cloned();
            // A scripted failure is used up by the execution it fails.
            if let Some(Behaviour::Fail { message, times }) = &behaviour {
                let next = match times {
                    0 | 1 => Behaviour::Succeed,
                    n => Behaviour::Fail {
                        message: message.clone(),
                        times: n - 1,
                    },
                };
                s.script.insert(step.into(), next);
            }
            behaviour.unwrap_or(Behaviour::Succeed)
        });
        let uid = request.migration_uid().to_string();
        let (backend, sources) = self.with(|s| {
            if let StepRequest::PrepareTarget(r) = &request {
                let backend = match r.backend.as_str() {
                    "" => agent_api::backend::CRI_CHECKPOINT_IMAGE,
                    named => named,
                };
                s.prepared.insert(uid.clone(), backend.to_string());
                s.sources.insert(uid.clone(), r.source_node.clone());
            }
            (
                s.prepared.get(&uid).cloned().unwrap_or_default(),
                s.sources.get(&uid).cloned(),
            )
        });
        async move {
            match behaviour {
                Behaviour::Fail { message, .. } => v1::Operation::failed(&uid, message),
                Behaviour::Hold if step == Step::Memory => {
                    self.operations
                        .progress(&uid, step, MEMORY_BYTES / 4, MEMORY_BYTES);
                    self.held(step).await;
                    succeeded(&uid, step)
                }
                Behaviour::Hold => {
                    self.operations.progress(&uid, step, 1, 4);
                    self.held(step).await;
                    succeeded(&uid, step)
                }
                Behaviour::Succeed | Behaviour::Crash => match request {
                    StepRequest::Transfer(r) => self.send(r).await,
                    // As the node agent: a source gets a deadline of its own, and the target
                    // stages only the archives the operator recorded at the checkpoint.
                    StepRequest::Checkpoint(r) if r.resume_after_seconds == 0 => {
                        v1::Operation::failed(&uid, "the checkpoint request names no deadline")
                    }
                    StepRequest::Checkpoint(r)
                        if r.post_copy && r.backend != agent_api::backend::RUNTIME_WRAPPER =>
                    {
                        v1::Operation::failed(&uid, "post-copy needs the runtime-wrapper backend")
                    }
                    StepRequest::StageRestore(v1::StageRestoreRequest {
                        post_copy: Some(from),
                        ..
                    }) if from.endpoint.is_empty() || Some(&from.node) != sources.as_ref() => {
                        v1::Operation::failed(
                            &uid,
                            format!(
                                "the memory must come from the agent of {sources:?}, not {from:?}"
                            ),
                        )
                    }
                    StepRequest::StageRestore(r)
                        if r.expected != succeeded(&uid, Step::Checkpoint).archives =>
                    {
                        v1::Operation::failed(
                            &uid,
                            format!(
                                "expected archives {:?} are not the checkpoint's",
                                r.expected
                            ),
                        )
                    }
                    StepRequest::Checkpoint(_) => {
                        tokio::time::sleep(CHECKPOINT_TIME).await;
                        succeeded(&uid, step)
                    }
                    StepRequest::StageRestore(_) => staged(&uid, &backend),
                    _ => succeeded(&uid, step),
                },
            }
        }
    }

    /// Returns once the test released `step`.
    async fn held(&self, step: Step) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.with(|s| s.released.get(&step).copied().unwrap_or(false)) {
                return;
            }
            released.await;
        }
    }

    /// Streams [`ARCHIVE_BYTES`] in chunks to the target agent, recording progress.
    async fn send(&self, request: v1::TransferRequest) -> v1::Operation {
        let uid = request.migration_uid.clone();
        let chunk = ARCHIVE_BYTES / CHUNKS;
        let interval = self.with(|s| s.chunk_interval.unwrap_or(CHUNK_INTERVAL));
        let (operations, progress_uid) = (self.operations.clone(), uid.clone());
        let chunks = tokio_stream::StreamExt::then(tokio_stream::iter(0..CHUNKS), move |i| {
            let (operations, uid) = (operations.clone(), progress_uid.clone());
            async move {
                tokio::time::sleep(interval).await;
                operations.progress(&uid, Step::Transfer, i * chunk, ARCHIVE_BYTES);
                v1::ReceiveChunk {
                    migration_uid: uid,
                    container: "app".into(),
                    offset: i * chunk,
                    data: vec![0u8; usize::try_from(chunk).unwrap_or(0)],
                    ..Default::default()
                }
            }
        });
        let endpoint = &request.target_endpoint;
        let result = async {
            let channel = self
                .tls
                .endpoint(endpoint, &request.target_node)
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("connecting to the target agent {endpoint}: {e}"))?;
            AgentClient::new(channel)
                .raw()
                .receive(chunks)
                .await
                .map_err(|s| format!("streaming to the target agent: {}", s.message()))
        }
        .await;
        match result {
            Ok(received) if received.get_ref().bytes == ARCHIVE_BYTES => {
                succeeded(&uid, Step::Transfer)
            }
            Ok(received) => v1::Operation::failed(
                &uid,
                format!(
                    "the target received {} of {ARCHIVE_BYTES} bytes",
                    received.get_ref().bytes
                ),
            ),
            Err(message) => v1::Operation::failed(&uid, message),
        }
    }
}

fn succeeded(uid: &str, step: Step) -> v1::Operation {
    let mut op = v1::Operation::succeeded(uid);
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
        Step::StageRestore => return staged(uid, ""),
        Step::Memory => {
            op.bytes_done = MEMORY_BYTES;
            op.bytes_total = MEMORY_BYTES;
        }
        _ => {}
    }
    op
}

/// StageRestore's answer, as a node agent stages for `backend`: a directory of its store for the
/// runtime wrapper, an archive beside it, or the image of the checkpoint's archive tagged after
/// the migration and pinned by digest.
fn staged(uid: &str, backend: &str) -> v1::Operation {
    let store = format!("/var/lib/kube-migros/migrations/{uid}/staged/app");
    let image = match backend {
        agent_api::backend::RUNTIME_WRAPPER => store,
        agent_api::backend::CRI_CHECKPOINT_ARCHIVE => format!("{store}.tar"),
        _ => {
            let archive = &succeeded(uid, Step::Checkpoint).archives[0];
            let image = agent_api::checkpoint_image::Parts::new(
                &archive.name,
                &archive.digest,
                archive.bytes,
            );
            format!(
                "localhost/checkpoint:{}@{}",
                agent_api::checkpoint_image::tag(uid, &archive.name),
                image.manifest_digest()
            )
        }
    };
    let mut op = v1::Operation::succeeded(uid);
    op.staged = vec![v1::StagedContainer {
        name: "app".into(),
        image,
    }];
    op
}

#[tonic::async_trait]
impl v1::agent_server::Agent for Service {
    async fn capabilities(
        &self,
        request: Request<v1::CapabilitiesRequest>,
    ) -> Result<Response<v1::NodeCapabilities>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        self.alive()?;
        Ok(Response::new(v1::NodeCapabilities {
            node_name: self.node.clone(),
            runtime_name: "test".into(),
            runtime_version: "0".into(),
            criu_version: "0".into(),
            rxe_present: !self.with(|s| s.no_rxe),
            free_bytes: 1 << 40,
            restore_backends: self
                .with(|s| s.backends.clone())
                .unwrap_or_else(|| vec![agent_api::backend::CRI_CHECKPOINT_IMAGE.into()]),
            notes: Vec::new(),
            strategies: self.with(|s| s.strategies.clone()),
        }))
    }

    async fn receive(
        &self,
        request: Request<Streaming<v1::ReceiveChunk>>,
    ) -> Result<Response<v1::ReceiveResult>, Status> {
        // As the node agent: only the agent of the migration's source node may send.
        let peer = identity::agent_node(&request)?;
        self.alive()?;
        self.with(|s| {
            let count = s.counts.entry(Scripted::Receive).or_default();
            count.calls += 1;
            count.executions += 1;
        });
        let mut stream = request.into_inner();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await? {
            // A crashed agent stops taking data in the middle of a stream.
            self.alive()?;
            let source = self.with(|s| s.sources.get(&chunk.migration_uid).cloned());
            if source.as_deref() != Some(peer.as_str()) {
                return Err(Status::permission_denied(format!(
                    "the agent of node {peer} may not send migration {}: it comes from {source:?}",
                    chunk.migration_uid
                )));
            }
            bytes += chunk.data.len() as u64;
        }
        Ok(Response::new(v1::ReceiveResult {
            bytes,
            ..Default::default()
        }))
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

    type PagesStream = futures::stream::Empty<Result<v1::PageFrame, Status>>;

    /// Pages go agent to agent, never through the operator: a test agent serves none (the
    /// runtime suite streams them between real agents).
    async fn pages(
        &self,
        _: Request<tonic::Streaming<v1::PageFrame>>,
    ) -> Result<Response<Self::PagesStream>, Status> {
        Err(Status::unimplemented("the test agent serves no pages"))
    }

    /// Scripted as a step: held, it answers RUNNING with a quarter of [`MEMORY_BYTES`] in.
    async fn memory(&self, r: Request<v1::StepRequest>) -> Result<Response<v1::Operation>, Status> {
        self.step(r, StepRequest::Memory).await
    }
}
