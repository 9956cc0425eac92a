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

use crate::{
    Dirs,
    bridge::{BRIDGE, BRIDGE_IP, PREFIX, ensure_bridge, ip, link_exists},
    containerd::{self, Containerd},
    error::{CommandFailed, IoError, io_at},
    process, registry, rootfs, tools,
};

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
    # Built from e2e/sandbox/images/pause and pushed to the sandbox registry.
    sandbox_image = "10.88.0.1:5000/kube-migros/pause:current"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    # The RuntimeClass handler of kube-migros' runtime-wrapper restore backend: runc through
    # migros-runc (installed with the agent), and the migration annotations passed to it.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kube-migros]
      runtime_type = "io.containerd.runc.v2"
      pod_annotations = ["migros.io/*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kube-migros.options]
        BinaryName = "/opt/kube-migros/bin/migros-runc"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "/etc/containerd/certs.d"
"#;

/// The pod network of every node: the `bridge` plugin on the node's bridge `cni0` (which also holds
/// the node's uplink to the host bridge, so all pods of all nodes share one L2 segment), with
/// kube-migros' `migros-ipam` in front of `host-local`: a pod reserved an address by a migration
/// gets it, every other pod an address of its node's range `10.88.<index>.0/24`.
fn cni_config(node: &Node) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "migros",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{POD_BRIDGE}",
      "isGateway": false,
      "ipMasq": false,
      "ipam": {{
        "type": "migros-ipam",
        "reservations": "/var/lib/kube-migros/ipam",
        "delegate": {{
          "type": "host-local",
          "ranges": [[{{
            "subnet": "10.88.0.0/{PREFIX}",
            "rangeStart": "10.88.{index}.2",
            "rangeEnd": "10.88.{index}.254",
            "gateway": "{BRIDGE_IP}"
          }}]],
          "routes": [{{ "dst": "0.0.0.0/0" }}]
        }}
      }}
    }}
  ]
}}
"#,
        index = node.index
    )
}

/// Bump when the way a node is set up (in `start`) changes: running nodes are then made anew.
const NODE_RECIPE_VERSION: &str = "2";

/// The bridge inside each node that its pods and its uplink are ports of.
pub const POD_BRIDGE: &str = "cni0";

const CRIU_CONFIG: &str = "tcp-established\nskip-in-flight\nnetwork-lock nftables\n";

