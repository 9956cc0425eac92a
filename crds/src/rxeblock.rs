//! `RxeBlock` (`migros.io/v1alpha1`, cluster-scoped): one block of rxe queue-pair and memory-region
//! numbers owned by one RDMA pod. The object's name is the block's index, so the API server's
//! uniqueness of names is what makes an allocation atomic across operator replicas.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label on an RxeBlock naming the namespace of the pod that owns it.
pub const RXE_POD_NAMESPACE_LABEL: &str = "migros.io/pod-namespace";
/// Label on an RxeBlock naming the pod that owns it.
pub const RXE_POD_NAME_LABEL: &str = "migros.io/pod-name";

/// A block of rxe QP and MR numbers owned by the pod `spec.pod`. It follows the pod (by namespace
/// and name) across migrations and is released when the pod is gone and no migration of it is
/// active.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "migros.io",
    version = "v1alpha1",
    kind = "RxeBlock",
    plural = "rxeblocks",
    singular = "rxeblock",
    shortname = "rxe",
    category = "migros",
    doc = "A cluster-unique block of rxe QP and MR numbers owned by one RDMA pod",
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.pod.namespace"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod.name"}"#,
    printcolumn = r#"{"name":"QPN-Start","type":"integer","jsonPath":".spec.qpnStart"}"#,
    printcolumn = r#"{"name":"QPN-Count","type":"integer","jsonPath":".spec.qpnCount"}"#,
    printcolumn = r#"{"name":"MRN-Start","type":"integer","jsonPath":".spec.mrnStart"}"#,
    printcolumn = r#"{"name":"MRN-Count","type":"integer","jsonPath":".spec.mrnCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("an RxeBlock's spec is immutable")
)]
#[serde(rename_all = "camelCase")]
pub struct RxeBlockSpec {
    /// Index of the block in the configured ranges; the object is named `block-<index>`.
    pub index: u32,
    /// First queue-pair number.
    pub qpn_start: u32,
    /// Number of queue-pair numbers.
    pub qpn_count: u32,
    /// First memory-region number.
    pub mrn_start: u32,
    /// Number of memory-region numbers.
    pub mrn_count: u32,
    /// The pod that owns the block.
    pub pod: PodReference,
}

/// A pod by namespace and name (a migrated pod keeps both; its UID changes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PodReference {
    pub namespace: String,
    pub name: String,
}

/// The value of [`RXE_POD_NAME_LABEL`] for pod `name`: the name itself when it fits a label value
/// (63 characters), else its first 40 characters and a hash of all of it (FNV-1a, stable across
/// versions). A selector by it may match another long name with the same start and hash; readers
/// compare `spec.pod.name`.
pub fn pod_label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start: String = name.chars().take(40).collect();
    let start = start.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{start}-{hash:016x}")
}

/// The label selector of the blocks of pod `namespace/name` (it may match more: see
/// [`owned_by`]).
pub fn owner_selector(namespace: &str, name: &str) -> String {
    format!(
        "{RXE_POD_NAMESPACE_LABEL}={},{RXE_POD_NAME_LABEL}={}",
        pod_label_value(namespace),
        pod_label_value(name)
    )
}

/// The blocks of pod `namespace/name` among `blocks` (the answer to [`owner_selector`]: a long
/// name's label value is shared with names that hash alike), lowest index first: more than one
/// only after two allocations raced, and the lowest is the one kept.
pub fn owned_by(mut blocks: Vec<RxeBlock>, namespace: &str, name: &str) -> Vec<RxeBlock> {
    blocks.retain(|b| b.spec.pod.namespace == namespace && b.spec.pod.name == name);
    blocks.sort_by_key(|b| b.spec.index);
    blocks
}

impl RxeBlockSpec {
    /// The object name of the block with this index.
    pub fn object_name(index: u32) -> String {
        format!("block-{index}")
    }

    /// The QPN and MRN ranges, as the PodMigration status records them.
    pub fn ranges(&self) -> crate::podmigration::RxeRanges {
        crate::podmigration::RxeRanges {
            qpn_start: self.qpn_start,
            qpn_count: self.qpn_count,
            mrn_start: self.mrn_start,
            mrn_count: self.mrn_count,
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::pod_label_value;

    #[test]
    fn long_pod_names_get_a_label_value_that_fits() {
        assert_eq!(pod_label_value("db.0"), "db.0");
        let long = format!("{}.{}", "a".repeat(39), "b".repeat(100));
        let value = pod_label_value(&long);
        assert!(value.len() <= 63, "{value}");
        assert!(
            value.starts_with(&"a".repeat(39)) && !value.contains(".-"),
            "{value}"
        );
        assert_ne!(value, pod_label_value(&format!("{long}c")));
        assert_eq!(value, pod_label_value(&long));
    }
}
