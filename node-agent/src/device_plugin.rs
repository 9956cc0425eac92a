//! The agent as the kubelet's device plugin for `rdma/rxe` (device plugin API v1beta1;
//! docs/node-agent.md#device-plugin).
//!
//! - It advertises a configured number of `rdma/rxe` devices while the node's rxe counters are
//!   there (healthy) and registers again whenever the kubelet restarts (the kubelet removes the
//!   plugins' sockets then, and makes its own anew).
//! - `Allocate` hands a container what a verbs application needs on a real node: the
//!   `/dev/infiniband` device nodes that exist, and the rxe device's name in the environment.
//! - `PreStartContainer` (asked for, so the kubelet calls it before every start of a container
//!   with the devices, and waits for its answer) applies the pod's rxe block before the
//!   container starts: it finds the pod through the kubelet's pod resources API, waits a
//!   bounded time for the block the operator allocates (an `RxeBlock` labelled with the pod; the
//!   operator is the one allocator), takes the node's counter lock, sets the counters and keeps
//!   the lock until the container runs and has settled. Then it reads the counters back and
//!   records what the start took (`rxe_starts`). A pod whose block cannot be had gets an error,
//!   which the kubelet shows in the pod's events before it tries the start again.
//! - A container of a pod that a migration restores here starts with the counters the restore
//!   set and holds: the plugin lets it start and records it.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::Stream;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::events::{Event, EventType, Recorder},
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    metrics::Metrics,
    runtime::{Runtime, unix_channel},
    rxe_counters::{Block, Hold, Holds},
    rxe_starts::{How, Start, Starts},
};

/// The kubelet's device plugin API v1beta1 (`proto/kubelet/deviceplugin/v1beta1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// The kubelet's pod resources API v1 (`proto/kubelet/podresources/v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pod_resources {
    tonic::include_proto!("v1");
}

use api::{
    ContainerAllocateResponse, DevicePluginOptions, DeviceSpec,
    device_plugin_server::{DevicePlugin, DevicePluginServer},
    registration_client::RegistrationClient,
};
use pod_resources::pod_resources_lister_client::PodResourcesListerClient;

/// The API version the plugin speaks.
pub const API_VERSION: &str = "v1beta1";
/// The kubelet's registration socket in the device plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// The plugin's socket in the device plugin directory.
pub const SOCKET: &str = "kube-migros-rxe.sock";
/// How long the kubelet waits for `PreStartContainer` (`KubeletPreStartContainerRPCTimeoutInSecs`):
/// the plugin answers well within it.
pub const KUBELET_PRE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the plugin stays registered while the kubelet holds no device stream of it: the
/// kubelet opens one right after a registration, and drops it only when it drops the plugin.
pub const NO_STREAM_LIMIT: Duration = Duration::from_secs(20);

/// What the plugin is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The kubelet's device plugin directory (`/var/lib/kubelet/device-plugins`).
    pub dir: PathBuf,
    /// The kubelet's pod resources socket (`/var/lib/kubelet/pod-resources/kubelet.sock`).
    pub pod_resources: PathBuf,
    /// The resource advertised (`rdma/rxe`).
    pub resource: String,
    /// How many devices: pods that may use rxe on the node at once.
    pub devices: u32,
    /// Where the node's `/dev/infiniband` is seen (device nodes are handed out under
    /// `/dev/infiniband`).
    pub infiniband_dir: PathBuf,
    /// The rxe device's name (e.g. `rxe0`) for the environment; found in `/sys/class/infiniband`
    /// when unset.
    pub rdma_device: Option<String>,
    /// Simulated counters only (machines without RDMA): mount the counter directory into RDMA
    /// containers at this path, as the kernel's `/proc/sys/net/rdma_rxe` is seen in every
    /// container, so that a test workload can take numbers from it as rxe would hand them out.
    pub counters_mount: Option<PathBuf>,
    /// How long a start waits for the pod's block to appear.
    pub block_wait: Duration,
    /// How long a start waits for another start or restore that holds the counters.
    pub lock_wait: Duration,
    /// How long the counters stay held for a container that does not run.
    pub start_wait: Duration,
    /// How long the counters stay held after the container runs (for the queue pairs and memory
    /// regions the application makes as it starts).
    pub settle: Duration,
}

