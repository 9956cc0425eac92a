//! The node's SoftRoCE (rxe) ID counters. rxe hands out queue-pair and memory-region numbers by
//! counting up from `last_qpn` / `last_mrn` (`/proc/sys/net/rdma_rxe/` with the MigrOS kernel
//! patch); setting them to a pod's block right before its containers start makes every number the
//! pod gets lie in its block, so the numbers are still free on whatever node it moves to.
//!
//! The counters are node-wide, so setting them and starting the pod must not interleave with
//! another pod doing the same: [`Counters::hold`] takes the node's lock and keeps it (in the
//! returned guard) until the pod runs; [`Holds`] keeps those guards by migration. The directory is
//! configurable: the machines this project is tested on have no RDMA subsystem, so tests point it
//! at a per-node directory of plain files (docs/rxe-blocks.md).

use std::{
    collections::HashMap,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The files rxe reads its next numbers from.
pub const QPN_FILE: &str = "last_qpn";
pub const MRN_FILE: &str = "last_mrn";

/// A pod's block of rxe numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub qpn_start: u32,
    pub qpn_count: u32,
    pub mrn_start: u32,
    pub mrn_count: u32,
}

impl From<&agent_api::v1::RxeBlock> for Block {
    fn from(b: &agent_api::v1::RxeBlock) -> Self {
        Self {
            qpn_start: b.qpn_start,
            qpn_count: b.qpn_count,
            mrn_start: b.mrn_start,
            mrn_count: b.mrn_count,
        }
    }
}

impl Block {
    /// The first QPN past the block.
    pub fn qpn_end(&self) -> u64 {
        u64::from(self.qpn_start) + u64::from(self.qpn_count)
    }

    /// The first MRN past the block.
    pub fn mrn_end(&self) -> u64 {
        u64::from(self.mrn_start) + u64::from(self.mrn_count)
    }

    /// Whether counters at `(qpn, mrn)` lie in the block: each from its start to its last number
    /// (a counter holds the last number handed out).
    pub fn contains(&self, (qpn, mrn): (u32, u32)) -> bool {
        qpn >= self.qpn_start
            && u64::from(qpn) < self.qpn_end()
            && mrn >= self.mrn_start
            && u64::from(mrn) < self.mrn_end()
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QPNs {}..{}, MRNs {}..{}",
            self.qpn_start,
            self.qpn_end(),
            self.mrn_start,
            self.mrn_end()
        )
    }
}

/// Errors of counter handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this node has no rxe counters at {0}")]
    Absent(PathBuf),
    #[error("rxe block {block} is outside this node's ranges (QPNs {qpn:?}, MRNs {mrn:?})")]
    OutOfRange {
        block: Block,
        qpn: Range<u32>,
        mrn: Range<u32>,
    },
    #[error("the rxe counters are held by migration {holder} for longer than {0:?}", .waited)]
    Busy { holder: String, waited: Duration },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} reads {read:?} after writing {wrote}")]
    NotTaken {
        path: PathBuf,
        wrote: u32,
        read: String,
    },
}

/// The counters of one node, and its lock.
#[derive(Debug, Clone)]
pub struct Counters {
    dir: PathBuf,
    qpn: Range<u32>,
    mrn: Range<u32>,
    lock: Arc<Mutex<()>>,
    /// The migration holding the lock, for the message of those who wait.
    holder: Arc<std::sync::Mutex<String>>,
}

/// The node's counters, held for one pod until dropped.
#[derive(Debug)]
pub struct Hold {
    _guard: OwnedMutexGuard<()>,
    pub block: Block,
}

