//! `PodMigration` (`migros.io/v1alpha1`): one request to move a running pod to another node, and the
//! record of how that move went. The schema and its CEL rules make the API server reject bad input.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every kube-migros resource.
pub const GROUP: &str = "migros.io";
/// Label a pod carries to opt in to migration.
pub const MIGRATABLE_LABEL: &str = "migros.io/migratable";
/// Label that says why a PodMigration was made: `eviction` (the operator's eviction webhook),
/// `kubectl-migros` and `kubectl-migros-drain` (the kubectl plugin).
pub const REASON_LABEL: &str = "migros.io/reason";
/// Label of RDMA pods; they get a cluster-unique block of rxe QP and MR numbers.
pub const RDMA_LABEL: &str = "migros.io/rdma";

/// Default for `spec.timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 600;
/// Smallest accepted `spec.timeoutSeconds`.
pub const MIN_TIMEOUT_SECONDS: i64 = 10;
/// Largest accepted `spec.timeoutSeconds` (one day).
pub const MAX_TIMEOUT_SECONDS: i64 = 86_400;
/// Default for `spec.progressTimeoutSeconds` (KubeVirt's `progressTimeout` is 150 s too).
pub const DEFAULT_PROGRESS_TIMEOUT_SECONDS: i64 = 150;

// CEL has no DNS helpers that every supported API server version knows, so the rules spell the
// regular expressions of k8s.io/apimachinery's IsDNS1123Label and IsDNS1123Subdomain.
const DNS_SUBDOMAIN_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// Asks the operator to move the pod `spec.podName` (same namespace) to another node.
///
/// The spec is a request and cannot change after creation; everything the operator learns and does
/// is recorded in `status`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "migros.io",
    version = "v1alpha1",
    kind = "PodMigration",
    plural = "podmigrations",
    singular = "podmigration",
    shortname = "pm",
    category = "migros",
    namespaced,
    status = "PodMigrationStatus",
    selectable = ".spec.podName",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Downtime","type":"integer","jsonPath":".status.timings.downtimeMs","description":"Milliseconds from the source freezing until the target runs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".status.backend","priority":1,"description":"How the target node restores the pod"}"#,
    printcolumn = r#"{"name":"Memory Left","type":"integer","jsonPath":".status.memory.bytesRemaining","priority":1,"description":"PostCopy: bytes of the pod's memory still on the source node"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete this PodMigration and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationSpec {
    /// Name of the pod to migrate, in the namespace of this PodMigration.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE).message("podName must be a pod name (a DNS-1123 subdomain): lowercase letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit"))]
    pub pod_name: String,

    /// Node to move the pod to. When empty the operator picks a ready, schedulable node that can
    /// host the pod. Should this node go for good after the commit point (its Node deleted, or
    /// tainted `node.kubernetes.io/out-of-service`), the operator restores the pod on another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE).message("targetNode must be a valid node name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.')"))]
    pub target_node: Option<String>,

    /// How the pod's memory is moved.
    #[serde(default)]
    pub strategy: Strategy,

    /// How the pod keeps its network identity across the move.
    #[serde(default)]
    pub network: NetworkSpec,

    /// Seconds the whole migration may take before it is abandoned (rolled back if before the
    /// commit point).
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = MIN_TIMEOUT_SECONDS, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i64,

    /// Compression of the checkpoint while it travels between the agents.
    #[serde(default)]
    pub compression: Compression,

    /// Upper bound of the transfer rate, in bytes per second, as a Kubernetes quantity (`100Mi`);
    /// at least 64Ki (the stream sends 1 MiB chunks, and a receiving agent gives up a stream silent
    /// for a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('64Ki')) >= 0").message("bandwidthLimit must be a quantity of at least 64Ki bytes per second, such as 100Mi"))]
    pub bandwidth_limit: Option<String>,

    /// `PostCopy` only: seconds the pod may run on the target with no byte of its remaining memory
    /// arriving before the migration fails (the pod cannot be whole then; docs/api.md#post-copy).
    /// While the memory arrives, this takes the place of `timeoutSeconds`.
    #[serde(default = "default_progress_timeout_seconds")]
    #[schemars(range(min = MIN_TIMEOUT_SECONDS, max = MAX_TIMEOUT_SECONDS))]
    pub progress_timeout_seconds: i64,
}

impl PodMigrationSpec {
    /// A migration of pod `pod_name` with every other field at its default.
    pub fn of_pod(pod_name: &str) -> Self {
        Self {
            pod_name: pod_name.to_string(),
            target_node: None,
            strategy: Strategy::default(),
            network: NetworkSpec::default(),
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
            compression: Compression::default(),
            bandwidth_limit: None,
            progress_timeout_seconds: DEFAULT_PROGRESS_TIMEOUT_SECONDS,
        }
    }
}

fn default_timeout_seconds() -> i64 {
    DEFAULT_TIMEOUT_SECONDS
}

