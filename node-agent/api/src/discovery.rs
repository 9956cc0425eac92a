//! How the operator finds the agents: each agent keeps a Lease `<LEASE_PREFIX><node>` in the
//! operator's namespace, labelled [`LEASE_LABEL`] and annotated with its endpoint, renewed while
//! it runs. These names are the contract between the two sides.

/// Prefix of an agent Lease's name; the node name follows.
pub const LEASE_PREFIX: &str = "kube-migros-agent-";
/// Label on every agent Lease, to list them.
pub const LEASE_LABEL: &str = "migros.io/agent";
/// Annotation with the agent's gRPC endpoint (`host:port`).
pub const ENDPOINT_ANNOTATION: &str = "migros.io/agent-endpoint";
