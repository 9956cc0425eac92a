//! What every part of the sandbox says when a file or a command fails: one I/O error that names the
//! path, and one failed-command error with what the command printed. Each module's error wraps them.

use std::path::{Path, PathBuf};

/// A file or directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot read or write {path}: {source}")]
pub struct IoError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Names the path of an I/O error (`?` then wraps it in the module's error).
pub fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError {
        path: path.to_path_buf(),
        source,
    }
}

/// A command could not run, or failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {stderr}")]
pub struct CommandFailed {
    pub command: String,
    pub stderr: String,
}
