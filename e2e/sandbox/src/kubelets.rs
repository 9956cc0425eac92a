//! Kubelets on the sandbox nodes: each node runs a real kubelet of the sandbox's Kubernetes version
//! against its own containerd, registered as a Node of the sandbox control plane.
//!
//! A kubelet runs inside its node's mount, PID, network, UTS and IPC namespaces (it sees the node's
//! root, containerd socket and bridge), with the cgroupfs driver under a cgroup root of its own
//! (`/kube-migros-nodes/<node>` in each v1 hierarchy, so that nodes do not share pod cgroups), and
//! reaches the API server at the bridge address with a `system:node:<name>` client certificate.

use std::process::{Command, Stdio};

use crate::{
    Dirs,
    controlplane::{self, ControlPlane},
    k8s,
    nodes::{self, Node, Nodes},
    pki,
};

/// Errors of starting kubelets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nodes(#[from] nodes::Error),
    #[error(transparent)]
    ControlPlane(#[from] controlplane::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Binaries(#[from] crate::binaries::Error),
    #[error("starting the kubelet of {node}: {source}")]
    Start {
        node: String,
        source: std::io::Error,
    },
}

/// The kubelets of the sandbox.
#[derive(Debug, Clone)]
pub struct Kubelets {
    nodes: Nodes,
    control_plane: ControlPlane,
    bin_dir: std::path::PathBuf,
}

/// The kubelet configuration of a node (cgroup v1 host, no swap accounting, capability-poor VM).
pub fn config(node: &Node, cgroup_root: &str) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /opt/kube-migros/kubelet/ca.crt
authorization:
  mode: Webhook
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
resolvConf: ""
makeIPTablesUtilChains: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: 100Mi
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
nodeStatusUpdateFrequency: 4s
# The fault matrix kills the agents and the operator dozens of times: a crashed container comes
# back within a few seconds instead of after CrashLoopBackOff's five minutes (KEP-4603, alpha in
# 1.34).
featureGates:
  KubeletCrashLoopBackOffMax: true
crashLoopBackOff:
  maxContainerRestartPeriod: 2s
"#,
        ip = node.ip()
    )
}

impl Kubelets {
    pub fn new(dirs: &Dirs) -> Self {
        Self {
            nodes: Nodes::new(dirs),
            control_plane: ControlPlane::new(dirs),
            bin_dir: k8s::bin_dir(&dirs.cache),
        }
    }

