//! The agent's gRPC service: each migration step of DESIGN.md section 5 that happens on a node.
//!
//! Every step is keyed by migration UID and step, runs at most once at a time, and is remembered
//! while it runs and after it succeeded; a failure is reported once and then forgotten, so asking
//! again tries again. Steps answer at once when they end quickly and RUNNING otherwise (the
//! operator polls). What a step must remember to be undone is in the store's record on disk.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_api::{
    identity::{self, Caller},
    tls::TlsMaterial,
    v1::{self, Role as ApiRole, agent_server::Agent as AgentApi},
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    archive::{self, Limits},
    ipam::{Reservation, Reservations},
    metrics::Metrics,
    netblock::NetBlock,
    oci,
    runtime::{self, Runtime, TaskStatus},
    rxe,
    store::{self, Container, Record, Role, Store},
    transfer::{self, Incoming, Outgoing, RejectReason},
};

/// The restore backend that hands the runtime the archive's path.
pub const CRI_CHECKPOINT_ARCHIVE: &str = "cri-checkpoint-archive";
/// The restore backend that hands the runtime a checkpoint OCI image.
pub const CRI_CHECKPOINT_IMAGE: &str = "cri-checkpoint-image";

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a node turns a received, vetted checkpoint into something its runtime restores from. Built:
/// the CRI backends (containerd 2.1-2.3, CRI-O) with the archive's path (for CRI clients that create
/// the container themselves) or a checkpoint OCI image (what the kubelet can start); an OCI runtime
/// wrapper selected by a RuntimeClass, or KEP-5823 `RestorePod`, slot in here.
pub trait RestoreBackend: Send + Sync + std::fmt::Debug {
    /// The backend's name as capabilities report it.
    fn name(&self) -> &'static str;
    /// Makes the vetted checkpoint archive of `container` restorable (it may be moved into
    /// `work`) and answers the image reference the replacement pod's container names.
    fn stage<'a>(
        &'a self,
        uid: &'a str,
        container: &'a str,
        archive: &'a std::path::Path,
        work: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<String, String>>;
}

/// Moves the vetted archive to `<work>/<container>.tar`.
async fn keep(
    container: &str,
    archive: &std::path::Path,
    work: &std::path::Path,
) -> Result<PathBuf, String> {
    let out = work.join(format!("{container}.tar"));
    tokio::fs::rename(archive, &out)
        .await
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// Restore through the CRI from an archive path: `CreateContainer` whose image is the archive.
#[derive(Debug, Clone, Copy)]
pub struct CriCheckpointArchive;

impl RestoreBackend for CriCheckpointArchive {
    fn name(&self) -> &'static str {
        CRI_CHECKPOINT_ARCHIVE
    }

    fn stage<'a>(
        &'a self,
        _uid: &'a str,
        container: &'a str,
        archive: &'a std::path::Path,
        work: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { Ok(keep(container, archive, work).await?.display().to_string()) })
    }
}

/// Restore through the CRI from a checkpoint OCI image: packed, pushed to a registry the node
/// pulls from, and pulled into the node's runtime at once (so the kubelet finds it present).
#[derive(Debug, Clone)]
pub struct CriCheckpointImage {
    pub registry: oci::Registry,
    pub runtime: Runtime,
}

impl RestoreBackend for CriCheckpointImage {
    fn name(&self) -> &'static str {
        CRI_CHECKPOINT_IMAGE
    }

    fn stage<'a>(
        &'a self,
        uid: &'a str,
        container: &'a str,
        archive: &'a std::path::Path,
        work: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            // The checkpoint archive is the image's one layer as it is.
            let layer = keep(container, archive, work).await?;
            let image = {
                let (name, layer) = (container.to_string(), layer.clone());
                tokio::task::spawn_blocking(move || oci::Image::new(&name, &layer))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            };
            let reference = self
                .registry
                .push(&image, &format!("{uid}-{container}"))
                .await
                .map_err(|e| format!("pushing the checkpoint image: {e}"))?;
            self.runtime
                .pull(&reference)
                .await
                .map_err(|e| format!("pulling the checkpoint image: {e}"))?;
            // The runtime has its own copy now.
            let _ = tokio::fs::remove_file(&layer).await;
            Ok(reference)
        })
    }
}

/// What the agent is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub store: PathBuf,
    pub reservations: PathBuf,
    pub limits: Limits,
    /// Waiting for the checkpoint of one container at most this long.
    pub checkpoint_timeout: Duration,
    /// Waiting for the node's rxe counters (held by another restore) at most this long.
    pub rxe_wait: Duration,
    /// The rxe counters are released at the latest this long after a restore took them.
    pub rxe_hold_max: Duration,
    /// A step that ends within this answers its result at once instead of RUNNING.
    pub quick: Duration,
    /// Attempts of a transfer whose stream breaks.
    pub transfer_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Prepare,
    Checkpoint,
    Transfer,
    Stage,
    Finish,
    Commit(Role),
    Abort(Role),
    Cleanup(Role),
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare_target",
            Step::Checkpoint => "checkpoint",
            Step::Transfer => "transfer",
            Step::Stage => "stage_restore",
            Step::Finish => "finish_restore",
            Step::Commit(Role::Source) => "commit_source",
            Step::Commit(Role::Target) => "commit_target",
            Step::Abort(Role::Source) => "abort_source",
            Step::Abort(Role::Target) => "abort_target",
            Step::Cleanup(Role::Source) => "cleanup_source",
            Step::Cleanup(Role::Target) => "cleanup_target",
        }
    }
}

