//! Builds the Kubernetes binaries of the sandbox (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet, kubectl) from the Go module proxy at one pinned version, once, into a
//! cache directory outside the checkout.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

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

/// Errors of the build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed ({status}); see the output above")]
    Command { command: String, status: String },
    #[error("cannot run `{command}`: {source} (is Go installed and on PATH?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected output of `go mod download -json`: {0}")]
    ModDownload(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The build recipe; a change of it (version, binaries, flags) invalidates the cache.
fn recipe() -> String {
    let names: Vec<&str> = BINARIES.iter().map(|(name, _)| *name).collect();
    format!("{K8S_VERSION} {} {}", names.join(","), ldflags())
}

/// Where the binaries of [`K8S_VERSION`] are cached.
pub fn bin_dir(cache: &Path) -> PathBuf {
    cache.join("k8s").join(K8S_VERSION).join("bin")
}

/// Returns the binary directory, building whatever is missing or stale first. Safe to call from
/// several processes at once: a file lock serialises the builds.
pub fn ensure_built(cache: &Path) -> Result<PathBuf> {
    let root = cache.join("k8s").join(K8S_VERSION);
    let bin = root.join("bin");
    let stamp = bin.join(".recipe");
    if is_complete(&bin, &stamp) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&bin).map_err(io_err(&bin))?;
    let lock_path = root.join(".build.lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    if is_complete(&bin, &stamp) {
        return Ok(bin);
    }
    let src = root.join("src");
    write_module(&src)?;
    for (name, package) in BINARIES {
        // Go's build cache makes rebuilding an already built binary a matter of linking it.
        let target = bin.join(name);
        eprintln!(
            "e2e: building {name} {K8S_VERSION} from the Go module proxy (cached in {})",
            bin.display()
        );
        let partial = bin.join(format!(".{name}.partial"));
        go(
            &src,
            &["build", "-trimpath", "-ldflags", &ldflags(), "-o"],
            Some(&partial),
            package,
        )?;
        std::fs::rename(&partial, &target).map_err(io_err(&target))?;
    }
    std::fs::write(&stamp, recipe()).map_err(io_err(&stamp))?;
    Ok(bin)
}

fn is_complete(bin: &Path, stamp: &Path) -> bool {
    std::fs::read_to_string(stamp).is_ok_and(|r| r == recipe())
        && BINARIES.iter().all(|(name, _)| bin.join(name).is_file())
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

/// Writes a scratch Go module that requires `k8s.io/kubernetes` and pins each staging module
/// (`k8s.io/api`, `k8s.io/apiserver`, ...) to the matching `v0.x` release, the way Kubernetes' own
/// `replace ./staging/...` directives do inside its repository.
fn write_module(src: &Path) -> Result<()> {
    std::fs::create_dir_all(src).map_err(io_err(src))?;
    let upstream = download_go_mod(src)?;
    let staging_version = format!("v0.{}", K8S_VERSION.trim_start_matches("v1."));
    let mut go_mod = format!(
        "module kube-migros.local/k8s-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes {K8S_VERSION}\n\nreplace (\n"
    );
    for module in staging_modules(&upstream) {
        go_mod.push_str(&format!("\t{module} => {module} {staging_version}\n"));
    }
    go_mod.push_str(")\n");
    let imports: String = BINARIES
        .iter()
        .map(|(_, package)| format!("\t_ \"{package}\"\n"))
        .collect();
    let tools = format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n");
    let go_mod_path = src.join("go.mod");
    if std::fs::read_to_string(&go_mod_path).ok().as_deref() != Some(go_mod.as_str()) {
        std::fs::write(&go_mod_path, &go_mod).map_err(io_err(&go_mod_path))?;
        let _ = std::fs::remove_file(src.join("go.sum"));
    }
    let tools_path = src.join("tools.go");
    std::fs::write(&tools_path, tools).map_err(io_err(&tools_path))?;
    if !src.join("go.sum").exists() {
        eprintln!("e2e: resolving the Kubernetes {K8S_VERSION} module graph");
        go(src, &["mod", "tidy"], None, "")?;
    }
    Ok(())
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

fn download_go_mod(src: &Path) -> Result<String> {
    let module = format!("k8s.io/kubernetes@{K8S_VERSION}");
    let command = format!("go mod download -json {module}");
    let output = go_command(src)
        .args(["mod", "download", "-json", &module])
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(Error::Command {
            command,
            status: output.status.to_string(),
        });
    }
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| Error::ModDownload(e.to_string()))?;
    let path = info["GoMod"]
        .as_str()
        .ok_or_else(|| Error::ModDownload(format!("no GoMod in {info}")))?;
    std::fs::read_to_string(path).map_err(io_err(Path::new(path)))
}

fn go_command(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        // Outside a module `go mod download` needs a go.mod to exist; GOWORK must not leak in.
        .env("GOWORK", "off");
    cmd
}

fn go(dir: &Path, args: &[&str], output: Option<&Path>, package: &str) -> Result<()> {
    let mut cmd = go_command(dir);
    cmd.args(args);
    if let Some(out) = output {
        cmd.arg(out);
    }
    if !package.is_empty() {
        cmd.arg(package);
    }
    let command = format!("go {}", args.join(" "));
    let status = cmd.status().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command,
            status: status.to_string(),
        })
    }
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
