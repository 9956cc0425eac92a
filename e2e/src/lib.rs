//! The kube-migros sandbox: a real Kubernetes control plane and node runtimes (containerd, runc,
//! CRIU in namespaces) on one Linux machine, built and cached, plus what the tests share.

pub mod agents;
pub mod bench;
pub mod binaries;
pub mod cluster;
pub mod controlplane;
pub mod demo;
pub mod fixtures;
pub mod gobuild;
pub mod harness;
pub mod helm;
pub mod images;
pub mod install;
pub mod k8s;
pub mod kubelets;
pub mod nodes;
pub mod pki;
pub mod process;
pub mod registry;
pub mod release;
pub mod rootfs;
pub mod testagent;
pub mod tools;
pub mod workload;

use std::path::PathBuf;

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
