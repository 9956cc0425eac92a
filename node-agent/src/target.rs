//! The target end of a migration: prepare (room, rxe block, base images), receive the checkpoint
//! stream and stage each vetted archive with the restore backend, then stage the restore itself
//! (rxe counters held, IP reserved and blocked until the restored sockets exist), and finish once
//! the replacement pod runs (lift the block, announce the address). Release undoes all of it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_api::v1;
use futures::Stream;
use tracing::{info, warn};

use crate::{
    address,
    agent::{Agent, pod_ip},
    api::{MAX_RECEIVING, RECEIVE_SLOT_WAIT},
    archive,
    error::{Error, Result},
    ipam::Reservation,
    post_copy,
    room::Hold,
    rxe_counters::{self, Block},
    store::{Record, Role},
    wire::{self, Destination, Opened, Received, Rejected},
};

/// What a stream leaves in a migration's directory, removed when it is refused or replaced.
const RECEIVED_DIRS: [&str; 2] = ["incoming", agent_api::layout::STAGED];
/// How long, and how often, a target looks for its restored pod to run.
const WATCH_RESTORE_FOR: Duration = Duration::from_secs(600);
const WATCH_RESTORE_EVERY: Duration = Duration::from_millis(20);
/// How long a target looks for a restored container to kill when its memory cannot all come.
const KILL_RESTORED_WITHIN: Duration = Duration::from_secs(10);

impl Agent {
    /// Checks that the pod can be restored here and records the migration.
    pub async fn prepare(self, req: v1::PrepareTargetRequest) -> Result<v1::Operation> {
        let pod = req.pod.unwrap_or_default();
        let free = self.store.free_bytes()?.saturating_sub(self.room.held());
        if req.expected_bytes > free {
            return Err(Error::NotReady(format!(
                "the checkpoint store has {free} bytes free, the checkpoint needs about {}",
                req.expected_bytes
            )));
        }
        let limit = self.settings.limits.max_bytes;
        if req.expected_bytes > limit {
            return Err(Error::Invalid(format!(
                "the checkpoint (about {} bytes) is larger than this node's limit of {limit} bytes",
                req.expected_bytes
            )));
        }
        if let Some(block) = req.rxe.as_ref().map(Block::from) {
            let counters = self.parts.rxe.counters();
            if !counters.present() {
                return Err(rxe_counters::Error::Absent(counters.dir().to_path_buf()).into());
            }
            counters.check(block)?;
        }
        // The restore pulls the base images; find out now whether it can.
        for c in pod.containers.iter().filter(|c| !c.image.is_empty()) {
            self.runtime()
                .pull(&c.image)
                .await
                .map_err(|e| Error::from(e).during("the target cannot pull the base image"))?;
        }
        let backend = self.backend(&req.backend).await?.name().to_string();
        let fresh = Record {
            backend,
            source_node: req.source_node.clone(),
            ..Record::of_pod(&req.migration_uid, Role::Target, &pod)
        };
        // Asked again: what an earlier attempt did here stays recorded.
        let record = match self.store.load(&req.migration_uid)? {
            Some(r) if r.role == Role::Target => Record {
                pod_uid: fresh.pod_uid,
                pod_ip: fresh.pod_ip,
                containers: fresh.containers,
                backend: fresh.backend,
                source_node: fresh.source_node,
                ..r
            },
            _ => fresh,
        };
        self.store.save(&record)?;
        let mut op = self.done(&req.migration_uid);
        op.message = format!("{free} bytes free");
        Ok(op)
    }

    /// Receives a checkpoint stream from the source agent; anything refused leaves nothing.
    /// A stream takes one of `slots` once its first chunk named a migration this node prepared
    /// for the sending node (so that no other node's agent can hold the slots), and waits
    /// [`RECEIVE_SLOT_WAIT`] for one at most.
    pub async fn receive(
        &self,
        peer: &str,
        slots: &Arc<tokio::sync::Semaphore>,
        stream: impl Stream<Item = Result<v1::ReceiveChunk, tonic::Status>> + Unpin,
    ) -> Result<Received> {
        let mut sink = Staging {
            agent: self,
            peer,
            slots,
            slot: None,
            uid: None,
            backend: String::new(),
            hold: None,
        };
        let result = wire::receive(stream, &mut sink).await;
        match &result {
            Ok(got) if got.before => {}
            Ok(got) => self.parts.metrics.bytes("received", got.bytes),
            Err(_) => {
                if let Some(uid) = &sink.uid {
                    self.discard_received(uid);
                }
            }
        }
        result
    }

