//! The agent's own housekeeping, apart from the operator: paused sources whose deadline passed
//! are resumed (a source never stays frozen because its operator went away), and the data of
//! migrations untouched for a while (past their commit point: for the retention time) and with no
//! step running is removed after undoing what it holds (resume, unblock, release), exactly as a
//! Cleanup would.
//! A migration whose undo fails is kept and tried again later: nothing is forgotten that still
//! holds something. Runs until the shutdown token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::Agent;

/// How often the deadlines of paused sources are looked at.
const DEADLINES_EVERY: Duration = Duration::from_secs(1);

/// Every [`DEADLINES_EVERY`], resumes sources past their deadline; every `every`, collects what
/// is older than `after` (kept checkpoints past the commit point: `retention`) and reports the
/// count of stored migrations.
pub async fn run(
    agent: Agent,
    every: Duration,
    after: Duration,
    retention: Duration,
    shutdown: CancellationToken,
) {
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
            _ = collections.tick() => collect(&agent, after, retention).await,
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