fn default_progress_timeout_seconds() -> i64 {
    DEFAULT_PROGRESS_TIMEOUT_SECONDS
}

/// Migration strategy (docs/api.md#strategies).
///
/// `StopAndCopy` works everywhere. `PostCopy` needs userfaultfd and a large enough
/// `fs.pipe-max-size` on both nodes and the runtime-wrapper restore backend on the target;
/// `PreCopy` is not built. A request the nodes cannot do fails in Pending, before anything is
/// touched, with what they lack (soft-dirty page tracking for PreCopy) or, where they have all of
/// it, that this release does not move pods that way.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Freeze the pod, checkpoint it, copy the checkpoint, restore it on the target.
    #[default]
    StopAndCopy,
    /// Restore the pod on the target before its memory has arrived; the source serves the pages
    /// until all are in. The pause no longer grows with the pod's memory, but until the memory is
    /// in, the running pod depends on the source node too (docs/api.md#post-copy).
    PostCopy,
    /// Copy memory while the pod runs, then freeze it and copy what changed. Refused in Pending
    /// today (not built).
    PreCopy,
}

impl Strategy {
    /// The name `spec.strategy` uses, which the agents' capabilities use too.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::StopAndCopy => "StopAndCopy",
            Strategy::PostCopy => "PostCopy",
            Strategy::PreCopy => "PreCopy",
        }
    }
}

/// Network handling of a migration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Keep the pod IP on the target node (needed for established TCP and RDMA connections).
    #[serde(rename = "keepIP", default = "default_true")]
    pub keep_ip: bool,

    /// How the pod IP is reserved for the replacement pod; `Auto` detects it from the pod.
    #[serde(default)]
    pub mechanism: NetworkMechanism,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            keep_ip: true,
            mechanism: NetworkMechanism::default(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// The IP reservation mechanisms (see docs: keeping the pod IP).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkMechanism {
    /// Detect the mechanism from the pod's annotations and the node's CNI.
    #[default]
    Auto,
    /// Calico IPAM, through the `cni.projectcalico.org/ipAddrs` annotation.
    Calico,
    /// Kube-OVN, through the `ovn.kubernetes.io/ip_address` annotation.
    KubeOVN,
    /// A Multus secondary network with static IPAM (`ips` in the network-selection annotation).
    MultusStatic,
    /// The kube-migros CNI IPAM plugin for plain bridge and overlay networks.
    MigrosIPAM,
}

/// Compression of checkpoint data in transit.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Send the archive as it is.
    #[default]
    None,
    /// Compress the stream with zstd.
    Zstd,
}

/// Where a migration stands. The happy path is Pending, Preparing, Checkpointing, Transferring,
/// Restoring, Succeeded (`PostCopy`: Restoring, CopyingMemory, Succeeded); `Failed` and
/// `RolledBack` are the other final phases.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, preconditions not checked yet.
    #[default]
    Pending,
    /// The target agent reserves room and checks it can restore the pod.
    Preparing,
    /// The source agent freezes the pod and checkpoints its containers.
    Checkpointing,
    /// The checkpoint travels from the source agent to the target agent.
    Transferring,
    /// Past the commit point: the source is gone and the target restores the pod.
    Restoring,
    /// `PostCopy` only: the pod runs on the target while the rest of its memory comes from the
    /// source node, which it depends on until this ends (`status.memory`).
    CopyingMemory,
    /// The pod runs on the target node.
    Succeeded,
    /// The migration could not be done; see `status.message` and the conditions.
    Failed,
    /// The migration failed before its commit point and the source pod runs as before.
    RolledBack,
}

impl Phase {
    /// True for the phases a migration never leaves.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::RolledBack)
    }
}

/// What the operator observed and did; written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationStatus {
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Every phase entered, in order, with the time it was entered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transitions: Vec<PhaseTransition>,

    /// Standard conditions (`Ready`, `Committed`, ...), one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// A human-readable summary of the current state or of the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Node the pod ran on when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,

    /// Node the pod is moved to (chosen by the operator when `spec.targetNode` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,

    /// How the target node restores the pod: `runtime-wrapper` (the replacement runs under the
    /// `kube-migros` RuntimeClass with its own images and is restored once, at its first start) or
    /// `cri-checkpoint-image` (the replacement's images are checkpoint images: every restart of a
    /// container restores the checkpoint again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,

    /// The pod IP, kept across the move when `spec.network.keepIP` is true.
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,

    /// UID of the pod that was migrated.
    #[serde(
        rename = "sourcePodUID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub source_pod_uid: Option<String>,

    /// UID of the replacement pod on the target node.
    #[serde(
        rename = "targetPodUID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub target_pod_uid: Option<String>,

    /// Target nodes that went for good after the commit point and were replaced (oldest first):
    /// their agents are asked to drop what they kept of this migration when it is deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_targets: Vec<String>,

    /// SHA-256 (`sha256:<hex>`) of the replacement template annotation as the operator stored it
    /// at the start. A migration whose annotation no longer matches stops with reason
    /// `TemplateChanged`: the operator never creates a pod from a template someone else wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_digest: Option<String>,

    /// The rxe QP and MR number block of an RDMA pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rxe: Option<RxeRanges>,

    /// What was checkpointed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,

    /// Transfer progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// `PostCopy`: the memory left on the source when the pod resumed on the target, and how much
    /// of it has arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryProgress>,

    /// How long each part took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,

    /// True once the commit point is passed: from then on the source is gone for good and only the
    /// restore on the target is retried.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committed: bool,

    /// When the commit point was passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<Time>,
}