    /// Removes everything a refused stream left, so that nothing half-staged remains.
    fn discard_received(&self, uid: &str) {
        for sub in RECEIVED_DIRS {
            if let Err(e) = self.store.remove_subdir(uid, sub) {
                warn!(migration = %uid, error = %e, "cannot remove received data");
            }
        }
        let _ = self.store.update(uid, |r| {
            for c in &mut r.containers {
                c.staged = None;
                c.bytes = 0;
                c.digest.clear();
            }
        });
    }

    /// Sets the rxe counters to the pod's block (held until the pod runs), reserves and blocks
    /// the pod IP, and answers what each container is restored from.
    pub async fn stage_restore(self, req: v1::StageRestoreRequest) -> Result<v1::Operation> {
        let uid = req.migration_uid.clone();
        let record = self
            .store
            .load(&uid)?
            .filter(|r| r.role == Role::Target)
            .ok_or_else(|| {
                Error::NotReady(format!("migration {uid} was not prepared on this node"))
            })?;
        // Only what the operator recorded from the source's checkpoint is staged: the sending
        // peer's word on its own data is not enough.
        if req.expected.is_empty() {
            return Err(Error::Invalid(
                "the request names no expected archives (name and digest of each container)".into(),
            ));
        }
        for c in &record.containers {
            let want = req.expected.iter().find(|e| e.name == c.name);
            match want {
                Some(want) if !c.digest.is_empty() && want.digest == c.digest => {}
                Some(want) if !c.digest.is_empty() => {
                    return Err(Error::Invalid(format!(
                        "the checkpoint of container {} arrived with digest {}, the operator expects {}: it is not staged",
                        c.name, c.digest, want.digest
                    )));
                }
                Some(_) => {}
                None => {
                    return Err(Error::Invalid(format!(
                        "the operator expects no checkpoint of container {}",
                        c.name
                    )));
                }
            }
        }
        let mut staged = Vec::new();
        for c in &record.containers {
            // A path must still be there; an image reference is the runtime's.
            let present = |image: &&String| !image.starts_with('/') || Path::new(image).exists();
            let image = c.staged.as_ref().filter(present).ok_or_else(|| {
                Error::NotReady(format!(
                    "the checkpoint of container {} was not received",
                    c.name
                ))
            })?;
            staged.push(v1::StagedContainer {
                name: c.name.clone(),
                image: image.clone(),
            });
        }
        if let Some(block) = req.rxe.as_ref().map(Block::from)
            && self
                .parts
                .rxe
                .take(&uid, &format!("{}/{}", record.namespace, record.pod), block)
                .await?
        {
            info!(%block, "rxe counters set and held until the pod runs");
        }
        if let Some(ip) = pod_ip(&record.pod_ip)? {
            let reservation = Reservation {
                ip,
                migration: uid.clone(),
            };
            self.reservations
                .reserve(&record.namespace, &record.pod, &reservation)
                .map_err(|source| Error::Io {
                    what: format!("reserving {ip} for the pod"),
                    source,
                })?;
            self.store.update(&uid, |r| r.reserved = true)?;
            // Held, not blocked: the new sandbox's ARP goes out, so that peers send here, where
            // the uplinks answer them until the restored sockets exist.
            self.parts.net.hold(ip).await?;
            self.store.update(&uid, |r| r.blocked = true)?;
        }
        // Staged after the commit point (the operator asks only then): the checkpoint is the
        // pod's only copy now, kept until the cleanup or the retention time.
        self.store.update(&uid, |r| r.committed = true)?;
        if let Some(source) = &req.post_copy {
            self.fetch_memory(&record, source).await?;
        }
        tokio::spawn(self.clone().finish_when_running(uid.clone()));
        let mut op = self.done(&uid);
        op.staged = staged;
        Ok(op)
    }