/// Errors of node handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rootfs(#[from] rootfs::Error),
    #[error(transparent)]
    Tools(#[from] crate::gobuild::Error),
    #[error(transparent)]
    Registry(#[from] Box<registry::Error>),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error(transparent)]
    Io(#[from] IoError),
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

/// A node of the sandbox, by name and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub index: u8,
    /// Which containerd it runs.
    pub containerd: Containerd,
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
        let pid = self.containerd_pid().ok_or_else(|| CommandFailed {
            command: command.join(" "),
            stderr: format!("node {} is not running", self.name),
        })?;
        let output = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-p", "-n", "-u", "-i", "--"])
            .args(command)
            .output()
            .map_err(|e| CommandFailed {
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
    dirs: Dirs,
}

impl Nodes {
    pub fn new(dirs: &Dirs) -> Self {
        Self {
            dir: dirs.state.join("nodes"),
            dirs: dirs.clone(),
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
                        containerd: containerd::of_node(name),
                    }),
                    _ => Err(Error::BadName((*name).to_string())),
                }
            })
            .collect()
    }

    /// Starts the nodes that do not run yet (making the rootfs first when needed) and waits until
    /// each one's containerd answers.
    pub fn up(&self, nodes: &[Node]) -> Result<()> {
        let rootfs = rootfs::ensure(&self.dirs.cache)?;
        let tools = tools::ensure(&self.dirs.cache)?;
        let upstream = if nodes.iter().any(|n| n.containerd == Containerd::Upstream) {
            Some(containerd::ensure(&self.dirs.cache)?)
        } else {
            None
        };
        let registry_ca = registry::Registry::new(&self.dirs)
            .ca()
            .map_err(Box::new)?
            .cert;
        ensure_bridge()?;
        for node in nodes {
            // A node that runs with the current recipe is kept; one made by another version of
            // this code (or half dead) is made anew.
            let recipe = std::fs::read_to_string(self.node_dir(node).join("recipe")).ok();
            if recipe.as_deref() == Some(&self.recipe(node, &rootfs))
                && node
                    .exec(&["ctr", "version"])
                    .is_ok_and(|o| o.status.success())
            {
                continue;
            }
            self.stop(node)?;
            let containerd = upstream
                .as_deref()
                .filter(|_| node.containerd == Containerd::Upstream);
            self.start(node, &rootfs, &tools, &registry_ca, containerd)?;
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
                    containerd: containerd::of_node(name),
                    name: name.to_string(),
                    index: 0,
                })?;
            }
        }
        sweep_runtime_cgroups();
        if link_exists(BRIDGE) {
            ip(&["link", "delete", BRIDGE])?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(&self.dir)(e).into()),
            _ => Ok(()),
        }
    }

    /// A fingerprint of everything a node is made from.
    fn recipe(&self, node: &Node, rootfs: &Path) -> String {
        let all = [
            NODE_RECIPE_VERSION,
            INIT_SCRIPT,
            CONTAINERD_CONFIG,
            CRIU_CONFIG,
            &cni_config(node),
            &rootfs.display().to_string(),
            node.containerd.describe(),
            crate::containerd::CONTAINERD.1,
        ]
        .join("\0");
        format!("{:08x}", rootfs::fnv1a(&all))
    }

    fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.join(&node.name)
    }

    /// Whether a process named `comm` runs in the node.
    pub fn running(&self, node: &Node, comm: &str) -> bool {
        netns_pids(&node.netns()).into_iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
    }

    /// Stops every process named `comm` in the node (ours: only the sandbox runs there).
    pub fn stop_all(&self, node: &Node, comm: &str) -> Result<()> {
        for pid in netns_pids(&node.netns()) {
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            {
                process::stop(pid, comm, Duration::from_secs(5))?;
            }
        }
        Ok(())
    }

    /// The host side of the node's `/opt/kube-migros`: what is written here the node sees.
    pub fn host_dir(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join("host")
    }

    /// The node's simulated rxe device: its counters `last_qpn` and `last_mrn` as plain files in
    /// `/opt/kube-migros/rxe` (no RDMA subsystem exists on these machines); made when missing.
    pub fn ensure_rxe_counters(&self, node: &Node) -> Result<PathBuf> {
        let dir = self.host_dir(node).join("rxe");
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        for name in ["last_qpn", "last_mrn"] {
            let file = dir.join(name);
            if !file.exists() {
                std::fs::write(&file, "0\n").map_err(io_at(&file))?;
            }
        }
        Ok(dir)
    }

    /// The host side of a path inside the node's root file system (its overlay's upper layer
    /// holds everything the node wrote; read-only use).
    pub fn written(&self, node: &Node, path: &str) -> PathBuf {
        self.node_dir(node)
            .join("upper")
            .join(path.trim_start_matches('/'))
    }

    /// Copies `binary` into the node's `/opt/kube-migros/bin` (atomically: a running node may be
    /// executing the previous copy).
    pub fn install(&self, node: &Node, binary: &Path) -> Result<PathBuf> {
        let name = binary.file_name().unwrap_or_default();
        let bin = self.host_dir(node).join("bin");
        std::fs::create_dir_all(&bin).map_err(io_at(&bin))?;
        let tmp = bin.join(format!(".{}.tmp", name.to_string_lossy()));
        std::fs::copy(binary, &tmp).map_err(io_at(binary))?;
        let dest = bin.join(name);
        std::fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
        Ok(Path::new("/opt/kube-migros/bin").join(name))
    }

    fn stop(&self, node: &Node) -> Result<()> {
        let netns = node.netns();
        let pids = netns_pids(&netns);
        let cgroups: Vec<PathBuf> = pids.iter().flat_map(|pid| runtime_cgroups(*pid)).collect();
        // A process in a frozen cgroup (a paused container) ignores even SIGKILL until thawed.
        for pid in &pids {
            thaw(*pid);
        }
        for pid in pids {
            process::stop(
                pid,
                &format!("{} process", node.name),
                Duration::from_secs(5),
            )?;
        }
        remove_cgroups(cgroups);
        for hierarchy in cgroup_hierarchies() {
            rmdir_tree(&hierarchy.join(NODE_CGROUP_PARENT).join(&node.name));
        }
        if list_netns().contains(&netns) {
            ip(&["netns", "delete", &netns])?;
        }
        let dir = self.node_dir(node);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(&dir)(e).into()),
            _ => Ok(()),
        }
    }

    /// Makes and starts `node`; with `containerd`, the node runs the containerd and runc shim of
    /// that directory instead of the rootfs's.
    fn start(
        &self,
        node: &Node,
        rootfs: &Path,
        tools: &Path,
        registry_ca: &str,
        containerd: Option<&Path>,
    ) -> Result<()> {
        let dir = self.node_dir(node);
        let upper = dir.join("upper");
        write(&upper.join("etc/containerd/config.toml"), CONTAINERD_CONFIG)?;
        write(&upper.join("etc/hostname"), &format!("{}\n", node.name))?;
        // The node trusts the sandbox registry: containerd through hosts.toml, everything else
        // through the system bundle.
        let hosts = format!(
            "server = \"https://{0}\"\n\n[host.\"https://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/kube-migros/registry-ca.crt\"\n",
            registry::ADDRESS
        );
        write(
            &upper.join(format!(
                "etc/containerd/certs.d/{}/hosts.toml",
                registry::ADDRESS
            )),
            &hosts,
        )?;
        write(&upper.join("etc/kube-migros/registry-ca.crt"), registry_ca)?;
        let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt"))
            .unwrap_or_default();
        write(
            &upper.join("etc/ssl/certs/ca-certificates.crt"),
            &format!("{bundle}\n{registry_ca}"),
        )?;
        // CRIU as runc calls it: keep established TCP connections (the pod IP moves with the pod),
        // let connections still in a listen backlog go, and lock the network with nftables, which
        // cleans up after itself (docs/sandbox.md).
        write(&upper.join("etc/criu/runc.conf"), CRIU_CONFIG)?;
        // crictl, for driving the CRI by hand and for the raw baseline.
        let crictl = upper.join("usr/local/bin/crictl");
        write(&crictl, "")?;
        std::fs::copy(tools.join("crictl"), &crictl).map_err(io_at(&crictl))?;
        write(
            &upper.join("etc/crictl.yaml"),
            "runtime-endpoint: unix:///run/containerd/containerd.sock\nimage-endpoint: unix:///run/containerd/containerd.sock\ntimeout: 30\n",
        )?;
        write(
            &upper.join("etc/cni/net.d/10-migros.conflist"),
            &cni_config(node),
        )?;
        // Files the host hands the node (binaries, certificates, the rxe counter files of tests)
        // go to <node dir>/host, which the node sees at /opt/kube-migros.
        std::fs::create_dir_all(dir.join("host/bin")).map_err(io_at(&dir))?;
        let containerd_dir = match containerd {
            Some(built) => {
                let to = dir.join("host/containerd");
                std::fs::create_dir_all(&to).map_err(io_at(&to))?;
                for bin in ["containerd", "containerd-shim-runc-v2"] {
                    std::fs::copy(built.join(bin), to.join(bin)).map_err(io_at(&to))?;
                }
                "/opt/kube-migros/containerd"
            }
            None => "",
        };
        let init = dir.join("init.sh");
        write(&init, INIT_SCRIPT)?;
        write(&dir.join("recipe"), &self.recipe(node, rootfs))?;

        let netns = node.netns();
        plumb(node)?;

        let log_path = dir.join("node.log");
        let log = std::fs::File::create(&log_path).map_err(io_at(&log_path))?;
        let log_err = log.try_clone().map_err(io_at(&log_path))?;
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
            .arg(containerd_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(io_at(Path::new("nsenter")))?;
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

fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup namespace (path prefix) containerd gives the CRI's containers.
const RUNTIME_CGROUP_PREFIX: &str = "/k8s.io/";
/// Parent of the nodes' kubelet cgroup roots (`/kube-migros-nodes/<node>` in each v1 hierarchy).
pub const NODE_CGROUP_PARENT: &str = "kube-migros-nodes";

/// The v1 hierarchies of the host (not the empty cgroup2 mount `unified`).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.ends_with("unified"))
                .collect()
        })
        .unwrap_or_default()
}