type Work = std::pin::Pin<Box<dyn Future<Output = Result<v1::Operation, String>> + Send>>;

/// The agent of one node.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    runtime: Runtime,
    rxe: rxe::Counters,
    net: NetBlock,
    store: Store,
    reservations: Reservations,
    backend: Box<dyn RestoreBackend>,
    tls: TlsMaterial,
    metrics: Arc<Metrics>,
    operations: Mutex<HashMap<(String, Step), v1::Operation>>,
    /// Woken whenever an operation ends: callers asking about a running one wait for it a while.
    finished: tokio::sync::Notify,
    /// rxe counter holds by migration, with a serial number so that an expiry only ends the
    /// hold it was set for.
    holds: Mutex<HashMap<String, (u64, rxe::Hold)>>,
    serial: std::sync::atomic::AtomicU64,
    /// Serialises read-modify-write of records.
    records: Mutex<()>,
}

fn role(r: ApiRole) -> Result<Role, Status> {
    match r {
        ApiRole::Source => Ok(Role::Source),
        ApiRole::Target => Ok(Role::Target),
        ApiRole::Unspecified => Err(Status::invalid_argument("role must be source or target")),
    }
}

fn ipv4(ip: &str) -> Result<Option<Ipv4Addr>, String> {
    if ip.is_empty() {
        return Ok(None);
    }
    ip.parse()
        .map(Some)
        .map_err(|_| format!("pod IP {ip:?} is not an IPv4 address"))
}

fn check_pod(pod: Option<&v1::PodRef>) -> Result<&v1::PodRef, Status> {
    let pod = pod.ok_or_else(|| Status::invalid_argument("the request names no pod"))?;
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return Err(Status::invalid_argument(
            "the pod needs a namespace and a name",
        ));
    }
    if pod.containers.is_empty() {
        return Err(Status::invalid_argument("the pod has no containers"));
    }
    if let Some(c) = pod.containers.iter().find(|c| !store::valid_name(&c.name)) {
        return Err(Status::invalid_argument(format!(
            "container name {:?} is not a DNS label",
            c.name
        )));
    }
    ipv4(&pod.pod_ip).map_err(Status::invalid_argument)?;
    Ok(pod)
}