    /// Post-copy: starts a lazy-pages daemon for each container, fetching its memory from the
    /// source's agent, before the runtime wrapper restores it (docs/node-agent.md#post-copy).
    async fn fetch_memory(&self, record: &Record, source: &v1::PostCopySource) -> Result<()> {
        if source.node != record.source_node {
            return Err(Error::Invalid(format!(
                "the memory must come from the node the checkpoint came from ({}), not {}",
                record.source_node, source.node
            )));
        }
        self.store.update(&record.uid, |r| r.post_copy = true)?;
        for c in &record.containers {
            // A retried request: the daemons started before stay.
            if self.lazy.has(&record.uid, &c.name) {
                continue;
            }
            let dir =
                c.staged.clone().map(PathBuf::from).ok_or_else(|| {
                    Error::NotReady(format!("container {} is not staged", c.name))
                })?;
            let fetch = post_copy::Fetch {
                uid: record.uid.clone(),
                container: c.name.clone(),
                dir,
                source: source.clone(),
                tls: self.parts.tls.material(),
            };
            let (agent, namespace, pod, name) = (
                self.clone(),
                record.namespace.clone(),
                record.pod.clone(),
                c.name.clone(),
            );
            let kill = move || -> futures::future::BoxFuture<'static, ()> {
                Box::pin(async move { agent.kill_restored(&namespace, &pod, &name).await })
            };
            self.lazy.start(fetch, kill).await?;
        }
        if let Some(daemons) = self.lazy.of(&record.uid) {
            tokio::spawn(self.clone().record_memory_in(record.uid.clone(), daemons));
        }
        Ok(())
    }

    /// Records when every page of migration `uid` is in (every container's daemon decided so),
    /// so that a restarted agent knows its restored pod is whole.
    async fn record_memory_in(self, uid: String, daemons: Vec<Arc<post_copy::LazyDaemon>>) {
        for daemon in daemons {
            if daemon.decided().await != post_copy::Memory::Complete {
                return;
            }
        }
        if let Err(e) = self.store.update(&uid, |r| r.memory_in = true) {
            warn!(migration = %uid, error = %e, "cannot record that all memory is in");
        }
    }

    /// After a restart of the agent: the restored containers of a post-copy migration whose
    /// memory was not all in when the earlier run ended are killed (their lazy-pages daemons went
    /// with it, and the kernel serves zeroes for pages never copied).
    pub async fn recover_post_copy_targets(&self) {
        let unfinished: Vec<Record> = self
            .store
            .records()
            .filter(|r| r.role == Role::Target && r.post_copy && !r.memory_in)
            .collect();
        for r in unfinished {
            let uid = r.uid.clone();
            warn!(migration = %uid, "the memory of a post-copy restore was still coming when the agent stopped: killing the restored pod");
            for c in &r.containers {
                // A restore that comes now finds no daemon to serve it: without the marker it
                // fails (its images hold no pages) instead of running with none.
                if let Some(dir) = &c.staged {
                    let _ = std::fs::remove_file(Path::new(dir).join(post_copy::LAZY_MARKER));
                }
                self.kill_restored(&r.namespace, &r.pod, &c.name).await;
            }
            // The daemons the earlier run started, now without their agent.
            if let Ok(dir) = self.store.dir(&uid) {
                post_copy::kill_leftovers(&dir);
            }
        }
    }

    /// Freezes and kills a restored container whose memory cannot all come: it never runs on
    /// with pages missing. Its lazy-pages daemon's connection stays open until this returns. A
    /// restore still under way when it is called is looked for a while (its processes run before
    /// the runtime reports the container); one that never shows up fails by itself once the
    /// daemon is gone.
    async fn kill_restored(&self, namespace: &str, pod: &str, container: &str) {
        let rt = self.runtime();
        let deadline = Instant::now() + KILL_RESTORED_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(id)) = rt.find_live_container(namespace, pod, container).await {
                let _ = rt.pause(&id).await;
                let _ = rt.kill(&id).await;
                let _ = rt.resume(&id).await;
                if matches!(
                    rt.task_status(&id).await,
                    Ok(crate::runtime::TaskStatus::Stopped) | Err(_)
                ) {
                    info!(%container, "the restored container was killed");
                    return;
                }
            }
            tokio::time::sleep(WATCH_RESTORE_EVERY * 5).await;
        }
        warn!(%container, "no restored container to kill was found in time");
    }

    /// Post-copy: where the memory of migration `uid` stands on this target.
    pub fn memory(&self, uid: &str) -> Result<v1::Operation> {
        if let Some(daemons) = self.lazy.of(uid) {
            return Ok(post_copy::operation(uid, &daemons));
        }
        match self.store.load(uid)? {
            Some(r) if r.role == Role::Target && r.memory_in => {
                let mut op = v1::Operation::succeeded(uid);
                op.message = "all memory is in".into();
                Ok(op)
            }
            Some(r) if r.role == Role::Target && r.post_copy => Ok(v1::Operation::failed(
                uid,
                format!(
                    "the memory of migration {uid} was being fetched by an earlier run of this \
                     agent: the restored pod was killed"
                ),
            )),
            _ => Err(Error::NotReady(format!(
                "migration {uid} fetches no memory on this node"
            ))),
        }
    }

    /// Finishes the restore as soon as the node's runtime runs every container of the replacement:
    /// the kubelet reports the pod Running up to a status period later and the operator asks after
    /// that, while the restored sockets exist from the start. Stops when the restore was finished,
    /// aborted or cleaned up, or after [`WATCH_RESTORE_FOR`].
    async fn finish_when_running(self, uid: String) {
        let deadline = Instant::now() + WATCH_RESTORE_FOR;
        let rt = self.runtime();
        while Instant::now() < deadline {
            tokio::time::sleep(WATCH_RESTORE_EVERY).await;
            let Ok(Some(record)) = self.store.load(&uid) else {
                return;
            };
            if !record.blocked {
                return;
            }
            let mut running = true;
            for c in &record.containers {
                let found = rt.find_container(&record.namespace, &record.pod, "", &c.name);
                if !matches!(found.await, Ok(Some(_))) {
                    running = false;
                    break;
                }
            }
            if running {
                match self.clone().finish_restore(uid.clone()).await {
                    Ok(_) => info!(migration = %uid, "the restored pod runs: its IP is unblocked"),
                    Err(e) => {
                        warn!(migration = %uid, error = %e, "finishing the restore failed; the operator will ask")
                    }
                }
                return;
            }
        }
    }

    /// The replacement runs: lift the IP block, let go of the rxe counters, announce the address.
    pub async fn finish_restore(self, uid: String) -> Result<v1::Operation> {
        if let Some(record) = self.store.load(&uid)? {
            self.unblock(&record).await?;
            // The restored pod has a new MAC address on a new port: tell the network.
            self.announce(&record).await;
        }
        self.parts.rxe.release(&uid);
        Ok(v1::Operation::succeeded(&uid))
    }

    /// Announces the replacement pod's address from its network namespace (best effort: a peer
    /// that misses it finds the pod when its ARP entry expires).
    async fn announce(&self, record: &Record) {
        let netns = self
            .runtime()
            .pod_netns(&record.namespace, &record.pod, "")
            .await;
        let Some(netns) = netns else {
            warn!(migration = %record.uid, "no sandbox of the restored pod to announce its address from");
            return;
        };
        let path = PathBuf::from(&netns);
        let done = tokio::task::spawn_blocking(move || {
            // First what the restored sockets wait for (their window probes), then the rest.
            (address::resolve_waiting(&path), address::announce(&path))
        })
        .await;
        let uid = &record.uid;
        match done {
            Ok((resolved, announced)) => {
                match resolved {
                    Ok(asked) if asked.is_empty() => {}
                    Ok(asked) => {
                        info!(migration = %uid, ?asked, "asked the pod's kernel to resolve its waiting neighbours now")
                    }
                    Err(e) => {
                        warn!(migration = %uid, error = %e, "cannot have the pod's waiting neighbours resolved now")
                    }
                }
                match announced {
                    Ok(()) => info!(migration = %uid, %netns, "announced the pod's address"),
                    Err(e) => {
                        warn!(migration = %uid, error = %e, "cannot announce the pod's address")
                    }
                }
            }
            Err(e) => warn!(migration = %uid, error = %e, "cannot announce the pod's address"),
        }
    }

    /// Undoes the target's part: the IP block and reservation, the rxe hold.
    pub(crate) async fn release_target(&self, r: &Record) -> Result<()> {
        self.unblock(r).await?;
        if r.reserved {
            self.reservations
                .release(&r.namespace, &r.pod, &r.uid)
                .map_err(|source| Error::Io {
                    what: "releasing the IP reservation".into(),
                    source,
                })?;
        }
        self.parts.rxe.release(&r.uid);
        Ok(())
    }
}

