//! The agent of one node: what every step shares (settings, the runtime, the checkpoint store, the
//! rxe counters, the pod IP block list, the restore backends, the operations table) and the steps
//! that either end of a migration takes (abort, cleanup). The steps of each end are in `source`
//! and `target`; `api` is the gRPC facade in front of them.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_api::{Role, operations::Operations, tls::Served, v1};

use crate::{
    archive::Limits,
    error::{Error, Result},
    ipam::Reservations,
    metrics::Metrics,
    netblock::NetBlock,
    post_copy::{LazyDaemons, PageServers},
    restore::RestoreBackend,
    room::Room,
    runtime::Runtime,
    rxe_counters::Holds,
    rxe_starts::Starts,
    store::{self, Record, Store},
};

/// What the agent is configured with (the agent's flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub store: PathBuf,
    pub reservations: PathBuf,
    pub limits: Limits,
    /// Waiting for the checkpoint of one container at most this long.
    pub checkpoint_timeout: Duration,
    /// A step that ends within this answers its result at once instead of RUNNING.
    pub quick_answer: Duration,
    /// Attempts of a transfer whose stream breaks.
    pub transfer_attempts: u32,
    /// Waiting for a killed source container to end at most this long.
    pub stop_timeout: Duration,
    /// A paused source resumes by itself this long after its checkpoint unless the migration
    /// passed its commit point first, when the operator's request names no deadline.
    pub source_deadline: Duration,
    /// How the source checkpoints containers.
    pub checkpoint_via: CheckpointVia,
    /// The kubelet's root directory (its pods' emptyDir volumes are under it).
    pub kubelet_dir: PathBuf,
}

/// How the source checkpoints a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CheckpointVia {
    /// The container's task through containerd (CRIU images straight into the store, the
    /// writable layer from the overlay's upper directory) when the target restores with the
    /// runtime wrapper; the CRI otherwise.
    #[default]
    Auto,
    /// Always the CRI's `CheckpointContainer` (the runtime packs an archive).
    Cri,
}

/// The node's parts the agent works with.
#[derive(Debug)]
pub struct Parts {
    pub runtime: Runtime,
    pub rxe: Holds,
    /// What the rxe counters did at the starts of RDMA pods here (the device plugin's records).
    pub rxe_starts: Starts,
    pub net: NetBlock,
    /// The restore backends the agent was configured with, the preferred one first.
    pub backends: Vec<Box<dyn RestoreBackend>>,
    /// What the agent serves with, and dials peer agents with (its current certificate).
    pub tls: Arc<Served>,
    pub metrics: Arc<Metrics>,
}

/// The agent of one node; cheap to clone (every step owns one).
#[derive(Debug, Clone)]
pub struct Agent {
    pub(crate) settings: Arc<Settings>,
    pub(crate) parts: Arc<Parts>,
    pub(crate) store: Store,
    pub(crate) reservations: Reservations,
    pub(crate) operations: Arc<Operations>,
    /// Migrations whose checkpoint runs on this node (see `source::Agent::hold`).
    pub(crate) checkpointing: Arc<Mutex<BTreeSet<String>>>,
    /// Disk room held by the streams being received.
    pub(crate) room: Room,
    /// Source: page servers of post-copy migrations.
    pub(crate) page_servers: PageServers,
    /// Target: lazy-pages daemons of post-copy migrations.
    pub(crate) lazy: LazyDaemons,
}

