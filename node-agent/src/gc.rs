//! The agent's own housekeeping, apart from the operator: paused sources whose deadline passed
//! are resumed (a source never stays frozen because its operator went away), and the data of
//! migrations untouched for a while (past their commit point: for the retention time) and with no
//! step running is removed after undoing what it holds (resume, unblock, release), exactly as a
//! Cleanup would.
//! With a byte budget, the kept checkpoints of ended migrations are also removed, oldest first,
//! until they fit it (`retention.rs`). After each collection the agent publishes what it keeps
//! (on its Lease).
//! A migration whose undo fails is kept and tried again later: nothing is forgotten that still
//! holds something. Runs until the shutdown token is cancelled.

use std::time::Duration;

use crds::discovery::KeptCheckpoint;
use tokio::{sync::watch, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    agent::Agent,
    retention::{self, Budget, Standing},
};

/// How long the agent keeps what, and where it tells what it keeps.
#[derive(Debug)]
pub struct Retention {
    /// Data of migrations untouched this long is removed ...
    pub after: Duration,
    /// ... and kept checkpoints (past the commit point, or received whole) after this long.
    pub kept_for: Duration,
    /// At most this many bytes of kept checkpoints of ended migrations, when set.
    pub budget: Option<Budget>,
    /// What is kept, newest first, after each collection.
    pub publish: watch::Sender<Vec<KeptCheckpoint>>,
}

/// How often the deadlines of paused sources are looked at.
const DEADLINES_EVERY: Duration = Duration::from_secs(1);

/// How long the list of PodMigrations may take before a collection goes on without the budget.
const LIST_TIMEOUT: Duration = Duration::from_secs(20);

/// Every [`DEADLINES_EVERY`], resumes sources past their deadline; every `every`, collects what
/// `retention` lets go, and reports the count of stored migrations and what is kept. The two run
/// apart: a collection waiting on the disk or the API server never delays a resume.
pub async fn run(agent: Agent, every: Duration, retention: Retention, shutdown: CancellationToken) {
    // What a post-copy migration left when the agent's last run ended.
    agent.recover_post_copy_sources().await;
    agent.recover_post_copy_targets().await;
    let deadlines = async {
        let mut deadlines = tokio::time::interval(DEADLINES_EVERY);
        deadlines.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            deadlines.tick().await;
            agent.resume_expired().await;
        }
    };
    let collections = async {
        let mut collections = tokio::time::interval(every);
        collections.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            collections.tick().await;
            collect(&agent, retention.after, retention.kept_for).await;
            keep_within(&agent, &retention).await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        ((), ()) = async { tokio::join!(deadlines, collections) } => {}
    }
}

/// Undoes and removes the migrations older than `after` that garbage collection may take.
async fn collect(agent: &Agent, after: Duration, retention: Duration) {
    match agent
        .store()
        .stale(after, retention, |uid| agent.active(uid))
    {
        Ok(stale) => {
            for uid in stale {
                match agent.clone().cleanup(uid.clone()).await {
                    Ok(_) => {
                        info!(migration = %uid, "removed old migration data after undoing what it held");
                        agent.parts.metrics.collected();
                    }
                    Err(e) => {
                        warn!(migration = %uid, error = %e, "cannot undo an old migration; its data is kept")
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "garbage collection failed"),
    }
    agent
        .parts
        .metrics
        .stored(agent.store().list().map(|l| l.len()).unwrap_or(0));
}

/// Removes kept checkpoints of ended migrations past the byte budget, then publishes what is kept
/// and its bytes.
async fn keep_within(agent: &Agent, retention: &Retention) {
    let store = agent.store();
    let mut kept = match store.kept() {
        Ok(kept) => kept,
        Err(e) => return warn!(error = %e, "cannot list the kept checkpoints"),
    };
    // Only when everything kept, ended or not, is over the budget is it worth asking which ended.
    if let Some(budget) = retention
        .budget
        .as_ref()
        .filter(|b| kept.iter().map(|k| k.bytes).sum::<u64>() > b.bytes)
    {
        match tokio::time::timeout(LIST_TIMEOUT, budget.standings()).await {
            Ok(Ok(standings)) => {
                let standing = |uid: &str| standings.get(uid).copied().unwrap_or(Standing::Gone);
                let over =
                    retention::over_budget(&kept, budget.bytes, standing, |uid| agent.active(uid));
                for uid in &over {
                    // A step that began since the list (a Release, a Cleanup) goes first.
                    if agent.active(uid) {
                        continue;
                    }
                    match agent.clone().cleanup(uid.clone()).await {
                        Ok(_) => {
                            info!(migration = %uid, budget = budget.bytes, standing = ?standing(uid), "removed a kept checkpoint to stay within the byte budget");
                            agent.parts.metrics.evicted();
                        }
                        Err(e) => {
                            warn!(migration = %uid, error = %e, "cannot undo a kept checkpoint over the byte budget; it is kept")
                        }
                    }
                }
                if !over.is_empty() {
                    match store.kept() {
                        Ok(now) => kept = now,
                        Err(e) => return warn!(error = %e, "cannot list the kept checkpoints"),
                    }
                }
            }
            // Without knowing which migrations ended, nothing is removed.
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list PodMigrations; the byte budget is not applied this time")
            }
            Err(_) => warn!(
                "listing PodMigrations took over {LIST_TIMEOUT:?}; the byte budget is not applied this time"
            ),
        }
    }
    agent.parts.metrics.kept(kept.iter().map(|k| k.bytes).sum());
    let list = retention::published(&kept, &agent.settings.node_name, |uid| store.location(uid));
    retention.publish.send_if_modified(|published| {
        let changed = *published != list;
        *published = list;
        changed
    });
}
