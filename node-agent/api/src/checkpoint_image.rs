//! The checkpoint OCI image of one container, as the `cri-checkpoint-image` backend pushes it.
//!
//! The image is a function of three facts the operator records when the source checkpoints: the
//! container's name and the digest and size of its checkpoint archive (the image's one layer, as
//! it is). The target builds the image from them and answers a reference pinned by the manifest's
//! digest; the operator computes the same digest from the status and uses the reference only when
//! it names exactly that image. A target cannot hand the replacement an image of its choosing, and
//! the kubelet pulls by digest, so no later push to the tag changes what is restored.
//!
//! The JSON is written here byte for byte (fields in a fixed order, no map whose order a serde
//! feature could change), because both sides must derive the same digest.

use sha2::{Digest, Sha256};

/// The manifest annotations that mark a checkpoint image (containerd and CRI-O read the first;
/// checkpointctl writes both).
pub const CHECKPOINT_NAME_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri-o.annotations.checkpoint.name",
    "org.criu.checkpoint.container.name",
];

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// The config and manifest of a checkpoint image, as the bytes pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Parts {
    /// The image of container `name` whose one layer has `layer_digest` (`sha256:<hex>`) and
    /// `layer_size` bytes.
    pub fn new(name: &str, layer_digest: &str, layer_size: u64) -> Self {
        let digest = quoted(layer_digest);
        let config = format!(
            r#"{{"architecture":"amd64","config":{{}},"os":"linux","rootfs":{{"diff_ids":[{digest}],"type":"layers"}}}}"#
        )
        .into_bytes();
        let annotations = CHECKPOINT_NAME_ANNOTATIONS
            .iter()
            .map(|a| format!("{}:{}", quoted(a), quoted(name)))
            .collect::<Vec<_>>()
            .join(",");
        let manifest = format!(
            r#"{{"annotations":{{{annotations}}},"config":{},"layers":[{}],"mediaType":{},"schemaVersion":2}}"#,
            descriptor(CONFIG_TYPE, &digest_of(&config), config.len() as u64),
            descriptor(LAYER_TYPE, layer_digest, layer_size),
            quoted(MANIFEST_TYPE),
        )
        .into_bytes();
        Self { config, manifest }
    }

    pub fn config_digest(&self) -> String {
        digest_of(&self.config)
    }

    /// The digest a reference pins the image by.
    pub fn manifest_digest(&self) -> String {
        digest_of(&self.manifest)
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The tag an image of this migration's container is pushed as.
pub fn tag(migration_uid: &str, container: &str) -> String {
    format!("{migration_uid}-{container}")
}

/// Whether `reference` (`host/path:tag@sha256:<hex>`) is the image of this migration's container
/// pinned by `manifest_digest`.
pub fn names(reference: &str, migration_uid: &str, container: &str, manifest_digest: &str) -> bool {
    let Some((name, digest)) = reference.split_once('@') else {
        return false;
    };
    let tagged = name
        .rsplit('/')
        .next()
        .and_then(|last| last.split_once(':'))
        .is_some_and(|(_, t)| t == tag(migration_uid, container));
    tagged && digest == manifest_digest && !name.contains(char::is_whitespace)
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> String {
    format!(
        r#"{{"digest":{},"mediaType":{},"size":{size}}}"#,
        quoted(digest),
        quoted(media_type)
    )
}

/// `s` as a JSON string.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const LAYER: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn the_parts_are_valid_json_naming_the_layer_and_the_container() {
        let parts = Parts::new("app", LAYER, 4096);
        let manifest = json(&parts.manifest);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MANIFEST_TYPE);
        assert_eq!(manifest["layers"][0]["digest"], LAYER);
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER_TYPE);
        assert_eq!(manifest["layers"][0]["size"], 4096);
        assert_eq!(manifest["config"]["digest"], parts.config_digest().as_str());
        assert_eq!(manifest["config"]["size"], parts.config.len());
        for a in CHECKPOINT_NAME_ANNOTATIONS {
            assert_eq!(manifest["annotations"][a], "app");
        }
        let config = json(&parts.config);
        assert_eq!(config["rootfs"]["diff_ids"][0], LAYER);
        assert_eq!(config["os"], "linux");
    }

    #[test]
    fn the_digest_changes_with_every_fact_and_only_with_them() {
        let d = Parts::new("app", LAYER, 4096).manifest_digest();
        assert_eq!(d, Parts::new("app", LAYER, 4096).manifest_digest());
        assert_ne!(d, Parts::new("db", LAYER, 4096).manifest_digest());
        assert_ne!(d, Parts::new("app", LAYER, 4097).manifest_digest());
        let other = LAYER.replace("0123", "3210");
        assert_ne!(d, Parts::new("app", &other, 4096).manifest_digest());
        assert!(d.starts_with("sha256:") && d.len() == 7 + 64, "{d}");
    }

    #[test]
    fn names_in_the_image_are_escaped() {
        let odd = "a\"b\\c\n";
        let manifest = json(&Parts::new(odd, LAYER, 1).manifest);
        assert_eq!(manifest["annotations"][CHECKPOINT_NAME_ANNOTATIONS[0]], odd);
    }

    #[test]
    fn only_the_pinned_reference_of_this_migrations_container_is_named() {
        let d = Parts::new("app", LAYER, 1).manifest_digest();
        let ok = format!("registry:5000/checkpoints:m-1-app@{d}");
        assert!(names(&ok, "m-1", "app", &d));
        for bad in [
            "registry:5000/checkpoints:m-1-app".to_string(),
            format!("registry:5000/checkpoints:m-2-app@{d}"),
            format!("registry:5000/checkpoints:m-1-db@{d}"),
            format!("registry:5000/checkpoints:m-1-app@{LAYER}"),
            format!("registry:5000/checkpoints@{d}"),
            format!("registry:5000/check points:m-1-app@{d}"),
        ] {
            assert!(!names(&bad, "m-1", "app", &d), "{bad}");
        }
    }
}
