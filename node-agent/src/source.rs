//! The source end of a migration: silence the pod's IP, pause its containers and checkpoint them
//! (they stay paused), stream the checkpoint to the target agent, and then either stop the paused
//! containers for good (commit) or resume them as they were (rollback).
//!
//! Two ways to checkpoint, both into one archive per container: through the CRI
//! (`CheckpointContainer`: the runtime runs CRIU and packs the archive, copying the images
//! through its content store), or, when the target restores with the runtime wrapper, the
//! container's task straight through containerd (the runc shim runs CRIU into the store) with the
//! writable layer taken from the overlay's upper directory, packed in one pass.
//! What must be undone is written to the migration's record first, so that a restarted agent can
//! still undo it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_api::{Step, v1};
use tracing::{info, warn};

use crate::{
    agent::{Agent, CheckpointVia, pod_ip},
    archive, empty_dirs,
    error::{Error, Result},
    layer, post_copy,
    restore::RUNTIME_WRAPPER,
    runtime::TaskStatus,
    store::{Container, Record, Role},
    wire::{self, Outgoing},
};

/// How the source checkpoints (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dump {
    Cri,
    Task,
    /// The task without its memory, which a page server serves after the restore (post-copy).
    Lazy,
}

/// How long a source serves the pages of a post-copy migration at most.
const SERVE_PAGES_FOR: Duration = Duration::from_secs(30 * 60);

/// How often a stopping or waiting step looks at the runtime again.
const RECHECK: Duration = Duration::from_millis(20);

/// How long a checkpoint waits for the device plugin to check a start of the pod that is under
/// way (the plugin holds the counters at most its start wait and settle time).
const RXE_START_SETTLE_LIMIT: Duration = Duration::from_secs(45);

impl Agent {
    /// Pauses and checkpoints the pod's containers; on any failure the pod runs again, reachable,
    /// and nothing of the attempt is kept.
    pub async fn checkpoint(self, req: v1::CheckpointRequest) -> Result<v1::Operation> {
        let uid = req.migration_uid.clone();
        let pod = req.pod.unwrap_or_default();
        // A pod whose numbers left its block at a start here cannot keep them elsewhere. A start
        // still under way (a pod moved right after it started) is waited for.
        self.parts
            .rxe_starts
            .settled(&pod.uid, RXE_START_SETTLE_LIMIT)
            .await;
        if let Some(why) = self.parts.rxe_starts.outside(&pod.uid) {
            return Err(Error::RxeOutsideBlock(format!(
                "{why}; it is refused as a migration source (docs/rxe-blocks.md)"
            )));
        }
        let mut record = Record::of_pod(&uid, Role::Source, &pod);
        // The source's own deadline, kept in the record so that a restarted agent keeps it too.
        let resume_after = match req.resume_after_seconds {
            0 => self.settings.source_deadline,
            s => Duration::from_secs(s),
        };
        record.resume_at = Some(crate::unix_now().saturating_add(resume_after.as_secs()));
        // The containers are found by the pod's sandbox. An ID the request names must be that
        // container's: whoever holds the operator's certificate pauses and dumps the pod it names,
        // never another container of the node.
        for c in &mut record.containers {
            let found = self
                .runtime()
                .find_container(&pod.namespace, &pod.name, &pod.uid, &c.name)
                .await?
                .ok_or_else(|| {
                    Error::NotReady(format!(
                        "no running container {} of pod {}/{} on this node",
                        c.name, pod.namespace, pod.name
                    ))
                })?;
            if !c.id.is_empty() && c.id != found {
                return Err(Error::Invalid(format!(
                    "container ID {} is not container {} of pod {}/{}",
                    c.id, c.name, pod.namespace, pod.name
                )));
            }
            c.id = found;
        }
        // One migration at a time moves a pod: refused before anything is touched.
        let _hold = self.hold(&record)?;
        let via = match self.settings.checkpoint_via {
            _ if req.post_copy && req.backend != RUNTIME_WRAPPER => {
                return Err(Error::Invalid(format!(
                    "post-copy restores through the {RUNTIME_WRAPPER} backend, not {:?}",
                    req.backend
                )));
            }
            _ if req.post_copy => Dump::Lazy,
            CheckpointVia::Auto if req.backend == RUNTIME_WRAPPER => Dump::Task,
            _ => Dump::Cri,
        };
        record.post_copy = via == Dump::Lazy;
        match self.freeze_and_dump(&mut record, via).await {
            Ok(op) => Ok(op),
            Err(cause) => {
                // Leave the source as it was: running and reachable.
                if let Err(undo) = self.thaw(&record).await {
                    return Err(Error::Undo {
                        cause: Box::new(cause),
                        undo: Box::new(undo),
                    });
                }
                // Undone: nothing of this attempt is kept.
                if let Err(e) = self.store.remove(&uid) {
                    warn!(error = %e, "cannot remove the failed checkpoint's data");
                }
                Err(cause)
            }
        }
    }

