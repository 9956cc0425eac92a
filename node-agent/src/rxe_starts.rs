//! What the node's rxe counters did while the agent held them for a container's start: the
//! record that a pod's numbers lie in its block is kept, not assumed (docs/rxe-blocks.md).
//!
//! For every start of a container with an `rdma/rxe` device the agent records the block, the
//! counters as it set them and as it found them when it let go of them. rxe counts up from
//! the counters, so every number the container got while the agent held them lies between the
//! two; a start whose counters ended outside the block (or went backwards: someone else wrote
//! them) is outside, and its pod is refused as a migration source. The records are kept in one
//! JSON file of the checkpoint store (`rxe-starts.json`), so that an agent restart does not
//! forget them, and are served on `/rxe/starts`.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

use crate::rxe_counters::Block;

/// Records kept per pod (its latest container starts).
const KEPT_PER_POD: usize = 8;

/// Who set the counters for a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum How {
    /// The device plugin, before the container's first start on this node (or a restart).
    Plugin,
    /// A migration's restore, which set them to the pod's block and held them.
    Restore,
}

/// One container start of an RDMA pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    pub how: How,
    pub block: Block,
    /// The counters (QPN, MRN) when the start began: as the plugin set them, or as a restore
    /// had set them.
    pub set: (u32, u32),
    /// The counters when the agent let go of them (after the container ran and settled).
    pub after: (u32, u32),
    /// Whether the agent let go and read the counters back: a record that is not done is a start
    /// under way, or one whose agent stopped while it held the counters.
    pub done: bool,
    /// Whether the container was seen started before the agent let go.
    pub ran: bool,
    /// Every number the counters handed out while held lies in the block.
    pub inside: bool,
    /// Seconds since the epoch, when the record was last written.
    pub at: u64,
}

impl Start {
    /// A start under way: the counters were set to `set`.
    #[allow(clippy::too_many_arguments)]
    pub fn begun(
        namespace: &str,
        pod: &str,
        uid: &str,
        container: &str,
        how: How,
        block: Block,
        set: (u32, u32),
    ) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
            uid: uid.into(),
            container: container.into(),
            how,
            block,
            set,
            after: set,
            done: false,
            ran: false,
            inside: false,
            at: crate::unix_now(),
        }
    }

    /// The start ended: the counters read `after` when the agent let go; `ran`: the container
    /// was seen started by then.
    pub fn ended(mut self, after: (u32, u32), ran: bool) -> Self {
        self.after = after;
        self.ran = ran;
        self.done = true;
        self.inside = inside(self.block, self.set, after);
        self.at = crate::unix_now();
        self
    }

    /// Every number of the start is known to lie in the block.
    pub fn verified(&self) -> bool {
        self.done && self.ran && self.inside
    }

    /// Why this start cannot count as inside its pod's block, for events and refusals; `None`
    /// when it does.
    pub fn outside(&self) -> Option<String> {
        let who = format!(
            "container {} of pod {}/{}",
            self.container, self.namespace, self.pod
        );
        if !self.done {
            Some(format!(
                "the start of {who} was not checked: it is under way, or the agent stopped while it held the rxe counters"
            ))
        } else if !self.inside {
            Some(format!(
                "{who} got rxe numbers outside its block ({}): the counters went from QPN {} / MRN {} to QPN {} / MRN {} while it started",
                self.block, self.set.0, self.set.1, self.after.0, self.after.1
            ))
        } else if !self.ran {
            Some(format!(
                "{who} did not start while the agent held the rxe counters at its block ({}): the numbers it took afterwards are unknown",
                self.block
            ))
        } else {
            None
        }
    }
}

/// Whether counters that went from `set` to `after` handed out numbers of `block` only: both
/// lie in the block and neither went backwards.
pub fn inside(block: Block, set: (u32, u32), after: (u32, u32)) -> bool {
    block.contains(set) && block.contains(after) && after.0 >= set.0 && after.1 >= set.1
}

/// The starts this node recorded, persisted in one file.
#[derive(Debug, Clone)]
pub struct Starts {
    path: PathBuf,
    all: Arc<Mutex<Vec<Start>>>,
    /// Pods (UIDs) with a start this process checks now (a record that is not done and whose
    /// pod is not here was left by an agent that stopped), each with what tells its check to
    /// end the settle time at once (a checkpoint of the pod waits for it: the pod is about to be
    /// frozen).
    checking: Arc<Mutex<HashMap<String, Arc<tokio::sync::Notify>>>>,
}