impl Agent {
    pub fn new(settings: Settings, parts: Parts) -> Self {
        Self {
            store: Store::new(&settings.store),
            reservations: Reservations::new(&settings.reservations),
            operations: Operations::new(settings.quick_answer),
            checkpointing: Arc::default(),
            room: Room::default(),
            page_servers: PageServers::default(),
            lazy: LazyDaemons::default(),
            settings: Arc::new(settings),
            parts: Arc::new(parts),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn runtime(&self) -> &Runtime {
        &self.parts.runtime
    }

    pub fn operations(&self) -> &Arc<Operations> {
        &self.operations
    }

    /// Whether a step of migration `uid` runs now (its data must stay).
    pub fn active(&self, uid: &str) -> bool {
        self.operations.active(uid)
    }

    /// What this node can do.
    pub async fn capabilities(&self) -> Result<v1::NodeCapabilities> {
        let (runtime_name, runtime_version) = self.parts.runtime.version().await?;
        let criu = criu_version().await;
        let (mut restore_backends, mut notes) = (Vec::new(), Vec::new());
        for backend in &self.parts.backends {
            match backend.unavailable(&self.parts.runtime).await {
                None => restore_backends.push(backend.name().to_string()),
                Some(why) => notes.push(why),
            }
        }
        Ok(v1::NodeCapabilities {
            node_name: self.settings.node_name.clone(),
            runtime_name,
            runtime_version,
            criu_version: criu.clone().unwrap_or_default(),
            rxe_present: self.parts.rxe.counters().present(),
            // Less what streams being received hold.
            free_bytes: self
                .store
                .free_bytes()
                .unwrap_or(0)
                .saturating_sub(self.room.held()),
            restore_backends,
            notes,
            strategies: crate::strategies::requirements(criu.is_some()).await,
        })
    }

    /// The backend named `name` (empty: the preferred one), if the node can restore with it now.
    pub(crate) async fn backend(&self, name: &str) -> Result<&dyn RestoreBackend> {
        let backend = self
            .parts
            .backends
            .iter()
            .find(|b| name.is_empty() || b.name() == name)
            .ok_or_else(|| Error::Invalid(format!("this node has no restore backend {name:?}")))?;
        match backend.unavailable(&self.parts.runtime).await {
            None => Ok(backend.as_ref()),
            Some(why) => Err(Error::NotReady(why)),
        }
    }

    /// A succeeded operation of `uid` that says where the node keeps the migration's data.
    pub(crate) fn done(&self, uid: &str) -> v1::Operation {
        let mut op = v1::Operation::succeeded(uid);
        op.location = self.store.location(uid);
        op
    }

    /// Before the commit point. Source: lift the network block and resume the containers as
    /// they were. Target: discard what was received or staged.
    pub async fn abort(self, uid: String, role: Role) -> Result<v1::Operation> {
        match self.store.load(&uid)? {
            None => {}
            Some(r) if r.committed => {
                return Err(Error::NotReady(format!(
                    "migration {uid} is past its commit point; it cannot be aborted"
                )));
            }
            Some(r) => match role {
                Role::Source => self.thaw(&r).await?,
                Role::Target => self.release_target(&r).await?,
            },
        }
        self.store.remove(&uid)?;
        Ok(v1::Operation::succeeded(&uid))
    }

    /// Drops everything kept for the migration, after undoing what would otherwise stay: a
    /// source that is not past the commit point is resumed (a pod is never left frozen).
    pub async fn cleanup(self, uid: String) -> Result<v1::Operation> {
        if let Some(r) = self.store.load(&uid)? {
            match r.role {
                store::Role::Source if !r.committed => self.thaw(&r).await?,
                store::Role::Source => {
                    if r.post_copy && !r.stopped {
                        self.stop_unserved(&r).await?;
                    }
                    self.unblock(&r).await?;
                }
                store::Role::Target => {
                    self.release_target(&r).await?;
                    // Images no pod was made from; a replacement's own image stays for its
                    // restarts (the kubelet's image garbage collection takes it when unused).
                    if !r.committed {
                        self.remove_staged_images(&r).await;
                    }
                }
            }
        }
        self.store.remove(&uid)?;
        self.operations.forget(&uid);
        self.parts.rxe.release(&uid);
        // Post-copy: a daemon still streaming decides on its own (and kills the restored pod if
        // its pages cannot all come); only the account of it goes.
        self.lazy.forget(&uid);
        Ok(v1::Operation::succeeded(&uid))
    }

    /// A target past the commit point whose restore did not finish: releases what it holds for
    /// the pod (the IP block and reservation, the rxe counters) and keeps the checkpoint for a
    /// manual restore, until garbage collection takes it after the retention time.
    pub async fn release(self, uid: String) -> Result<v1::Operation> {
        if let Some(r) = self.store.load(&uid)? {
            if r.role != store::Role::Target {
                return Err(Error::Invalid(format!(
                    "migration {uid} is not a target here: only a target keeps its checkpoint"
                )));
            }
            self.release_target(&r).await?;
            if r.reserved {
                self.store.update(&uid, |r| r.reserved = false)?;
            }
        }
        self.operations.forget(&uid);
        Ok(self.done(&uid))
    }

    /// Removes the checkpoint images the record's containers were staged as from the runtime
    /// (paths in the store go with the store's data); one that cannot be removed now (a pod
    /// still uses it) is left to the runtime's own image garbage collection.
    async fn remove_staged_images(&self, r: &Record) {
        for image in r.containers.iter().filter_map(|c| c.staged.as_deref()) {
            if image.starts_with('/') {
                continue;
            }
            if let Err(e) = self.parts.runtime.remove_image(image).await {
                tracing::warn!(migration = %r.uid, %image, error = %e, "cannot remove a checkpoint image");
            }
        }
    }

    /// Lifts this node's block of the record's pod IP, if the agent set one.
    pub(crate) async fn unblock(&self, r: &Record) -> Result<()> {
        if let Some(ip) = pod_ip(&r.pod_ip)?.filter(|_| r.blocked) {
            self.parts.net.unblock(ip).await?;
            match self.store.update(&r.uid, |r| r.blocked = false) {
                // Cleaned up meanwhile: nothing left to note it in.
                Ok(_) | Err(store::Error::NoRecord(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// A pod IP as the API carries it: empty for none.
pub(crate) fn pod_ip(ip: &str) -> Result<Option<Ipv4Addr>> {
    if ip.is_empty() {
        return Ok(None);
    }
    ip.parse()
        .map(Some)
        .map_err(|_| Error::Invalid(format!("pod IP {ip:?} is not an IPv4 address")))
}

/// The version of the node's CRIU (the one its runtime uses, run as post-copy runs it:
/// `post_copy::in_node`), if it has one.
pub async fn criu_version() -> Option<String> {
    let mut command = crate::post_copy::in_node("criu");
    let out = command.arg("--version").output().await.ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
}