/// The device plugin.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    holds: Holds,
    runtime: Runtime,
    client: Client,
    recorder: Recorder,
    starts: Starts,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// The pod a container start belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodContainer {
    namespace: String,
    name: String,
    container: String,
}

impl Plugin {
    pub fn new(
        settings: Settings,
        holds: Holds,
        runtime: Runtime,
        client: Client,
        recorder: Recorder,
        starts: Starts,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                holds,
                runtime,
                client,
                recorder,
                starts,
                metrics,
            }),
        }
    }

    /// Serves the plugin and keeps it registered with the kubelet until `shutdown`: again
    /// whenever the kubelet restarted (its socket made anew, or the plugin's removed) or holds
    /// no device stream for [`NO_STREAM_LIMIT`] (it dropped the registration).
    pub async fn run(self, shutdown: CancellationToken) {
        let settings = &self.inner.settings;
        let socket = settings.dir.join(SOCKET);
        let kubelet = settings.dir.join(KUBELET_SOCKET);
        loop {
            let served = shutdown.child_token();
            let streams = Arc::new(AtomicUsize::new(0));
            let server = match self.serve(&socket, served.clone(), streams.clone()) {
                Ok(server) => server,
                Err(e) => {
                    warn!(socket = %socket.display(), error = %e, "cannot serve the device plugin; trying again");
                    if pause(&shutdown, Duration::from_secs(5)).await {
                        return;
                    }
                    continue;
                }
            };
            let stop = async |server: tokio::task::JoinHandle<()>| {
                served.cancel();
                let _ = server.await;
            };
            let mut said = false;
            let registered = loop {
                match self.register(&kubelet).await {
                    Ok(()) => break Some(identity(&kubelet)),
                    Err(e) => {
                        if !said {
                            warn!(error = %e, "cannot register with the kubelet yet; retrying");
                            said = true;
                        }
                        if pause(&shutdown, Duration::from_secs(2)).await {
                            break None;
                        }
                    }
                }
            };
            let Some(registered) = registered else {
                stop(server).await;
                let _ = std::fs::remove_file(&socket);
                return;
            };
            info!(resource = %settings.resource, devices = settings.devices, "registered with the kubelet as a device plugin");
            let mut streamless = Instant::now();
            loop {
                if pause(&shutdown, Duration::from_secs(1)).await {
                    stop(server).await;
                    let _ = std::fs::remove_file(&socket);
                    return;
                }
                if !socket.exists() || identity(&kubelet) != registered {
                    info!("the kubelet restarted; registering again");
                    break;
                }
                if streams.load(Ordering::Relaxed) > 0 {
                    streamless = Instant::now();
                } else if streamless.elapsed() > NO_STREAM_LIMIT {
                    info!("the kubelet holds no device stream; registering again");
                    break;
                }
            }
            stop(server).await;
        }
    }

    fn serve(
        &self,
        socket: &Path,
        stop: CancellationToken,
        streams: Arc<AtomicUsize>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(socket)?;
        let service = Service {
            plugin: self.clone(),
            stop: stop.clone(),
            streams,
        };
        Ok(tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
            {
                warn!(error = %e, "the device plugin server failed");
            }
        }))
    }

    async fn register(&self, kubelet: &Path) -> Result<(), String> {
        RegistrationClient::new(unix_channel(kubelet))
            .register(api::RegisterRequest {
                version: API_VERSION.into(),
                endpoint: SOCKET.into(),
                resource_name: self.inner.settings.resource.clone(),
                options: Some(options()),
            })
            .await
            .map_err(|e| format!("{}: {}", kubelet.display(), e.message()))?;
        Ok(())
    }

    /// The devices, all healthy when the node's counters are there.
    fn devices(&self, healthy: bool) -> api::ListAndWatchResponse {
        let health = if healthy { "Healthy" } else { "Unhealthy" };
        api::ListAndWatchResponse {
            devices: (0..self.inner.settings.devices)
                .map(|i| api::Device {
                    id: format!("rxe-{i}"),
                    health: health.into(),
                    topology: None,
                })
                .collect(),
        }
    }

    /// What a container with rxe devices gets.
    fn allocation(&self) -> ContainerAllocateResponse {
        let settings = &self.inner.settings;
        let devices = device_nodes(&settings.infiniband_dir)
            .into_iter()
            .map(|name| {
                let path = format!("/dev/infiniband/{name}");
                DeviceSpec {
                    container_path: path.clone(),
                    host_path: path,
                    permissions: "rw".into(),
                }
            })
            .collect();
        let envs = settings
            .rdma_device
            .clone()
            .or_else(rxe_device)
            .map(|device| verbs_environment(&device))
            .unwrap_or_default();
        let mounts = settings
            .counters_mount
            .iter()
            .map(|path| api::Mount {
                container_path: path.display().to_string(),
                host_path: self.inner.holds.counters().dir().display().to_string(),
                read_only: false,
            })
            .collect();
        ContainerAllocateResponse {
            envs,
            devices,
            mounts,
            ..Default::default()
        }
    }

    /// Applies the pod's block before its container starts (see the module's doc).
    async fn pre_start(&self, ids: &[String]) -> Result<(), String> {
        let inner = &self.inner;
        let who = self.pod_of(ids).await?;
        let key = format!("{}/{}", who.namespace, who.name);
        let uid = inner
            .runtime
            .pod_uid(&who.namespace, &who.name)
            .await
            .map_err(|e| format!("the sandbox of pod {key}: {e}"))?
            .ok_or_else(|| format!("pod {key} has no ready sandbox on this node yet"))?;
        let counters = inner.holds.counters();
        if let Some(block) = inner.holds.restoring(&key) {
            // A migration restores this pod: its restore set the counters to the block and
            // holds them until the pod runs.
            let now = counters.read().map_err(|e| e.to_string())?;
            let start = Start::begun(
                &who.namespace,
                &who.name,
                &uid,
                &who.container,
                How::Restore,
                block,
                now,
            )
            .ended(now, true);
            self.record(start);
            info!(pod = %key, container = %who.container, %block, "a restore holds the rxe counters at the pod's block");
            return Ok(());
        }
        let block = self.block_of(&who.namespace, &who.name).await?;
        let since = epoch_nanos();
        // Where the pod's earlier starts left off, read once the lock is held: they recorded
        // their end before they let go.
        let (hold, at) = counters
            .hold_at(
                &format!("the start of pod {key}"),
                block,
                || inner.starts.next_at(&uid, block),
                inner.settings.lock_wait,
            )
            .await
            .map_err(|e| format!("rxe counters for pod {key}: {e}"))?;
        // Recorded before the container may run: a source whose start is not checked yet (or
        // never will be: the agent stopped) is refused.
        let start = Start::begun(
            &who.namespace,
            &who.name,
            &uid,
            &who.container,
            How::Plugin,
            block,
            at,
        );
        if let Err(e) = inner.starts.put(start.clone()) {
            return Err(format!("cannot record the start of pod {key}: {e}"));
        }
        info!(pod = %key, container = %who.container, %block, qpn = at.0, mrn = at.1, "rxe counters set for the container's start");
        tokio::spawn(self.clone().until_started(start, hold, since));
        Ok(())
    }

    /// Keeps `hold` until the container started (or the wait ends) and has settled, then records
    /// what its start took and lets go.
    async fn until_started(self, start: Start, hold: Hold, since: i64) {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.settings.start_wait;
        let mut ran = false;
        while Instant::now() < deadline {
            match inner
                .runtime
                .runs_since(
                    &start.namespace,
                    &start.pod,
                    &start.uid,
                    &start.container,
                    since,
                )
                .await
            {
                Ok(true) => {
                    ran = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot see whether the container runs"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if ran {
            // A checkpoint of the pod ends the settle time: the pod is about to be frozen.
            let hurry = inner.starts.hurry(&start.uid);
            tokio::select! {
                () = tokio::time::sleep(inner.settings.settle) => {}
                () = hurry.notified() => {}
            }
        }
        let after = match inner.holds.counters().read() {
            Ok(after) => after,
            Err(e) => {
                warn!(error = %e, "cannot read the rxe counters back; the start counts as outside its block");
                (0, 0)
            }
        };
        // Recorded before the next start may take the counters (it continues after these
        // numbers).
        let start = start.ended(after, ran);
        self.record(start);
        drop(hold);
    }

    /// Records a start (at once), counts it, and tells the pod's events (in the background).
    fn record(&self, start: Start) {
        let inner = &self.inner;
        if let Err(e) = inner.starts.put(start.clone()) {
            warn!(error = %e, "cannot write the rxe start records");
        }
        inner.metrics.rxe_start(start.how, start.verified());
        let pod = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(start.namespace.clone()),
            name: Some(start.pod.clone()),
            uid: Some(start.uid.clone()),
            ..Default::default()
        };
        let event = match start.outside() {
            Some(why) => {
                warn!(pod = %format!("{}/{}", start.namespace, start.pod), "{why}");
                Event {
                    type_: EventType::Warning,
                    reason: "RxeOutsideBlock".into(),
                    note: Some(format!(
                        "{why}; the pod is not migrated (its numbers may be taken on another node) until it is recreated (docs/rxe-blocks.md)"
                    )),
                    action: "StartContainer".into(),
                    secondary: None,
                }
            }
            None => Event {
                type_: EventType::Normal,
                reason: "RxeBlockApplied".into(),
                note: Some(format!(
                    "container {} started with the rxe counters in its block ({}), set by {}: QPN {} -> {}, MRN {} -> {}",
                    start.container,
                    start.block,
                    match start.how {
                        How::Plugin => "the device plugin",
                        How::Restore => "its restore",
                    },
                    start.set.0,
                    start.after.0,
                    start.set.1,
                    start.after.1
                )),
                action: "StartContainer".into(),
                secondary: None,
            },
        };
        let recorder = inner.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &pod).await {
                warn!(error = %e, "could not publish an Event");
            }
        });
    }

    /// The pod and container the kubelet allocated `ids` to (its pod resources API), and forgets
    /// the records of pods no longer on the node.
    async fn pod_of(&self, ids: &[String]) -> Result<PodContainer, String> {
        let settings = &self.inner.settings;
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        // The kubelet knows the allocation before it asks; a few tries cover a slow answer.
        for attempt in 0..5 {
            let pods = PodResourcesListerClient::new(unix_channel(&settings.pod_resources))
                .list(pod_resources::ListPodResourcesRequest {})
                .await
                .map_err(|e| {
                    format!(
                        "the kubelet's pod resources API ({}): {}",
                        settings.pod_resources.display(),
                        e.message()
                    )
                })?
                .into_inner()
                .pod_resources;
            let found = pods.iter().find_map(|pod| {
                pod.containers.iter().find_map(|c| {
                    c.devices
                        .iter()
                        .any(|d| {
                            d.resource_name == settings.resource
                                && d.device_ids.iter().any(|id| wanted.contains(id.as_str()))
                        })
                        .then(|| PodContainer {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            container: c.name.clone(),
                        })
                })
            });
            if let Some(found) = found {
                self.forget_gone(&pods);
                return Ok(found);
            }
            if attempt < 4 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Err(format!(
            "the kubelet names no pod holding {} devices {ids:?}",
            settings.resource
        ))
    }

    /// Drops the start records of pods no longer on the node (by name: a pod replaced under its
    /// name keeps the records of its former UID until it goes, which no check reads).
    fn forget_gone(&self, pods: &[pod_resources::PodResources]) {
        let live: HashSet<(String, String)> = pods
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        if let Err(e) = self.inner.starts.keep_only(&live) {
            warn!(error = %e, "cannot write the rxe start records");
        }
    }

    /// The block of pod `namespace/name`, waiting for the operator to allocate it.
    async fn block_of(&self, namespace: &str, name: &str) -> Result<Block, String> {
        let api: Api<crds::RxeBlock> = Api::all(self.inner.client.clone());
        let params = ListParams::default().labels(&crds::owner_selector(namespace, name));
        let deadline = Instant::now() + self.inner.settings.block_wait;
        loop {
            match api.list(&params).await {
                Ok(list) => {
                    if let Some(b) = crds::owned_by(list.items, namespace, name).first() {
                        return Ok(Block {
                            qpn_start: b.spec.qpn_start,
                            qpn_count: b.spec.qpn_count,
                            mrn_start: b.spec.mrn_start,
                            mrn_count: b.spec.mrn_count,
                        });
                    }
                }
                Err(e) => warn!(error = %e, "cannot list rxe blocks"),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pod {namespace}/{name} has no rxe block after {:?}; it does not start with numbers outside a block of its own. The operator allocates a block to every pod labelled {}=true while blocks are free (and its namespace's share is not taken; see the pod's events and `kubectl get rxeblocks`); the kubelet tries again",
                    self.inner.settings.block_wait,
                    crds::RDMA_LABEL
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The gRPC face of the plugin while it is served once (until `stop`).
struct Service {
    plugin: Plugin,
    stop: CancellationToken,
    /// Device streams the kubelet holds open.
    streams: Arc<AtomicUsize>,
}

/// Counts an open device stream while it lives.
struct Streaming(Arc<AtomicUsize>);

impl Streaming {
    fn new(streams: Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self(streams)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Service {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (plugin, stop) = (self.plugin.clone(), self.stop.clone());
        let streaming = Streaming::new(self.streams.clone());
        tokio::spawn(async move {
            let _streaming = streaming;
            let mut last = None;
            loop {
                let healthy = plugin.inner.holds.counters().present();
                if last != Some(healthy) {
                    if !healthy {
                        warn!("the rxe counters are gone: the devices are unhealthy");
                    }
                    if tx.send(Ok(plugin.devices(healthy))).await.is_err() {
                        return;
                    }
                    last = Some(healthy);
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        // The devices are alike: any choice is as good.
        Ok(Response::new(api::PreferredAllocationResponse::default()))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let containers = request.into_inner().container_requests;
        Ok(Response::new(api::AllocateResponse {
            container_responses: containers
                .iter()
                .map(|_| self.plugin.allocation())
                .collect(),
        }))
    }

    async fn pre_start_container(
        &self,
        request: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        let ids = request.into_inner().devices_ids;
        match tokio::time::timeout(
            KUBELET_PRE_START_TIMEOUT - Duration::from_secs(2),
            self.plugin.pre_start(&ids),
        )
        .await
        {
            Ok(Ok(())) => Ok(Response::new(api::PreStartContainerResponse {})),
            Ok(Err(why)) => {
                warn!(devices = ?ids, "refused a container start: {why}");
                Err(Status::failed_precondition(why))
            }
            Err(_) => Err(Status::deadline_exceeded(
                "the rxe counters could not be set in time; the kubelet tries again",
            )),
        }
    }
}

fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: false,
    }
}

/// The file's identity (device, inode), to tell a socket made anew from the old one.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Waits `d`; answers whether `shutdown` came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// The RDMA device nodes a verbs application opens (`uverbsN`, `rdma_cm`) that exist in `dir`.
pub fn device_nodes(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n == "rdma_cm" || n.starts_with("uverbs"))
        .collect();
    names.sort();
    names
}

/// The first rxe device in `/sys/class/infiniband`.
fn rxe_device() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("rxe"))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// The environment that points verbs applications and the usual communication libraries at
/// the rxe device.
pub fn verbs_environment(device: &str) -> HashMap<String, String> {
    HashMap::from([
        ("MIGROS_RDMA_DEVICE".to_string(), device.to_string()),
        ("NCCL_IB_HCA".to_string(), device.to_string()),
        ("UCX_NET_DEVICES".to_string(), format!("{device}:1")),
    ])
}

fn epoch_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_device_nodes_verbs_open_are_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["uverbs1", "rdma_cm", "uverbs0", "umad0", "issm0"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(device_nodes(dir.path()), ["rdma_cm", "uverbs0", "uverbs1"]);
        assert!(device_nodes(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn the_environment_names_the_rxe_device() {
        let env = verbs_environment("rxe0");
        assert_eq!(env["MIGROS_RDMA_DEVICE"], "rxe0");
        assert_eq!(env["UCX_NET_DEVICES"], "rxe0:1");
    }
}
