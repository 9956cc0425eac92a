//! Sandbox nodes: each node is a network namespace on a shared L2 bridge (the "rdma-net" of the
//! seed) plus a private mount and PID namespace whose root is the cached Debian rootfs
//! (`pivot_root`, not chroot, so that CRIU can dump), running containerd with the CRI plugin.
//! Killing a node's init ends everything in it; `down` also deletes its network namespace.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Dirs, process, rootfs};

/// The host bridge that joins the nodes.
pub const BRIDGE: &str = "migros0";
/// The bridge's address on the host; nodes are `10.88.0.(10 + index)`.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Prefix length of the node network.
pub const PREFIX: u8 = 16;
/// Prefix of every node's network namespace name.
const NETNS_PREFIX: &str = "migros-";

const INIT_SCRIPT: &str = include_str!("../node/init.sh");
const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    # CAP_SYS_RESOURCE is withheld on these machines: a negative oom_score_adj cannot be written.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "/etc/containerd/certs.d"
"#;

/// Errors of node handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rootfs(#[from] rootfs::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "node {node} did not become ready within {seconds}s: {reason}\nlast lines of {log}:\n{tail}"
    )]
    NotReady {
        node: String,
        seconds: u64,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("node names are DNS labels of at most 20 characters; {0:?} is not")]
    BadName(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A node of the sandbox, by name and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub index: u8,
}

impl Node {
    /// The node's address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 10 + self.index)
    }

    pub fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }

    /// Runs `command` in all of the node's namespaces (it sees the node's root, pids and network).
    pub fn exec(&self, command: &[&str]) -> Result<std::process::Output> {
        let pid = self.containerd_pid().ok_or_else(|| Error::Command {
            command: command.join(" "),
            stderr: format!("node {} is not running", self.name),
        })?;
        let output = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-p", "-n", "-u", "-i", "--"])
            .args(command)
            .output()
            .map_err(|e| Error::Command {
                command: command.join(" "),
                stderr: e.to_string(),
            })?;
        Ok(output)
    }

    /// The pid (as the host sees it) of the node's containerd, if it runs.
    pub fn containerd_pid(&self) -> Option<i32> {
        netns_pids(&self.netns()).into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "containerd")
        })
    }
}

/// The nodes' files under the state directory.
#[derive(Debug, Clone)]
pub struct Nodes {
    dir: PathBuf,
    cache: PathBuf,
}

impl Nodes {
    pub fn new(dirs: &Dirs) -> Self {
        Self {
            dir: dirs.state.join("nodes"),
            cache: dirs.cache.clone(),
        }
    }

