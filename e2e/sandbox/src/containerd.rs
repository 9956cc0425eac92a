//! The containerd of the sandbox nodes. The Debian rootfs brings containerd 2.1, the last series
//! that restores a container from a checkpoint image through the CRI (`CreateContainer`); current
//! containerd (2.4) no longer does, and restores only through kube-migros' runtime wrapper. Both are
//! tried here: 2.4 is built from its Go module at one pinned version (with its runc shim), cached
//! like the Kubernetes binaries, and each node runs one of the two (see [`of_node`]).

use std::path::{Path, PathBuf};

use crate::gobuild::{Error, Recipe};

/// The upstream release the nodes that do not run Debian's containerd run: the newest 2.4.x the
/// module proxy serves.
pub const CONTAINERD: (&str, &str) = ("github.com/containerd/containerd/v2", "v2.4.2");

const BINARIES: &[(&str, &str)] = &[
    (
        "containerd",
        "github.com/containerd/containerd/v2/cmd/containerd",
    ),
    (
        "containerd-shim-runc-v2",
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
    ),
];

/// Which containerd a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containerd {
    /// Debian's 2.1, from the node rootfs: restores from checkpoint images through the CRI.
    Debian,
    /// [`CONTAINERD`], built here: restores only through the runtime wrapper.
    Upstream,
}

impl Containerd {
    pub fn describe(self) -> &'static str {
        match self {
            Containerd::Debian => "Debian's containerd 2.1",
            Containerd::Upstream => "containerd 2.4",
        }
    }
}

/// The containerd of sandbox node `name`: node-2 keeps Debian's 2.1 (where the checkpoint-image
/// backend still works), every other node runs 2.4 (the runtime wrapper only).
pub fn of_node(name: &str) -> Containerd {
    if name == "node-2" {
        Containerd::Debian
    } else {
        Containerd::Upstream
    }
}

fn recipe(cache: &Path) -> Recipe<'static> {
    let (module, version) = CONTAINERD;
    Recipe {
        title: "containerd",
        root: cache.join("containerd").join(version),
        binaries: BINARIES,
        ldflags: format!("-X {module}/version.Version={version} -s -w"),
        fingerprint: format!("{module}@{version}"),
        tags: "",
    }
}

/// The directory of the built `containerd` and `containerd-shim-runc-v2`, built when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf, Error> {
    let (module, version) = CONTAINERD;
    recipe(cache).ensure(|_| {
        Ok(format!(
            "module kube-migros.local/containerd\n\ngo 1.24.0\n\nrequire {module} {version}\n"
        ))
    })
}
