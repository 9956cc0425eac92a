//! The operator's HTTP endpoints: `/live` (the process serves), `/ready` (connected, caches
//! synced, and either leading or standing by), `/metrics` (Prometheus text format).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
    pub leader: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

/// Serves the endpoints on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    match (
        health.ready.load(Ordering::Relaxed),
        health.leader.load(Ordering::Relaxed),
    ) {
        (true, true) => (StatusCode::OK, "ok: leading"),
        (true, false) => (StatusCode::OK, "ok: standing by"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    }
}

async fn metrics(State(health): State<Health>) -> ([(&'static str, &'static str); 1], String) {
    let content_type = [(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    (content_type, health.metrics.encode())
}
