//! Garbage collection of the checkpoint store: data of migrations untouched for a while, not past
//! their commit point and with no step running, is removed (the operator normally cleans up; this
//! catches what an operator that went away left). Runs until the shutdown token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::Agent;

/// Every `every`, removes what is older than `after`; reports the count of stored migrations.
pub async fn run(agent: Agent, every: Duration, after: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match agent.store().collect(after, |uid| agent.active(uid)) {
            Ok(removed) if !removed.is_empty() => info!(?removed, "removed old checkpoint data"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "garbage collection failed"),
        }
        agent
            .parts
            .metrics
            .stored(agent.store().list().map(|l| l.len()).unwrap_or(0));
    }
}
