//! Tools of the node runtime built from the Go module proxy (cached like the Kubernetes binaries):
//! the distribution registry that serves the sandbox's images, crane to assemble and push images
//! without a Docker engine, and crictl to drive the CRI by hand (the raw recipe).

use std::path::{Path, PathBuf};

use crate::gobuild::{Error, Recipe};

/// Versions of the tool modules.
pub const REGISTRY: (&str, &str) = ("github.com/distribution/distribution/v3", "v3.1.2");
pub const CRANE: (&str, &str) = ("github.com/google/go-containerregistry", "v0.22.1");
pub const CRI_TOOLS: (&str, &str) = ("sigs.k8s.io/cri-tools", "v1.34.0");

const BINARIES: &[(&str, &str)] = &[
    (
        "registry",
        "github.com/distribution/distribution/v3/cmd/registry",
    ),
    ("crane", "github.com/google/go-containerregistry/cmd/crane"),
    ("crictl", "sigs.k8s.io/cri-tools/cmd/crictl"),
];

fn recipe(cache: &Path) -> Recipe<'static> {
    let modules = [REGISTRY, CRANE, CRI_TOOLS];
    let fingerprint: Vec<String> = modules.iter().map(|(m, v)| format!("{m}@{v}")).collect();
    Recipe {
        title: "sandbox tools",
        root: cache.join("tools"),
        binaries: BINARIES,
        ldflags: "-s -w".into(),
        fingerprint: fingerprint.join(" "),
        tags: "",
    }
}

/// The directory of `registry`, `crane` and `crictl`, built when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf, Error> {
    recipe(cache).ensure(|_| {
        let requires: String = [REGISTRY, CRANE, CRI_TOOLS]
            .iter()
            .map(|(m, v)| format!("\t{m} {v}\n"))
            .collect();
        Ok(format!(
            "module kube-migros.local/tools\n\ngo 1.24.0\n\nrequire (\n{requires})\n"
        ))
    })
}
