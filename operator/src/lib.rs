//! The kube-migros operator: reconciles PodMigrations (docs/operator.md) by driving the node
//! agents over mutual TLS, allocates rxe ID blocks, and elects one leader among its replicas.

pub mod admission;
pub mod agents;
pub mod certificates;
pub mod claims;
pub mod controller;
pub mod leader;
pub mod metrics;
pub use crds::movable;
pub mod network;
pub mod queue;
pub mod replacement;
pub mod rxe_blocks;
pub mod server;
pub mod signer;
pub mod statemachine;
pub mod strategy;
pub mod targets;
pub mod webhook;

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rxe block: {0}")]
    Rxe(#[from] rxe_blocks::Error),
    #[error("invalid PodMigration {0}")]
    Invalid(String),
    #[error("PodMigration {0} is being rolled back or cleaned up before it can go")]
    CleanupPending(String),
    #[error("cannot (de)serialize: {0}")]
    Json(#[from] serde_json::Error),
    /// A status write refused because the object changed since it was read; the stored object
    /// was read again and the next look decides on it.
    #[error("PodMigration {0} changed since it was read; deciding again")]
    Changed(String),
}

/// How a failed reconcile is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object cannot be handled as it is: wait for it to change.
    Invalid,
    /// Work in progress: look again soon, without backing off.
    Pending,
    /// The API server or an agent had a hiccup: back off per object.
    Transient,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) | Error::Json(_) => ErrorKind::Invalid,
            Error::CleanupPending(_) | Error::Changed(_) => ErrorKind::Pending,
            Error::Kube(_) | Error::Rxe(_) => ErrorKind::Transient,
        }
    }

    /// The `kind` label of the reconcile error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Rxe(_) => "rxe",
            Error::Invalid(_) => "invalid",
            Error::CleanupPending(_) => "cleanup_pending",
            Error::Changed(_) => "changed",
            Error::Json(_) => "json",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
