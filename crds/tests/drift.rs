//! Fails when the CRD YAML committed in the Helm chart differs from what `crdgen` renders from the
//! Rust types, so the chart can never ship a stale schema.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crds::CHART_CRD_DIR);
    for (file, rendered) in crds::rendered_crds().expect("render CRDs") {
        let path = dir.join(&file);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            committed == rendered,
            "{} is stale; regenerate it with `cargo run -p crds --bin crdgen`",
            path.display()
        );
    }
}