impl Starts {
    /// The records in `path` (none when it does not exist or cannot be read: the agent starts
    /// with what it can, and says so).
    pub fn load(path: &Path) -> Self {
        let all = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable rxe start records; starting without them");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the rxe start records; starting without them");
                Vec::new()
            }
        };
        Self {
            path: path.to_path_buf(),
            all: Arc::new(Mutex::new(all)),
            checking: Arc::default(),
        }
    }

    fn checking(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Notify>>> {
        self.checking.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What tells the check of pod `uid`'s start under way to end its settle time now.
    pub fn hurry(&self, uid: &str) -> Arc<tokio::sync::Notify> {
        // Never marks a pod under check: only `put` does.
        self.checking().get(uid).cloned().unwrap_or_default()
    }

    /// Waits (at most `limit`) until no start of pod `uid` is being checked by this process,
    /// telling such a check to end its settle time now; answers whether none is.
    pub async fn settled(&self, uid: &str, limit: std::time::Duration) -> bool {
        if let Some(hurry) = self.checking().get(uid) {
            hurry.notify_one();
        }
        let deadline = tokio::time::Instant::now() + limit;
        while self.checking().contains_key(uid) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        true
    }

    fn all_mut(&self) -> std::sync::MutexGuard<'_, Vec<Start>> {
        self.all.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<Start> {
        self.all_mut().clone()
    }

    /// Writes `start`: it replaces the record of its container's start under way, if any, else
    /// it is added. A pod keeps its latest few records, and always the latest of each container
    /// (what the refusal of a source reads).
    pub fn put(&self, start: Start) -> std::io::Result<()> {
        if start.done {
            self.checking().remove(&start.uid);
        } else {
            self.checking().entry(start.uid.clone()).or_default();
        }
        let mut all = self.all_mut();
        let under_way = all
            .iter()
            .rposition(|s| !s.done && s.uid == start.uid && s.container == start.container);
        match under_way {
            Some(i) => all[i] = start.clone(),
            None => all.push(start.clone()),
        }
        let of_pod = all.iter().filter(|s| s.uid == start.uid).count();
        if of_pod > KEPT_PER_POD {
            // The oldest records that a later one of the same container supersedes go first.
            let mut drop = of_pod - KEPT_PER_POD;
            let mut i = 0;
            while drop > 0 && i < all.len() {
                let superseded = all[i].uid == start.uid
                    && all[i + 1..]
                        .iter()
                        .any(|later| later.uid == start.uid && later.container == all[i].container);
                if superseded {
                    all.remove(i);
                    drop -= 1;
                } else {
                    i += 1;
                }
            }
        }
        self.write(&all)
    }

    /// Forgets the pods that are not in `live` (namespace and name of the pods on the node).
    pub fn keep_only(&self, live: &HashSet<(String, String)>) -> std::io::Result<()> {
        let mut all = self.all_mut();
        let before = all.len();
        all.retain(|s| live.contains(&(s.namespace.clone(), s.pod.clone())));
        if all.len() == before {
            return Ok(());
        }
        self.write(&all)
    }

    fn write(&self, all: &[Start]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&tmp, serde_json::to_vec_pretty(all)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Where the counters of the next start of pod `uid` begin: after the numbers its earlier
    /// starts took (a pod's containers share its block), or at the block's start for its first
    /// one, or when the earlier numbers fill the block.
    pub fn next_at(&self, uid: &str, block: Block) -> (u32, u32) {
        self.all_mut()
            .iter()
            .rev()
            .find(|s| s.uid == uid && s.block == block && s.done && s.inside)
            .map(|s| s.after)
            .filter(|&(qpn, mrn)| {
                u64::from(qpn) + 1 < block.qpn_end() && u64::from(mrn) + 1 < block.mrn_end()
            })
            .unwrap_or((block.qpn_start, block.mrn_start))
    }

    /// Why pod `uid` cannot count as inside its block (a container whose latest start here is
    /// not verified), if so.
    pub fn outside(&self, uid: &str) -> Option<String> {
        let all = self.all_mut();
        let mut containers: Vec<&str> = all
            .iter()
            .filter(|s| s.uid == uid)
            .map(|s| s.container.as_str())
            .collect();
        containers.sort_unstable();
        containers.dedup();
        containers.into_iter().find_map(|c| {
            all.iter()
                .rev()
                .find(|s| s.uid == uid && s.container == c)
                .and_then(Start::outside)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BLOCK: Block = Block {
        qpn_start: 1024,
        qpn_count: 256,
        mrn_start: 2048,
        mrn_count: 256,
    };

    fn start(uid: &str, container: &str, set: (u32, u32), after: (u32, u32)) -> Start {
        Start::begun(
            "ns",
            &format!("pod-{uid}"),
            uid,
            container,
            How::Plugin,
            BLOCK,
            set,
        )
        .ended(after, true)
    }

    #[test]
    fn numbers_are_inside_only_when_both_counters_stay_in_the_block_and_go_forwards() {
        assert!(inside(BLOCK, (1024, 2048), (1024, 2048)));
        assert!(inside(BLOCK, (1024, 2048), (1279, 2303)));
        // Past the last number of the block.
        assert!(!inside(BLOCK, (1024, 2048), (1280, 2050)));
        assert!(!inside(BLOCK, (1024, 2048), (1030, 2304)));
        // Backwards: another writer set them.
        assert!(!inside(BLOCK, (1100, 2048), (1050, 2048)));
        // Set outside (a restore that found other counters).
        assert!(!inside(BLOCK, (17, 2048), (1030, 2050)));
    }

    #[test]
    fn a_pods_next_start_continues_after_its_earlier_numbers_and_restarts_when_the_block_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let starts = Starts::load(&dir.path().join("rxe-starts.json"));
        assert_eq!(starts.next_at("u1", BLOCK), (1024, 2048));
        starts
            .put(start("u1", "a", (1024, 2048), (1027, 2050)))
            .unwrap();
        assert_eq!(starts.next_at("u1", BLOCK), (1027, 2050));
        assert_eq!(starts.next_at("u2", BLOCK), (1024, 2048));
        starts
            .put(start("u1", "b", (1027, 2050), (1279, 2051)))
            .unwrap();
        assert_eq!(starts.next_at("u1", BLOCK), (1024, 2048));
    }

    #[test]
    fn a_start_counts_only_once_checked_run_and_inside() {
        let dir = tempfile::tempdir().unwrap();
        let starts = Starts::load(&dir.path().join("rxe-starts.json"));
        let begun = Start::begun("ns", "p", "u1", "a", How::Plugin, BLOCK, (1024, 2048));
        starts.put(begun.clone()).unwrap();
        let why = starts.outside("u1").unwrap();
        assert!(why.contains("was not checked"), "{why}");
        // The same start, ended without the container seen running.
        starts
            .put(begun.clone().ended((1024, 2048), false))
            .unwrap();
        assert_eq!(starts.all().len(), 1, "the start under way was replaced");
        let why = starts.outside("u1").unwrap();
        assert!(why.contains("did not start"), "{why}");
        // Started again, inside: its latest start counts.
        starts
            .put(start("u1", "a", (1024, 2048), (1026, 2049)))
            .unwrap();
        assert_eq!(starts.outside("u1"), None);
        // Another container of the pod went past the block.
        starts
            .put(start("u1", "b", (1026, 2049), (1300, 2049)))
            .unwrap();
        let why = starts.outside("u1").unwrap();
        assert!(why.contains("QPN 1026 / MRN 2049 to QPN 1300"), "{why}");
    }

    #[test]
    fn records_survive_a_restart_keep_each_containers_latest_and_forget_gone_pods() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rxe-starts.json");
        let starts = Starts::load(&path);
        starts
            .put(start("u1", "a", (1024, 2048), (1026, 2049)))
            .unwrap();
        // One container went outside, then a sibling restarted many times.
        starts
            .put(start("u2", "bad", (1024, 2048), (1300, 2049)))
            .unwrap();
        for _ in 0..KEPT_PER_POD + 3 {
            starts
                .put(start("u2", "loop", (1024, 2048), (1024, 2048)))
                .unwrap();
        }
        let again = Starts::load(&path);
        assert_eq!(again.all(), starts.all());
        assert_eq!(
            again.all().iter().filter(|s| s.uid == "u2").count(),
            KEPT_PER_POD
        );
        assert!(again.outside("u1").is_none());
        assert!(
            again.outside("u2").is_some(),
            "the outside start was pruned"
        );
        again
            .keep_only(&HashSet::from([("ns".to_string(), "pod-u2".to_string())]))
            .unwrap();
        assert!(Starts::load(&path).all().iter().all(|s| s.uid == "u2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_under_way_is_waited_for_and_one_left_by_a_stopped_agent_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rxe-starts.json");
        let starts = Starts::load(&path);
        let begun = Start::begun("ns", "p", "u1", "a", How::Plugin, BLOCK, (1024, 2048));
        starts.put(begun.clone()).unwrap();
        let limit = std::time::Duration::from_secs(5);
        assert!(!starts.settled("u1", limit).await, "under way");
        let ends = {
            let starts = starts.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                starts.put(begun.ended((1025, 2048), true)).unwrap();
            })
        };
        assert!(starts.settled("u1", limit).await);
        ends.await.unwrap();
        assert_eq!(starts.outside("u1"), None);
        // A start under way when the agent stopped: nothing to wait for, and refused.
        starts
            .put(Start::begun(
                "ns",
                "p",
                "u2",
                "a",
                How::Plugin,
                BLOCK,
                (1024, 2048),
            ))
            .unwrap();
        let after_restart = Starts::load(&path);
        assert!(after_restart.settled("u2", limit).await);
        assert!(after_restart.outside("u2").is_some());
    }

    #[test]
    fn an_unreadable_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rxe-starts.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(Starts::load(&path).all().is_empty());
    }
}
