//! Long-running sandbox processes: started detached with a pid file and a log file, recognised later
//! by their pid file *and* their executable (so a reused pid is never mistaken for ours), and
//! stopped with SIGTERM, then SIGKILL.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::error::{IoError, io_at};
use nix::{sys::signal::Signal, unistd::Pid};

/// Errors of process handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {name} ({binary}): {source}")]
    Spawn {
        name: String,
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("process {pid} ({name}) did not exit after SIGKILL")]
    Unkillable { pid: i32, name: String },
    #[error("`{command}` failed ({status}); its output is above")]
    Failed { command: String, status: String },
    #[error("cannot run `{command}`: {source}")]
    CannotRun {
        command: String,
        source: std::io::Error,
    },
}

/// Runs a command to its end (output goes where the command says), failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let command = format!("{cmd:?}");
    let status = cmd.status().map_err(|source| Error::CannotRun {
        command: command.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            command,
            status: status.to_string(),
        })
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// A daemon of the sandbox: a binary, its arguments and where its pid and log files go.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl Daemon {
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.pid", self.name))
    }

    pub fn log_file(&self) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.name))
    }

    /// Starts the daemon in its own process group (so a terminal's Ctrl-C or a job kill of the
    /// command that started it does not take it down) and records its pid.
    pub fn spawn(&self) -> Result<u32> {
        std::fs::create_dir_all(&self.run_dir).map_err(io_at(&self.run_dir))?;
        std::fs::create_dir_all(&self.log_dir).map_err(io_at(&self.log_dir))?;
        let log_path = self.log_file();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_at(&log_path))?;
        let log_err = log.try_clone().map_err(io_at(&log_path))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&self.binary)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .process_group(0)
                .spawn()
                .map_err(|source| Error::Spawn {
                    name: self.name.clone(),
                    binary: self.binary.clone(),
                    source,
                })?
        };
        let pid_path = self.pid_file();
        std::fs::write(&pid_path, child.id().to_string()).map_err(io_at(&pid_path))?;
        Ok(child.id())
    }

    /// The pid of the running daemon, if its pid file names a live process running our binary.
    pub fn running_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (is_alive(pid) && exe_of(pid).as_deref() == Some(self.binary.as_path())).then_some(pid)
    }

    /// The last `n` lines of the daemon's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The executable a process runs, if it can be read.
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// True while the process exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Every process whose executable lies under `dir`: the sandbox's own binaries, whatever started
/// them (a crashed earlier run included).
pub fn processes_running_from(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| exe_of(*pid).is_some_and(|exe| exe.starts_with(dir)) && is_alive(*pid))
        .collect()
}

/// Stops a process: SIGTERM, up to `grace` for it to exit, then SIGKILL.
pub fn stop(pid: i32, name: &str, grace: Duration) -> Result<()> {
    if !is_alive(pid) {
        return Ok(());
    }
    // An error here means the process is already gone (ESRCH), which is the goal.
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_for_exit(pid, grace) {
        return Ok(());
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    if wait_for_exit(pid, Duration::from_secs(10)) {
        Ok(())
    } else {
        Err(Error::Unkillable {
            pid,
            name: name.to_string(),
        })
    }
}

fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !is_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_is_recognised_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon {
            name: "sleeper".into(),
            binary: PathBuf::from("/bin/sleep").canonicalize().unwrap(),
            args: vec!["600".into()],
            run_dir: dir.path().join("run"),
            log_dir: dir.path().join("logs"),
        };
        let pid = daemon.spawn().unwrap() as i32;
        assert_eq!(daemon.running_pid(), Some(pid));
        stop(pid, "sleeper", Duration::from_secs(5)).unwrap();
        assert!(!is_alive(pid));
        assert_eq!(daemon.running_pid(), None);
    }
}
