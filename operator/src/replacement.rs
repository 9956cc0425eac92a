//! The replacement pod, pure: a copy of the source pod (same name, labels, annotations, owner
//! references) bound to the target node, without init containers (the restored process is past
//! them), marked with its migration, and restored either by the runtime wrapper's RuntimeClass
//! (its containers keep their images) or from checkpoint images (named as its containers' images).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;

/// Annotation of a PodMigration: the template of the replacement pod, taken from the source pod
/// before anything is done to it, so that the replacement can be built after the source is gone.
pub const TEMPLATE_ANNOTATION: &str = "migros.io/replacement-template";

/// `sha256:<hex>` of `pm`'s replacement template annotation, if it has one (recorded in
/// `status.templateDigest` at the start).
pub fn template_digest(pm: &crds::PodMigration) -> Option<String> {
    use sha2::Digest;
    let raw = pm.metadata.annotations.as_ref()?.get(TEMPLATE_ANNOTATION)?;
    let digest = sha2::Sha256::digest(raw.as_bytes());
    Some(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}
/// Annotation of a replacement pod: the UID of the migration that created it.
pub const MIGRATION_UID_ANNOTATION: &str = "migros.io/migration-uid";
/// Annotation of a replacement pod: the name of the migration that created it.
pub const MIGRATION_ANNOTATION: &str = "migros.io/migration";
/// Annotation of a replacement pod: the IP it must get (read by the IP reservation mechanisms).
pub const POD_IP_ANNOTATION: &str = "migros.io/pod-ip";
/// Annotation of a replacement pod restored from checkpoint images: its containers' own images
/// (JSON, by container name), which its spec no longer names, for the next move.
pub const IMAGES_ANNOTATION: &str = "migros.io/images";

/// The part of the source pod the replacement is made from (no status, no server-set fields), with
/// the containers' own images (a pod restored from checkpoint images names those instead).
pub fn template(source: &Pod) -> Pod {
    let meta = &source.metadata;
    let mut spec = source.spec.clone().unwrap_or_default();
    let own: BTreeMap<String, String> = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(IMAGES_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    for container in &mut spec.containers {
        if let Some(image) = own.get(&container.name) {
            container.image = Some(image.clone());
        }
    }
    spec.init_containers = None;
    spec.ephemeral_containers = None;
    spec.node_name = None;
    // Admission recomputes it from priorityClassName; a stale copy would be refused.
    spec.priority = None;
    Pod {
        metadata: ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            annotations: meta.annotations.clone(),
            owner_references: meta.owner_references.clone(),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// How the node restores the replacement's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore<'a> {
    /// Under this RuntimeClass, whose runtime (`migros-runc`) restores each container at its first
    /// start from what the node staged; the containers keep their images, so a restart is fresh.
    RuntimeClass(&'a str),
    /// From these checkpoint images, by container name, named as the containers' images (every
    /// start of a container restores the checkpoint).
    Images(&'a BTreeMap<String, String>),
}

/// The replacement pod to create: the template bound to `target`, marked as made by the migration
/// (`migration` is its name and UID), restored as `restore` says.
pub fn build(
    template: &Pod,
    target: &str,
    migration: (&str, &str),
    pod_ip: Option<&str>,
    restore: Restore<'_>,
) -> Pod {
    let mut pod = template.clone();
    let (migration_name, migration_uid) = migration;
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(MIGRATION_ANNOTATION.into(), migration_name.into());
    annotations.insert(MIGRATION_UID_ANNOTATION.into(), migration_uid.into());
    if let Some(ip) = pod_ip {
        annotations.insert(POD_IP_ANNOTATION.into(), ip.into());
    }
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(target.into());
        match restore {
            Restore::RuntimeClass(class) => {
                spec.runtime_class_name = Some(class.into());
                annotations.remove(IMAGES_ANNOTATION);
            }
            Restore::Images(images) => {
                let own: BTreeMap<&str, &str> = spec
                    .containers
                    .iter()
                    .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
                    .collect();
                annotations.insert(
                    IMAGES_ANNOTATION.into(),
                    serde_json::to_string(&own).unwrap_or_default(),
                );
                for container in &mut spec.containers {
                    if let Some(image) = images.get(&container.name) {
                        container.image = Some(image.clone());
                    }
                }
            }
        }
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    fn source() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("server".into()),
                namespace: Some("team".into()),
                uid: Some("uid-1".into()),
                resource_version: Some("42".into()),
                labels: Some([("app".to_string(), "server".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                priority: Some(0),
                init_containers: Some(vec![Container {
                    name: "init".into(),
                    ..Default::default()
                }]),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("registry/app:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_replacement_keeps_identity_and_drops_what_cannot_be_restored() {
        let images = [("app".to_string(), "localhost/checkpoint/app:m1".to_string())].into();
        let pod = build(
            &template(&source()),
            "node-2",
            ("move", "m-uid"),
            Some("10.0.0.9"),
            Restore::Images(&images),
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("server"));
        assert_eq!(pod.metadata.labels, source().metadata.labels);
        assert_eq!(pod.metadata.uid, None);
        assert_eq!(pod.metadata.resource_version, None);
        let annotations = pod.metadata.annotations.unwrap();
        assert_eq!(annotations[MIGRATION_UID_ANNOTATION], "m-uid");
        assert_eq!(annotations[POD_IP_ANNOTATION], "10.0.0.9");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-2"));
        assert_eq!(spec.init_containers, None);
        assert_eq!(spec.priority, None);
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some("localhost/checkpoint/app:m1")
        );
        assert_eq!(pod.status, None);
    }

    #[test]
    fn a_pod_restored_from_checkpoint_images_moves_on_with_its_own_images() {
        let images = [("app".to_string(), "localhost/checkpoint/app:m1".to_string())].into();
        let first = build(
            &template(&source()),
            "node-2",
            ("move", "m1"),
            None,
            Restore::Images(&images),
        );
        let next = template(&first);
        assert_eq!(
            next.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("registry/app:1")
        );
        let second = build(
            &next,
            "node-3",
            ("move-2", "m2"),
            None,
            Restore::RuntimeClass("kube-migros"),
        );
        assert_eq!(
            second.spec.unwrap().containers[0].image.as_deref(),
            Some("registry/app:1")
        );
        assert!(
            !second
                .metadata
                .annotations
                .unwrap()
                .contains_key(IMAGES_ANNOTATION)
        );
    }

    #[test]
    fn under_the_runtime_class_the_containers_keep_their_images() {
        let pod = build(
            &template(&source()),
            "node-2",
            ("move", "m-uid"),
            None,
            Restore::RuntimeClass("kube-migros"),
        );
        let annotations = pod.metadata.annotations.unwrap();
        assert_eq!(annotations[MIGRATION_UID_ANNOTATION], "m-uid");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("kube-migros"));
        assert_eq!(spec.containers[0].image.as_deref(), Some("registry/app:1"));
    }
}
