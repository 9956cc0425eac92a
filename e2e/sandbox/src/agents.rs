//! The real node agent on the sandbox nodes: installed into a node and run inside it (the node's
//! mount, network, PID, UTS and IPC namespaces, as the chart's DaemonSet pod with host mounts, host
//! network and host PID would), with the test's certificates, a per-node rxe counter directory of plain files (no RDMA
//! device exists here), and checkpoint images pushed to the sandbox registry.

use std::{
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
};

use crate::nodes::{Node, Nodes};

/// Port of the agent API on each node's address.
pub const AGENT_PORT: u16 = 7443;
/// The runtime handler of the nodes' containerd that runs `migros-runc`.
pub const RUNTIME_HANDLER: &str = "kube-migros";
/// Where agents push checkpoint images (the sandbox registry, which every node trusts).
pub const CHECKPOINT_REPOSITORY: &str = "10.88.0.1:5000/kube-migros/checkpoints";

/// Where RDMA containers see their node's simulated rxe counters (the device plugin mounts the
/// counter directory there, as the kernel's `/proc/sys/net/rdma_rxe` is seen in every container).
pub const RXE_COUNTERS_MOUNT: &str = "/run/migros-rxe";

/// How to run an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra arguments (e.g. limits of a test).
    pub args: Vec<String>,
    /// Announce with a Lease in this namespace, with this kubeconfig (its text).
    pub announce: Option<(String, String)>,
    /// Do not offer the runtime-wrapper backend (the node then restores from checkpoint images).
    pub without_wrapper: bool,
    /// Serve the kubelet's device plugin for `rdma/rxe` (needs `announce`'s kubeconfig: it reads
    /// rxe blocks and publishes Events), as the chart's agents do.
    pub device_plugin: bool,
}

/// Installs the agent binary `binary` and the runtime wrapper (`migros-runc`, which the node's
/// containerd runs for the `kube-migros` handler) into `node`, writes the TLS files (`ca.crt`,
/// `tls.crt`, `tls.key` already in `<host dir>/tls`), resets the rxe counter files, and starts the
/// agent.
pub fn start(
    nodes: &Nodes,
    node: &Node,
    binary: &Path,
    options: &AgentOptions,
) -> std::io::Result<AgentProcess> {
    let err = |e: crate::nodes::Error| std::io::Error::other(e.to_string());
    // One agent per node: an earlier one (of an interrupted run) would hold the port.
    nodes.stop_all(node, "node-agent").map_err(err)?;
    let agent = nodes.install(node, binary).map_err(err)?;
    let wrapper = crate::binaries::ensure("node-agent", "migros-runc")
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    nodes.install(node, &wrapper).map_err(err)?;
    let host = nodes.host_dir(node);
    let rxe = host.join("rxe");
    std::fs::create_dir_all(&rxe)?;
    for f in ["last_qpn", "last_mrn"] {
        std::fs::write(rxe.join(f), "0\n")?;
    }
    let pid = node
        .containerd_pid()
        .ok_or_else(|| std::io::Error::other(format!("node {} is not running", node.name)))?;
    let log = std::fs::File::create(host.join("agent.log"))?;
    let log_err = log.try_clone()?;
    let ip = node.ip();
    let mut command = Command::new("nsenter");
    command
        // The node's PID namespace too (nsenter forks the agent into it): the agent's `/proc/self`
        // is its own, as with the chart's hostPID.
        .args(["-t", &pid.to_string(), "-m", "-n", "-p", "-u", "-i", "--"])
        .arg(agent)
        .args(["--node-name", &node.name])
        .args(["--listen", &format!("{ip}:{AGENT_PORT}")])
        .args(["--http-addr", &format!("{ip}:9465")])
        .args(["--tls-dir", "/opt/kube-migros/tls"])
        .args(["--rxe-dir", "/opt/kube-migros/rxe"])
        .args(["--checkpoint-registry", CHECKPOINT_REPOSITORY])
        .args(["--registry-ca", "/etc/kube-migros/registry-ca.crt"])
        // The node's uplink to the other nodes: peers' segments to a blocked pod arrive there.
        .args(["--answer-device", "eth0"])
        .args(&options.args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if !options.without_wrapper {
        command.args(["--runtime-handler", RUNTIME_HANDLER]);
    }
    if let Some((namespace, kubeconfig)) = &options.announce {
        std::fs::write(host.join("agent.kubeconfig"), kubeconfig)?;
        command
            .args(["--lease-namespace", namespace])
            .args(["--advertise", &format!("{ip}:{AGENT_PORT}")])
            .env("KUBECONFIG", "/opt/kube-migros/agent.kubeconfig");
    }
    if options.device_plugin {
        if options.announce.is_none() {
            return Err(std::io::Error::other(
                "the device plugin needs a kubeconfig (AgentOptions::announce)",
            ));
        }
        command
            .arg("--device-plugin")
            .args(["--rxe-counters-mount", RXE_COUNTERS_MOUNT]);
    }
    let nsenter = command.spawn()?;
    Ok(AgentProcess {
        nsenter,
        netns: node.netns(),
    })
}

/// A running agent: `nsenter` and the agent it forked into the node's PID namespace.
#[derive(Debug)]
pub struct AgentProcess {
    nsenter: Child,
    netns: String,
}

impl AgentProcess {
    /// Kills the agent at once (SIGKILL: no clean-up of its own), and `nsenter` with it.
    pub fn kill(&mut self) -> std::io::Result<()> {
        for pid in crate::nodes::netns_pids(&self.netns) {
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "node-agent")
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.nsenter.kill()
    }

    /// Waits for the agent's end (`nsenter` ends with it).
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.nsenter.wait()
    }
}

/// The last lines of the agent's log on `node`.
pub fn log_tail(nodes: &Nodes, node: &Node, lines: usize) -> String {
    let text = std::fs::read_to_string(nodes.host_dir(node).join("agent.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
