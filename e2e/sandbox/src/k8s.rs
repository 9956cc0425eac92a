//! Builds the Kubernetes binaries of the sandbox (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet, kubectl) from the Go module proxy at one pinned version, once, into a
//! cache directory outside the checkout.

use std::path::{Path, PathBuf};

use crate::gobuild::{self, Recipe};

/// The Kubernetes release of the sandbox. k8s-openapi's `v1_34` feature in the workspace
/// Cargo.toml must name the same minor. 1.34 is the last release whose kubelet runs on a cgroup v1
/// host without opting in (`failCgroupV1: false` from 1.35 on), which these VMs are.
pub const K8S_VERSION: &str = "v1.34.12";

/// The binaries built and where their `main` package lives.
pub const BINARIES: &[(&str, &str)] = &[
    ("etcd", "go.etcd.io/etcd/server/v3"),
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    (
        "kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
    ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
    ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
];

pub use crate::gobuild::Error;

/// The recipe of the Kubernetes binaries.
fn recipe(cache: &Path) -> Recipe<'static> {
    Recipe {
        title: "Kubernetes",
        root: cache.join("k8s").join(K8S_VERSION),
        binaries: BINARIES,
        ldflags: ldflags(),
        // The release is the whole fingerprint: the staging versions follow from it.
        tags: "",
        fingerprint: K8S_VERSION.to_string(),
    }
}

/// Where the binaries of [`K8S_VERSION`] are cached.
pub fn bin_dir(cache: &Path) -> PathBuf {
    recipe(cache).bin_dir()
}

/// Returns the binary directory, building whatever is missing or stale first.
pub fn ensure_built(cache: &Path) -> Result<PathBuf, Error> {
    recipe(cache).ensure(go_mod)
}

/// Version stamps the official release build sets, so `--version` and the API report the release.
fn ldflags() -> String {
    let minor = K8S_VERSION.split('.').nth(1).unwrap_or_default();
    [
        format!("-X k8s.io/component-base/version.gitVersion={K8S_VERSION}"),
        "-X k8s.io/component-base/version.gitMajor=1".to_string(),
        format!("-X k8s.io/component-base/version.gitMinor={minor}"),
        "-X k8s.io/component-base/version.gitTreeState=clean".to_string(),
        format!("-X k8s.io/client-go/pkg/version.gitVersion={K8S_VERSION}"),
        "-s -w".to_string(),
    ]
    .join(" ")
}

/// A scratch module that requires `k8s.io/kubernetes` and pins each staging module (`k8s.io/api`,
/// `k8s.io/apiserver`, ...) to the matching `v0.x` release, the way Kubernetes' own
/// `replace ./staging/...` directives do inside its repository.
fn go_mod(dir: &Path) -> Result<String, Error> {
    let upstream = gobuild::upstream_go_mod(dir, "k8s.io/kubernetes", K8S_VERSION)?;
    let staging_version = format!("v0.{}", K8S_VERSION.trim_start_matches("v1."));
    let mut text = format!(
        "module kube-migros.local/k8s-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes {K8S_VERSION}\n\nreplace (\n"
    );
    for module in staging_modules(&upstream) {
        text.push_str(&format!("\t{module} => {module} {staging_version}\n"));
    }
    text.push_str(")\n");
    Ok(text)
}

/// The staging modules named in Kubernetes' own go.mod (`k8s.io/x => ./staging/src/k8s.io/x`).
fn staging_modules(go_mod: &str) -> Vec<&str> {
    go_mod
        .lines()
        .filter_map(|line| line.trim().split_once("=>"))
        .filter(|(_, to)| to.trim().starts_with("./staging/"))
        .map(|(from, _)| from.trim())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_are_read_from_the_replace_block() {
        let go_mod = "module k8s.io/kubernetes\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/kubelet => ./staging/src/k8s.io/kubelet\n\tgithub.com/x/y => github.com/x/z v1.0.0\n)\n";
        assert_eq!(
            staging_modules(go_mod),
            vec!["k8s.io/api", "k8s.io/kubelet"]
        );
    }

    #[test]
    fn ldflags_stamp_the_pinned_release() {
        let flags = ldflags();
        assert!(flags.contains(&format!("gitVersion={K8S_VERSION}")));
        assert!(flags.contains("gitMinor=34"));
    }
}
