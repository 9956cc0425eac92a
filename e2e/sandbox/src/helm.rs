//! Helm, built from its Go module at one pinned version and cached like the Kubernetes binaries, and
//! the few Helm commands the sandbox runs (install or upgrade the chart, uninstall it).

use std::path::{Path, PathBuf};

use crate::gobuild::{Error, Recipe};

/// The Helm release (its go.mod asks for Go 1.24, which every toolchain of the sandbox has).
pub const HELM: (&str, &str) = ("helm.sh/helm/v3", "v3.19.0");

const BINARIES: &[(&str, &str)] = &[("helm", "helm.sh/helm/v3/cmd/helm")];

fn recipe(cache: &Path) -> Recipe<'static> {
    let (module, version) = HELM;
    Recipe {
        title: "Helm",
        root: cache.join("helm").join(version),
        binaries: BINARIES,
        // What the release build stamps: its version, and the Kubernetes version that `helm
        // template` assumes (the client-go minor it is built with).
        ldflags: format!(
            "-X helm.sh/helm/v3/internal/version.version={version} \
             -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
             -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
             -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=34 -s -w"
        ),
        fingerprint: format!("{module}@{version}"),
        tags: "",
    }
}

/// The path of the `helm` binary, built when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf, Error> {
    let (module, version) = HELM;
    let bin = recipe(cache).ensure(|_| {
        Ok(format!(
            "module kube-migros.local/helm\n\ngo 1.24.0\n\nrequire {module} {version}\n"
        ))
    })?;
    Ok(bin.join("helm"))
}

/// The path of the `helm` binary when it is already built.
pub fn cached(cache: &Path) -> Option<PathBuf> {
    let recipe = recipe(cache);
    recipe.is_complete().then(|| recipe.bin_dir().join("helm"))
}
