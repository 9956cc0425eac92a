//! The checkpoint store of a node: one directory per migration, holding what the agent needs to
//! finish or undo its part of it (a JSON record) and the data:
//!
//! ```text
//! <store>/migrations/<uid>/record.json
//! <store>/migrations/<uid>/checkpoint/<container>.tar   source: the runtime's checkpoint archives
//! <store>/migrations/<uid>/incoming/<container>.part    target: an archive while it is received
//! <store>/migrations/<uid>/staged/<container>.tar       target: a vetted archive, as the restore
//!                                                       backend keeps it
//! ```
//!
//! The record is on disk, so an agent restarted in the middle of a migration can still resume or
//! undo it (resume the paused source, lift the network block) when the operator asks again.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// The role of this node in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

/// A container of the migrated pod, as this node knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    /// Runtime container ID (source).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// The archive: bytes and `sha256:` digest (source: checkpointed; target: received).
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Source: the checkpoint is a directory, sent as an archive of `bytes` whose digest is
    /// taken as it is sent (a checkpoint taken without the CRI).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
    /// Target: the image the runtime restores this container from, once staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<String>,
}

/// What this node did for one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub uid: String,
    pub role: Role,
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_ip: String,
    pub containers: Vec<Container>,
    /// Target: the restore backend that stages the checkpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// Source: the containers are paused by the agent.
    #[serde(default)]
    pub paused: bool,
    /// Source: when (Unix seconds) the agent paused the containers, while they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<u64>,
    /// The pod IP is blocked on this node by the agent.
    #[serde(default)]
    pub blocked: bool,
    /// Target: an IP reservation was written for the replacement pod.
    #[serde(default)]
    pub reserved: bool,
    /// Past the commit point: the data is kept until Cleanup, whatever the age.
    #[serde(default)]
    pub committed: bool,
    /// Source: the paused containers were killed for good.
    #[serde(default)]
    pub stopped: bool,
    /// Source: when (Unix seconds) the agent resumes the pod by itself unless the migration
    /// passed its commit point first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_at: Option<u64>,
    /// Source: the agent resumed the pod at `resume_at`; a commit is refused from then on.
    #[serde(default)]
    pub resumed: bool,
    /// Target: the node the checkpoint comes from; only its agent may stream it here.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_node: String,
    /// Post-copy: the memory stays on the source and streams to the target after the restore.
    #[serde(default)]
    pub post_copy: bool,
    /// Source: the node the checkpoint was sent to; only its agent may fetch the pages.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_node: String,
    /// Source: the transfer's bandwidth limit (bytes per second, 0: none), which pages follow too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bandwidth_limit: u64,
    /// Target, post-copy: every page of the restored containers is in.
    #[serde(default)]
    pub memory_in: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    /// How long a source's containers have been frozen by this agent at `now` (Unix seconds):
    /// paused, and neither stopped for good nor resumed. A post-copy source past its commit point
    /// is not frozen for its application, which runs on the target while these serve its pages.
    pub fn frozen_for(&self, now: u64) -> Option<Duration> {
        let serving = self.post_copy && self.committed;
        let since = self
            .paused_at
            .filter(|_| self.paused && !self.stopped && !self.resumed && !serving)?;
        Some(Duration::from_secs(now.saturating_sub(since)))
    }

    pub fn new(uid: &str, role: Role, namespace: &str, pod: &str) -> Self {
        Self {
            uid: uid.into(),
            role,
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: String::new(),
            pod_ip: String::new(),
            containers: Vec::new(),
            backend: String::new(),
            paused: false,
            paused_at: None,
            blocked: false,
            reserved: false,
            committed: false,
            stopped: false,
            resume_at: None,
            resumed: false,
            source_node: String::new(),
            post_copy: false,
            target_node: String::new(),
            bandwidth_limit: 0,
            memory_in: false,
        }
    }

    /// The record of `pod` for this node's `role` in migration `uid`: its identity, address and
    /// containers (with the runtime's IDs when the request carries them).
    pub fn of_pod(uid: &str, role: Role, pod: &agent_api::v1::PodRef) -> Self {
        Self {
            pod_uid: pod.uid.clone(),
            pod_ip: pod.pod_ip.clone(),
            containers: pod
                .containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    id: crate::runtime::container_id(&c.container_id).to_string(),
                    image: c.image.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Self::new(uid, role, &pod.namespace, &pod.name)
        }
    }

    /// Its data is kept for a manual restore: past the commit point, or a checkpoint received
    /// whole (the target may not have heard of the commit yet, and it may be the only copy).
    pub fn kept(&self) -> bool {
        self.committed || self.received_whole()
    }

    /// Target: every container's checkpoint arrived whole (and was staged).
    pub fn received_whole(&self) -> bool {
        self.role == Role::Target
            && !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| c.staged.is_some() && !c.digest.is_empty())
    }

    /// Source: the time (Unix seconds) at which the agent must resume the pod by itself, while it
    /// holds the pod paused or blocked and has not stopped it.
    pub fn deadline(&self) -> Option<u64> {
        let held = self.paused || self.blocked;
        (self.role == Role::Source && held && !self.stopped)
            .then_some(self.resume_at)
            .flatten()
    }

    pub fn container_mut(&mut self, name: &str) -> Option<&mut Container> {
        self.containers.iter_mut().find(|c| c.name == name)
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid record: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0:?} is not a valid migration UID")]
    BadUid(String),
    #[error("this node has no record of migration {0}")]
    NoRecord(String),
    #[error(
        "the checkpoint store {store} is on the file system of {root} (the node's root disk), and \
         its own was asked for: mount a disk of its own there, or drop --store-own-filesystem \
         (chart: agent.storeOwnFilesystem)"
    )]
    SharedFilesystem { store: PathBuf, root: PathBuf },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The store at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Serialises read-modify-write of records.
    records: Arc<Mutex<()>>,
    /// The deadlines of the records that have one ([`Record::deadline`]), by UID: read from the
    /// disk once, at the first [`Store::due`], and kept current by every write since, so that
    /// looking for due sources every second reads no record that is not due.
    deadlines: Arc<Mutex<Option<BTreeMap<String, u64>>>>,
}