    /// Starts the kubelet of `node` unless one runs there.
    pub fn start(&self, node: &Node) -> Result<(), Error> {
        // The pod network's IPAM plugin (see nodes.rs: the node's CNI configuration) and the
        // runtime of the `kube-migros` handler, as a node image would have them.
        for bin in ["migros-ipam", "migros-runc"] {
            let path = crate::binaries::ensure("node-agent", bin)?;
            self.nodes.install(node, &path)?;
        }
        let dir = self.nodes.host_dir(node).join("kubelet");
        let cgroup_root = nodes::prepare_cgroup_root(node)?;
        let wanted = config(node, &cgroup_root);
        if self.nodes.running(node, "kubelet") {
            // One started with another configuration (an older version of this code) is
            // restarted with this one; the pods it runs go on.
            let current = std::fs::read_to_string(dir.join("config.yaml")).unwrap_or_default();
            if current == wanted {
                return Ok(());
            }
            self.nodes.stop_all(node, "kubelet")?;
        }
        let kubelet = self.nodes.install(node, &self.bin_dir.join("kubelet"))?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::Start {
            node: node.name.clone(),
            source: e,
        })?;
        pki::write(&dir.join("ca.crt"), &self.control_plane.ca_cert()?, 0o644)?;
        pki::write(
            &dir.join("kubeconfig"),
            &self.control_plane.kubelet_kubeconfig(&node.name)?,
            0o600,
        )?;
        pki::write(&dir.join("config.yaml"), &wanted, 0o644)?;
        let pid = node.containerd_pid().ok_or_else(|| {
            nodes::Error::Command(crate::error::CommandFailed {
                command: "kubelet".into(),
                stderr: format!("node {} is not running", node.name),
            })
        })?;
        let log_path = self.nodes.host_dir(node).join("kubelet.log");
        let start = |e| Error::Start {
            node: node.name.clone(),
            source: e,
        };
        let log = std::fs::File::create(&log_path).map_err(start)?;
        let err = log.try_clone().map_err(start)?;
        use std::os::unix::process::CommandExt;
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-p", "-n", "-u", "-i", "--"])
            .arg(&kubelet)
            .args(["--config", "/opt/kube-migros/kubelet/config.yaml"])
            .args(["--kubeconfig", "/opt/kube-migros/kubelet/kubeconfig"])
            .args(["--hostname-override", &node.name])
            .args(["--node-ip", &node.ip().to_string()])
            .args(["--root-dir", "/var/lib/kubelet"])
            .args(["--v", "1"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(start)?;
        Ok(())
    }

    /// Stops the kubelet of `node` and starts it again (its pods go on running; it finds them
    /// again, and device plugins register anew).
    pub fn restart(&self, node: &Node) -> Result<(), Error> {
        self.nodes.stop_all(node, "kubelet")?;
        self.start(node)
    }

    /// The last lines of the kubelet's log on `node`.
    pub fn log_tail(&self, node: &Node, lines: usize) -> String {
        let text = std::fs::read_to_string(self.nodes.host_dir(node).join("kubelet.log"))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Waits until the Node objects of `nodes` report Ready; the reason of the last failed check.
pub async fn wait_ready(
    client: &kube::Client,
    nodes: &[Node],
    timeout: std::time::Duration,
) -> Result<(), String> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let api: kube::Api<NodeObject> = kube::Api::all(client.clone());
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for node in nodes {
            let ready = api
                .get_opt(&node.name)
                .await
                .ok()
                .flatten()
                .is_some_and(|n| {
                    n.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            if !ready {
                waiting.push(node.name.clone());
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "nodes not Ready after {timeout:?}: {}",
                waiting.join(", ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Deletes the Node objects of `nodes` (after their kubelets are gone).
pub async fn forget(client: &kube::Client, nodes: &[Node]) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let api: kube::Api<NodeObject> = kube::Api::all(client.clone());
    for node in nodes {
        match api.delete(&node.name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The extended resource by which RDMA pods ask for a node with SoftRoCE (advertised by the
/// agents' device plugin).
pub const RXE_RESOURCE: &str = "rdma/rxe";

/// The label of the sandbox's real nodes (what DaemonSets of the sandbox select): test suites add
/// Node objects without kubelets, which a DaemonSet would wait for forever.
pub const SANDBOX_NODE_LABEL: &str = "migros.io/sandbox-node";

/// Labels the Node object of `node` with [`SANDBOX_NODE_LABEL`] and makes it schedulable (a run
/// interrupted in the middle of a drain leaves its node cordoned).
pub async fn label_sandbox_node(client: &kube::Client, node: &Node) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let api: kube::Api<NodeObject> = kube::Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": {"labels": {SANDBOX_NODE_LABEL: "true"}},
        "spec": {"unschedulable": null},
    });
    api.patch(
        &node.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// The `rdma/rxe` devices `node` reports allocatable (0 when none).
pub async fn rxe_allocatable(client: &kube::Client, node: &str) -> Result<i64, kube::Error> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let api: kube::Api<NodeObject> = kube::Api::all(client.clone());
    let node = api.get(node).await?;
    Ok(node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get(RXE_RESOURCE).cloned())
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0))
}

/// Waits until every node of `nodes` reports `rdma/rxe` devices allocatable (their agents'
/// device plugin registered with their kubelet); the nodes still without them otherwise.
pub async fn wait_rxe(
    client: &kube::Client,
    nodes: &[&str],
    timeout: std::time::Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for node in nodes {
            if !rxe_allocatable(client, node).await.is_ok_and(|n| n > 0) {
                waiting.push(node.to_string());
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "no {RXE_RESOURCE} allocatable after {timeout:?} on {} (is the agents' device plugin registered?)",
                waiting.join(", ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Removes an `rdma/rxe` count that an earlier version of the sandbox patched into the node's
/// status: the agents' device plugin alone advertises it now (a stale count would let the
/// scheduler place RDMA pods where no plugin runs). While a plugin is registered, the kubelet
/// writes its count back at its next status update.
pub async fn forget_patched_rxe(client: &kube::Client, node: &Node) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let api: kube::Api<NodeObject> = kube::Api::all(client.clone());
    let patch = serde_json::json!({"status": {
        "capacity": {RXE_RESOURCE: null},
        "allocatable": {RXE_RESOURCE: null},
    }});
    api.patch_status(
        &node.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
