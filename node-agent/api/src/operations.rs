//! The operations table: the rule that makes every step of the agent API idempotent, shared by the
//! node agent and the test agent so that both keep it the same way.
//!
//! A step of a migration runs at most once at a time. It is remembered while it runs and after it
//! succeeded, so asking again returns its state and never starts the work twice; a failure is
//! reported once and then forgotten, so asking again tries again. A step that ends within the
//! quick-answer time is answered with its result; one that takes longer answers RUNNING, and a
//! caller asking about a running step waits up to the quick-answer time for its end, so that a
//! poller learns of the end at once rather than at its next poll.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, oneshot};

use crate::{steps::Step, v1};

/// A migration, a step, and where the step goes (a transfer's target node; empty for the others):
/// a transfer to another node, after the first target went, is a step of its own.
type Key = (String, Step, String);

/// What the table knows of a step when it is asked for.
enum Known {
    Running,
    /// Succeeded (remembered) or failed (reported now, then forgotten).
    Ended(v1::Operation),
    New,
}

/// The steps of every migration one agent knows about.
#[derive(Debug)]
pub struct Operations {
    table: Mutex<HashMap<Key, v1::Operation>>,
    /// Woken whenever an operation ends.
    finished: Notify,
    quick: Duration,
}

impl Operations {
    /// A table whose steps answer their result when they end within `quick`.
    pub fn new(quick: Duration) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::default(),
            finished: Notify::new(),
            quick,
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<Key, v1::Operation>> {
        // The table holds plain values and is never left half-changed: a panic elsewhere while it
        // was held does not make it wrong.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Step `step` of migration `uid`: started with the work `start` makes unless it runs or
    /// succeeded already (`start` is called only when the work starts). The work runs on its own
    /// task, so a caller that goes away does not stop it; its wall time goes into `duration_ms`.
    pub async fn run<W>(
        self: &Arc<Self>,
        uid: &str,
        step: Step,
        start: impl FnOnce() -> W,
    ) -> v1::Operation
    where
        W: Future<Output = v1::Operation> + Send + 'static,
    {
        self.run_to(uid, step, "", start).await
    }

    /// [`Self::run`] of a step that goes to node `to` (a transfer): one to another node is
    /// another step.
    pub async fn run_to<W>(
        self: &Arc<Self>,
        uid: &str,
        step: Step,
        to: &str,
        start: impl FnOnce() -> W,
    ) -> v1::Operation
    where
        W: Future<Output = v1::Operation> + Send + 'static,
    {
        let key = (uid.to_string(), step, to.to_string());
        // Decided under the lock, acted on after it (it is not held across an await).
        let known = {
            let mut table = self.table();
            match table.get(&key).cloned() {
                Some(op) if op.state() == v1::State::Running => Known::Running,
                Some(op) => {
                    if op.state() == v1::State::Failed {
                        table.remove(&key);
                    }
                    Known::Ended(op)
                }
                None => {
                    table.insert(key.clone(), v1::Operation::running(uid));
                    Known::New
                }
            }
        };
        match known {
            Known::Running => return self.await_running(&key).await,
            Known::Ended(op) => return op,
            Known::New => {}
        }
        let work = start();
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let spawned_key = key.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut op = work.await;
            op.migration_uid = spawned_key.0.clone();
            op.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.table().insert(spawned_key, op.clone());
            this.finished.notify_waiters();
            let _ = tx.send(op);
        });
        match tokio::time::timeout(self.quick, rx).await {
            Ok(Ok(op)) if op.state() == v1::State::Failed => {
                self.table().remove(&key);
                op
            }
            Ok(Ok(op)) => op,
            // Still running, or it ended just as the wait did.
            _ => self.read(&key),
        }
    }

    /// The operation `key` now; a failure read here is reported now, so it is forgotten now.
    fn read(&self, key: &Key) -> v1::Operation {
        let mut table = self.table();
        match table.get(key).map(v1::Operation::state) {
            Some(v1::State::Failed) => table.remove(key).unwrap_or_default(),
            Some(_) => table.get(key).cloned().unwrap_or_default(),
            None => v1::Operation::running(&key.0),
        }
    }

    /// The running operation `key`, once it ended or the quick-answer time passed.
    async fn await_running(&self, key: &Key) -> v1::Operation {
        let deadline = tokio::time::Instant::now() + self.quick;
        loop {
            // Registered before the table is read, so that an end in between is not missed.
            let notified = self.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let op = self.read(key);
            if op.state() != v1::State::Running
                || tokio::time::timeout_at(deadline, notified).await.is_err()
            {
                return op;
            }
        }
    }

    /// Records the progress of a running step.
    pub fn progress(&self, uid: &str, step: Step, done: u64, total: u64) {
        for ((u, s, _), op) in self.table().iter_mut() {
            if u == uid && *s == step && op.state() == v1::State::Running {
                op.bytes_done = done;
                op.bytes_total = total;
            }
        }
    }

    /// Whether a step of migration `uid` runs now.
    pub fn active(&self, uid: &str) -> bool {
        self.table()
            .iter()
            .any(|((u, _, _), op)| u == uid && op.state() == v1::State::Running)
    }

    /// Forgets the ended steps of migration `uid` (after its cleanup).
    pub fn forget(&self, uid: &str) {
        self.table()
            .retain(|(u, _, _), op| u != uid || op.state() == v1::State::Running);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn counted(
        starts: &Arc<AtomicU32>,
        op: v1::Operation,
    ) -> impl FnOnce() -> std::future::Ready<v1::Operation> {
        let starts = starts.clone();
        move || {
            starts.fetch_add(1, Ordering::SeqCst);
            std::future::ready(op)
        }
    }

    #[tokio::test]
    async fn a_succeeded_step_is_remembered_and_never_run_twice() {
        let ops = Operations::new(Duration::from_secs(1));
        let starts = Arc::new(AtomicU32::new(0));
        for _ in 0..3 {
            let op = ops
                .run(
                    "m",
                    Step::Checkpoint,
                    counted(&starts, v1::Operation::succeeded("")),
                )
                .await;
            assert_eq!(op.state(), v1::State::Succeeded);
            assert_eq!(op.migration_uid, "m");
        }
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        // Another step, or another migration, is another operation.
        let other = ops
            .run(
                "n",
                Step::Checkpoint,
                counted(&starts, v1::Operation::succeeded("")),
            )
            .await;
        assert_eq!(other.migration_uid, "n");
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_transfer_to_another_node_is_another_step() {
        let ops = Operations::new(Duration::from_secs(1));
        let starts = Arc::new(AtomicU32::new(0));
        for to in ["node-2", "node-2", "node-3", "node-3"] {
            let op = ops
                .run_to(
                    "m",
                    Step::Transfer,
                    to,
                    counted(&starts, v1::Operation::succeeded("")),
                )
                .await;
            assert_eq!(op.state(), v1::State::Succeeded);
        }
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failure_is_reported_once_and_asking_again_tries_again() {
        let ops = Operations::new(Duration::from_secs(1));
        let starts = Arc::new(AtomicU32::new(0));
        let failed = ops
            .run(
                "m",
                Step::Transfer,
                counted(&starts, v1::Operation::failed("", "broken")),
            )
            .await;
        assert_eq!(failed.state(), v1::State::Failed);
        assert_eq!(failed.message, "broken");
        let again = ops
            .run(
                "m",
                Step::Transfer,
                counted(&starts, v1::Operation::succeeded("")),
            )
            .await;
        assert_eq!(again.state(), v1::State::Succeeded);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_long_step_answers_running_shows_progress_and_its_end_reaches_the_next_caller() {
        let ops = Operations::new(Duration::from_millis(50));
        let (release, released) = oneshot::channel::<()>();
        let first = ops
            .run("m", Step::Transfer, || async move {
                let _ = released.await;
                v1::Operation::failed("", "the target went away")
            })
            .await;
        assert_eq!(first.state(), v1::State::Running);
        assert!(ops.active("m"));
        ops.progress("m", Step::Transfer, 5, 10);
        let polled = ops
            .run("m", Step::Transfer, || async {
                unreachable!("started twice")
            })
            .await;
        assert_eq!((polled.bytes_done, polled.bytes_total), (5, 10));
        release.send(()).unwrap();
        // The end is reported to the caller waiting on the running step, once.
        let ended = ops
            .run("m", Step::Transfer, || async {
                unreachable!("started twice")
            })
            .await;
        assert_eq!(ended.state(), v1::State::Failed, "{ended:?}");
        assert!(!ops.active("m"));
        let fresh = ops
            .run("m", Step::Transfer, || async {
                v1::Operation::succeeded("")
            })
            .await;
        assert_eq!(fresh.state(), v1::State::Succeeded);
    }

    #[tokio::test]
    async fn forgetting_keeps_running_steps() {
        let ops = Operations::new(Duration::from_millis(10));
        ops.run("m", Step::Checkpoint, || async {
            v1::Operation::succeeded("")
        })
        .await;
        let (_hold, held) = oneshot::channel::<()>();
        ops.run("m", Step::Transfer, || async move {
            let _ = held.await;
            v1::Operation::succeeded("")
        })
        .await;
        ops.forget("m");
        assert!(ops.active("m"));
        let starts = Arc::new(AtomicU32::new(0));
        ops.run(
            "m",
            Step::Checkpoint,
            counted(&starts, v1::Operation::succeeded("")),
        )
        .await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "a forgotten step runs again"
        );
    }
}
