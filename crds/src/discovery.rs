//! How the operator finds the agents, and what they tell about themselves: each agent keeps a
//! Lease `<LEASE_PREFIX><node>` in the operator's namespace, labelled [`LEASE_LABEL`], annotated
//! with its endpoint and with the checkpoints it keeps ([`KEPT_ANNOTATION`]), renewed while it
//! runs. These names are the contract between the agents, the operator and `kubectl migros`.

use serde::{Deserialize, Serialize};

/// Prefix of an agent Lease's name; the node name follows.
pub const LEASE_PREFIX: &str = "kube-migros-agent-";
/// Label on every agent Lease, to list them.
pub const LEASE_LABEL: &str = "migros.io/agent";
/// Annotation with the agent's gRPC endpoint (`host:port`).
pub const ENDPOINT_ANNOTATION: &str = "migros.io/agent-endpoint";
/// Annotation with the checkpoints the agent keeps past their migration's commit point (or
/// received whole), as a JSON list of [`KeptCheckpoint`], newest first: at most [`KEPT_LISTED`]
/// of them and [`KEPT_BYTES`] of JSON.
pub const KEPT_ANNOTATION: &str = "migros.io/kept-checkpoints";
/// The most checkpoints one Lease lists.
pub const KEPT_LISTED: usize = 100;
/// The most bytes of JSON the list takes (an object's annotations hold at most 256 KiB in all,
/// and the Lease is written at every renewal).
pub const KEPT_BYTES: usize = 32 << 10;

/// A checkpoint an agent keeps on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptCheckpoint {
    /// The PodMigration's UID.
    pub migration: String,
    /// The migrated pod.
    pub namespace: String,
    pub pod: String,
    /// `source` (the checkpoint it took) or `target` (the one it received).
    pub role: String,
    /// Bytes on the node's disk.
    pub bytes: u64,
    /// When (Unix seconds) the agent last changed it: the age that retention counts from.
    pub since: u64,
    /// Where it is: `<node>:<directory>`.
    pub location: String,
}

/// The checkpoints an agent's Lease lists (none without the annotation).
pub fn kept_of(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<KeptCheckpoint>, serde_json::Error> {
    annotations
        .get(KEPT_ANNOTATION)
        .map_or(Ok(Vec::new()), |text| serde_json::from_str(text))
}
