//! The node-agent gRPC API shared by the operator and the agents: the generated protobuf types,
//! client and server (`v1`); the step protocol (`steps`), its typed client (`client`) and the
//! operations table that makes every step idempotent (`operations`); mutual-TLS configuration
//! (`tls`), certificates for it (`pki`), who may call what (`identity`) and the checkpoint image
//! both sides derive (`checkpoint_image`). How the operator finds the agents (their Leases) is in
//! `crds::discovery`, which the kubectl plugin reads too.

pub mod checkpoint_image;
pub mod client;
pub mod identity;
pub mod operations;
pub mod pki;
pub mod steps;
pub mod tls;

/// Generated from `proto/agent.proto`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("migros.agent.v1");
}

pub use steps::{Role, Step, StepArgs};

/// The names of the restore backends, as capabilities list them and PrepareTarget asks for them.
pub mod backend {
    /// The replacement runs under the `kube-migros` RuntimeClass, whose runtime (`migros-runc`)
    /// restores each container at its first start from the unpacked checkpoint.
    pub const RUNTIME_WRAPPER: &str = "runtime-wrapper";
    /// The replacement's images are checkpoint OCI images (containerd 2.1-2.3, CRI-O).
    pub const CRI_CHECKPOINT_IMAGE: &str = "cri-checkpoint-image";
    /// The runtime gets the archive's path (CRI clients that create containers themselves).
    pub const CRI_CHECKPOINT_ARCHIVE: &str = "cri-checkpoint-archive";
}

/// Where an agent's store keeps a migration's data: `<store>/migrations/<uid>/`, with what a
/// target staged for the runtime in `staged/` (the unpacked checkpoint of a container for the
/// runtime wrapper, `<container>.tar` for an archive). Both sides use these names: the agent to
/// lay its store out, the operator to take from a target no staged path but these.
pub mod layout {
    pub const MIGRATIONS: &str = "migrations";
    pub const STAGED: &str = "staged";

    /// The end of the path a container of migration `uid` is staged at, below the store.
    pub fn staged_tail(uid: &str, container: &str) -> String {
        format!("/{MIGRATIONS}/{uid}/{STAGED}/{container}")
    }
}
pub use v1::{Operation, State};

impl v1::Operation {
    /// A step that is still going on.
    pub fn running(migration_uid: &str) -> Self {
        Self {
            migration_uid: migration_uid.into(),
            state: State::Running.into(),
            ..Default::default()
        }
    }

    /// A step that ended well.
    pub fn succeeded(migration_uid: &str) -> Self {
        Self {
            migration_uid: migration_uid.into(),
            state: State::Succeeded.into(),
            ..Default::default()
        }
    }

    /// A step that failed, and why.
    pub fn failed(migration_uid: &str, message: impl Into<String>) -> Self {
        Self {
            migration_uid: migration_uid.into(),
            state: State::Failed.into(),
            message: message.into(),
            ..Default::default()
        }
    }
}
