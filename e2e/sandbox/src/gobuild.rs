//! Builds Go commands from the Go module proxy into a cache directory, once: a scratch module that
//! requires what is built (its go.mod written by the caller), `go mod tidy`, then one `go build` per
//! command. A stamp holds the recipe; a changed recipe rebuilds. A file lock serialises builders.

use crate::error::{IoError, io_at};
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Run(#[from] crate::process::Error),
    #[error("`{command}` failed ({status}); see the output above")]
    Command { command: String, status: String },
    #[error("cannot run `{command}`: {source} (is Go installed and on PATH?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("unexpected output of `go mod download -json`: {0}")]
    ModDownload(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to build.
#[derive(Debug, Clone)]
pub struct Recipe<'a> {
    /// Human name for messages ("Kubernetes v1.34.12").
    pub title: &'a str,
    /// Cache directory of this recipe; binaries go to `<root>/bin`.
    pub root: PathBuf,
    /// Commands: (binary name, main package).
    pub binaries: &'a [(&'a str, &'a str)],
    /// `-ldflags` of every build.
    pub ldflags: String,
    /// `-tags` of every build (none when empty).
    pub tags: &'a str,
    /// A text that changes whenever the go.mod would (versions, replacements).
    pub fingerprint: String,
}

impl Recipe<'_> {
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    fn stamp(&self) -> String {
        let names: Vec<&str> = self.binaries.iter().map(|(name, _)| *name).collect();
        let tags = if self.tags.is_empty() {
            String::new()
        } else {
            format!(" tags={}", self.tags)
        };
        format!(
            "{} {} {}{tags}",
            self.fingerprint,
            names.join(","),
            self.ldflags
        )
    }

    /// Whether every binary is built for this recipe.
    pub fn is_complete(&self) -> bool {
        let bin = self.bin_dir();
        std::fs::read_to_string(bin.join(".recipe")).is_ok_and(|r| r == self.stamp())
            && self
                .binaries
                .iter()
                .all(|(name, _)| bin.join(name).is_file())
    }

    /// The binary directory, building first when needed; `go_mod` writes the scratch module's
    /// go.mod text (called only when a build is needed, in the module's directory).
    pub fn ensure(&self, go_mod: impl FnOnce(&Path) -> Result<String>) -> Result<PathBuf> {
        let bin = self.bin_dir();
        if self.is_complete() {
            return Ok(bin);
        }
        std::fs::create_dir_all(&bin).map_err(io_at(&bin))?;
        let lock_path = self.root.join(".build.lock");
        let lock = File::create(&lock_path).map_err(io_at(&lock_path))?;
        lock.lock().map_err(io_at(&lock_path))?;
        if self.is_complete() {
            return Ok(bin);
        }
        let src = self.root.join("src");
        std::fs::create_dir_all(&src).map_err(io_at(&src))?;
        let text = go_mod(&src)?;
        let go_mod_path = src.join("go.mod");
        if std::fs::read_to_string(&go_mod_path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&go_mod_path, &text).map_err(io_at(&go_mod_path))?;
            let _ = std::fs::remove_file(src.join("go.sum"));
        }
        let imports: String = self
            .binaries
            .iter()
            .map(|(_, p)| format!("\t_ \"{p}\"\n"))
            .collect();
        let tools = src.join("tools.go");
        let tools_text = format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n");
        std::fs::write(&tools, tools_text).map_err(io_at(&tools))?;
        if !src.join("go.sum").exists() {
            eprintln!("e2e: resolving the module graph of {}", self.title);
            run(go_command(&src).args(["mod", "tidy"]))?;
        }
        for (name, package) in self.binaries {
            eprintln!(
                "e2e: building {name} ({}) from the Go module proxy into {}",
                self.title,
                bin.display()
            );
            // Go's build cache makes rebuilding an already built binary a matter of linking it.
            let partial = bin.join(format!(".{name}.partial"));
            run(go_command(&src)
                .args([
                    "build",
                    "-trimpath",
                    "-tags",
                    self.tags,
                    "-ldflags",
                    &self.ldflags,
                    "-o",
                ])
                .arg(&partial)
                .arg(package))?;
            let target = bin.join(name);
            std::fs::rename(&partial, &target).map_err(io_at(&target))?;
        }
        let stamp = bin.join(".recipe");
        std::fs::write(&stamp, self.stamp()).map_err(io_at(&stamp))?;
        Ok(bin)
    }
}

/// The go.mod text of the module `module@version`, as the proxy serves it.
pub fn upstream_go_mod(dir: &Path, module: &str, version: &str) -> Result<String> {
    let spec = format!("{module}@{version}");
    let command = format!("go mod download -json {spec}");
    let output = go_command(dir)
        .args(["mod", "download", "-json", &spec])
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
    Ok(std::fs::read_to_string(path).map_err(io_at(Path::new(path)))?)
}

/// `go` in `dir`, static, with the local toolchain and no workspace.
pub fn go_command(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOWORK", "off");
    cmd
}

/// Runs a command, failing with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    Ok(crate::process::run(cmd)?)
}
