//! The kube-migros node agent: the node's side of a migration (docs/architecture.md).
//!
//! - `api`: the gRPC facade (who may call what, request checks, dispatch into the operations
//!   table of `agent_api::operations`);
//! - `agent`: what every step shares, and the steps of either end (abort, cleanup);
//! - `source` and `target`: the steps of each end of a migration;
//! - `wire`: both halves of the agent-to-agent checkpoint stream;
//! - `restore`: the restore backends; `oci`: checkpoint images and the registry; `wrapper`: what
//!   `migros-runc`, the runtime of the wrapper backend, does with each container;
//! - `archive`: vetting (and unpacking) received archives; `layer`: applying a container's
//!   filesystem changes to its restored root; `empty_dirs`: a pod's emptyDir volumes carried
//!   with its checkpoint; `store`: per-migration records and data on disk;
//! - `runtime`: the CRI and containerd's Tasks API (pause, checkpoint, kill);
//! - `netblock`: silencing a pod IP on the node's bridge; `address`: announcing where a pod's
//!   address lives after a move; `ipam`: IP reservations and the `migros-ipam` CNI plugin;
//! - `rxe_counters`: the node's rxe ID counters, their lock and holds; `device_plugin`: the
//!   kubelet's device plugin for `rdma/rxe`, which applies a pod's rxe block before its
//!   containers start; `rxe_starts`: what the counters did at those starts;
//! - process parts: `lease` (how the operator finds the agent, and what it keeps), `admin`
//!   (`/live`, `/ready`, `/metrics`), `gc` and `retention` (what is kept, and how much),
//!   `metrics`; `error`: the one error of the steps.

pub mod address;
pub mod admin;
pub mod agent;
pub mod api;
pub mod archive;
pub mod certificate;
pub mod device_plugin;
pub mod empty_dirs;
pub mod error;
pub mod gc;
pub mod ipam;
pub mod layer;
pub mod lease;
pub mod metrics;
pub mod netblock;
pub mod netns;
pub mod oci;
pub mod post_copy;
pub mod restore;
pub mod retention;
pub mod room;
pub mod runtime;
pub mod rxe_counters;
pub mod rxe_starts;
pub mod source;
pub mod store;
pub mod strategies;
pub mod target;
pub mod wire;
pub mod wrapper;

/// Seconds since the Unix epoch (what is kept on disk, as a source's deadline, must survive a
/// restart of the agent).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
