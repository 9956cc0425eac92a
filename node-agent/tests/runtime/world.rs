//! The world of the runtime tests: three sandbox nodes (real containerd, runc, CRIU, CNI) with the
//! real node agent running in each, pods driven through the CRI with crictl (as a kubelet would),
//! and gRPC clients with the operator's and a peer agent's certificates.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_api::{Step, StepArgs, client::Client, tls::TlsMaterial, v1};
use sandbox::{
    Dirs,
    nodes::{Node, Nodes},
    registry::Registry,
};
use testkit::fixtures::Certificates;

pub use sandbox::agents::{AGENT_PORT, CHECKPOINT_REPOSITORY, RUNTIME_HANDLER};
/// The largest archive the test agents accept (small, so that "oversized" is cheap to send).
pub const MAX_ARCHIVE_BYTES: u64 = 64 << 20;
/// The rxe ranges the test agents accept.
pub const RXE_RANGE: (u32, u32) = (1024, 1024 + 256 * 16);
/// Namespace of the test pods.
pub const NAMESPACE: &str = "agent-test";

pub type Result<T, E = String> = std::result::Result<T, E>;

/// How a test pod runs: under which runtime handler, with which pod annotations.
#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    pub handler: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodOptions {
    /// The replacement pod of migration `uid`, restored by the runtime wrapper.
    pub fn restore_of(uid: &str) -> Self {
        Self {
            handler: Some(RUNTIME_HANDLER.into()),
            annotations: [("migros.io/migration-uid".to_string(), uid.to_string())].into(),
        }
    }
}

/// Fails with a message unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

pub struct World {
    pub nodes: Vec<Node>,
    handle: Nodes,
    pub certs: Certificates,
    agents: std::sync::Mutex<Vec<sandbox::agents::AgentProcess>>,
    pub demo_image: String,
    pub rt: tokio::runtime::Runtime,
}

impl World {
    /// Brings up the nodes, the registry with the test images, and an agent on each node.
    pub fn up() -> Result<Self> {
        let dirs = Dirs::from_env();
        // The chart's agents (left by the demo) would hold the agent's ports on the nodes.
        sandbox::release::retire(&dirs).map_err(|e| e.to_string())?;
        let handle = Nodes::new(&dirs);
        let nodes = Nodes::named(&["node-1", "node-2", "node-3"]).map_err(|e| e.to_string())?;
        handle.up(&nodes).map_err(|e| e.to_string())?;
        let registry = Registry::new(&dirs);
        registry.up().map_err(|e| e.to_string())?;
        let images = sandbox::images::ensure(&dirs, &registry).map_err(|e| e.to_string())?;
        let demo_image = images
            .get("demo")
            .cloned()
            .ok_or("no demo image was built")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let world = Self {
            nodes,
            handle,
            certs: Certificates::generate(),
            agents: std::sync::Mutex::default(),
            demo_image,
            rt,
        };
        for i in 0..world.nodes.len() {
            world.clear_node(i)?;
            let agent = world.start_agent(i)?;
            world.agents.lock().unwrap().push(agent);
        }
        for i in 0..world.nodes.len() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let caps = world.rt.block_on(async {
                    world
                        .operator(i)
                        .await?
                        .capabilities()
                        .await
                        .map_err(|s| s.to_string())
                });
                match caps {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!(
                            "the agent of {} did not answer: {e}\n{}",
                            world.nodes[i].name,
                            world.agent_log(i)
                        ));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        Ok(world)
    }

