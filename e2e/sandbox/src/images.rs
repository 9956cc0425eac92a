//! The sandbox's test images, built from this repository (no image is pulled from the internet):
//! `pause` (the pod infrastructure process) and `demo` (the stateful workload), static Go programs in
//! `e2e/sandbox/images`, each put alone into a one-layer image with crane and pushed to the sandbox registry.
//! Tags are the binaries' SHA-256, so an unchanged program is not pushed again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

use crate::error::{IoError, io_at};
use crate::{Dirs, gobuild, registry, tools};

/// The second tag of every image: the latest build.
pub const CURRENT: &str = "current";

/// The images: name, and Go package under `e2e/sandbox/images`.
pub const IMAGES: &[(&str, &str)] = &[("pause", "./pause"), ("demo", "./demo")];

/// Errors while building or pushing images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] gobuild::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The static binary of image `name` as last built by [`ensure`] (its image's only file).
pub fn binary(dirs: &Dirs, name: &str) -> PathBuf {
    dirs.state
        .join("images")
        .join(name)
        .join("rootfs")
        .join(name)
}

/// Builds and pushes every image that the registry lacks; returns name -> reference.
pub fn ensure(
    dirs: &Dirs,
    registry: &registry::Registry,
) -> Result<BTreeMap<String, String>, Error> {
    let publisher = Publisher::new(dirs, registry)?;
    let sources = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images");
    let mut references = BTreeMap::new();
    for (name, package) in IMAGES {
        let binary = binary(dirs, name);
        let root = binary.parent().unwrap_or(&publisher.work).to_path_buf();
        std::fs::create_dir_all(&root).map_err(io_at(&root))?;
        gobuild::run(
            gobuild::go_command(&sources)
                .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
                .arg(&binary)
                .arg(package),
        )?;
        let bytes = std::fs::read(&binary).map_err(io_at(&binary))?;
        let tag = hex(&Sha256::digest(&bytes))[..16].to_string();
        let reference = publisher.publish(name, &root, &tag)?;
        // A stable name too, for configuration that cannot follow the content tag (the sandbox image).
        publisher.tag(&reference, CURRENT)?;
        references.insert((*name).to_string(), reference);
    }
    Ok(references)
}

/// Puts a directory tree into a one-layer image and pushes it to the sandbox registry with crane.
#[derive(Debug, Clone)]
pub struct Publisher {
    crane: PathBuf,
    trust: PathBuf,
    /// Scratch space of the image builds.
    pub work: PathBuf,
}

impl Publisher {
    pub fn new(dirs: &Dirs, registry: &registry::Registry) -> Result<Self, Error> {
        let bin = tools::ensure(&dirs.cache)?;
        let work = dirs.state.join("images");
        let trust = trust_bundle(&work, &registry.ca()?.cert)?;
        Ok(Self {
            crane: bin.join("crane"),
            trust,
            work,
        })
    }

    fn crane(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.crane);
        cmd.args(args).env("SSL_CERT_FILE", &self.trust);
        cmd
    }

    /// Pushes `<registry>/kube-migros/<name>:<tag>` holding the files of `root` (entrypoint
    /// `/<name>`), unless the registry has it; returns the reference.
    pub fn publish(&self, name: &str, root: &Path, tag: &str) -> Result<String, Error> {
        let reference = format!("{}/kube-migros/{name}:{tag}", registry::ADDRESS);
        if self
            .crane(&["digest", &reference])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(reference);
        }
        let layer = self.work.join(name).join("layer.tar");
        std::fs::create_dir_all(self.work.join(name)).map_err(io_at(&self.work))?;
        gobuild::run(
            Command::new("tar")
                .arg("-C")
                .arg(root)
                .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
                .arg(&layer)
                .arg("."),
        )?;
        let layer_arg = layer.display().to_string();
        gobuild::run(&mut self.crane(&[
            "append",
            "--platform",
            "linux/amd64",
            "-f",
            &layer_arg,
            "-t",
            &reference,
        ]))?;
        let entrypoint = format!("--entrypoint=/{name}");
        gobuild::run(&mut self.crane(&["mutate", &entrypoint, "-t", &reference, &reference]))?;
        Ok(reference)
    }

    /// Tags `reference` with `tag` too.
    pub fn tag(&self, reference: &str, tag: &str) -> Result<(), Error> {
        gobuild::run(&mut self.crane(&["tag", reference, tag]))?;
        Ok(())
    }
}

/// The host's CA bundle plus the registry CA, for crane.
fn trust_bundle(work: &Path, registry_ca: &str) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(work).map_err(io_at(work))?;
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let path = work.join("trust.pem");
    std::fs::write(&path, format!("{system}\n{registry_ca}")).map_err(io_at(&path))?;
    Ok(path)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
