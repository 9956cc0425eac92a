//! Binaries of this workspace that the sandbox installs into its nodes (the `migros-ipam` CNI
//! plugin, the node agent), built with cargo on demand: in the same profile and target directory
//! as the caller, so inside `cargo test` the build is already done and this is a quick check.

use std::path::PathBuf;

/// Errors of building a workspace binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building {bin}: {why}")]
    Build { bin: String, why: String },
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
}

/// Builds binary `bin` of package `package` (debug profile) and returns its path.
pub fn ensure(package: &str, bin: &str) -> Result<PathBuf, Error> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(crate::repo_root())
        .output()
        .map_err(|e| Error::Build {
            bin: bin.into(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Build {
            bin: bin.into(),
            why: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(target_dir().join("debug").join(bin))
}
