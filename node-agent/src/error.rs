//! The one error of the agent's steps: what went wrong, in words the operator shows its users (the
//! message of a failed operation), whether trying again may help, and the gRPC code a refused
//! request or stream answers with.

use std::path::PathBuf;

use crate::{archive, netblock, oci, runtime, rxe_counters, store, wire};

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be served as asked; asking again the same way fails again.
    #[error("{0}")]
    Invalid(String),
    /// The node is not in the state the step needs (e.g. a migration it never prepared).
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    #[error(transparent)]
    Rxe(#[from] rxe_counters::Error),
    #[error(transparent)]
    NetBlock(#[from] netblock::Error),
    #[error(transparent)]
    Archive(#[from] archive::Error),
    #[error(transparent)]
    Image(#[from] oci::Error),
    /// A checkpoint stream refused by the receiving agent (this node, or the peer).
    #[error(transparent)]
    Rejected(#[from] wire::Rejected),
    /// The peer agent could not be reached, broke off, or refused.
    #[error("{what}: {}", source.message())]
    Peer {
        what: String,
        #[source]
        source: tonic::Status,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Step {
        what: &'static str,
        #[source]
        source: Box<Error>,
    },
    /// Commit of a source whose pod the agent resumed at its deadline: the pod runs here, the
    /// checkpoint is stale, and the migration cannot pass its commit point any more.
    #[error("{0}")]
    SourceResumed(String),
    /// Checkpoint of an RDMA pod that got rxe numbers outside its block at a start on this node
    /// (docs/rxe-blocks.md#checked-not-assumed): moving it could collide on the target.
    #[error("{0}")]
    RxeOutsideBlock(String),
    /// Undoing a failed step failed too: the node may need a hand (both are said).
    #[error("{cause}; undoing it failed too: {undo}")]
    Undo { cause: Box<Error>, undo: Box<Error> },
    #[error("a blocking task of the agent failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps the error with what was being done.
    pub fn during(self, what: &'static str) -> Self {
        Error::Step {
            what,
            source: Box::new(self),
        }
    }

    /// An I/O error at `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io {
            what: path.display().to_string(),
            source,
        }
    }

    /// Whether the same step may succeed if tried again without a change: the peer or the
    /// runtime had a hiccup, rather than refusing what it was given.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Peer { source, .. } => !matches!(
                source.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::AlreadyExists
            ),
            Error::Step { source, .. } => source.retryable(),
            Error::Rejected(reason) => reason.retryable(),
            Error::Runtime(_) | Error::Io { .. } | Error::Task(_) => true,
            _ => false,
        }
    }

    /// The gRPC code a refused request or stream answers with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::Invalid(_) => tonic::Code::InvalidArgument,
            Error::Rejected(reason) => reason.code(),
            Error::Step { source, .. } => source.code(),
            // Whatever else kept this node from taking a request: the sender does not retry it
            // as it is.
            _ => tonic::Code::FailedPrecondition,
        }
    }

    /// The error as a gRPC status.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_final_and_a_broken_link_is_worth_another_try() {
        let refused = Error::Peer {
            what: "sending the checkpoint".into(),
            source: tonic::Status::invalid_argument("digest mismatch"),
        };
        assert!(!refused.retryable());
        let broken = Error::Peer {
            what: "sending the checkpoint".into(),
            source: tonic::Status::unavailable("connection reset"),
        };
        assert!(broken.retryable());
        let during = broken.during("transfer");
        assert!(during.retryable());
        assert_eq!(
            during.to_string(),
            "transfer: sending the checkpoint: connection reset"
        );
        assert!(!Error::Invalid("no pod".into()).retryable());
    }

    #[test]
    fn refusals_carry_the_code_the_caller_acts_on() {
        let too_large = Error::Rejected(wire::Rejected::TooLarge {
            container: "app".into(),
            bytes: 10,
            limit: 5,
        });
        assert_eq!(too_large.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            Error::Invalid("x".into()).status().code(),
            tonic::Code::InvalidArgument
        );
    }
}