/// A migration UID is used as a directory name: it must be a plain name.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A container name is used as a file name: DNS label characters only.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Store {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            records: Arc::default(),
            deadlines: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn migrations(&self) -> PathBuf {
        self.root.join(agent_api::layout::MIGRATIONS)
    }

    /// The directory of migration `uid`.
    pub fn dir(&self, uid: &str) -> Result<PathBuf, Error> {
        if !valid_uid(uid) {
            return Err(Error::BadUid(uid.into()));
        }
        Ok(self.migrations().join(uid))
    }

    /// A subdirectory of the migration's directory, created.
    pub fn subdir(&self, uid: &str, name: &str) -> Result<PathBuf, Error> {
        let dir = self.dir(uid)?.join(name);
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(dir)
    }

    /// The record of `uid`, if the node has one.
    pub fn load(&self, uid: &str) -> Result<Option<Record>, Error> {
        let path = self.dir(uid)?.join("record.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Record { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// The record of `uid`, which must exist.
    pub fn record(&self, uid: &str) -> Result<Record, Error> {
        self.load(uid)?.ok_or_else(|| Error::NoRecord(uid.into()))
    }

    /// Loads, changes and saves the record of `uid`, which must exist, as one step.
    pub fn update(&self, uid: &str, change: impl FnOnce(&mut Record)) -> Result<Record, Error> {
        let _guard = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = self.record(uid)?;
        change(&mut record);
        self.write(&record)?;
        Ok(record)
    }

    /// Writes the record atomically (write to a temporary file, then rename).
    pub fn save(&self, record: &Record) -> Result<(), Error> {
        let _guard = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        self.write(record)
    }

    fn write(&self, record: &Record) -> Result<(), Error> {
        let dir = self.dir(&record.uid)?;
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let path = dir.join("record.json");
        let tmp = dir.join(".record.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| Error::Record {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, bytes).map_err(io_at(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        self.note_deadline(&record.uid, record.deadline());
        Ok(())
    }

    fn note_deadline(&self, uid: &str, deadline: Option<u64>) {
        let mut index = self
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = index.as_mut() {
            match deadline {
                Some(at) => index.insert(uid.to_string(), at),
                None => index.remove(uid),
            };
        }
    }

    /// The migrations whose deadline ([`Record::deadline`]) is at or before `now`.
    pub fn due(&self, now: u64) -> Result<Vec<String>, Error> {
        let _guard = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let mut index = self
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if index.is_none() {
            let mut read = BTreeMap::new();
            for uid in self.list()? {
                if let Ok(Some(at)) = self.load(&uid).map(|r| r.and_then(|r| r.deadline())) {
                    read.insert(uid, at);
                }
            }
            *index = Some(read);
        }
        Ok(index
            .iter()
            .flatten()
            .filter(|(_, at)| **at <= now)
            .map(|(uid, _)| uid.clone())
            .collect())
    }

    /// Where the data of migration `uid` is kept (for a manual restore); empty for a bad UID.
    pub fn location(&self, uid: &str) -> String {
        self.dir(uid)
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }

    /// Deletes everything of migration `uid`.
    pub fn remove(&self, uid: &str) -> Result<(), Error> {
        let dir = self.dir(uid)?;
        self.note_deadline(uid, None);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path: dir, source }),
        }
    }

    /// Removes a subdirectory of a migration (e.g. what a failed receive left).
    pub fn remove_subdir(&self, uid: &str, name: &str) -> Result<(), Error> {
        let dir = self.dir(uid)?.join(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path: dir, source }),
        }
    }

    /// UIDs of the migrations with data on this node.
    pub fn list(&self) -> Result<Vec<String>, Error> {
        let dir = self.migrations();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(Error::Io { path: dir, source }),
        };
        let mut uids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_uid(n))
            .collect();
        uids.sort();
        Ok(uids)
    }

    /// The records of the migrations with data on this node that can be read (one that cannot is
    /// skipped: it holds nothing its reader could act on).
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|uid| self.load(&uid).ok().flatten())
    }

    /// Fails unless the store is on a file system of its own, not the one of `root` (the node's
    /// root, `/proc/1/root` for an agent in the node's PID namespace): checkpoints that fill it
    /// then cannot fill the node's root disk.
    pub fn check_own_filesystem(&self, root: &Path) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        fs::create_dir_all(&self.root).map_err(io_at(&self.root))?;
        let store = fs::metadata(&self.root).map_err(io_at(&self.root))?.dev();
        let node = fs::metadata(root).map_err(io_at(root))?.dev();
        if store == node {
            return Err(Error::SharedFilesystem {
                store: self.root.clone(),
                root: root.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Free bytes on the store's file system.
    pub fn free_bytes(&self) -> Result<u64, Error> {
        Ok(self.space()?.0)
    }

    /// Free and total bytes of the store's file system.
    pub fn space(&self) -> Result<(u64, u64), Error> {
        fs::create_dir_all(&self.root).map_err(io_at(&self.root))?;
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|e| Error::Io {
            path: self.root.clone(),
            source: e.into(),
        })?;
        Ok((
            stat.blocks_available() * stat.fragment_size(),
            stat.blocks() * stat.fragment_size(),
        ))
    }

    /// The longest a source whose record is here has been frozen at `now` (Unix seconds); zero
    /// when none is.
    pub fn longest_pause(&self, now: u64) -> Duration {
        self.list()
            .unwrap_or_default()
            .iter()
            .filter_map(|uid| self.load(uid).ok().flatten())
            .filter_map(|r| r.frozen_for(now))
            .max()
            .unwrap_or_default()
    }

    /// What garbage collection may take: migrations that were not touched for `age`, or for
    /// `retention` when they are past their commit point (whose data is kept for a manual restore
    /// until Cleanup or the retention time), unless `active` says a step of theirs runs. The
    /// caller undoes what they hold before removing them (`gc.rs`); nothing is removed here.
    pub fn stale(
        &self,
        age: Duration,
        retention: Duration,
        active: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, Error> {
        let now = SystemTime::now();
        let mut stale = Vec::new();
        for uid in self.list()? {
            if active(&uid) {
                continue;
            }
            let untouched = now.duration_since(self.touched(&uid)?).unwrap_or_default();
            let kept = self.load(&uid).ok().flatten().is_some_and(|r| r.kept());
            if untouched < if kept { retention } else { age } {
                continue;
            }
            stale.push(uid);
        }
        Ok(stale)
    }

    /// When migration `uid`'s record was last written (its directory's time without one).
    fn touched(&self, uid: &str) -> Result<SystemTime, Error> {
        let dir = self.dir(uid)?;
        fs::metadata(dir.join("record.json"))
            .or_else(|_| fs::metadata(&dir))
            .and_then(|m| m.modified())
            .map_err(io_at(&dir))
    }

    /// Bytes migration `uid`'s data takes on the disk (allocated blocks, so a sparse file counts
    /// what it holds); symbolic links are not followed.
    pub fn bytes(&self, uid: &str) -> Result<u64, Error> {
        fn walk(path: &Path) -> io::Result<u64> {
            use std::os::unix::fs::MetadataExt;
            let meta = fs::symlink_metadata(path)?;
            let mut total = meta.blocks() * 512;
            if meta.is_dir() {
                for entry in fs::read_dir(path)? {
                    total += match walk(&entry?.path()) {
                        Ok(n) => n,
                        // Removed while it was counted.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                        Err(e) => return Err(e),
                    };
                }
            }
            Ok(total)
        }
        let dir = self.dir(uid)?;
        walk(&dir).map_err(io_at(&dir))
    }

    /// The checkpoints kept on this node ([`Record::kept`]), newest first.
    pub fn kept(&self) -> Result<Vec<Kept>, Error> {
        let mut kept = Vec::new();
        for record in self.records().filter(Record::kept) {
            let uid = record.uid.clone();
            match (self.bytes(&uid), self.touched(&uid)) {
                (Ok(bytes), Ok(since)) => kept.push(Kept {
                    record,
                    bytes,
                    since,
                }),
                // Removed since it was listed.
                (Err(Error::Io { source, .. }), _) | (_, Err(Error::Io { source, .. }))
                    if source.kind() == io::ErrorKind::NotFound => {}
                (Err(e), _) | (_, Err(e)) => return Err(e),
            }
        }
        kept.sort_by(|a, b| b.since.cmp(&a.since).then(a.record.uid.cmp(&b.record.uid)));
        Ok(kept)
    }
}

/// A checkpoint kept on this node: its migration's record, its bytes on disk, and when it was
/// last touched (its age counts from then).
#[derive(Debug, Clone)]
pub struct Kept {
    pub record: Record,
    pub bytes: u64,
    pub since: SystemTime,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_and_are_removed_with_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.load("m1").unwrap(), None);
        let mut r = Record::new("m1", Role::Source, "ns", "pod");
        r.containers.push(Container {
            name: "app".into(),
            id: "abc".into(),
            ..Default::default()
        });
        store.save(&r).unwrap();
        fs::write(
            store.subdir("m1", "checkpoint").unwrap().join("app.tar"),
            b"x",
        )
        .unwrap();
        assert_eq!(store.load("m1").unwrap(), Some(r));
        assert_eq!(store.list().unwrap(), vec!["m1".to_string()]);
        store.remove("m1").unwrap();
        assert!(!dir.path().join("migrations/m1").exists());
        store.remove("m1").unwrap();
    }

    #[test]
    fn due_sources_are_found_from_the_disk_once_and_then_kept_current() {
        let dir = tempfile::tempdir().unwrap();
        let held = |uid: &str, at: u64| {
            let mut r = Record::new(uid, Role::Source, "ns", "pod");
            (r.paused, r.resume_at) = (true, Some(at));
            r
        };
        // Written before the index exists (an earlier run of the agent): found by the first look.
        let earlier = Store::new(dir.path());
        earlier.save(&held("old", 10)).unwrap();
        let mut target = held("target", 10);
        target.role = Role::Target;
        earlier.save(&target).unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.due(9).unwrap(), Vec::<String>::new());
        assert_eq!(store.due(10).unwrap(), vec!["old".to_string()]);
        // Written since: a new held source, one that was let go, one removed.
        store.save(&held("new", 20)).unwrap();
        store.update("old", |r| r.paused = false).unwrap();
        assert_eq!(store.due(100).unwrap(), vec!["new".to_string()]);
        store.update("new", |r| r.stopped = true).unwrap();
        assert_eq!(store.due(100).unwrap(), Vec::<String>::new());
        store.save(&held("gone", 5)).unwrap();
        store.remove("gone").unwrap();
        assert_eq!(store.due(100).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_store_asked_to_have_its_own_file_system_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        // The same file system as the temporary directory's parent: refused, saying why.
        let shared = store.check_own_filesystem(dir.path().parent().unwrap());
        assert!(
            matches!(&shared, Err(Error::SharedFilesystem { .. })),
            "{shared:?}"
        );
        // /proc is a file system of its own: the store is not on it.
        store.check_own_filesystem(Path::new("/proc")).unwrap();
    }

    #[test]
    fn uids_and_names_cannot_walk_out_of_the_store() {
        let store = Store::new(Path::new("/store"));
        for bad in ["", "..", "a/b", "../x", "a b"] {
            assert!(store.dir(bad).is_err(), "{bad:?}");
        }
        assert!(valid_name("app-1"));
        for bad in ["", "App", "a/b", "..", "a.b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_longest_pause_counts_only_sources_still_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.longest_pause(1_000), Duration::ZERO);
        for (uid, paused_at, stopped, resumed) in [
            ("frozen", 900, false, false),
            ("later", 990, false, false),
            ("stopped", 100, true, false),
            ("resumed", 100, false, true),
            ("serving", 100, false, false),
        ] {
            let mut r = Record::new(uid, Role::Source, "ns", "pod");
            r.paused = true;
            r.paused_at = Some(paused_at);
            r.stopped = stopped;
            r.resumed = resumed;
            // A post-copy source serving its pages after the commit: its pod runs elsewhere.
            r.post_copy = uid == "serving";
            r.committed = uid == "serving";
            store.save(&r).unwrap();
        }
        assert_eq!(store.longest_pause(1_000), Duration::from_secs(100));
        store.update("frozen", |r| r.paused = false).unwrap();
        assert_eq!(store.longest_pause(1_000), Duration::from_secs(10));
    }

    #[test]
    fn collection_takes_old_idle_migrations_and_kept_checkpoints_after_their_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for uid in ["old", "active", "kept", "received"] {
            let mut r = Record::new(uid, Role::Target, "ns", "pod");
            r.committed = uid == "kept";
            if uid == "received" {
                // A whole checkpoint the target has not heard the commit of yet.
                r.containers.push(Container {
                    name: "app".into(),
                    staged: Some("/store/staged/app".into()),
                    digest: "sha256:ab".into(),
                    ..Default::default()
                });
            }
            store.save(&r).unwrap();
        }
        let (hour, week) = (Duration::from_secs(3600), Duration::from_secs(7 * 86_400));
        assert!(store.stale(hour, week, |_| false).unwrap().is_empty());
        let stale = store
            .stale(Duration::ZERO, week, |uid| uid == "active")
            .unwrap();
        assert_eq!(stale, vec!["old".to_string()]);
        // Past the retention time, a kept checkpoint goes too.
        let stale = store
            .stale(Duration::ZERO, Duration::ZERO, |uid| uid == "active")
            .unwrap();
        assert_eq!(stale, ["kept", "old", "received"].map(String::from));
        // Naming them removes nothing: the caller undoes first.
        assert_eq!(store.list().unwrap().len(), 4);
    }

    #[test]
    fn kept_checkpoints_are_listed_newest_first_with_their_bytes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for uid in ["older", "newer", "in-flight"] {
            let mut r = Record::new(uid, Role::Source, "ns", "pod");
            r.committed = uid != "in-flight";
            store.save(&r).unwrap();
            let data = store.subdir(uid, "checkpoint").unwrap();
            // Bytes that no file system compresses away (a linear congruential sequence).
            let mut x: u32 = 12345;
            let noise: Vec<u8> = (0..256 << 10)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            fs::write(data.join("app.tar"), noise).unwrap();
            // A link out of the store is not followed.
            std::os::unix::fs::symlink("/usr", data.join("out")).unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(600);
        fs::File::options()
            .write(true)
            .open(store.dir("older").unwrap().join("record.json"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let kept = store.kept().unwrap();
        let uids: Vec<&str> = kept.iter().map(|k| k.record.uid.as_str()).collect();
        assert_eq!(uids, ["newer", "older"]);
        // The archive's 256 KiB and a little for the record and the directories.
        for k in &kept {
            assert!(
                (256 << 10..300 << 10).contains(&k.bytes),
                "{}: {} bytes",
                k.record.uid,
                k.bytes
            );
        }
        assert!(kept[1].since <= old + Duration::from_secs(1));
    }
}