    /// Saves `record` and marks its migration as checkpointing until the guard goes, unless
    /// another migration holds a container of its pod on this node: one that is checkpointing it,
    /// or has it paused or its IP blocked and has not stopped it (committed) or given it back
    /// (aborted). Checked and saved under one lock, so of two at once the second sees the first.
    fn hold(&self, record: &Record) -> Result<Checkpointing> {
        let mut running = self
            .checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for uid in self.store.list()? {
            if uid == record.uid {
                continue;
            }
            let other = match self.store.load(&uid) {
                Ok(Some(other)) => other,
                Ok(None) => continue,
                // A record this agent cannot read holds nothing it could undo either.
                Err(e) => {
                    warn!(migration = %uid, error = %e, "an unreadable record is not looked at");
                    continue;
                }
            };
            if holds(&other, record, running.contains(&uid)) {
                return Err(Error::Invalid(format!(
                    "pod {}/{} is held on this node by migration {uid}: one migration at a time",
                    record.namespace, record.pod
                )));
            }
        }
        self.store.save(record)?;
        running.insert(record.uid.clone());
        Ok(Checkpointing {
            table: self.checkpointing.clone(),
            uid: record.uid.clone(),
        })
    }

    async fn freeze_and_dump(&self, record: &mut Record, via: Dump) -> Result<v1::Operation> {
        let uid = record.uid.clone();
        // Silence first: from here on the node acknowledges nothing of the pod's connections.
        if let Some(ip) = pod_ip(&record.pod_ip)? {
            record.blocked = true;
            self.store.save(record)?;
            self.parts.net.block(ip).await?;
        }
        self.pause(record).await?;
        let dir = self.store.subdir(&uid, "checkpoint")?;
        let mut archives = Vec::new();
        for c in &mut record.containers {
            let path = dir.join(format!("{}.tar", c.name));
            let _ = std::fs::remove_file(&path);
            let started = Instant::now();
            let (digest, bytes) = match via {
                Dump::Cri => {
                    self.runtime()
                        .checkpoint(&c.id, &path, self.settings.checkpoint_timeout)
                        .await?;
                    tokio::task::spawn_blocking(move || archive::digest_file(&path)).await??
                }
                Dump::Task | Dump::Lazy => {
                    c.directory = true;
                    (
                        String::new(),
                        self.dump_task(&uid, c, &dir, via == Dump::Lazy).await?,
                    )
                }
            };
            info!(container = %c.name, bytes, ?via, took_ms = started.elapsed().as_millis() as u64, "checkpointed");
            self.parts.metrics.bytes("checkpointed", bytes);
            c.bytes = bytes;
            c.digest = digest.clone();
            archives.push(v1::ContainerArchive {
                name: c.name.clone(),
                bytes,
                digest,
            });
        }
        // The pod's emptyDir volumes travel with its first container (the runtime wrapper applies
        // them before restoring it); checkpoint images cannot carry them, and the operator sends
        // pods with emptyDir volumes only to targets with the wrapper.
        if via != Dump::Cri
            && let Some(first) = record.containers.first_mut()
        {
            let (kubelet, pod_uid) = (self.settings.kubelet_dir.clone(), record.pod_uid.clone());
            let root = dir.join(&first.name);
            let bytes = tokio::task::spawn_blocking(move || -> Result<Option<u64>> {
                let volumes =
                    empty_dirs::of_pod(&kubelet, &pod_uid).map_err(Error::io(&kubelet))?;
                if volumes.is_empty() {
                    return Ok(None);
                }
                empty_dirs::pack(&volumes, &root)
                    .map_err(|e| Error::Invalid(format!("the emptyDir volumes: {e}")))?;
                Ok(Some(archive::Layout::of(&root)?.bytes()))
            })
            .await??;
            if let Some(bytes) = bytes {
                info!(container = %first.name, bytes, "packed the pod's emptyDir volumes");
                first.bytes = bytes;
                if let Some(a) = archives.first_mut() {
                    a.bytes = bytes;
                }
            }
        }
        // The snapshot is only good if nothing ran after it: every task must still be paused.
        for c in &record.containers {
            let status = self.runtime().task_status(&c.id).await?;
            if status != TaskStatus::Paused {
                return Err(Error::NotReady(format!(
                    "container {} is {} after its checkpoint, not paused",
                    c.name,
                    task_state(status)
                )));
            }
        }
        self.store.save(record)?;
        let total = archives.iter().map(|a| a.bytes).sum();
        let mut op = self.done(&uid);
        op.archives = archives;
        op.bytes_done = total;
        op.bytes_total = total;
        Ok(op)
    }

