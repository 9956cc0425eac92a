//! promtool, built from the Prometheus Go module at one pinned version and cached like Helm: the
//! chart's alerting rules are checked (`promtool check rules`) and unit-tested (`promtool test
//! rules`) with it.

use std::path::{Path, PathBuf};

use crate::gobuild::{Error, Recipe};

/// The Prometheus module (v0.316.0 is Prometheus 3.16); its go.mod asks for Go 1.25.
pub const PROMETHEUS: (&str, &str) = ("github.com/prometheus/prometheus", "v0.316.0");

const BINARIES: &[(&str, &str)] = &[("promtool", "github.com/prometheus/prometheus/cmd/promtool")];

fn recipe(cache: &Path) -> Recipe<'static> {
    let (module, version) = PROMETHEUS;
    Recipe {
        title: "promtool",
        root: cache.join("promtool").join(version),
        binaries: BINARIES,
        ldflags: format!("-X github.com/prometheus/common/version.Version={version} -s -w"),
        fingerprint: format!("{module}@{version}"),
        // Rules are checked and tested offline: none of the service discovery plugins (cloud
        // SDKs) is needed, which halves the build.
        tags: "remove_all_sd",
    }
}

/// The path of the `promtool` binary, built when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf, Error> {
    let (module, version) = PROMETHEUS;
    let bin = recipe(cache).ensure(|_| {
        Ok(format!(
            "module kube-migros.local/promtool\n\ngo 1.25.0\n\nrequire {module} {version}\n"
        ))
    })?;
    Ok(bin.join("promtool"))
}