impl Counters {
    /// Counters in `dir`; blocks must lie inside the `qpn` and `mrn` ranges (end exclusive).
    pub fn new(dir: &Path, qpn: Range<u32>, mrn: Range<u32>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            qpn,
            mrn,
            lock: Arc::new(Mutex::new(())),
            holder: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the counters exist and can be written.
    pub fn present(&self) -> bool {
        [QPN_FILE, MRN_FILE].iter().all(|f| {
            std::fs::metadata(self.dir.join(f))
                .is_ok_and(|m| m.is_file() && !m.permissions().readonly())
        })
    }

    /// Checks that `block` lies inside the configured ranges.
    pub fn check(&self, block: Block) -> Result<(), Error> {
        let inside = |start: u32, count: u32, range: &Range<u32>| {
            count > 0
                && start >= range.start
                && u64::from(start) + u64::from(count) <= u64::from(range.end)
        };
        if inside(block.qpn_start, block.qpn_count, &self.qpn)
            && inside(block.mrn_start, block.mrn_count, &self.mrn)
        {
            Ok(())
        } else {
            Err(Error::OutOfRange {
                block,
                qpn: self.qpn.clone(),
                mrn: self.mrn.clone(),
            })
        }
    }

    /// Takes the node's lock for migration `owner` (waiting at most `wait` for another holder),
    /// then sets both counters to the start of `block` and reads them back.
    pub async fn hold(&self, owner: &str, block: Block, wait: Duration) -> Result<Hold, Error> {
        let start = (block.qpn_start, block.mrn_start);
        Ok(self.hold_at(owner, block, || start, wait).await?.0)
    }

    /// Like [`Counters::hold`], with the counters set to what `at` answers (QPN, MRN) once the
    /// lock is taken, which must lie in `block`: a pod's second container continues where its
    /// first one's numbers end, as recorded by the time the first one let go.
    pub async fn hold_at(
        &self,
        owner: &str,
        block: Block,
        at: impl FnOnce() -> (u32, u32),
        wait: Duration,
    ) -> Result<(Hold, (u32, u32)), Error> {
        self.check(block)?;
        if !self.present() {
            return Err(Error::Absent(self.dir.clone()));
        }
        let guard = match tokio::time::timeout(wait, self.lock.clone().lock_owned()).await {
            Ok(guard) => guard,
            Err(_) => {
                let holder = self
                    .holder
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_else(|_| "another migration".into());
                return Err(Error::Busy {
                    holder,
                    waited: wait,
                });
            }
        };
        if let Ok(mut holder) = self.holder.lock() {
            *holder = owner.to_string();
        }
        let at = at();
        if !block.contains(at) {
            return Err(Error::OutOfRange {
                block,
                qpn: at.0..at.0,
                mrn: at.1..at.1,
            });
        }
        self.write(QPN_FILE, at.0)?;
        self.write(MRN_FILE, at.1)?;
        Ok((
            Hold {
                _guard: guard,
                block,
            },
            at,
        ))
    }

    /// The counters' values now (QPN, MRN): the last numbers rxe handed out.
    pub fn read(&self) -> Result<(u32, u32), Error> {
        let read = |file: &str| {
            let path = self.dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            text.trim().parse::<u32>().map_err(|_| Error::NotTaken {
                path,
                wrote: 0,
                read: text,
            })
        };
        Ok((read(QPN_FILE)?, read(MRN_FILE)?))
    }

    fn write(&self, file: &str, value: u32) -> Result<(), Error> {
        let path = self.dir.join(file);
        std::fs::write(&path, format!("{value}\n")).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let read = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        if read.trim() != value.to_string() {
            return Err(Error::NotTaken {
                path,
                wrote: value,
                read,
            });
        }
        Ok(())
    }
}

/// The holds of the node's counters by migration. A restore takes one when it stages and lets it
/// go when its pod runs; an operator that never says so does not block the node for good: a hold
/// ends after `max` at the latest.
#[derive(Debug, Clone)]
pub struct Holds {
    counters: Counters,
    /// Holds by migration, with a serial number so that an expiry only ends the hold it was set
    /// for.
    held: Arc<std::sync::Mutex<HashMap<String, Held>>>,
    serial: Arc<AtomicU64>,
    /// How long a restore waits while another one holds the counters.
    wait: Duration,
    max: Duration,
}

/// One migration's hold: its serial number, the hold, and the pod it restores
/// (`namespace/name`).
#[derive(Debug)]
struct Held {
    serial: u64,
    hold: Hold,
    pod: String,
}

impl Holds {
    pub fn new(counters: Counters, wait: Duration, max: Duration) -> Self {
        Self {
            counters,
            held: Arc::default(),
            serial: Arc::default(),
            wait,
            max,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the counters to `block` for migration `uid`, which restores pod `pod`
    /// (`namespace/name`), and holds them until [`Holds::release`] (or the maximum hold). A retry
    /// with the same block keeps its hold; a retry with another block lets go of the old one
    /// first. Answers whether the counters were set now.
    pub async fn take(&self, uid: &str, pod: &str, block: Block) -> Result<bool, Error> {
        if self.held().get(uid).map(|h| h.hold.block) == Some(block) {
            return Ok(false);
        }
        self.release(uid);
        let hold = self.counters.hold(uid, block, self.wait).await?;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        self.held().insert(
            uid.to_string(),
            Held {
                serial,
                hold,
                pod: pod.to_string(),
            },
        );
        let (this, uid) = (self.clone(), uid.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(this.max).await;
            let mut held = this.held();
            if held.get(&uid).is_some_and(|h| h.serial == serial) {
                tracing::warn!(migration = %uid, "rxe counters held too long; released");
                held.remove(&uid);
            }
        });
        Ok(true)
    }

    /// Lets go of the counters migration `uid` holds, if any.
    pub fn release(&self, uid: &str) {
        self.held().remove(uid);
    }

    /// The block of the migration that holds the counters to restore pod `pod`
    /// (`namespace/name`), if one does: its containers start with the counters already set.
    pub fn restoring(&self, pod: &str) -> Option<Block> {
        self.held()
            .values()
            .find(|h| h.pod == pod)
            .map(|h| h.hold.block)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn block(qpn: u32, mrn: u32) -> Block {
        Block {
            qpn_start: qpn,
            qpn_count: 256,
            mrn_start: mrn,
            mrn_count: 256,
        }
    }

    fn counters(dir: &Path) -> Counters {
        for f in [QPN_FILE, MRN_FILE] {
            std::fs::write(dir.join(f), "0\n").unwrap();
        }
        Counters::new(dir, 1024..2048, 1024..2048)
    }

    #[tokio::test]
    async fn holding_writes_the_block_start_and_excludes_others_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = counters(dir.path());
        let hold = c
            .hold("m1", block(1280, 1536), Duration::from_secs(1))
            .await
            .unwrap();
        let read = |f| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read(QPN_FILE).trim(), "1280");
        assert_eq!(read(MRN_FILE).trim(), "1536");
        let busy = c
            .hold("m2", block(1024, 1024), Duration::from_millis(50))
            .await;
        assert!(
            matches!(&busy, Err(Error::Busy { holder, .. }) if holder == "m1"),
            "{busy:?}"
        );
        // Nothing was written by the refused hold.
        assert_eq!(read(QPN_FILE).trim(), "1280");
        drop(hold);
        c.hold("m2", block(1024, 1024), Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(read(QPN_FILE).trim(), "1024");
    }

    #[tokio::test]
    async fn blocks_outside_the_ranges_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = counters(dir.path());
        for b in [block(512, 1024), block(1024, 1900), block(2000, 1024)] {
            let r = c.hold("m", b, Duration::from_millis(50)).await;
            assert!(matches!(r, Err(Error::OutOfRange { .. })), "{b}: {r:?}");
        }
        let empty = Block {
            qpn_count: 0,
            ..block(1024, 1024)
        };
        assert!(c.check(empty).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(QPN_FILE)).unwrap(),
            "0\n"
        );
    }