    /// Checkpoints the (paused) task of `c` through containerd into `<dir>/<name>/checkpoint` and
    /// writes its writable layer next to it (`rootfs-diff.tar`): the layout of a CRI checkpoint
    /// archive, kept as a directory; answers the size of the archive it streams as. `lazy`: the
    /// memory stays behind, served by a page server after the restore (`post_copy`).
    async fn dump_task(&self, uid: &str, c: &Container, dir: &Path, lazy: bool) -> Result<u64> {
        let rt = self.runtime();
        let pid = rt.task_pid(&c.id).await?;
        // The writable layer, found before anything is written: a root filesystem that is not
        // an overlay fails here, with the container untouched.
        let upper = tokio::task::spawn_blocking(move || layer::upper_of(pid))
            .await?
            .map_err(|e| Error::Invalid(format!("container {}: {e}", c.name)))?;
        let (root, criu) = (dir.join(&c.name), dir.join(format!("{}.criu", c.name)));
        let images = root.join("checkpoint");
        for d in [&root, &criu] {
            let _ = std::fs::remove_dir_all(d);
        }
        for d in [&images, &criu] {
            std::fs::create_dir_all(d).map_err(Error::io(d))?;
        }
        let dump = async {
            if lazy {
                let runc_root = Path::new("/run/containerd/runc").join(rt.namespace());
                self.page_servers
                    .dump(uid, &c.name, &c.id, &runc_root, &images, &criu)
                    .await
            } else {
                Ok(rt.checkpoint_task(&c.id, &images, &criu).await?)
            }
        };
        tokio::time::timeout(self.settings.checkpoint_timeout, dump)
            .await
            .map_err(|_| {
                Error::NotReady(format!(
                    "the checkpoint of container {} took longer than {:?}",
                    c.name, self.settings.checkpoint_timeout
                ))
            })??;
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let diff = root.join("rootfs-diff.tar");
            let file = std::fs::File::create(&diff).map_err(Error::io(&diff))?;
            let written = layer::write_upper(&upper, std::io::BufWriter::new(file))
                .map_err(|e| Error::Invalid(format!("the writable layer: {e}")))?;
            if written.skipped > 0 {
                warn!(
                    skipped = written.skipped,
                    "sockets, FIFOs or device nodes of the writable layer are not carried"
                );
            }
            // A lazy dump's CRIU still runs (and logs) there.
            if !lazy {
                let _ = std::fs::remove_dir_all(&criu);
            }
            Ok(archive::Layout::of(&root)?.bytes())
        })
        .await?
    }

    /// Pauses every container of the record through the runtime (the record says so first).
    async fn pause(&self, record: &mut Record) -> Result<()> {
        for c in &record.containers {
            match self.runtime().task_status(&c.id).await? {
                TaskStatus::Paused => {}
                TaskStatus::Running => {
                    record.paused = true;
                    record.paused_at.get_or_insert_with(crate::unix_now);
                    self.store.save(record)?;
                    self.runtime().pause(&c.id).await?;
                }
                other => {
                    return Err(Error::NotReady(format!(
                        "container {} is not running (its task is {})",
                        c.name,
                        task_state(other)
                    )));
                }
            }
        }
        record.paused = true;
        record.paused_at.get_or_insert_with(crate::unix_now);
        self.store.save(record)?;
        Ok(())
    }

    /// Resumes what the agent paused and lifts its network block (the source's rollback).
    pub(crate) async fn thaw(&self, record: &Record) -> Result<()> {
        // The record on disk is the truth: a step may have changed it since `record` was read.
        let Some(record) = self.store.load(&record.uid)? else {
            return Ok(());
        };
        // A page server holds the paused containers (whole: nothing was taken from them) until
        // it ends; one an earlier run of the agent started is found by its command line.
        self.page_servers.stop(&record.uid).await;
        if record.post_copy {
            let dir = self.store.dir(&record.uid)?;
            if post_copy::kill_leftovers(&dir) > 0 {
                warn!(migration = %record.uid, "stopped the page servers an earlier run of the agent left");
            }
            // A killed page server leaves CRIU's network lock in the pod's namespace.
            self.unlock_pod_network(&record).await;
        }
        if record.paused && !record.stopped {
            for c in &record.containers {
                match self.runtime().task_status(&c.id).await {
                    Ok(TaskStatus::Paused | TaskStatus::Pausing) => {
                        match self.runtime().resume(&c.id).await {
                            Ok(()) => {}
                            // A lazy dump's CRIU thaws the cgroup and holds the processes
                            // stopped itself; killed above, it let them go: they run again.
                            Err(e) if record.post_copy && e.to_string().contains("not paused") => {
                                info!(container = %c.name, "running again since its page server was stopped");
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(_) => {}
                    // A container that is gone has nothing to resume.
                    Err(e) => warn!(container = %c.name, error = %e, "not resumed"),
                }
            }
            self.store.update(&record.uid, |r| {
                r.paused = false;
                r.paused_at = None;
            })?;
        }
        self.unblock(&record).await
    }

    /// Lifts a network lock CRIU left in the pod's namespace (post-copy abort).
    async fn unlock_pod_network(&self, record: &Record) {
        let netns = self
            .runtime()
            .pod_netns(&record.namespace, &record.pod, &record.pod_uid)
            .await;
        let Some(netns) = netns else {
            warn!(migration = %record.uid, "no network namespace of the pod to lift CRIU's lock in");
            return;
        };
        let (path, nft) = (PathBuf::from(&netns), self.parts.net.nft_binary());
        match tokio::task::spawn_blocking(move || post_copy::unlock_network(&path, &nft)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(migration = %record.uid, tables = n, "lifted CRIU's network lock"),
            Ok(Err(e)) => {
                warn!(migration = %record.uid, error = %e, "cannot lift CRIU's network lock")
            }
            Err(e) => warn!(migration = %record.uid, error = %e, "cannot lift CRIU's network lock"),
        }
    }

    /// Streams the checkpoint to the target agent, trying again while the stream breaks.
    pub async fn transfer(self, req: v1::TransferRequest) -> Result<v1::Operation> {
        let uid = req.migration_uid.clone();
        let record = self
            .store
            .load(&uid)?
            .filter(|r| {
                r.role == Role::Source
                    && r.containers
                        .iter()
                        .all(|c| c.directory || !c.digest.is_empty())
            })
            .ok_or_else(|| {
                Error::NotReady(format!("migration {uid} has no checkpoint on this node"))
            })?;
        if record.resumed {
            return Err(Error::SourceResumed(format!(
                "the pod {}/{} was resumed on this node at its deadline: its checkpoint is stale and is not sent",
                record.namespace, record.pod
            )));
        }
        // Where the checkpoint goes is where its pages may go (post-copy), at the same pace.
        self.store.update(&uid, |r| {
            r.target_node = req.target_node.clone();
            r.bandwidth_limit = req.bandwidth_limit;
        })?;
        let dir = self.store.dir(&uid)?.join("checkpoint");
        let archives: Vec<Outgoing> = record
            .containers
            .iter()
            .map(|c| Outgoing {
                container: c.name.clone(),
                path: if c.directory {
                    dir.join(&c.name)
                } else {
                    dir.join(format!("{}.tar", c.name))
                },
                directory: c.directory,
                bytes: c.bytes,
                digest: c.digest.clone(),
            })
            .collect();
        let total: u64 = archives.iter().map(|a| a.bytes).sum();
        let attempts = self.settings.transfer_attempts.max(1);
        let mut attempt = 1;
        loop {
            let operations = self.operations.clone();
            let progress_uid = uid.clone();
            let progress = move |done| {
                operations.progress(&progress_uid, Step::Transfer, done, total);
            };
            match wire::send(&self.parts.tls.material(), &req, &archives, progress).await {
                Ok(sent) => {
                    self.parts.metrics.bytes("sent", sent.wire);
                    let mut op = self.done(&uid);
                    op.bytes_done = total;
                    op.bytes_total = total;
                    op.stream_ms = sent.stream.as_millis() as u64;
                    // The digests of directories were taken as they were sent.
                    self.store.update(&uid, |r| {
                        for a in &sent.archives {
                            if let Some(c) = r.container_mut(&a.name) {
                                c.digest = a.digest.clone();
                            }
                        }
                    })?;
                    op.archives = sent.archives.clone();
                    op.message = if sent.before {
                        "the target had received the checkpoint from an earlier stream whose \
                         answer was lost: nothing was sent again"
                            .into()
                    } else {
                        format!(
                            "{} bytes on the wire; the stream took {} ms",
                            sent.wire, op.stream_ms
                        )
                    };
                    return Ok(op);
                }
                // The target refused the data: sending it again would not help.
                Err(e) if !e.retryable() => return Err(e),
                Err(e) if attempt >= attempts => {
                    return Err(Error::NotReady(format!(
                        "the transfer failed {attempts} times; last: {e}"
                    )));
                }
                Err(e) => {
                    warn!(attempt, error = %e, "transfer attempt failed");
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Post-copy: the page server of one container, for the agent of `peer`, which must be the
    /// node the checkpoint went to; with the pace of the migration's transfer.
    pub fn page_server(
        &self,
        peer: &str,
        uid: &str,
        container: &str,
    ) -> Result<(Arc<crate::post_copy::PageServer>, u64)> {
        let record = self
            .store
            .load(uid)?
            .filter(|r| r.role == Role::Source && r.post_copy)
            .ok_or_else(|| {
                Error::NotReady(format!("migration {uid} serves no pages on this node"))
            })?;
        if record.target_node.is_empty() || record.target_node != peer {
            return Err(Error::Invalid(format!(
                "the pages of migration {uid} go to the node its checkpoint went to, not {peer}"
            )));
        }
        let server = self.page_servers.get(uid, container).ok_or_else(|| {
            Error::NotReady(format!(
                "container {container} of migration {uid} has no page server on this node"
            ))
        })?;
        Ok((server, record.bandwidth_limit))
    }

    /// Past the commit point: the paused containers are killed for good (they never run another
    /// instruction). The pod IP stays blocked here until the old sandbox is gone.
    ///
    /// A source decides between this and its deadline ([`Agent::resume_expired`]) in one update
    /// of its record: whichever comes first wins, and the other is refused. A source resumed at
    /// its deadline is never stopped: it runs, and the migration cannot pass its commit point.
    pub async fn commit(self, uid: String, role: agent_api::Role) -> Result<v1::Operation> {
        let source = role == agent_api::Role::Source;
        let record = self.store.update(&uid, |r| {
            if !r.resumed {
                r.committed = true;
            }
        })?;
        if record.resumed {
            return Err(Error::SourceResumed(format!(
                "the pod {}/{} was resumed on this node at its deadline (no commit came before it): it runs here and is not stopped",
                record.namespace, record.pod
            )));
        }
        if source && record.post_copy && !record.stopped {
            // The page servers hold the frozen containers until the target has every page, and
            // end them then: the pod is stopped for good once its memory left.
            tokio::spawn(self.clone().stop_when_served(record));
            return Ok(self.done(&uid));
        }
        if source && !record.stopped {
            self.stop(&record).await?;
        }
        self.store.update(&uid, |r| r.stopped |= source)?;
        // The source's network block stays while the old sandbox exists: it must never answer
        // for the IP again, not even ARP. Once it is gone, other pods of this node must reach the
        // address where it lives now, so the block goes too.
        if source && record.blocked {
            tokio::spawn(self.clone().unblock_when_sandbox_gone(record));
        }
        Ok(self.done(&uid))
    }

    /// Post-copy, past the commit point: once the page servers end (every page served, or the
    /// target gone: the pod cannot come back here either way), the containers are stopped for
    /// good and the IP follows as after any commit.
    async fn stop_when_served(self, record: Record) {
        let uid = record.uid.clone();
        match self.page_servers.finished(&uid, SERVE_PAGES_FOR).await {
            Ok(()) => info!(migration = %uid, "every page was served"),
            Err(e) => warn!(migration = %uid, error = %e, "the page servers ended early"),
        }
        if let Err(e) = self.stop_unserved(&record).await {
            warn!(migration = %uid, error = %e, "stopping the source after its pages were served");
            return;
        }
        if let Err(e) = self.store.update(&uid, |r| r.stopped = true) {
            warn!(migration = %uid, error = %e, "recording the stop");
        }
        if record.blocked {
            self.unblock_when_sandbox_gone(record).await;
        }
    }

    /// Stops a committed post-copy source: its page servers (ended, or still holding the pod for a
    /// target that will never fetch the rest: a failed migration's cleanup) and the containers.
    pub(crate) async fn stop_unserved(&self, record: &Record) -> Result<()> {
        self.page_servers.stop(&record.uid).await;
        if let Ok(dir) = self.store.dir(&record.uid) {
            post_copy::kill_leftovers(&dir);
        }
        self.stop(record).await
    }

    /// After a restart of the agent: a committed post-copy source whose page servers went with the
    /// earlier run cannot serve its pages any more, and can never run here again: it is stopped.
    pub async fn recover_post_copy_sources(&self) {
        let stranded = self
            .store
            .records()
            .filter(|r| r.role == Role::Source && r.post_copy && r.committed && !r.stopped);
        for r in stranded {
            warn!(migration = %r.uid, "the page servers of a committed post-copy source went with the agent's last run: stopping the pod");
            tokio::spawn(self.clone().stop_when_served(r));
        }
    }

    /// Kills the record's paused containers and waits for their end.
    async fn stop(&self, record: &Record) -> Result<()> {
        let rt = self.runtime();
        for c in &record.containers {
            // A frozen task acts on SIGKILL once thawed, before running any code of its own.
            match rt.kill(&c.id).await {
                Ok(()) => {}
                // Gone already (an earlier attempt killed it): stopped for good.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            }
            // A task in a PID namespace of its own may end right away (the kernel ends the
            // namespace), and one being killed may stop being "paused" under our resume: a
            // failed resume is judged by the wait for the task's end below.
            if matches!(rt.task_status(&c.id).await, Ok(TaskStatus::Paused))
                && let Err(e) = rt.resume(&c.id).await
            {
                warn!(container = %c.name, error = %e, "resume after SIGKILL failed; waiting for the task to end");
            }
        }
        let deadline = Instant::now() + self.settings.stop_timeout;
        for c in &record.containers {
            loop {
                match rt.task_status(&c.id).await {
                    Ok(TaskStatus::Stopped) | Err(_) => break,
                    Ok(status) if Instant::now() > deadline => {
                        return Err(Error::NotReady(format!(
                            "container {} is still {} {}s after SIGKILL",
                            c.name,
                            task_state(status),
                            self.settings.stop_timeout.as_secs()
                        )));
                    }
                    Ok(status) => {
                        // Still frozen with the SIGKILL pending: thaw it again.
                        if status == TaskStatus::Paused {
                            let _ = rt.resume(&c.id).await;
                        }
                        tokio::time::sleep(RECHECK).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Resumes every paused source whose deadline passed before its migration reached the commit
    /// point (the operator went away, or cannot reach this node): the pod runs again, reachable,
    /// and a commit is refused from then on. Returns the migrations resumed now.
    pub async fn resume_expired(&self) -> Vec<String> {
        let now = crate::unix_now();
        let mut resumed = Vec::new();
        for uid in self.store.due(now).unwrap_or_default() {
            let Ok(Some(r)) = self.store.load(&uid) else {
                continue;
            };
            if r.deadline().is_none_or(|at| at > now) {
                continue;
            }
            // Post-copy past the commit: the page servers hold the pod until they served it.
            if r.committed && r.post_copy && self.page_servers.serving(&uid) {
                continue;
            }
            // Committed, but the stop did not finish (it failed, or the agent restarted in it):
            // the decision stands, so the agent finishes it rather than leave the pod frozen.
            if r.committed {
                match self.stop(&r).await {
                    Ok(()) => {
                        let _ = self.store.update(&uid, |r| r.stopped = true);
                        warn!(migration = %uid, "a committed source whose stop had not finished was stopped at its deadline");
                    }
                    Err(e) => warn!(migration = %uid, error = %e, "cannot stop a committed source"),
                }
                continue;
            }
            // A checkpoint that is still running undoes its own work when it fails.
            if self.checkpointing().contains(&uid) {
                continue;
            }
            let decided = self.store.update(&uid, |r| {
                if !r.committed {
                    r.resumed = true;
                }
            });
            match decided {
                Ok(r) if r.resumed => {}
                // The commit came first, or the record went meanwhile.
                _ => continue,
            }
            match self.thaw(&r).await {
                Ok(()) => {
                    warn!(migration = %uid, pod = %format!("{}/{}", r.namespace, r.pod), "the source's deadline passed before the commit point: the pod was resumed");
                    self.parts.metrics.resumed_at_deadline();
                    resumed.push(uid);
                }
                // Tried again at the next look.
                Err(e) => {
                    warn!(migration = %uid, error = %e, "cannot resume the source at its deadline")
                }
            }
        }
        resumed
    }

    fn checkpointing(&self) -> BTreeSet<String> {
        self.checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn unblock_when_sandbox_gone(self, record: Record) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let sandbox = self
                .runtime()
                .find_sandbox(&record.namespace, &record.pod, &record.pod_uid)
                .await;
            match sandbox {
                Ok(None) => break,
                Ok(Some(_)) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Given up: Cleanup lifts it.
                _ => return,
            }
        }
        match self.unblock(&record).await {
            Ok(()) => {
                info!(migration = %record.uid, ip = %record.pod_ip, "the old sandbox is gone; the pod IP is unblocked here")
            }
            Err(e) => warn!(migration = %record.uid, error = %e, "cannot unblock the pod IP"),
        }
    }
}

/// A migration's mark in the agent's checkpoint table, taken off when dropped.
struct Checkpointing {
    table: Arc<Mutex<BTreeSet<String>>>,
    uid: String,
}

impl Drop for Checkpointing {
    fn drop(&mut self) {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table.remove(&self.uid);
    }
}

/// Whether the source migration `other` holds a container of `mine`'s pod: it is checkpointing
/// (`checkpointing`), or has the pod paused or its IP blocked, and has not stopped it for good.
fn holds(other: &Record, mine: &Record, checkpointing: bool) -> bool {
    let same_pod = !mine.pod_uid.is_empty() && other.pod_uid == mine.pod_uid;
    let same_container = other
        .containers
        .iter()
        .any(|o| !o.id.is_empty() && mine.containers.iter().any(|m| m.id == o.id));
    other.role == Role::Source
        && !other.stopped
        && (checkpointing || other.paused || other.blocked)
        && (same_pod || same_container)
}

/// A task state in words (`paused`, `stopped`, ...).
fn task_state(status: TaskStatus) -> String {
    status.as_str_name().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(uid: &str, pod_uid: &str, container: &str) -> Record {
        let mut r = Record::new(uid, Role::Source, "ns", "app");
        r.pod_uid = pod_uid.into();
        r.containers = vec![Container {
            name: "app".into(),
            id: container.into(),
            ..Container::default()
        }];
        r
    }

    #[test]
    fn a_pod_is_held_by_a_migration_that_checkpoints_pauses_or_silences_it_until_it_stops_it() {
        let mine = source("b", "pod-1", "c1");
        let mut other = source("a", "pod-1", "c1");
        assert!(!holds(&other, &mine, false), "recorded, not started");
        assert!(holds(&other, &mine, true), "checkpointing");
        other.blocked = true;
        assert!(holds(&other, &mine, false), "silenced");
        other.blocked = false;
        other.paused = true;
        assert!(holds(&other, &mine, false), "paused");
        // The same containers under another pod UID (the request did not name it) count too.
        let by_container = source("b", "", "c1");
        assert!(holds(&other, &by_container, false));
        assert!(!holds(&other, &source("b", "pod-2", "c2"), false));
        // Stopped (committed), or a target's record: nothing held.
        other.stopped = true;
        assert!(!holds(&other, &mine, false));
        let mut target = source("a", "pod-1", "c1");
        target.role = Role::Target;
        target.blocked = true;
        assert!(!holds(&target, &mine, true));
    }
}
