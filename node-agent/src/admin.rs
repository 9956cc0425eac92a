//! The agent's HTTP endpoints: `/live` (the process serves), `/ready` (the node's runtime answers
//! and the checkpoint store is usable: the agent can take a migration), `/metrics` (Prometheus
//! text format), `/rxe/starts` (the device plugin's records of RDMA pods' starts, JSON; see
//! `rxe_starts`). Served until the shutdown token is cancelled.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;

/// How long `/ready` waits for the runtime's answer.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` (so that a taken port fails the start) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    agent: Agent,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(encode))
        .route("/rxe/starts", get(rxe_starts))
        .with_state(agent);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}

async fn ready(State(agent): State<Agent>) -> (StatusCode, String) {
    let runtime = tokio::time::timeout(RUNTIME_TIMEOUT, agent.runtime().version()).await;
    let store = agent.store().free_bytes();
    match (runtime, store) {
        (Ok(Ok((name, version))), Ok(free)) => (
            StatusCode::OK,
            format!("ok: {name} {version}, {free} bytes free in the checkpoint store"),
        ),
        (Ok(Err(e)), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the runtime does not answer: {e}"),
        ),
        (Err(_), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the runtime gave no answer within {RUNTIME_TIMEOUT:?}"),
        ),
        (_, Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the checkpoint store is not usable: {e}"),
        ),
    }
}

async fn encode(State(agent): State<Agent>) -> ([(&'static str, &'static str); 1], String) {
    let content_type = [(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    // What only a look at the node tells: the store's room, and the longest frozen source.
    let store = agent.store().clone();
    let observed = tokio::task::spawn_blocking(move || {
        let space = store.space().ok();
        (space, store.longest_pause(crate::unix_now()))
    })
    .await;
    // A store that cannot be read keeps its last figures rather than reading as empty (full).
    if let Ok((Some((free, capacity)), pause)) = observed {
        agent.parts.metrics.observe_node(free, capacity, pause);
    }
    (content_type, agent.parts.metrics.encode())
}

async fn rxe_starts(State(agent): State<Agent>) -> ([(&'static str, &'static str); 1], String) {
    let json = serde_json::to_string_pretty(&agent.parts.rxe_starts.all())
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    ([("content-type", "application/json")], json)
}