    /// Stops the agents; with `KUBE_MIGROS_KEEP_NODES` unset, also the nodes and the registry.
    pub fn down(mut self) -> Result<()> {
        for agent in self.agents.get_mut().unwrap().iter_mut() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if std::env::var_os("KUBE_MIGROS_KEEP_NODES").is_none() {
            self.handle.down().map_err(|e| e.to_string())?;
            Registry::new(&Dirs::from_env())
                .down()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Removes pods, agent data and rxe files left by an earlier run on node `i`.
    fn clear_node(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        // These tests play the kubelet; a real one (left by the demo or the cluster tests) would
        // remove the pods they make, which it does not know.
        self.handle
            .stop_all(node, "kubelet")
            .map_err(|e| e.to_string())?;
        // A container left paused by an interrupted run cannot be stopped until it is resumed.
        let tasks = self.exec(i, &["ctr", "-n", "k8s.io", "tasks", "ls"])?;
        for task in tasks.lines().filter(|l| l.ends_with("PAUSED")) {
            if let Some(id) = task.split_whitespace().next() {
                let _ = self.exec(i, &["ctr", "-n", "k8s.io", "tasks", "resume", id]);
            }
        }
        let pods = self.exec(i, &["crictl", "pods", "-q"])?;
        for pod in pods.split_whitespace() {
            let _ = self.exec(i, &["crictl", "stopp", pod]);
            let _ = self.exec(i, &["crictl", "rmp", "-f", pod]);
        }
        self.exec(i, &["rm", "-rf", "/var/lib/kube-migros"])?;
        let host = self.handle.host_dir(node);
        // (The rxe counter files are reset by the agent's start.)
        let tls = host.join("tls");
        std::fs::create_dir_all(&tls).map_err(|e| e.to_string())?;
        self.certs.write_agent(&tls, &node.name);
        Ok(())
    }

    /// Kills node `i`'s agent (SIGKILL: no clean-up of its own) and starts it again; answers
    /// once it serves.
    pub async fn restart_agent(&self, i: usize) -> Result<()> {
        {
            let mut agents = self.agents.lock().unwrap();
            let _ = agents[i].kill();
            let _ = agents[i].wait();
            agents[i] = self.start_agent(i)?;
        }
        until(
            "the restarted agent to serve",
            Duration::from_secs(30),
            || async {
                let mut agent = self.operator(i).await.ok()?;
                agent.capabilities().await.ok()
            },
        )
        .await
        .map(drop)
    }

    fn start_agent(&self, i: usize) -> Result<sandbox::agents::AgentProcess> {
        let node = &self.nodes[i];
        self.handle
            .install(node, Path::new(env!("CARGO_BIN_EXE_migros-ipam")))
            .map_err(|e| e.to_string())?;
        let options = sandbox::agents::AgentOptions {
            args: [
                "--rxe-qpn-range",
                &format!("{}-{}", RXE_RANGE.0, RXE_RANGE.1),
                "--rxe-mrn-range",
                &format!("{}-{}", RXE_RANGE.0, RXE_RANGE.1),
                "--rxe-wait-seconds",
                "2",
                "--max-archive-bytes",
                &MAX_ARCHIVE_BYTES.to_string(),
                // As an admin allows it for PostCopy (the chart's agent.raisePipeMaxSize).
                "--raise-pipe-max-size",
            ]
            .map(String::from)
            .to_vec(),
            announce: None,
            without_wrapper: false,
            device_plugin: false,
        };
        sandbox::agents::start(
            &self.handle,
            node,
            Path::new(env!("CARGO_BIN_EXE_node-agent")),
            &options,
        )
        .map_err(|e| format!("starting the agent on {}: {e}", node.name))
    }

    pub fn agent_log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.handle.host_dir(&self.nodes[i]).join("agent.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn endpoint(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.nodes[i].ip(), AGENT_PORT))
    }

    /// A client of node `i`'s agent with `tls` (None: no client certificate).
    pub async fn client(
        &self,
        i: usize,
        tls: Option<TlsMaterial>,
        ca: Option<&str>,
    ) -> Result<Client> {
        let node = &self.nodes[i].name;
        let mut config = match tls {
            Some(t) => t.client_for(node),
            None => tonic::transport::ClientTlsConfig::new()
                .domain_name(agent_api::tls::agent_server_name(node)),
        };
        if let Some(ca) = ca {
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", self.endpoint(i)))
                .map_err(|e| e.to_string())?
                .tls_config(config)
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(3))
                .connect()
                .await
                .map_err(|e| format!("connecting to the agent of {}: {e}", self.nodes[i].name))?;
        Ok(Client::new(channel))
    }

    /// A client of node `i`'s agent as the operator.
    pub async fn operator(&self, i: usize) -> Result<Client> {
        self.client(i, Some(self.certs.operator()), None).await
    }

    /// Runs `command` in node `i`; its stdout, or why it failed.
    pub fn exec(&self, i: usize, command: &[&str]) -> Result<String> {
        let out = self.nodes[i].exec(command).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{command:?} on {}: {}",
                self.nodes[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host path of `path` in node `i` (for files the node wrote).
    pub fn written(&self, i: usize, path: &str) -> PathBuf {
        self.handle.written(&self.nodes[i], path)
    }

    pub fn rxe_file(&self, i: usize, file: &str) -> String {
        std::fs::read_to_string(self.handle.host_dir(&self.nodes[i]).join("rxe").join(file))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The addresses node `i` blocks or holds now (both sets of its bridge table); an error when they cannot be read (never "none").
    pub fn blocked(&self, i: usize) -> Result<Vec<Ipv4Addr>> {
        let out = self.exec(i, &["nft", "-j", "list", "table", "bridge", "kube_migros"])?;
        Ok(node_agent::netblock::parse_set(&out))
    }

    /// The segments node `i` answered host-unreachable for blocked addresses so far (0 before
    /// any block made the table).
    pub fn answered(&self, i: usize) -> Result<u64> {
        let out = self.exec(i, &["nft", "-j", "list", "ruleset"])?;
        Ok(node_agent::netblock::parse_answered(&out))
    }

    /// The migrations with data in node `i`'s store (none while the store has no migrations
    /// directory); an error when it cannot be read.
    pub fn stored(&self, i: usize) -> Result<Vec<String>> {
        let dir = self.written(i, "/var/lib/kube-migros/migrations");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("reading {}: {e}", dir.display())),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Starts a pod on node `i` through the CRI: a sandbox on the pod network and one container
    /// `app` of `image` (with `args`; none for a checkpoint image).
    pub fn run_pod(&self, i: usize, name: &str, image: &str, args: &[&str]) -> Result<Pod> {
        self.run_pod_with(i, name, image, args, &PodOptions::default())
    }

    /// Runs pod `name` on node `i` as the kubelet would (sandbox, then its one container `app`),
    /// with the runtime handler and pod annotations of `options`.
    pub fn run_pod_with(
        &self,
        i: usize,
        name: &str,
        image: &str,
        args: &[&str],
        options: &PodOptions,
    ) -> Result<Pod> {
        let dir = format!("/var/lib/containerd/test-{name}");
        let host_dir = self
            .handle
            .host_dir(&self.nodes[i])
            .join("..")
            .join("containerd")
            .join(format!("test-{name}"));
        std::fs::create_dir_all(&host_dir).map_err(|e| e.to_string())?;
        let sandbox = serde_json::json!({
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"), "attempt": 0},
            "log_directory": format!("/var/log/pods/{name}"),
            "annotations": options.annotations,
            // Each container in a PID namespace of its own, as the kubelet does by default: a
            // restored process gets its PIDs back, which a namespace shared with the sandbox may
            // already use (CRIU restore fails with EEXIST).
            "linux": {"security_context": {"namespace_options": {"pid": 1}}}
        });
        std::fs::write(host_dir.join("pod.json"), sandbox.to_string())
            .map_err(|e| e.to_string())?;
        let pod_json = format!("{dir}/pod.json");
        let mut runp = vec!["crictl", "runp"];
        if let Some(handler) = &options.handler {
            runp.extend(["--runtime", handler.as_str()]);
        }
        runp.push(pod_json.as_str());
        let sandbox_id = self.exec(i, &runp)?.trim().to_string();
        let container_id = self.start_container(i, name, &sandbox_id, image, args, 0)?;
        let inspect = self.exec(i, &["crictl", "inspectp", &sandbox_id])?;
        let v: serde_json::Value = serde_json::from_str(&inspect).map_err(|e| e.to_string())?;
        let ip = v["status"]["network"]["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("pod {name} has no IPv4 address: {inspect}"))?;
        Ok(Pod {
            node: i,
            name: name.into(),
            sandbox_id,
            container_id,
            ip,
        })
    }

    /// Creates and starts the container `app` (restart number `attempt`) of pod `name`'s sandbox on
    /// node `i`, as the kubelet does; answers its ID.
    pub fn start_container(
        &self,
        i: usize,
        name: &str,
        sandbox_id: &str,
        image: &str,
        args: &[&str],
        attempt: u32,
    ) -> Result<String> {
        let dir = format!("/var/lib/containerd/test-{name}");
        let host_dir = self
            .handle
            .host_dir(&self.nodes[i])
            .join("..")
            .join("containerd")
            .join(format!("test-{name}"));
        let container = serde_json::json!({
            "metadata": {"name": "app", "attempt": attempt},
            "image": {"image": image},
            "args": args,
            "log_path": format!("app-{attempt}.log"),
            "linux": {"security_context": {"namespace_options": {"pid": 1}}}
        });
        let file = format!("app-{attempt}.json");
        std::fs::write(host_dir.join(&file), container.to_string()).map_err(|e| e.to_string())?;
        let (pod_json, app_json) = (format!("{dir}/pod.json"), format!("{dir}/{file}"));
        let mut create = vec!["crictl", "create"];
        if !image.starts_with('/') {
            create.push("--with-pull");
        }
        create.extend([sandbox_id, app_json.as_str(), pod_json.as_str()]);
        let container_id = self.exec(i, &create)?.trim().to_string();
        self.exec(i, &["crictl", "start", &container_id])?;
        Ok(container_id)
    }

    /// Stops and removes a pod's sandbox (what a kubelet does when the pod object goes).
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.exec(pod.node, &["crictl", "stopp", &pod.sandbox_id])?;
        self.exec(pod.node, &["crictl", "rmp", "-f", &pod.sandbox_id])?;
        Ok(())
    }

    /// containerd's state of a container's task on node `i` (`RUNNING`, `PAUSED`, ...; `GONE`
    /// when containerd lists no task of it). A probe that fails answers `UNKNOWN (why)`, which
    /// matches no state a test expects.
    pub fn task_state(&self, i: usize, container_id: &str) -> String {
        let out = match self.exec(i, &["ctr", "-n", "k8s.io", "tasks", "ls"]) {
            Ok(out) => out,
            Err(e) => return format!("UNKNOWN ({e})"),
        };
        out.lines()
            .find(|l| l.starts_with(container_id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("GONE")
            .to_string()
    }

    /// CPU time the container's processes used so far (cgroup v1 cpuacct), in nanoseconds.
    pub fn cpu_ns(&self, i: usize, container_id: &str) -> Result<u64> {
        let inspect = self.exec(i, &["crictl", "inspect", container_id])?;
        let v: serde_json::Value = serde_json::from_str(&inspect).map_err(|e| e.to_string())?;
        let pid = v["info"]["pid"]
            .as_u64()
            .ok_or("the container has no pid")?;
        // Paths in /proc/<pid>/cgroup are relative to the node's (= the host's) hierarchy.
        let cgroups = self.exec(i, &["cat", &format!("/proc/{pid}/cgroup")])?;
        let path = cgroups
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "cpuacct")
                    .then(|| path.to_string())
            })
            .ok_or("no cpuacct cgroup")?;
        let usage = self.exec(
            i,
            &[
                "cat",
                &format!("/sys/fs/cgroup/cpuacct{path}/cpuacct.usage"),
            ],
        )?;
        usage.trim().parse().map_err(|e| format!("{usage:?}: {e}"))
    }
}

/// A pod started by a test.
#[derive(Debug, Clone)]
pub struct Pod {
    pub node: usize,
    pub name: String,
    pub sandbox_id: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// The agent API's view of the pod.
    pub fn pod_ref(&self, image: &str) -> v1::PodRef {
        v1::PodRef {
            namespace: NAMESPACE.into(),
            name: self.name.clone(),
            uid: format!("uid-{}", self.name),
            pod_ip: self.ip.to_string(),
            containers: vec![v1::ContainerRef {
                name: "app".into(),
                container_id: format!("containerd://{}", self.container_id),
                image: image.into(),
            }],
        }
    }
}

/// The demo workload's status line, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status(pub BTreeMap<String, String>);

impl Status {
    pub fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or_default()
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key).parse().unwrap_or(0)
    }

    /// A number the status must carry: a missing or malformed field fails (a check of it must
    /// not pass on a status that does not report it).
    pub fn exact(&self, key: &str) -> Result<u64> {
        self.get(key)
            .parse()
            .map_err(|_| format!("the status has no number {key}: {self:?}"))
    }
}

/// Reads the demo's status at `ip:8080` (from the host, over the bridge), within a second.
pub async fn status(ip: Ipv4Addr) -> Result<Status> {
    testkit::workload::state(ip)
        .await
        .map(Status)
        .ok_or_else(|| format!("{ip}:8080 did not answer within a second"))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `agent` for `step` of the migration in `args` until it leaves RUNNING; fails unless it
/// succeeded.
pub async fn done(agent: &mut Client, step: Step, args: &StepArgs) -> Result<v1::Operation> {
    let op = settled(agent, step, args, Duration::from_secs(120)).await?;
    match op.state() {
        v1::State::Succeeded => Ok(op),
        _ => Err(format!("{step} failed: {}", op.message)),
    }
}

/// Like [`done`], but expects the step to fail; returns its message.
pub async fn fails(agent: &mut Client, step: Step, args: &StepArgs) -> Result<String> {
    let op = settled(agent, step, args, Duration::from_secs(60)).await?;
    match op.state() {
        v1::State::Failed => Ok(op.message),
        _ => Err(format!("{step} succeeded, it should have failed")),
    }
}

/// Asks for the step until it succeeded or failed.
async fn settled(
    agent: &mut Client,
    step: Step,
    args: &StepArgs,
    timeout: Duration,
) -> Result<v1::Operation> {
    let deadline = Instant::now() + timeout;
    loop {
        let op = agent
            .step(step, args)
            .await
            .map_err(|s| format!("{step}: {}", s.message()))?;
        match op.state() {
            v1::State::Succeeded | v1::State::Failed => return Ok(op),
            _ if Instant::now() > deadline => {
                return Err(format!("{step} still runs after {timeout:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
