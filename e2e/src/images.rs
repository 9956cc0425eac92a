//! The sandbox's test images, built from this repository (no image is pulled from the internet):
//! `pause` (the pod infrastructure process) and `demo` (the stateful workload), static Go programs in
//! `e2e/images`, each put alone into a one-layer image with crane and pushed to the sandbox registry.
//! Tags are the binaries' SHA-256, so an unchanged program is not pushed again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

use crate::{Dirs, gobuild, registry, tools};

/// The second tag of every image: the latest build.
pub const CURRENT: &str = "current";

/// The images: name, and Go package under `e2e/images`.
pub const IMAGES: &[(&str, &str)] = &[("pause", "./pause"), ("demo", "./demo")];

/// Errors while building or pushing images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] gobuild::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds and pushes every image that the registry lacks; returns name -> reference.
pub fn ensure(
    dirs: &Dirs,
    registry: &registry::Registry,
) -> Result<BTreeMap<String, String>, Error> {
    let bin = tools::ensure(&dirs.cache)?;
    let work = dirs.state.join("images");
    let trust = trust_bundle(&work, &registry.ca()?.cert)?;
    let sources = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images");
    let mut references = BTreeMap::new();
    for (name, package) in IMAGES {
        let root = work.join(name).join("rootfs");
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let binary = root.join(name);
        gobuild::run(
            gobuild::go_command(&sources)
                .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
                .arg(&binary)
                .arg(package),
        )?;
        let bytes = std::fs::read(&binary).map_err(io_err(&binary))?;
        let tag = hex(&Sha256::digest(&bytes))[..16].to_string();
        let reference = format!("{}/kube-migros/{name}:{tag}", registry::ADDRESS);
        let crane = |args: &[&str]| {
            let mut cmd = Command::new(bin.join("crane"));
            cmd.args(args).env("SSL_CERT_FILE", &trust);
            cmd
        };
        if !crane(&["digest", &reference])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let layer = work.join(name).join("layer.tar");
            gobuild::run(
                Command::new("tar")
                    .arg("-C")
                    .arg(&root)
                    .arg("-cf")
                    .arg(&layer)
                    .arg(name),
            )?;
            let layer_arg = layer.display().to_string();
            gobuild::run(&mut crane(&[
                "append",
                "--platform",
                "linux/amd64",
                "-f",
                &layer_arg,
                "-t",
                &reference,
            ]))?;
            let entrypoint = format!("--entrypoint=/{name}");
            gobuild::run(&mut crane(&[
                "mutate",
                &entrypoint,
                "-t",
                &reference,
                &reference,
            ]))?;
        }
        // A stable name too, for configuration that cannot follow the content tag (the sandbox image).
        gobuild::run(&mut crane(&["tag", &reference, CURRENT]))?;
        references.insert((*name).to_string(), reference);
    }
    Ok(references)
}

/// The host's CA bundle plus the registry CA, for crane.
fn trust_bundle(work: &Path, registry_ca: &str) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(work).map_err(io_err(work))?;
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let path = work.join("trust.pem");
    std::fs::write(&path, format!("{system}\n{registry_ca}")).map_err(io_err(&path))?;
    Ok(path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
