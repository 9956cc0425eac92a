//! The kube-migros node agent: the node's side of a migration (DESIGN.md sections 4 and 5).
//!
//! - `service`: the gRPC service the operator (and, for `Receive`, a peer agent) calls, with the
//!   restore backend trait;
//! - `runtime`: the CRI and containerd's Tasks API (pause, checkpoint, kill);
//! - `netblock`: silencing a pod IP on the node's bridge (nftables);
//! - `transfer` and `archive`: the agent-to-agent stream, and vetting and staging what arrives;
//! - `store`: the per-migration records and data on disk, and their garbage collection;
//! - `rxe`: the node's rxe ID counters and their lock;
//! - `ipam`: IP reservations and the `migros-ipam` CNI plugin that honours them;
//! - `announce`: the Lease by which the operator finds the agent; `metrics`.

pub mod announce;
pub mod archive;
pub mod ipam;
pub mod metrics;
pub mod netblock;
pub mod oci;
pub mod runtime;
pub mod rxe;
pub mod service;
pub mod store;
pub mod transfer;