/// The kubelet cgroup root of `node`: `/kube-migros-nodes/<node>`, made in every v1 hierarchy
/// (cpuset ones get their parent's CPUs and memory nodes, which v1 does not inherit).
pub fn prepare_cgroup_root(node: &Node) -> Result<String> {
    for hierarchy in cgroup_hierarchies() {
        let mut dir = hierarchy.clone();
        for part in [NODE_CGROUP_PARENT, node.name.as_str()] {
            let parent = dir.clone();
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).map_err(io_at(&dir))?;
            }
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(parent.join(file))
                    && std::fs::read_to_string(dir.join(file)).is_ok_and(|v| v.trim().is_empty())
                {
                    std::fs::write(dir.join(file), value.trim()).map_err(io_at(&dir))?;
                }
            }
        }
    }
    Ok(format!("/{NODE_CGROUP_PARENT}/{}", node.name))
}

/// Removes a cgroup directory tree, deepest first (a cgroup with processes stays).
fn rmdir_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
        {
            rmdir_tree(&child.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The cgroup v1 directories of `pid` that the node's runtime made (under `/k8s.io/`); the host's
/// own cgroups are never written or removed.
fn runtime_cgroups(pid: i32) -> Vec<PathBuf> {
    let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    cgroups
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let controller = controllers.split(',').next().filter(|c| !c.is_empty())?;
            let controller = controller.trim_start_matches("name=");
            let ours = path.starts_with(RUNTIME_CGROUP_PREFIX)
                || path.starts_with(&format!("/{NODE_CGROUP_PARENT}/"));
            ours.then(|| {
                Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(path.trim_start_matches('/'))
            })
        })
        .collect()
}