/// The target's side of a stream: only prepared migrations, archives that fit, each checked entry
/// by entry and staged by the restore backend as it completes.
struct Staging<'a> {
    agent: &'a Agent,
    /// The node of the sending agent, as its certificate names it.
    peer: &'a str,
    /// The node's receive slots, and the one this stream holds once its sender was checked.
    slots: &'a Arc<tokio::sync::Semaphore>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The migration, once the first chunk named it.
    uid: Option<String>,
    /// The backend it stages with (its record says which).
    backend: String,
    /// Disk room held for the archive being received, given back when the next one is admitted
    /// (the finished one's bytes are on the disk then, counted as used) or the stream ends.
    hold: Option<Hold>,
}

impl Staging<'_> {
    fn uid(&self) -> Result<&str> {
        self.uid
            .as_deref()
            .ok_or_else(|| Error::Rejected(Rejected::Empty))
    }
}

impl wire::Sink for Staging<'_> {
    async fn open(&mut self, uid: &str) -> Result<Opened> {
        let store = &self.agent.store;
        let record = store
            .load(uid)?
            .filter(|r| r.role == Role::Target)
            .ok_or_else(|| {
                Error::NotReady(format!("migration {uid} was not prepared on this node"))
            })?;
        // Only the agent of the node the checkpoint comes from may send it (another node's agent
        // could otherwise put its own data in place of the pod's).
        if record.source_node != self.peer {
            return Err(Rejected::WrongSender {
                uid: uid.to_string(),
                peer: self.peer.to_string(),
                from: record.source_node,
            }
            .into());
        }
        // Once every archive arrived whole, no other stream replaces it: the source's stream
        // again (its answer to the first was lost) takes none of its data and is answered what
        // arrived then, which the operator checks against its record at StageRestore.
        if record.received_whole() {
            return Ok(Opened::Had(
                record
                    .containers
                    .into_iter()
                    .map(|c| v1::ContainerArchive {
                        name: c.name,
                        bytes: c.bytes,
                        digest: c.digest,
                    })
                    .collect(),
            ));
        }
        let slot = tokio::time::timeout(RECEIVE_SLOT_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Rejected::Busy(MAX_RECEIVING))?;
        self.slot = Some(slot);
        self.uid = Some(uid.to_string());
        self.backend = record.backend.clone();
        // A new stream replaces whatever an earlier, broken one left.
        for sub in RECEIVED_DIRS {
            store.remove_subdir(uid, sub)?;
        }
        Ok(Opened::Receive(
            record.containers.into_iter().map(|c| c.name).collect(),
        ))
    }

    async fn admit(&mut self, container: &str, bytes: u64) -> Result<Destination> {
        let limit = self.agent.settings.limits.max_bytes;
        if bytes > limit {
            return Err(Rejected::TooLarge {
                container: container.into(),
                bytes,
                limit,
            }
            .into());
        }
        let unpacks = self
            .agent
            .backend(&self.backend)
            .await?
            .unpacks_on_arrival();
        // The archive before this one arrived whole: its bytes are on the disk now.
        self.hold = None;
        let free = self.agent.store.free_bytes()?;
        // Unpacked on arrival: one copy. Received, then pulled into the runtime (the image
        // backend): two copies at the peak. And a margin. Held against other streams until this
        // archive is in.
        let copies = if unpacks { 2 } else { 3 };
        let hold = self
            .agent
            .room
            .hold(bytes.saturating_mul(copies), free)
            .map_err(|short| Rejected::NoSpace {
                container: container.into(),
                bytes,
                free: short.free.saturating_sub(short.held),
            })?;
        self.hold = Some(hold);
        let uid = self.uid()?;
        Ok(if unpacks {
            Destination::Unpack {
                dir: self
                    .agent
                    .store
                    .subdir(uid, agent_api::layout::STAGED)?
                    .join(container),
                limits: self.agent.settings.limits,
            }
        } else {
            Destination::File(self.agent.store.subdir(uid, "incoming")?)
        })
    }

    async fn received(&mut self, got: &v1::ContainerArchive, at: &Path) -> Result<()> {
        let uid = self.uid()?.to_string();
        let backend = self.agent.backend(&self.backend).await?;
        let image = if backend.unpacks_on_arrival() {
            let work = self.agent.store.subdir(&uid, agent_api::layout::STAGED)?;
            backend.stage(&uid, &got.name, at, &work).await?
        } else {
            let staged = self.stage_archive(&uid, &got.name, at).await;
            // Only what the backend staged is kept.
            let _ = tokio::fs::remove_file(at).await;
            staged?
        };
        self.agent.store.update(&uid, |r| {
            if let Some(c) = r.container_mut(&got.name) {
                c.bytes = got.bytes;
                c.digest = got.digest.clone();
                c.staged = Some(image);
            }
        })?;
        Ok(())
    }
}

impl Staging<'_> {
    /// Checks a received archive entry by entry (as unpacking would, writing nothing) and stages
    /// it for the runtime; answers what the container restores from.
    async fn stage_archive(&self, uid: &str, container: &str, part: &Path) -> Result<String> {
        let limits = self.agent.settings.limits;
        let (path, name) = (part.to_path_buf(), container.to_string());
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(Error::io(&path))?;
            archive::check(std::io::BufReader::with_capacity(1 << 20, file), limits)
                .map(drop)
                .map_err(|source| {
                    Error::from(Rejected::Unsafe {
                        container: name,
                        source,
                    })
                })
        })
        .await??;
        let work = self.agent.store.subdir(uid, agent_api::layout::STAGED)?;
        let backend = self.agent.backend(&self.backend).await?;
        backend.stage(uid, container, part, &work).await
    }
}