    // Virtual time: the expiry is reached without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn holds_are_kept_per_migration_released_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let holds = Holds::new(
            counters(dir.path()),
            Duration::from_millis(50),
            Duration::from_millis(300),
        );
        assert!(holds.take("m1", "ns/a", block(1280, 1280)).await.unwrap());
        assert_eq!(holds.restoring("ns/a"), Some(block(1280, 1280)));
        assert_eq!(holds.restoring("ns/b"), None);
        // Asked again with the same block: the hold stays, nothing is written again.
        assert!(!holds.take("m1", "ns/a", block(1280, 1280)).await.unwrap());
        let busy = holds.take("m2", "ns/b", block(1024, 1024)).await;
        assert!(matches!(busy, Err(Error::Busy { .. })), "{busy:?}");
        holds.release("m1");
        assert_eq!(holds.restoring("ns/a"), None);
        assert!(holds.take("m2", "ns/b", block(1024, 1024)).await.unwrap());
        // Never released: it ends by itself.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(holds.restoring("ns/b"), None);
        assert!(holds.take("m3", "ns/c", block(1536, 1536)).await.unwrap());
    }

    #[tokio::test]
    async fn a_node_without_counters_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters::new(dir.path(), 1024..2048, 1024..2048);
        assert!(!c.present());
        let r = c
            .hold("m", block(1024, 1024), Duration::from_millis(50))
            .await;
        assert!(matches!(r, Err(Error::Absent(_))), "{r:?}");
    }
}
