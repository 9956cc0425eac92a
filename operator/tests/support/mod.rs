//! What the operator's integration tests share: the operator binary run as a real process against
//! the sandbox API server, a scenario of API nodes with test agents, and waiting on PodMigrations.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)] // each test file uses a part

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crds::{Phase, PodMigration};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    runtime::wait::await_condition,
};
use serde_json::json;
use testkit::{
    fixtures::{self, ApiNode, Certificates},
    harness,
    testagent::TestAgent,
};

/// The sandbox cluster with its real nodes, as the tests that run the real agent in each node
/// need it: CRDs installed, the RuntimeClass of the runtime wrapper, the agent binary, and the
/// kubeconfig the agents announce themselves with (the admin's).
#[derive(Debug)]
pub struct RealNodes {
    pub nodes: sandbox::nodes::Nodes,
    pub wanted: Vec<sandbox::nodes::Node>,
    pub images: std::collections::BTreeMap<String, String>,
    pub agent_binary: std::path::PathBuf,
    pub kubeconfig: String,
}

impl RealNodes {
    pub async fn up() -> Self {
        let env = harness::env().await;
        let client = harness::client().await;
        harness::install_crds(&client).await;
        let dirs = sandbox::Dirs::from_env();
        let cluster = sandbox::cluster::up(&dirs)
            .await
            .expect("the sandbox cluster");
        let agent_binary =
            sandbox::binaries::ensure("node-agent", "node-agent").expect("agent built");
        // The nodes' containerd has the runtime wrapper's handler; replacements run under this
        // class.
        sandbox::release::ensure_runtime_class(&client)
            .await
            .expect("the RuntimeClass");
        let kubeconfig = testkit::workload::node_kubeconfig(&env).unwrap();
        Self {
            nodes: sandbox::nodes::Nodes::new(&dirs),
            wanted: cluster.nodes,
            images: cluster.images,
            agent_binary,
            kubeconfig,
        }
    }
}

/// The operator binary of this workspace.
pub const OPERATOR: &str = env!("CARGO_BIN_EXE_operator");

/// A running operator process; killed when dropped.
#[derive(Debug)]
pub struct Operator {
    child: Child,
    pub identity: String,
    pub http: SocketAddr,
}

/// How a test runs its operator, beyond the namespace it watches.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// Its mutual-TLS certificates; without them the operator makes its own in Secrets.
    pub certs: Option<&'a Certificates>,
    /// The runtime wrapper's RuntimeClass; `None`: one named after the namespace (cluster-scoped),
    /// which does not exist unless the test makes it.
    pub runtime_class: Option<&'a str>,
    /// `--allow-checkpoint-images`: most test agents offer checkpoint images alone.
    pub checkpoint_images: bool,
    /// Serve the admission webhooks and register them for the namespace (needs `certs`).
    pub webhooks: bool,
    /// Migrations in flight leaving a node, arriving on a node, in all; the operator's defaults
    /// when `None`.
    pub limits: Option<(usize, usize, usize)>,
    /// More arguments, last.
    pub args: &'a [&'a str],
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            certs: None,
            runtime_class: None,
            checkpoint_images: true,
            webhooks: false,
            limits: None,
            args: &[],
        }
    }
}

impl<'a> Options<'a> {
    pub fn new(certs: &'a Certificates) -> Self {
        Self {
            certs: Some(certs),
            ..Self::default()
        }
    }
}

impl Operator {
    /// Starts an operator that watches only `ns` and keeps its Leases there, with
    /// [`Options::new`].
    pub async fn start(ns: &str, identity: &str, certs: &Certificates) -> Self {
        Self::start_with(ns, identity, Options::new(certs)).await
    }

    /// As [`Operator::start`], with `options`.
    pub async fn start_with(ns: &str, identity: &str, options: Options<'_>) -> Self {
        let env = harness::env().await;
        let http = free_port();
        let webhook = free_port();
        let webhooks = options.webhooks.then(|| {
            let certs = options
                .certs
                .expect("webhooks need the test's certificates");
            [
                format!("--webhook-addr={webhook}"),
                format!("--webhook-tls-dir={}", certs.webhook_dir().display()),
            ]
        });
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("operator-{ns}-{identity}.log")),
        )
        .expect("log file");
        let child = Command::new(OPERATOR)
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "info,operator=debug,kube=warn")
            .args([
                "--namespace",
                ns,
                "--watch-namespace",
                ns,
                "--identity",
                identity,
                "--runtime-class",
                options.runtime_class.unwrap_or(ns),
            ])
            .args(
                options
                    .checkpoint_images
                    .then_some("--allow-checkpoint-images"),
            )
            .args([
                "--lease-duration-seconds",
                "4",
                "--lease-retry-seconds",
                "1",
                "--rxe-sweep-seconds",
                "1",
            ])
            .arg("--http-addr")
            .arg(http.to_string())
            .args(
                options
                    .certs
                    .map(|c| format!("--tls-dir={}", c.operator_dir().display())),
            )
            .args(webhooks.iter().flatten())
            .args(options.limits.iter().flat_map(|(leaving, arriving, all)| {
                [
                    format!("--max-leaving-per-node={leaving}"),
                    format!("--max-arriving-per-node={arriving}"),
                    format!("--max-in-flight={all}"),
                ]
            }))
            .args(options.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the operator");
        let operator = Self {
            child,
            identity: identity.into(),
            http,
        };
        if let Some(certs) = options.certs.filter(|_| options.webhooks) {
            // The webhooks serve once the operator is ready.
            operator.wait_ready().await;
            let client = harness::client().await;
            testkit::webhooks::register(&client, ns, &webhook.to_string(), certs.ca_pem()).await;
        }
        operator
    }

    /// SIGKILL, as a crash or an evicted pod.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for the operator")
    }

    /// GET `path` on the operator's HTTP endpoint: (status code, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connect to the operator");
        let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// Waits until the HTTP endpoint answers /ready with 200.
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(self.http).await.is_ok()
                && self.get("/ready").await.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("operator {} never became ready", self.identity);
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

