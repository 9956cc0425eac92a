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
use tokio::sync::watch;
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

/// Every [`DEADLINES_EVERY`], resumes sources past their deadline; every `every`, collects what
/// `retention` lets go, and reports the count of stored migrations and what is kept.
pub async fn run(agent: Agent, every: Duration, retention: Retention, shutdown: CancellationToken) {
    // What a post-copy migration left when the agent's last run ended.
    agent.recover_post_copy_sources().await;
    agent.recover_post_copy_targets().await;
    let mut deadlines = tokio::time::interval(DEADLINES_EVERY);
    let mut collections = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = deadlines.tick() => {
                agent.resume_expired().await;
            }
            _ = collections.tick() => {
                collect(&agent, retention.after, retention.kept_for).await;
                keep_within(&agent, &retention).await;
            }
        }
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
    if let Some(budget) = &retention.budget {
        match (store.kept(), budget.standings().await) {
            (Ok(kept), Ok(standings)) => {
                let standing = |uid: &str| standings.get(uid).copied().unwrap_or(Standing::Gone);
                for uid in
                    retention::over_budget(&kept, budget.bytes, standing, |uid| agent.active(uid))
                {
                    match agent.clone().cleanup(uid.clone()).await {
                        Ok(_) => {
                            info!(migration = %uid, budget = budget.bytes, standing = ?standing(&uid), "removed a kept checkpoint to stay within the byte budget");
                            agent.parts.metrics.evicted();
                        }
                        Err(e) => {
                            warn!(migration = %uid, error = %e, "cannot undo a kept checkpoint over the byte budget; it is kept")
                        }
                    }
                }
            }
            (Err(e), _) => warn!(error = %e, "cannot list the kept checkpoints"),
            // Without knowing which migrations ended, nothing is removed.
            (_, Err(e)) => {
                warn!(error = %e, "cannot list PodMigrations; the byte budget is not applied this time")
            }
        }
    }
    match store.kept() {
        Ok(kept) => {
            agent.parts.metrics.kept(kept.iter().map(|k| k.bytes).sum());
            let list =
                retention::published(&kept, &agent.settings.node_name, |uid| store.location(uid));
            retention.publish.send_if_modified(|published| {
                let changed = *published != list;
                *published = list;
                changed
            });
        }
        Err(e) => warn!(error = %e, "cannot list the kept checkpoints"),
    }
}