/// A phase and when it was entered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    /// The phase entered.
    pub phase: Phase,
    /// When it was entered (microseconds: the timings are computed from these).
    pub time: MicroTime,
}

/// A block of rxe queue-pair and memory-region numbers owned by one RDMA pod, cluster-wide.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RxeRanges {
    /// First queue-pair number of the block.
    pub qpn_start: u32,
    /// Number of queue-pair numbers in the block.
    pub qpn_count: u32,
    /// First memory-region number of the block.
    pub mrn_start: u32,
    /// Number of memory-region numbers in the block.
    pub mrn_count: u32,
}

/// The checkpoint of a pod: all its containers' archives.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Total size of all archives, in bytes.
    pub bytes: i64,
    /// Where the archives are kept when a migration failed after its commit point, so that they can
    /// be restored by hand (`node:path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// One entry per container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerCheckpoint>,
}

/// The checkpoint archive of one container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerCheckpoint {
    /// Container name.
    pub name: String,
    /// Archive size in bytes.
    pub bytes: i64,
    /// Archive digest, `sha256:<hex>`.
    pub digest: String,
    /// The image the target runtime restores this container from, once staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Bytes moved so far.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes the target agent has received.
    pub bytes_transferred: i64,
    /// Bytes to send in all.
    pub bytes_total: i64,
}

/// The memory of a `PostCopy` migration that arrives after the pod resumed on the target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryProgress {
    /// Bytes of memory that stayed on the source at the checkpoint.
    pub bytes_total: i64,
    /// Bytes of it that have arrived on the target.
    pub bytes_transferred: i64,
    /// Bytes still on the source.
    pub bytes_remaining: i64,
    /// Average rate since the pod resumed on the target, in bytes per second.
    pub bytes_per_second: i64,
    /// When the last bytes arrived (or, before any, when the copy began): the progress timeout
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<MicroTime>,
}

/// Durations of a migration's parts, in milliseconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Freezing and checkpointing the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_ms: Option<i64>,
    /// Moving the checkpoint to the target, staging included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_ms: Option<i64>,
    /// The stream alone within the transfer: from its first byte at the target until its last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_ms: Option<i64>,
    /// Restoring the pod on the target until it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<i64>,
    /// From the source freezing until the target runs: the pause the application sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<i64>,
    /// `PostCopy`: from the pod running on the target until all its memory is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_ms: Option<i64>,
    /// From creation of the PodMigration to its final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn spec_defaults_match_the_design() {
        let spec: PodMigrationSpec =
            serde_json::from_value(serde_json::json!({"podName": "server"})).unwrap();
        assert_eq!(spec.strategy, Strategy::StopAndCopy);
        assert!(spec.network.keep_ip);
        assert_eq!(spec.network.mechanism, NetworkMechanism::Auto);
        assert_eq!(spec.timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(spec.progress_timeout_seconds, 150);
        assert_eq!(spec.compression, Compression::None);
        assert_eq!(spec.target_node, None);
    }

    #[test]
    fn strategy_names_are_the_wire_names() {
        for s in [Strategy::StopAndCopy, Strategy::PostCopy, Strategy::PreCopy] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }

    #[test]
    fn status_uses_the_documented_field_names() {
        let status = PodMigrationStatus {
            pod_ip: Some("10.0.0.7".into()),
            source_pod_uid: Some("a".into()),
            target_pod_uid: Some("b".into()),
            committed: true,
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        for key in ["podIP", "sourcePodUID", "targetPodUID", "committed"] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
    }

    #[test]
    fn only_final_phases_are_final() {
        let finals: Vec<Phase> = [
            Phase::Pending,
            Phase::Preparing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
            Phase::Succeeded,
            Phase::Failed,
            Phase::RolledBack,
        ]
        .into_iter()
        .filter(|p| p.is_final())
        .collect();
        assert_eq!(
            finals,
            vec![Phase::Succeeded, Phase::Failed, Phase::RolledBack]
        );
    }

    #[test]
    fn crd_carries_the_rules_and_columns() {
        let crd = serde_json::to_string(&PodMigration::crd()).unwrap();
        for needle in [
            "self == oldSelf",
            "x-kubernetes-validations",
            "\"shortNames\":[\"pm\"]",
            "\"name\":\"Downtime\"",
            "\"subresources\":{\"status\":{}}",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}