/// Thaws the runtime's freezer cgroup of `pid` if it is frozen.
fn thaw(pid: i32) {
    for dir in runtime_cgroups(pid) {
        let state = dir.join("freezer.state");
        if std::fs::read_to_string(&state).is_ok_and(|s| s.trim() != "THAWED") {
            let _ = std::fs::write(&state, "THAWED");
        }
    }
}

/// Removes every empty runtime cgroup (`/k8s.io/*` in each v1 hierarchy), such as those a crashed
/// earlier run left; rmdir fails on a cgroup that still has processes, which then stays.
fn sweep_runtime_cgroups() {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for controller in controllers.filter_map(|e| e.ok()) {
        let root = controller
            .path()
            .join(RUNTIME_CGROUP_PREFIX.trim_matches('/'));
        if let Ok(children) = std::fs::read_dir(&root) {
            for child in children
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
            {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&root);
        rmdir_tree(&controller.path().join(NODE_CGROUP_PARENT));
    }
}

/// Removes the runtime's cgroups of processes that are gone (a cgroup with processes stays).
fn remove_cgroups(mut dirs: Vec<PathBuf>) {
    dirs.sort();
    dirs.dedup();
    for dir in dirs.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Processes in network namespace `netns` (by comparing namespace inodes).
pub(crate) fn netns_pids(netns: &str) -> Vec<i32> {
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

/// Writes a file, creating its directory.
fn write(path: &Path, contents: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    Ok(std::fs::write(path, contents).map_err(io_at(path))?)
}

/// The node's network namespace, its veth to the host's bridge and its pod bridge carrying the
/// node's address.
fn plumb(node: &Node) -> Result<()> {
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
    // The node's address sits on its pod bridge, whose uplink port is eth0.
    // A fixed MAC: a bridge without one takes its ports' lowest, which changes as pods come
    // and go, and then the host's ARP entry for the node is stale for seconds.
    let mac = format!("02:6d:67:00:00:{:02x}", node.index);
    in_ns(&["link", "add", POD_BRIDGE, "address", &mac, "type", "bridge"])?;
    in_ns(&["link", "set", "eth0", "master", POD_BRIDGE, "up"])?;
    in_ns(&[
        "addr",
        "add",
        &format!("{}/{PREFIX}", node.ip()),
        "dev",
        POD_BRIDGE,
    ])?;
    in_ns(&["link", "set", POD_BRIDGE, "up"])?;
    in_ns(&["route", "add", "default", "via", &BRIDGE_IP.to_string()])?;
    Ok(())
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