fn check_uid(uid: &str) -> Result<(), Status> {
    if store::valid_uid(uid) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{uid:?} is not a migration UID"
        )))
    }
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        runtime: Runtime,
        rxe: rxe::Counters,
        net: NetBlock,
        backend: Box<dyn RestoreBackend>,
        tls: TlsMaterial,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store = Store::new(&config.store);
        let reservations = Reservations::new(&config.reservations);
        Self {
            inner: Arc::new(Inner {
                config,
                runtime,
                rxe,
                net,
                store,
                reservations,
                backend,
                tls,
                metrics,
                operations: Mutex::default(),
                finished: tokio::sync::Notify::new(),
                holds: Mutex::default(),
                serial: Default::default(),
                records: Mutex::default(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Whether a step of migration `uid` is running now.
    pub fn active(&self, uid: &str) -> bool {
        self.inner.operations.lock().is_ok_and(|ops| {
            ops.iter()
                .any(|((u, _), op)| u == uid && op.state() == v1::State::Running)
        })
    }

    fn record(&self, uid: &str) -> Result<Option<Record>, String> {
        self.inner.store.load(uid).map_err(|e| e.to_string())
    }

    /// Loads, changes and saves the record of `uid` under the records lock.
    fn update(&self, uid: &str, change: impl FnOnce(&mut Record)) -> Result<Record, String> {
        let _guard = self
            .inner
            .records
            .lock()
            .map_err(|_| "record lock poisoned".to_string())?;
        let mut record = self
            .record(uid)?
            .ok_or_else(|| format!("this node has no record of migration {uid}"))?;
        change(&mut record);
        self.inner.store.save(&record).map_err(|e| e.to_string())?;
        Ok(record)
    }

    fn save(&self, record: &Record) -> Result<(), String> {
        let _guard = self
            .inner
            .records
            .lock()
            .map_err(|_| "record lock poisoned".to_string())?;
        self.inner.store.save(record).map_err(|e| e.to_string())
    }

    fn location(&self, uid: &str) -> String {
        self.inner
            .store
            .dir(uid)
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }

    fn set_progress(&self, uid: &str, step: Step, done: u64, total: u64) {
        if let Ok(mut ops) = self.inner.operations.lock()
            && let Some(op) = ops.get_mut(&(uid.to_string(), step))
            && op.state() == v1::State::Running
        {
            op.bytes_done = done;
            op.bytes_total = total;
        }
    }

    /// Runs `work` as step `step` of `uid` unless it runs or succeeded already (see the module).
    /// The operation `(uid, step)`, waiting up to the quick answer time for a running one to end
    /// (so that a caller polling it learns of the end at once rather than at its next poll). A
    /// failure read here is reported now, so it is forgotten now.
    async fn await_running(&self, uid: &str, step: Step) -> v1::Operation {
        let key = (uid.to_string(), step);
        let deadline = tokio::time::Instant::now() + self.inner.config.quick;
        loop {
            // Registered before the table is read, so that an end in between is not missed.
            let notified = self.inner.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let running = {
                let Ok(mut ops) = self.inner.operations.lock() else {
                    return v1::Operation::failed(uid, "operation table poisoned");
                };
                match ops.get(&key).cloned() {
                    Some(op) if op.state() == v1::State::Running => op,
                    Some(op) if op.state() == v1::State::Failed => {
                        ops.remove(&key);
                        return op;
                    }
                    Some(op) => return op,
                    None => return v1::Operation::running(uid),
                }
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return running;
            }
        }
    }

    async fn operate(&self, uid: &str, step: Step, work: Work) -> v1::Operation {
        let key = (uid.to_string(), step);
        let running = {
            let Ok(mut ops) = self.inner.operations.lock() else {
                return v1::Operation::failed(uid, "operation table poisoned");
            };
            match ops.get(&key).cloned() {
                Some(op) if op.state() == v1::State::Failed => {
                    ops.remove(&key);
                    return op;
                }
                Some(op) if op.state() == v1::State::Running => true,
                Some(op) => return op,
                None => {
                    ops.insert(key.clone(), v1::Operation::running(uid));
                    false
                }
            }
        };
        if running {
            return self.await_running(uid, step).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let agent = self.clone();
        let span = info_span!("step", migration = %uid, step = step.name());
        let future = work;
        tokio::spawn(
            async move {
                let started = Instant::now();
                let result = future.await;
                let took = started.elapsed();
                agent.inner.metrics.step(step.name(), result.is_ok(), took);
                let op = match result {
                    Ok(mut op) => {
                        info!(took_ms = took.as_millis() as u64, "step succeeded");
                        op.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                        op
                    }
                    Err(message) => {
                        warn!(%message, "step failed");
                        let mut op = v1::Operation::failed(&key.0, message);
                        op.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                        op
                    }
                };
                if let Ok(mut ops) = agent.inner.operations.lock() {
                    ops.insert(key, op.clone());
                }
                agent.inner.finished.notify_waiters();
                let _ = tx.send(op);
            }
            .instrument(span),
        );
        match tokio::time::timeout(self.inner.config.quick, rx).await {
            Ok(Ok(op)) => {
                if op.state() == v1::State::Failed
                    && let Ok(mut ops) = self.inner.operations.lock()
                {
                    ops.remove(&(uid.to_string(), step));
                }
                op
            }
            // Still running, or it ended just as the wait did: a failure read here is reported
            // now, so it is forgotten now.
            _ => {
                let Ok(mut ops) = self.inner.operations.lock() else {
                    return v1::Operation::failed(uid, "operation table poisoned");
                };
                let key = (uid.to_string(), step);
                match ops.get(&key).cloned() {
                    Some(op) if op.state() == v1::State::Failed => {
                        ops.remove(&key);
                        op
                    }
                    Some(op) => op,
                    None => v1::Operation::running(uid),
                }
            }
        }
    }

    /// What every step RPC does: only the operator may ask, the UID must be a plain name, then
    /// `plan` checks the request and names the step and its work, which [`Agent::operate`] runs.
    async fn step_rpc<T>(
        &self,
        request: Request<T>,
        uid_of: fn(&T) -> &String,
        plan: impl FnOnce(Agent, T) -> Result<(Step, Work), Status>,
    ) -> Result<Response<v1::Operation>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let req = request.into_inner();
        let uid = uid_of(&req).clone();
        check_uid(&uid)?;
        let (step, work) = plan(self.clone(), req)?;
        Ok(Response::new(self.operate(&uid, step, work).await))
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut ops) = self.inner.operations.lock() {
            ops.retain(|(u, _), op| u != uid || op.state() == v1::State::Running);
        }
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.remove(uid);
        }
    }

    // ---- target steps ----

    async fn prepare(self, req: v1::PrepareTargetRequest) -> Result<v1::Operation, String> {
        let pod = req.pod.unwrap_or_default();
        let free = self.inner.store.free_bytes().map_err(|e| e.to_string())?;
        if req.expected_bytes > free {
            return Err(format!(
                "the checkpoint store has {free} bytes free, the checkpoint needs about {}",
                req.expected_bytes
            ));
        }
        if req.expected_bytes > self.inner.config.limits.max_bytes {
            return Err(format!(
                "the checkpoint (about {} bytes) is larger than this node's limit of {} bytes",
                req.expected_bytes, self.inner.config.limits.max_bytes
            ));
        }
        if let Some(block) = req.rxe.as_ref().map(rxe::Block::from) {
            if !self.inner.rxe.present() {
                return Err(rxe::Error::Absent(self.inner.rxe.dir().to_path_buf()).to_string());
            }
            self.inner.rxe.check(block).map_err(|e| e.to_string())?;
        }
        // The restore pulls the base images; find out now whether it can.
        for c in &pod.containers {
            if !c.image.is_empty() {
                self.inner
                    .runtime
                    .pull(&c.image)
                    .await
                    .map_err(|e| format!("the target cannot pull the base image: {e}"))?;
            }
        }
        let mut record = match self.record(&req.migration_uid)? {
            Some(r) if r.role == Role::Target => r,
            _ => Record::new(&req.migration_uid, Role::Target, &pod.namespace, &pod.name),
        };
        record.pod_uid = pod.uid.clone();
        record.pod_ip = pod.pod_ip.clone();
        record.containers = pod
            .containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                image: c.image.clone(),
                ..Default::default()
            })
            .collect();
        self.save(&record)?;
        let mut op = v1::Operation::succeeded(&req.migration_uid);
        op.location = self.location(&req.migration_uid);
        op.message = format!("{free} bytes free");
        Ok(op)
    }

    async fn stage(self, req: v1::StageRestoreRequest) -> Result<v1::Operation, String> {
        let uid = req.migration_uid.clone();
        let record = self
            .record(&uid)?
            .filter(|r| r.role == Role::Target)
            .ok_or_else(|| format!("migration {uid} was not prepared on this node"))?;
        let mut staged = Vec::new();
        for c in &record.containers {
            // A path must still be there; an image reference is the runtime's.
            let present =
                |image: &&String| !image.starts_with('/') || std::path::Path::new(image).is_file();
            let image = c.staged.as_ref().filter(present).ok_or_else(|| {
                format!("the checkpoint of container {} was not received", c.name)
            })?;
            staged.push(v1::StagedContainer {
                name: c.name.clone(),
                image: image.clone(),
            });
        }
        if let Some(block) = req.rxe.as_ref().map(rxe::Block::from) {
            let held = self
                .inner
                .holds
                .lock()
                .map_err(|_| "hold table poisoned")?
                .get(&uid)
                .map(|(_, h)| h.block);
            if held != Some(block) {
                // A different block asked for by a retry: let go of the old one first.
                self.inner
                    .holds
                    .lock()
                    .map_err(|_| "hold table poisoned")?
                    .remove(&uid);
                let hold = self
                    .inner
                    .rxe
                    .hold(&uid, block, self.inner.config.rxe_wait)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(%block, "rxe counters set and held until the pod runs");
                let serial = self
                    .inner
                    .serial
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.inner
                    .holds
                    .lock()
                    .map_err(|_| "hold table poisoned")?
                    .insert(uid.clone(), (serial, hold));
                // An operator that never says the pod runs must not block the node for good.
                let (agent, uid, max) = (self.clone(), uid.clone(), self.inner.config.rxe_hold_max);
                tokio::spawn(async move {
                    tokio::time::sleep(max).await;
                    if let Ok(mut holds) = agent.inner.holds.lock()
                        && holds.get(&uid).is_some_and(|(s, _)| *s == serial)
                    {
                        warn!(migration = %uid, "rxe counters held too long; released");
                        holds.remove(&uid);
                    }
                });
            }
        }
        if let Some(ip) = ipv4(&record.pod_ip)? {
            let reservation = Reservation {
                ip,
                migration: uid.clone(),
            };
            self.inner
                .reservations
                .reserve(&record.namespace, &record.pod, &reservation)
                .map_err(|e| format!("reserving {ip} for the pod: {e}"))?;
            self.update(&uid, |r| r.reserved = true)?;
            self.inner.net.block(ip).await.map_err(|e| e.to_string())?;
            self.update(&uid, |r| r.blocked = true)?;
        }
        let mut op = v1::Operation::succeeded(&uid);
        op.staged = staged;
        op.location = self.location(&uid);
        Ok(op)
    }

    async fn finish(self, uid: String) -> Result<v1::Operation, String> {
        let record = self.record(&uid)?;
        if let Some(record) = record.filter(|r| r.blocked)
            && let Some(ip) = ipv4(&record.pod_ip)?
        {
            self.inner
                .net
                .unblock(ip)
                .await
                .map_err(|e| e.to_string())?;
            self.update(&uid, |r| r.blocked = false)?;
        }
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.remove(&uid);
        }
        // The restored pod has a new MAC address on a new port: tell the network.
        if let Some(record) = self.record(&uid)? {
            self.announce(&record).await;
        }
        Ok(v1::Operation::succeeded(&uid))
    }

    /// Announces the replacement pod's address from its network namespace (best effort: a peer
    /// that misses it finds the pod when its ARP entry expires).
    async fn announce(&self, record: &Record) {
        let rt = &self.inner.runtime;
        let netns = match rt.find_sandbox(&record.namespace, &record.pod, "").await {
            Ok(Some(sandbox)) => rt.sandbox_netns(&sandbox).await.ok().flatten(),
            _ => None,
        };
        let Some(netns) = netns else {
            warn!(migration = %record.uid, "no sandbox of the restored pod to announce its address from");
            return;
        };
        let path = std::path::PathBuf::from(&netns);
        match tokio::task::spawn_blocking(move || crate::netblock::announce(&path)).await {
            Ok(Ok(())) => info!(migration = %record.uid, %netns, "announced the pod's address"),
            Ok(Err(e)) => {
                warn!(migration = %record.uid, error = %e, "cannot announce the pod's address")
            }
            Err(e) => {
                warn!(migration = %record.uid, error = %e, "cannot announce the pod's address")
            }
        }
    }

    // ---- source steps ----

    async fn checkpoint(self, req: v1::CheckpointRequest) -> Result<v1::Operation, String> {
        let uid = req.migration_uid.clone();
        let pod = req.pod.unwrap_or_default();
        let mut record = Record::new(&uid, Role::Source, &pod.namespace, &pod.name);
        record.pod_uid = pod.uid.clone();
        record.pod_ip = pod.pod_ip.clone();
        record.containers = pod
            .containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                id: runtime::container_id(&c.container_id).to_string(),
                image: c.image.clone(),
                ..Default::default()
            })
            .collect();
        // The operator may not know the runtime's IDs: find them by the pod's sandbox.
        for c in record.containers.iter_mut().filter(|c| c.id.is_empty()) {
            c.id = self
                .inner
                .runtime
                .find_container(&pod.namespace, &pod.name, &pod.uid, &c.name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "no running container {} of pod {}/{} on this node",
                        c.name, pod.namespace, pod.name
                    )
                })?;
        }
        self.save(&record)?;
        match self.freeze_and_dump(&mut record).await {
            Ok(op) => Ok(op),
            Err(why) => {
                // Leave the source as it was: running and reachable.
                if let Err(undo) = self.thaw(&uid).await {
                    return Err(format!("{why}; undoing it failed too: {undo}"));
                }
                // Undone: nothing of this attempt is kept.
                if let Err(e) = self.inner.store.remove(&uid) {
                    warn!(error = %e, "cannot remove the failed checkpoint's data");
                }
                Err(why)
            }
        }
    }

    async fn freeze_and_dump(&self, record: &mut Record) -> Result<v1::Operation, String> {
        let uid = record.uid.clone();
        let rt = &self.inner.runtime;
        // Silence first: from here on the node acknowledges nothing of the pod's connections.
        if let Some(ip) = ipv4(&record.pod_ip)? {
            record.blocked = true;
            self.save(record)?;
            self.inner.net.block(ip).await.map_err(|e| e.to_string())?;
        }
        for c in &record.containers {
            match rt.task_status(&c.id).await.map_err(|e| e.to_string())? {
                TaskStatus::Paused => {}
                TaskStatus::Running => {
                    record.paused = true;
                    self.save(record)?;
                    rt.pause(&c.id).await.map_err(|e| e.to_string())?;
                }
                other => {
                    return Err(format!(
                        "container {} is not running (its task is {})",
                        c.name,
                        other.as_str_name().to_lowercase()
                    ));
                }
            }
        }
        record.paused = true;
        self.save(record)?;
        let dir = self
            .inner
            .store
            .subdir(&uid, "checkpoint")
            .map_err(|e| e.to_string())?;
        let mut archives = Vec::new();
        let mut total = 0;
        for i in 0..record.containers.len() {
            let c = record.containers[i].clone();
            let path = dir.join(format!("{}.tar", c.name));
            let _ = std::fs::remove_file(&path);
            let started = Instant::now();
            rt.checkpoint(&c.id, &path, self.inner.config.checkpoint_timeout)
                .await
                .map_err(|e| e.to_string())?;
            let (digest, bytes) = tokio::task::spawn_blocking({
                let path = path.clone();
                move || archive::digest_file(&path)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            info!(container = %c.name, bytes, took_ms = started.elapsed().as_millis() as u64, "checkpointed");
            self.inner.metrics.bytes("checkpointed", bytes);
            total += bytes;
            record.containers[i].bytes = bytes;
            record.containers[i].digest = digest.clone();
            archives.push(v1::ContainerArchive {
                name: c.name.clone(),
                bytes,
                digest,
            });
        }
        // The snapshot is only good if nothing ran after it: every task must still be paused.
        for c in &record.containers {
            let status = rt.task_status(&c.id).await.map_err(|e| e.to_string())?;
            if status != TaskStatus::Paused {
                return Err(format!(
                    "container {} is {} after its checkpoint, not paused",
                    c.name,
                    status.as_str_name().to_lowercase()
                ));
            }
        }
        self.save(record)?;
        let mut op = v1::Operation::succeeded(&uid);
        op.archives = archives;
        op.bytes_done = total;
        op.bytes_total = total;
        op.location = self.location(&uid);
        Ok(op)
    }

    /// Resumes what the agent paused and lifts its network block (the source's rollback).
    async fn thaw(&self, uid: &str) -> Result<(), String> {
        let Some(record) = self.record(uid)? else {
            return Ok(());
        };
        let rt = &self.inner.runtime;
        if record.paused && !record.stopped {
            for c in &record.containers {
                match rt.task_status(&c.id).await {
                    Ok(TaskStatus::Paused | TaskStatus::Pausing) => {
                        rt.resume(&c.id).await.map_err(|e| e.to_string())?;
                    }
                    Ok(_) => {}
                    // A container that is gone has nothing to resume.
                    Err(e) => warn!(container = %c.name, error = %e, "not resumed"),
                }
            }
            self.update(uid, |r| r.paused = false)?;
        }
        if let Some(ip) = ipv4(&record.pod_ip)?.filter(|_| record.blocked) {
            self.inner
                .net
                .unblock(ip)
                .await
                .map_err(|e| e.to_string())?;
            self.update(uid, |r| r.blocked = false)?;
        }
        Ok(())
    }

    async fn transfer(self, req: v1::TransferRequest) -> Result<v1::Operation, String> {
        let uid = req.migration_uid.clone();
        let record = self
            .record(&uid)?
            .filter(|r| r.role == Role::Source && r.containers.iter().all(|c| !c.digest.is_empty()))
            .ok_or_else(|| format!("migration {uid} has no checkpoint on this node"))?;
        let dir = self.inner.store.dir(&uid).map_err(|e| e.to_string())?;
        let archives: Vec<Outgoing> = record
            .containers
            .iter()
            .map(|c| Outgoing {
                container: c.name.clone(),
                path: dir.join("checkpoint").join(format!("{}.tar", c.name)),
                bytes: c.bytes,
                digest: c.digest.clone(),
            })
            .collect();
        let total: u64 = archives.iter().map(|a| a.bytes).sum();
        let mut last = String::new();
        for attempt in 1..=self.inner.config.transfer_attempts.max(1) {
            match self.send_once(&req, &archives, total).await {
                Ok(wire) => {
                    self.inner.metrics.bytes("sent", wire);
                    let mut op = v1::Operation::succeeded(&uid);
                    op.bytes_done = total;
                    op.bytes_total = total;
                    op.location = self.location(&uid);
                    op.message = format!("{wire} bytes on the wire");
                    return Ok(op);
                }
                // The target refused the data: sending it again would not help.
                Err((false, why)) => return Err(why),
                Err((true, why)) => {
                    warn!(attempt, error = %why, "transfer attempt failed");
                    last = why;
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
            }
        }
        Err(format!(
            "the transfer failed {} times; last: {last}",
            self.inner.config.transfer_attempts.max(1)
        ))
    }

    /// One attempt; the error says whether another attempt may help.
    async fn send_once(
        &self,
        req: &v1::TransferRequest,
        archives: &[Outgoing],
        total: u64,
    ) -> Result<u64, (bool, String)> {
        let endpoint = &req.target_endpoint;
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{endpoint}"))
            .map_err(|e| (false, format!("bad target endpoint {endpoint:?}: {e}")))?
            .tls_config(self.inner.tls.client())
            .map_err(|e| (false, e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                (
                    true,
                    format!("connecting to the target agent {endpoint}: {e}"),
                )
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let uid = req.migration_uid.clone();
        let agent = self.clone();
        let producer = tokio::spawn(transfer::produce(
            uid.clone(),
            archives.to_vec(),
            req.compression(),
            req.bandwidth_limit,
            tx,
            move |done| agent.set_progress(&uid, Step::Transfer, done, total),
        ));
        let result = v1::agent_client::AgentClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .receive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let produced = producer.await.map_err(|e| (true, e.to_string()))?;
        match result {
            Ok(answer) if answer.get_ref().bytes == total => produced.map_err(|e| (true, e)),
            Ok(answer) => Err((
                true,
                format!(
                    "the target received {} of {total} bytes",
                    answer.get_ref().bytes
                ),
            )),
            Err(status) => {
                let retry = !matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::ResourceExhausted
                );
                Err((
                    retry,
                    format!(
                        "the target agent refused the checkpoint: {}",
                        status.message()
                    ),
                ))
            }
        }
    }

    async fn commit(self, uid: String, role: Role) -> Result<v1::Operation, String> {
        let Some(record) = self.record(&uid)? else {
            return Err(format!("this node has no record of migration {uid}"));
        };
        if role == Role::Source && !record.stopped {
            let rt = &self.inner.runtime;
            for c in &record.containers {
                // A frozen task acts on SIGKILL once thawed, before running any code of its own.
                match rt.kill(&c.id).await {
                    Ok(()) => {}
                    // Gone already (an earlier attempt killed it): stopped for good.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.to_string()),
                }
                // A task in a PID namespace of its own may end right away (the kernel ends the
                // namespace), and one being killed may stop being "paused" under our resume: a
                // failed resume is judged by the wait for the task's end below.
                if matches!(rt.task_status(&c.id).await, Ok(TaskStatus::Paused))
                    && let Err(e) = rt.resume(&c.id).await
                {
                    warn!(migration = %uid, container = %c.name, error = %e, "resume after SIGKILL failed; waiting for the task to end");
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            for c in &record.containers {
                loop {
                    match rt.task_status(&c.id).await {
                        Ok(TaskStatus::Stopped) | Err(_) => break,
                        Ok(status) if Instant::now() > deadline => {
                            return Err(format!(
                                "container {} is still {} 30 s after SIGKILL",
                                c.name,
                                status.as_str_name().to_lowercase()
                            ));
                        }
                        Ok(status) => {
                            // Still frozen with the SIGKILL pending: thaw it again.
                            if status == TaskStatus::Paused {
                                let _ = rt.resume(&c.id).await;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }
        self.update(&uid, |r| {
            r.committed = true;
            if role == Role::Source {
                r.stopped = true;
            }
        })?;
        // The source's network block stays while the old sandbox exists: it must never answer
        // for the IP again, not even ARP. Once it is gone, other pods of this node must reach the
        // address where it lives now, so the block goes too.
        if role == Role::Source && record.blocked {
            tokio::spawn(self.clone().unblock_when_sandbox_gone(record));
        }
        let mut op = v1::Operation::succeeded(&uid);
        op.location = self.location(&uid);
        Ok(op)
    }

    async fn unblock_when_sandbox_gone(self, record: Record) {
        let Ok(Some(ip)) = ipv4(&record.pod_ip) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let ready = self
                .inner
                .runtime
                .find_sandbox(&record.namespace, &record.pod, &record.pod_uid)
                .await;
            match ready {
                Ok(None) => break,
                Ok(Some(_)) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Given up: Cleanup lifts it.
                _ => return,
            }
        }
        match self.inner.net.unblock(ip).await {
            Ok(()) => {
                info!(migration = %record.uid, %ip, "the old sandbox is gone; the pod IP is unblocked here");
                let _ = self.update(&record.uid, |r| r.blocked = false);
            }
            Err(e) => warn!(migration = %record.uid, error = %e, "cannot unblock the pod IP"),
        }
    }

    async fn abort(self, uid: String, role: Role) -> Result<v1::Operation, String> {
        match (role, self.record(&uid)?) {
            (_, None) => {}
            (_, Some(r)) if r.committed => {
                return Err(format!(
                    "migration {uid} is past its commit point; it cannot be aborted"
                ));
            }
            (Role::Source, Some(_)) => self.thaw(&uid).await?,
            (Role::Target, Some(r)) => self.release_target(&r).await?,
        }
        self.inner.store.remove(&uid).map_err(|e| e.to_string())?;
        Ok(v1::Operation::succeeded(&uid))
    }

    async fn release_target(&self, r: &Record) -> Result<(), String> {
        if let Some(ip) = ipv4(&r.pod_ip)?.filter(|_| r.blocked) {
            self.inner
                .net
                .unblock(ip)
                .await
                .map_err(|e| e.to_string())?;
        }
        if r.reserved {
            self.inner
                .reservations
                .release(&r.namespace, &r.pod, &r.uid)
                .map_err(|e| format!("releasing the IP reservation: {e}"))?;
        }
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.remove(&r.uid);
        }
        Ok(())
    }

    async fn cleanup(self, uid: String) -> Result<v1::Operation, String> {
        if let Some(r) = self.record(&uid)? {
            match r.role {
                // Never leave a pod frozen: before the commit point, cleaning up resumes it.
                Role::Source if !r.committed => self.thaw(&uid).await?,
                Role::Source => {
                    if let Some(ip) = ipv4(&r.pod_ip)?.filter(|_| r.blocked) {
                        self.inner
                            .net
                            .unblock(ip)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Role::Target => self.release_target(&r).await?,
            }
        }
        self.inner.store.remove(&uid).map_err(|e| e.to_string())?;
        self.forget(&uid);
        Ok(v1::Operation::succeeded(&uid))
    }

    // ---- receive ----

    async fn receive_stream(
        &self,
        stream: &mut Streaming<v1::ReceiveChunk>,
        uid: &mut String,
        received: &mut Vec<v1::ContainerArchive>,
    ) -> Result<u64, RejectReason> {
        let io = |e: String| RejectReason::Io(e);
        let mut record: Option<Record> = None;
        let mut current: Option<Incoming> = None;
        let mut bytes = 0u64;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| RejectReason::Io(format!("the stream broke: {}", s.message())))?
        {
            if record.is_none() {
                *uid = chunk.migration_uid.clone();
                if !store::valid_uid(uid) {
                    return Err(io(format!("{uid:?} is not a migration UID")));
                }
                let r = self
                    .record(uid)
                    .map_err(io)?
                    .filter(|r| r.role == Role::Target)
                    .ok_or_else(|| io(format!("migration {uid} was not prepared on this node")))?;
                // A new stream replaces whatever an earlier, broken one left.
                for sub in ["incoming", "unpacked", "staged"] {
                    self.inner
                        .store
                        .remove_subdir(uid, sub)
                        .map_err(|e| io(e.to_string()))?;
                }
                record = Some(r);
            }
            let Some(r) = record.as_ref() else { continue };
            if chunk.migration_uid != *uid {
                return Err(RejectReason::MixedMigrations {
                    want: uid.clone(),
                    got: chunk.migration_uid,
                });
            }
            if current
                .as_ref()
                .is_none_or(|c| c.container != chunk.container)
            {
                if let Some(c) = current.take() {
                    return Err(RejectReason::Truncated {
                        container: c.container,
                        got: c.written,
                        bytes: c.total,
                    });
                }
                if !r.containers.iter().any(|c| c.name == chunk.container)
                    || received.iter().any(|a| a.name == chunk.container)
                {
                    return Err(RejectReason::UnknownContainer(chunk.container));
                }
                let limit = self.inner.config.limits.max_bytes;
                if chunk.total_bytes > limit {
                    return Err(RejectReason::TooLarge {
                        container: chunk.container,
                        bytes: chunk.total_bytes,
                        limit,
                    });
                }
                let free = self
                    .inner
                    .store
                    .free_bytes()
                    .map_err(|e| io(e.to_string()))?;
                // Received, then pulled into the runtime (the image backend): two copies at the
                // peak, and a margin.
                if chunk.total_bytes.saturating_mul(3) > free {
                    return Err(RejectReason::NoSpace {
                        container: chunk.container,
                        bytes: chunk.total_bytes,
                        free,
                    });
                }
                let dir = self
                    .inner
                    .store
                    .subdir(uid, "incoming")
                    .map_err(|e| io(e.to_string()))?;
                current = Some(Incoming::create(&chunk.container, &dir, chunk.total_bytes).await?);
            }
            let Some(inc) = current.as_mut() else {
                continue;
            };
            bytes += inc.append(&chunk).await? as u64;
            if !chunk.digest.is_empty() {
                let Some(inc) = current.take() else { continue };
                let container = inc.container.clone();
                let size = inc.total;
                let part = inc.finish(&chunk.digest).await?;
                let image = self.stage_archive(uid, &container, &part).await?;
                self.update(uid, |r| {
                    if let Some(c) = r.container_mut(&container) {
                        c.bytes = size;
                        c.digest = chunk.digest.clone();
                        c.staged = Some(image.clone());
                    }
                })
                .map_err(io)?;
                received.push(v1::ContainerArchive {
                    name: container,
                    bytes: size,
                    digest: chunk.digest,
                });
            }
        }
        if let Some(c) = current {
            return Err(RejectReason::Truncated {
                container: c.container,
                got: c.written,
                bytes: c.total,
            });
        }
        let Some(r) = record else {
            return Err(io("the stream carried no data".into()));
        };
        if let Some(c) = r
            .containers
            .iter()
            .find(|c| !received.iter().any(|a| a.name == c.name))
        {
            return Err(RejectReason::Missing(c.name.clone()));
        }
        Ok(bytes)
    }

    /// Checks a received archive entry by entry (as unpacking would, writing nothing) and stages
    /// it for the runtime; returns the image.
    async fn stage_archive(
        &self,
        uid: &str,
        container: &str,
        part: &std::path::Path,
    ) -> Result<String, RejectReason> {
        let io = |e: String| RejectReason::Io(e);
        let work = self
            .inner
            .store
            .subdir(uid, "staged")
            .map_err(|e| io(e.to_string()))?;
        let limits = self.inner.config.limits;
        let (part_path, name) = (part.to_path_buf(), container.to_string());
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&part_path)
                .map_err(|e| io(format!("{}: {e}", part_path.display())))?;
            archive::check(std::io::BufReader::with_capacity(1 << 20, file), limits)
                .map(drop)
                .map_err(|source| RejectReason::Unsafe {
                    container: name,
                    source,
                })
        })
        .await
        .map_err(|e| io(e.to_string()))??;
        let staged = self
            .inner
            .backend
            .stage(uid, container, part, &work)
            .await
            .map_err(io);
        // Only what the backend staged is kept.
        let _ = tokio::fs::remove_file(part).await;
        staged
    }

    /// Removes everything a refused stream left, so that nothing half-staged remains.
    fn discard_received(&self, uid: &str) {
        if !store::valid_uid(uid) {
            return;
        }
        for sub in ["incoming", "unpacked", "staged"] {
            if let Err(e) = self.inner.store.remove_subdir(uid, sub) {
                warn!(migration = %uid, error = %e, "cannot remove received data");
            }
        }
        let _ = self.update(uid, |r| {
            for c in &mut r.containers {
                c.staged = None;
                c.bytes = 0;
                c.digest.clear();
            }
        });
    }
}

#[tonic::async_trait]
impl AgentApi for Agent {
    async fn capabilities(
        &self,
        request: Request<v1::CapabilitiesRequest>,
    ) -> Result<Response<v1::NodeCapabilities>, Status> {
        identity::require(&request, &[Caller::Operator])?;
        let (runtime_name, runtime_version) = self
            .inner
            .runtime
            .version()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::NodeCapabilities {
            node_name: self.inner.config.node_name.clone(),
            runtime_name,
            runtime_version,
            criu_version: criu_version().await.unwrap_or_default(),
            rxe_present: self.inner.rxe.present(),
            free_bytes: self.inner.store.free_bytes().unwrap_or(0),
            restore_backends: vec![self.inner.backend.name().into()],
        }))
    }

    async fn prepare_target(
        &self,
        request: Request<v1::PrepareTargetRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| {
                check_pod(r.pod.as_ref())?;
                Ok((Step::Prepare, Box::pin(agent.prepare(r))))
            },
        )
        .await
    }

    async fn checkpoint(
        &self,
        request: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| {
                check_pod(r.pod.as_ref())?;
                Ok((Step::Checkpoint, Box::pin(agent.checkpoint(r))))
            },
        )
        .await
    }

    async fn transfer(
        &self,
        request: Request<v1::TransferRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| Ok((Step::Transfer, Box::pin(agent.transfer(r)))),
        )
        .await
    }

    async fn receive(
        &self,
        request: Request<Streaming<v1::ReceiveChunk>>,
    ) -> Result<Response<v1::ReceiveResult>, Status> {
        identity::require(&request, &[Caller::Agent])?;
        let mut stream = request.into_inner();
        let mut uid = String::new();
        let mut archives = Vec::new();
        let started = Instant::now();
        match self
            .receive_stream(&mut stream, &mut uid, &mut archives)
            .await
        {
            Ok(bytes) => {
                self.inner.metrics.bytes("received", bytes);
                info!(migration = %uid, bytes, took_ms = started.elapsed().as_millis() as u64, "checkpoint received and staged");
                Ok(Response::new(v1::ReceiveResult { bytes, archives }))
            }
            Err(reason) => {
                warn!(migration = %uid, %reason, "checkpoint refused");
                self.discard_received(&uid);
                let code = match reason {
                    RejectReason::TooLarge { .. } | RejectReason::NoSpace { .. } => {
                        tonic::Code::ResourceExhausted
                    }
                    RejectReason::Io(_) => tonic::Code::FailedPrecondition,
                    _ => tonic::Code::InvalidArgument,
                };
                Err(Status::new(code, reason.to_string()))
            }
        }
    }

    async fn stage_restore(
        &self,
        request: Request<v1::StageRestoreRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| Ok((Step::Stage, Box::pin(agent.stage(r)))),
        )
        .await
    }

    async fn finish_restore(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| Ok((Step::Finish, Box::pin(agent.finish(r.migration_uid)))),
        )
        .await
    }

    async fn commit(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| {
                let role = role(r.role())?;
                Ok((
                    Step::Commit(role),
                    Box::pin(agent.commit(r.migration_uid, role)),
                ))
            },
        )
        .await
    }

    async fn abort(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| {
                let role = role(r.role())?;
                Ok((
                    Step::Abort(role),
                    Box::pin(agent.abort(r.migration_uid, role)),
                ))
            },
        )
        .await
    }

    async fn cleanup(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::Operation>, Status> {
        self.step_rpc(
            request,
            |r| &r.migration_uid,
            |agent, r| {
                let role = role(r.role())?;
                Ok((
                    Step::Cleanup(role),
                    Box::pin(agent.cleanup(r.migration_uid)),
                ))
            },
        )
        .await
    }
}

/// `criu --version`'s version, if CRIU is installed.
pub async fn criu_version() -> Option<String> {
    let out = tokio::process::Command::new("criu")
        .arg("--version")
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
}