    /// The nodes named `names`, in order (their index is their position, from 1).
    pub fn named(names: &[&str]) -> Result<Vec<Node>> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let valid = !name.is_empty()
                    && name.len() <= 20
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                let index = u8::try_from(i + 1).ok().filter(|i| *i < 200);
                match (valid, index) {
                    (true, Some(index)) => Ok(Node {
                        name: (*name).to_string(),
                        index,
                    }),
                    _ => Err(Error::BadName((*name).to_string())),
                }
            })
            .collect()
    }

    /// Starts the nodes that do not run yet (making the rootfs first when needed) and waits until
    /// each one's containerd answers.
    pub fn up(&self, nodes: &[Node]) -> Result<()> {
        let rootfs = rootfs::ensure(&self.cache)?;
        ensure_bridge()?;
        for node in nodes {
            if node
                .exec(&["ctr", "version"])
                .is_ok_and(|o| o.status.success())
            {
                continue;
            }
            self.stop(node)?;
            self.start(node, &rootfs)?;
        }
        for node in nodes {
            self.wait_ready(node, Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Stops every sandbox node (any network namespace named `migros-*`: all processes in it are
    /// the sandbox's), removes the bridge and the nodes' state. Idempotent.
    pub fn down(&self) -> Result<()> {
        for netns in list_netns() {
            if let Some(name) = netns.strip_prefix(NETNS_PREFIX) {
                self.stop(&Node {
                    name: name.to_string(),
                    index: 0,
                })?;
            }
        }
        if link_exists(BRIDGE) {
            ip(&["link", "delete", BRIDGE])?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&self.dir)(e)),
            _ => Ok(()),
        }
    }

    fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.join(&node.name)
    }

    fn stop(&self, node: &Node) -> Result<()> {
        let netns = node.netns();
        for pid in netns_pids(&netns) {
            process::stop(
                pid,
                &format!("{} process", node.name),
                Duration::from_secs(5),
            )?;
        }
        if list_netns().contains(&netns) {
            ip(&["netns", "delete", &netns])?;
        }
        let dir = self.node_dir(node);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    fn start(&self, node: &Node, rootfs: &Path) -> Result<()> {
        let dir = self.node_dir(node);
        let etc = dir.join("upper/etc/containerd");
        std::fs::create_dir_all(&etc).map_err(io_err(&etc))?;
        write(&etc.join("config.toml"), CONTAINERD_CONFIG)?;
        write(&dir.join("upper/etc/hostname"), &format!("{}\n", node.name))?;
        let init = dir.join("init.sh");
        write(&init, INIT_SCRIPT)?;

        let netns = node.netns();
        let (host_if, node_if) = (format!("mgh{}", node.index), format!("mgn{}", node.index));
        if link_exists(&host_if) {
            ip(&["link", "delete", &host_if])?;
        }
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
        ])?;
        ip(&["link", "set", &host_if, "master", BRIDGE, "up"])?;
        ip(&["link", "set", &node_if, "netns", &netns])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["link", "set", &node_if, "name", "eth0"])?;
        in_ns(&[
            "addr",
            "add",
            &format!("{}/{PREFIX}", node.ip()),
            "dev",
            "eth0",
        ])?;
        in_ns(&["link", "set", "eth0", "up"])?;
        in_ns(&["route", "add", "default", "via", &BRIDGE_IP.to_string()])?;

        let log_path = dir.join("node.log");
        let log = std::fs::File::create(&log_path).map_err(io_err(&log_path))?;
        let log_err = log.try_clone().map_err(io_err(&log_path))?;
        use std::os::unix::process::CommandExt;
        // --kill-child: when the unshare parent dies, the node's init (and with it the node) dies.
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--fork",
                "--kill-child",
                "/bin/sh",
            ])
            .arg(&init)
            .arg(rootfs)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(io_err(Path::new("nsenter")))?;
        Ok(())
    }

    fn wait_ready(&self, node: &Node, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut reason = String::from("containerd has not started");
        while Instant::now() < deadline {
            match node.exec(&["ctr", "version"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => reason = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => reason = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = self.node_dir(node).join("node.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        Err(Error::NotReady {
            node: node.name.clone(),
            seconds: timeout.as_secs(),
            reason,
            log,
            tail,
        })
    }
}

fn ensure_bridge() -> Result<()> {
    if !link_exists(BRIDGE) {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{BRIDGE_IP}/{PREFIX}"),
            "dev",
            BRIDGE,
        ])?;
    }
    ip(&["link", "set", BRIDGE, "up"])
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes in network namespace `netns` (by comparing namespace inodes).
fn netns_pids(netns: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(format!("/run/netns/{netns}")) else {
        return Vec::new();
    };
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .filter(|pid| process::is_alive(*pid))
        .collect()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_become_addresses_on_the_bridge() {
        let nodes = Nodes::named(&["node-1", "node-2"]).unwrap();
        assert_eq!(nodes[1].ip(), Ipv4Addr::new(10, 88, 0, 12));
        assert_eq!(nodes[0].netns(), "migros-node-1");
        assert!(Nodes::named(&["Node_1"]).is_err());
        assert!(Nodes::named(&["a-name-that-is-far-too-long"]).is_err());
    }
}
