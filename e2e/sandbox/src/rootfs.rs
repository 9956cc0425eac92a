//! The node runtime's root filesystem: a Debian sid tree made with debootstrap (containerd 2.1,
//! runc, CRIU 4, the CNI plugins, iproute2, iptables, nftables), cached as a zstd tarball outside the
//! checkout and unpacked once into the directory every node uses as its read-only lower layer.
//! Debian 12's own CRIU fails on this kernel, hence sid (docs/sandbox.md).

use crate::error::{IoError, io_at};
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian suite of the rootfs.
pub const SUITE: &str = "sid";
/// Packages on top of debootstrap's minimal base.
pub const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "criu",
    "containernetworking-plugins",
    "iproute2",
    "iptables",
    "nftables",
    "busybox-static",
    // scp, for the raw baseline's copy over the bridge.
    "openssh-server",
    "openssh-client",
    "ca-certificates",
];
/// Bump when the way the rootfs is made changes.
const RECIPE_VERSION: u32 = 1;

/// Errors while making the rootfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Run(#[from] crate::process::Error),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A name that changes with the recipe, so a changed recipe makes a new rootfs.
fn recipe_name() -> String {
    format!(
        "debian-{SUITE}-r{RECIPE_VERSION}-{:08x}",
        fnv1a(&PACKAGES.join(","))
    )
}

/// FNV-1a: a short stable fingerprint of a recipe.
pub fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The unpacked rootfs, made (and cached as a tarball) when missing. Several processes may call
/// this at once: a file lock makes one of them do the work.
pub fn ensure(cache: &Path) -> Result<PathBuf, Error> {
    let base = cache.join("rootfs");
    std::fs::create_dir_all(&base).map_err(io_at(&base))?;
    let name = recipe_name();
    let dir = base.join(&name);
    let done = dir.join(".kube-migros-complete");
    if done.exists() {
        return Ok(dir);
    }
    let lock_path = base.join(".lock");
    let lock = File::create(&lock_path).map_err(io_at(&lock_path))?;
    lock.lock().map_err(io_at(&lock_path))?;
    if done.exists() {
        return Ok(dir);
    }
    let tarball = base.join(format!("{name}.tar.zst"));
    if !tarball.exists() {
        build_tarball(&base, &name, &tarball)?;
    }
    eprintln!("e2e: unpacking the node rootfs {}", tarball.display());
    let partial = base.join(format!(".{name}.unpacking"));
    remove_dir(&partial)?;
    std::fs::create_dir_all(&partial).map_err(io_at(&partial))?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&partial)
        .args(["--zstd", "-xpf"])
        .arg(&tarball))?;
    remove_dir(&dir)?;
    std::fs::rename(&partial, &dir).map_err(io_at(&dir))?;
    std::fs::write(&done, name).map_err(io_at(&done))?;
    Ok(dir)
}

fn build_tarball(base: &Path, name: &str, tarball: &Path) -> Result<(), Error> {
    ensure_debootstrap()?;
    let build = base.join(format!(".{name}.debootstrap"));
    remove_dir(&build)?;
    eprintln!(
        "e2e: making the node rootfs with debootstrap ({SUITE}: {})",
        PACKAGES.join(", ")
    );
    run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&build)
        .arg("http://deb.debian.org/debian"))?;
    let partial = base.join(format!(".{name}.tar.zst.partial"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&build)
        .args(["--zstd", "-cpf"])
        .arg(&partial)
        .arg("."))?;
    std::fs::rename(&partial, tarball).map_err(io_at(tarball))?;
    remove_dir(&build)
}

/// debootstrap comes from the host's own suite (bookworm); it installs sid into a directory only.
fn ensure_debootstrap() -> Result<(), Error> {
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("e2e: installing debootstrap");
    let install = || run(Command::new("apt-get").args(["install", "-y", "-qq", "debootstrap"]));
    install().or_else(|_| {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        install()
    })
}

fn remove_dir(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(path)(e).into()),
        _ => Ok(()),
    }
}

fn run(command: &mut Command) -> Result<(), Error> {
    Ok(crate::process::run(command)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_name_names_the_suite_and_changes_with_the_packages() {
        let name = recipe_name();
        assert!(name.starts_with("debian-sid-r1-"), "{name}");
        assert_ne!(fnv1a("containerd,runc"), fnv1a("containerd,runc,criu"));
    }
}
