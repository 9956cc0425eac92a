//! The kube-migros sandbox: a real Kubernetes control plane (built from its Go modules) and node
//! runtimes (containerd, runc, CRIU in namespaces, real kubelets) on one Linux machine, the
//! registry, the images and the Helm release of kube-migros, all built and cached. The test kit,
//! the end-to-end tests, the benchmarks and the demo stand on it (docs/sandbox.md).
//!
//! - infrastructure: `bridge`, `nodes` (and `rootfs`), `controlplane` (and `k8s`), `kubelets`,
//!   `registry`, `cluster` (all of it together);
//! - builds: `gobuild` (and `tools`, `helm`, `containerd` 2.4), `binaries` (this workspace's), `images`,
//!   `release` (the Helm release of kube-migros), `install` (the CRDs);
//! - running things: `process` (daemons, stopping what a run left), `agents` (the real node agent
//!   as a process in a node), `pki` (certificate files); `error`: the errors all of them share.

pub mod agents;
pub mod binaries;
pub mod bridge;
pub mod cluster;
pub mod containerd;
pub mod controlplane;
pub mod error;
pub mod gobuild;
pub mod helm;
pub mod images;
pub mod install;
pub mod k8s;
pub mod kubelets;
pub mod nodes;
pub mod pki;
pub mod process;
pub mod promtool;
pub mod registry;
pub mod release;
pub mod rootfs;
pub mod tools;

use std::path::{Path, PathBuf};

/// Default cache of expensive build artifacts (Kubernetes binaries); kept across runs.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kube-migros";
/// Default home of the running sandbox (certificates, etcd data, logs, pid files).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kube-migros-sandbox";

/// Where the sandbox keeps its cache and its state.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub cache: PathBuf,
    pub state: PathBuf,
}

impl Dirs {
    /// `KUBE_MIGROS_CACHE` and `KUBE_MIGROS_STATE`, else the defaults.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map_or_else(|| default.into(), PathBuf::from)
        };
        Self {
            cache: var("KUBE_MIGROS_CACHE", DEFAULT_CACHE_DIR),
            state: var("KUBE_MIGROS_STATE", DEFAULT_STATE_DIR),
        }
    }
}

/// The root of this repository (the workspace), where `charts/`, `docs/` and `target/` are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
