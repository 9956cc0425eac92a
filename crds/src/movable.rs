//! Which pods can follow to another node at all, pure. A pod that shares the node's network, belongs
//! to the node (DaemonSet and static pods), or keeps data only that node has, cannot move: its
//! migration fails in Pending with the reason, before anything is touched. emptyDir volumes move
//! with the pod, to targets that restore with the runtime wrapper (`has_empty_dir`).

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Volume};

/// Annotation the kubelet puts on the mirror of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why `pod` cannot move to another node, or `None` when it can. `claims` are the
/// PersistentVolumeClaims its volumes name (a claim not found counts as one that cannot follow).
pub fn why_not(pod: &Pod, claims: &[PersistentVolumeClaim]) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some(
            "it uses the node's network (hostNetwork): its address is the node's own and cannot \
             move"
                .into(),
        );
    }
    let owners = pod.metadata.owner_references.iter().flatten();
    if let Some(owner) = owners.into_iter().find(|o| o.kind == "DaemonSet") {
        return Some(format!(
            "it belongs to DaemonSet {}, which runs one pod on every node",
            owner.name
        ));
    }
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        return Some("it is a static pod of its node (a mirror pod)".into());
    }
    spec.volumes
        .iter()
        .flatten()
        .find_map(|v| volume_stays(v, claims))
        .map(|why| format!("volume {why}"))
}

/// Why a volume cannot follow the pod, if it cannot.
fn volume_stays(volume: &Volume, claims: &[PersistentVolumeClaim]) -> Option<String> {
    let name = &volume.name;
    if volume.host_path.is_some() {
        return Some(format!(
            "{name} is a hostPath: that directory exists on this node only"
        ));
    }
    if volume.ephemeral.is_some() {
        return Some(format!(
            "{name} is a generic ephemeral volume: its claim is made for this pod on this node"
        ));
    }
    let claim_name = &volume.persistent_volume_claim.as_ref()?.claim_name;
    let Some(claim) = claims
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(claim_name.as_str()))
    else {
        return Some(format!("{name}: claim {claim_name} not found"));
    };
    let modes = claim
        .status
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .or_else(|| claim.spec.as_ref()?.access_modes.clone())
        .unwrap_or_default();
    let shared = modes
        .iter()
        .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
    (!shared).then(|| {
        format!(
            "{name}: claim {claim_name} is {} (mounted on one node at a time)",
            if modes.is_empty() {
                "without an access mode".to_string()
            } else {
                modes.join(", ")
            }
        )
    })
}

/// Whether `pod` has emptyDir volumes: their content moves with the pod only where the runtime
/// wrapper restores it (the node agent packs them with the checkpoint, `migros-runc` unpacks them
/// into the new pod's volumes).
pub fn has_empty_dir(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.empty_dir.is_some())
}

/// The claims `pod`'s volumes name.
pub fn claim_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect()
}

/// The claims of `pod`'s volumes that exist (a missing one is left out: [`why_not`] judges the
/// pod by those it has).
pub async fn claims(
    client: &kube::Client,
    pod: &Pod,
) -> Result<Vec<PersistentVolumeClaim>, kube::Error> {
    let api: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(
        client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let mut claims = Vec::new();
    for name in claim_names(pod) {
        claims.extend(api.get_opt(&name).await?);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{
            EmptyDirVolumeSource, HostPathVolumeSource, PersistentVolumeClaimSpec,
            PersistentVolumeClaimStatus, PersistentVolumeClaimVolumeSource, PodSpec,
            ProjectedVolumeSource,
        },
        apimachinery::pkg::apis::meta::v1::OwnerReference,
    };
    use kube::api::ObjectMeta;

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn with_volume(v: Volume) -> Pod {
        pod(PodSpec {
            volumes: Some(vec![v]),
            ..Default::default()
        })
    }

    fn claim(name: &str, mode: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![mode.into()]),
                ..Default::default()
            }),
            status: Some(PersistentVolumeClaimStatus::default()),
        }
    }

    fn claim_volume(claim: &str) -> Volume {
        Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.into(),
                read_only: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_plain_pod_with_projected_and_shared_volumes_can_move() {
        let projected = Volume {
            name: "kube-api-access".into(),
            projected: Some(ProjectedVolumeSource::default()),
            ..Default::default()
        };
        let mut p = with_volume(projected);
        p.spec
            .as_mut()
            .unwrap()
            .volumes
            .as_mut()
            .unwrap()
            .push(claim_volume("shared"));
        assert_eq!(why_not(&p, &[claim("shared", "ReadWriteMany")]), None);
        assert_eq!(claim_names(&p), vec!["shared".to_string()]);
    }

    #[test]
    fn what_belongs_to_the_node_is_refused_with_the_reason() {
        let host = pod(PodSpec {
            host_network: Some(true),
            ..Default::default()
        });
        assert!(why_not(&host, &[]).unwrap().contains("hostNetwork"));

        let mut daemon = pod(PodSpec::default());
        daemon.metadata.owner_references = Some(vec![OwnerReference {
            kind: "DaemonSet".into(),
            name: "logs".into(),
            ..Default::default()
        }]);
        assert!(why_not(&daemon, &[]).unwrap().contains("DaemonSet logs"));

        let mut mirror = pod(PodSpec::default());
        mirror.metadata.annotations =
            Some([(MIRROR_ANNOTATION.to_string(), "x".to_string())].into());
        assert!(why_not(&mirror, &[]).unwrap().contains("static pod"));
    }

    #[test]
    fn volumes_bound_to_the_node_are_refused_with_the_reason() {
        let host_path = with_volume(Volume {
            name: "logs".into(),
            host_path: Some(HostPathVolumeSource::default()),
            ..Default::default()
        });
        assert!(
            why_not(&host_path, &[])
                .unwrap()
                .contains("logs is a hostPath")
        );
        // emptyDir content moves with the pod (where the runtime wrapper restores).
        let empty = with_volume(Volume {
            name: "scratch".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        assert_eq!(why_not(&empty, &[]), None);
        assert!(has_empty_dir(&empty) && !has_empty_dir(&host_path));
        let rwo = with_volume(claim_volume("db"));
        let why = why_not(&rwo, &[claim("db", "ReadWriteOnce")]).unwrap();
        assert!(why.contains("claim db is ReadWriteOnce"), "{why}");
        assert!(why_not(&rwo, &[]).unwrap().contains("claim db not found"));
    }
}