pub use testkit::harness::eventually;

/// Three API nodes with a test agent each, certificates, and the kubelet stand-in for
/// replacement pods.
pub struct Scenario {
    pub client: Client,
    pub ns: String,
    pub certs: Certificates,
    pub nodes: Vec<ApiNode>,
    pub agents: Vec<TestAgent>,
    kubelet: tokio::task::JoinHandle<()>,
}

impl Scenario {
    pub async fn new(client: Client, ns: &str) -> Self {
        harness::install_crds(&client).await;
        harness::wait_for_default_service_account(&client, ns).await;
        let certs = Certificates::generate();
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        for i in 1..=3 {
            let name = format!("{ns}-node-{i}");
            nodes.push(ApiNode::create(&client, &name).await);
            agents.push(TestAgent::start(client.clone(), ns, &name, &certs.agent(&name)).await);
        }
        let kubelet = tokio::spawn(fixtures::report_replacements_running(
            client.clone(),
            ns.to_string(),
        ));
        Self {
            client,
            ns: ns.into(),
            certs,
            nodes,
            agents,
            kubelet,
        }
    }

    pub fn node(&self, i: usize) -> String {
        self.nodes[i - 1].name.clone()
    }

    pub fn agent(&self, i: usize) -> &TestAgent {
        &self.agents[i - 1]
    }

    /// A migratable pod Running on node `i`.
    pub async fn pod(&self, name: &str, node: usize, ip: &str) -> Pod {
        self.pod_with(
            name,
            node,
            ip,
            &[(crds::MIGRATABLE_LABEL, "true"), ("app", name)],
        )
        .await
    }

    pub async fn pod_with(
        &self,
        name: &str,
        node: usize,
        ip: &str,
        labels: &[(&str, &str)],
    ) -> Pod {
        fixtures::run_pod(
            &self.client,
            &self.ns,
            &fixtures::pod(name, &self.node(node), labels),
            ip,
        )
        .await
    }

    /// Creates a PodMigration of `pod` (to node `target`, or any when `None`).
    pub async fn migrate(&self, name: &str, pod: &str, target: Option<usize>) -> PodMigration {
        self.migrate_with(name, pod, target, json!({})).await
    }

    pub async fn migrate_with(
        &self,
        name: &str,
        pod: &str,
        target: Option<usize>,
        extra: serde_json::Value,
    ) -> PodMigration {
        let mut spec = json!({"podName": pod});
        if let Some(t) = target {
            spec["targetNode"] = json!(self.node(t));
        }
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            spec[k] = v;
        }
        let pm: PodMigration = serde_json::from_value(json!({
            "apiVersion": "migros.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        self.migrations()
            .create(&PostParams::default(), &pm)
            .await
            .expect("create PodMigration")
    }

    pub fn migrations(&self) -> Api<PodMigration> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Waits until migration `name` is in `phase` (panics with its status after `timeout`).
    pub async fn wait_phase(&self, name: &str, phase: Phase, timeout: Duration) -> PodMigration {
        Self::wait_phase_in(&self.client, &self.ns, name, phase, timeout).await
    }

    /// [`Scenario::wait_phase`] for migration `name` in namespace `ns`.
    pub async fn wait_phase_in(
        client: &Client,
        ns: &str,
        name: &str,
        phase: Phase,
        timeout: Duration,
    ) -> PodMigration {
        let migrations: Api<PodMigration> = Api::namespaced(client.clone(), ns);
        let reached = await_condition(
            migrations.clone(),
            name,
            move |pm: Option<&PodMigration>| {
                pm.and_then(|p| p.status.as_ref()).and_then(|s| s.phase) == Some(phase)
            },
        );
        match tokio::time::timeout(timeout, reached).await {
            Ok(Ok(Some(pm))) => pm,
            _ => {
                let now = migrations.get_opt(name).await.ok().flatten();
                panic!(
                    "{name} not {phase:?} within {timeout:?}; now: {:#?}",
                    now.map(|p| p.status)
                );
            }
        }
    }

    /// The Ready condition's reason and the message of a migration.
    pub fn reason(pm: &PodMigration) -> (String, String) {
        let status = pm.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.reason.clone())
            .unwrap_or_default();
        (ready, status.message.unwrap_or_default())
    }

    /// Waits until an Event with `reason` about `object` exists (the operator publishes it right
    /// after the status write that a test may see first).
    pub async fn wait_event(&self, object: &str, reason: &str) {
        eventually(Duration::from_secs(30), || async {
            self.event_reasons(object)
                .await
                .iter()
                .any(|r| r == reason)
                .then_some(())
        })
        .await;
    }

    /// Names of the Events about `object`.
    pub async fn event_reasons(&self, object: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        let list = events
            .list(&ListParams::default())
            .await
            .expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
            .filter_map(|e| e.reason)
            .collect()
    }

    pub async fn pod_uid(&self, name: &str) -> Option<String> {
        self.pods()
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.uid())
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.kubelet.abort();
    }
}
