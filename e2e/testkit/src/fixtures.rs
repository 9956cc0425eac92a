//! Objects the operator tests set up on the real API server before the sandbox has kubelets:
//! Node objects kept Ready by a heartbeat (as a kubelet would), pods bound to them and marked
//! Running, and the mutual-TLS certificates of the operator and the agents.

// Test support: a failed set-up step fails the test that asked for it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{path::PathBuf, time::Duration};

use agent_api::{
    identity::{AGENT_COMMON_NAME, OPERATOR_COMMON_NAME},
    pki::{Ca, Leaf, Pem, Usage},
    tls::{TlsFiles, TlsMaterial, agent_server_name},
};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Container, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::task::JoinHandle;

use sandbox::{Dirs, controlplane::ControlPlane, pki};

/// Certificates of one test: a CA, the operator's client certificate, each node's agent
/// certificate (issued on first use) and one of the same CA for a name that is neither.
#[derive(Debug)]
pub struct Certificates {
    dir: tempfile::TempDir,
    authority: Ca,
    ca: String,
    agents: std::sync::Mutex<std::collections::BTreeMap<String, Pem>>,
}

impl Certificates {
    pub fn generate() -> Self {
        let ca = Ca::new("kube-migros-test-ca").expect("CA");
        let issue = |common_name, dns_names, usage| {
            ca.issue(&Leaf {
                common_name,
                dns_names,
                usage: Some(usage),
                ..Default::default()
            })
            .expect("certificate")
        };
        let operator = issue(OPERATOR_COMMON_NAME, &[], Usage::Client);
        // The API server calls a test operator's webhooks at 127.0.0.1.
        let webhook = ca
            .issue(&Leaf {
                common_name: "kube-migros-webhooks",
                ips: &[std::net::Ipv4Addr::LOCALHOST.into()],
                usage: Some(Usage::Server),
                ..Default::default()
            })
            .expect("webhook certificate");
        // The operator reads ca.crt, tls.crt and tls.key from one directory, as mounted from a Secret.
        let dir = tempfile::tempdir().expect("temporary directory");
        pki::write(&dir.path().join("ca.crt"), &ca.pem().cert, 0o644).expect("write ca.crt");
        pki::write_pem(dir.path(), "tls", &operator).expect("write the operator's certificate");
        let webhook_dir = dir.path().join("webhook");
        std::fs::create_dir_all(&webhook_dir).expect("webhook directory");
        pki::write_pem(&webhook_dir, "tls", &webhook).expect("write the webhook certificate");
        Self {
            dir,
            ca: ca.pem().cert.clone(),
            authority: ca,
            agents: Default::default(),
        }
    }

    /// Directory for the operator's `--tls-dir`.
    pub fn operator_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Directory for the operator's `--webhook-tls-dir` (a certificate for 127.0.0.1).
    pub fn webhook_dir(&self) -> PathBuf {
        self.dir.path().join("webhook")
    }

    /// The CA's certificate (PEM): the `caBundle` of the test operator's webhooks.
    pub fn ca_pem(&self) -> &str {
        &self.ca
    }

    /// The material the agent of `node` serves and dials peers with (its certificate names the
    /// node, as the operator's signer would issue it).
    pub fn agent(&self, node: &str) -> TlsMaterial {
        self.material(&self.agent_pem(node))
    }

    fn agent_pem(&self, node: &str) -> Pem {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .entry(node.to_string())
            .or_insert_with(|| {
                self.authority
                    .issue(&Leaf {
                        common_name: AGENT_COMMON_NAME,
                        dns_names: &[&agent_server_name(node)],
                        usage: Some(Usage::Both),
                        ..Default::default()
                    })
                    .expect("agent certificate")
            })
            .clone()
    }

    /// Writes the `ca.crt`, `tls.crt` and `tls.key` of the agent of `node` into `dir`, as a
    /// Secret mounts them.
    pub fn write_agent(&self, dir: &std::path::Path, node: &str) {
        std::fs::create_dir_all(dir).expect("the agent's TLS directory");
        pki::write(&dir.join("ca.crt"), &self.ca, 0o644).expect("write ca.crt");
        pki::write_pem(dir, "tls", &self.agent_pem(node)).expect("write the agent's certificate");
    }

    /// A certificate from the same CA, for the name of the agent of `node`, whose common name is
    /// neither the operator's nor an agent's.
    pub fn stranger(&self, node: &str) -> TlsMaterial {
        let pem = self
            .authority
            .issue(&Leaf {
                common_name: "somebody-else",
                dns_names: &[&agent_server_name(node)],
                usage: Some(Usage::Both),
                ..Default::default()
            })
            .expect("certificate");
        self.material(&pem)
    }

    /// The operator's material, loaded as the operator loads it.
    pub fn operator(&self) -> TlsMaterial {
        TlsFiles::in_dir(&self.operator_dir())
            .load()
            .expect("operator TLS material")
    }

    fn material(&self, pem: &Pem) -> TlsMaterial {
        TlsMaterial::from_pem(
            self.ca.clone().into(),
            pem.cert.clone().into(),
            pem.key.clone().into(),
        )
    }
}

/// A Node object with no kubelet behind it, kept Ready by renewing its heartbeat Lease (as a
/// kubelet does), and deleted when dropped (the drop waits for the deletion).
pub struct ApiNode {
    pub name: String,
    client: Client,
    heartbeat: JoinHandle<()>,
}

impl std::fmt::Debug for ApiNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiNode")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ApiNode {
    /// Creates the node with 4 CPUs, 8 GiB of memory and `rdma/rxe` devices, Ready. Test nodes
    /// that runs ended without deleting (older than half an hour) are deleted first.
    pub async fn create(client: &Client, name: &str) -> Self {
        let nodes: Api<Node> = Api::all(client.clone());
        forget_stale(&nodes).await;
        let capacity: std::collections::BTreeMap<String, Quantity> = [
            ("cpu", "4"),
            ("memory", "8Gi"),
            ("pods", "110"),
            ("rdma/rxe", "16"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.into())))
        .collect();
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [
                        ("kubernetes.io/hostname".to_string(), name.to_string()),
                        (TEST_NODE_LABEL.to_string(), "true".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: None,
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
        let status = NodeStatus {
            capacity: Some(capacity.clone()),
            allocatable: Some(capacity),
            conditions: Some(vec![ready_condition(true)]),
            ..Default::default()
        };
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .unwrap_or_else(|e| panic!("set the status of node {name}: {e}"));
        let heartbeat = tokio::spawn(heartbeat(client.clone(), name.to_string()));
        // A new node carries node.kubernetes.io/not-ready:NoSchedule until the node lifecycle
        // controller sees it Ready, as a real node does: wait for that, as a scheduler would.
        let untainted = kube::runtime::wait::await_condition(nodes, name, |n: Option<&Node>| {
            n.and_then(|n| n.spec.as_ref())
                .is_some_and(|s| s.taints.as_ref().is_none_or(Vec::is_empty))
        });
        tokio::time::timeout(Duration::from_secs(60), untainted)
            .await
            .unwrap_or_else(|_| panic!("node {name} still tainted after 60s"))
            .unwrap_or_else(|e| panic!("watching node {name}: {e}"));
        Self {
            name: name.into(),
            client: client.clone(),
            heartbeat,
        }
    }

    /// Sets the node's Ready condition.
    pub async fn set_ready(&self, ready: bool) {
        let patch = json!({"status": {"conditions": [ready_condition(ready)]}});
        Api::<Node>::all(self.client.clone())
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .expect("patch node condition");
    }

    /// Cordons or uncordons the node.
    pub async fn set_unschedulable(&self, unschedulable: bool) {
        Api::<Node>::all(self.client.clone())
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})),
            )
            .await
            .expect("cordon node");
    }
}

/// The label of [`ApiNode`]s.
pub const TEST_NODE_LABEL: &str = "migros.io/test-node";

async fn forget_stale(nodes: &Api<Node>) {
    let Ok(list) = nodes
        .list(&kube::api::ListParams::default().labels(TEST_NODE_LABEL))
        .await
    else {
        return;
    };
    let cutoff = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1800);
    for node in list.items {
        let old = node
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| t.0 < cutoff);
        if old {
            let name = node.metadata.name.unwrap_or_default();
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let name = self.name.clone();
        // The test's runtime may be shutting down, and a task spawned on it would never run (that
        // left Node objects behind): delete on a runtime of its own, with a client of its own,
        // and wait for it.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let env = ControlPlane::new(&Dirs::from_env()).env();
                let client = env.client().await.map_err(|e| e.to_string())?;
                match Api::<Node>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = deleted.map_err(|_| "the deleting thread panicked".to_string())
        {
            eprintln!("could not delete test node {}: {e}", self.name);
        }
    }
}

fn ready_condition(ready: bool) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: if ready { "True" } else { "False" }.into(),
        reason: Some(
            if ready {
                "KubeletReady"
            } else {
                "KubeletNotReady"
            }
            .into(),
        ),
        message: Some("set by the test".into()),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        last_transition_time: Some(Time(Timestamp::now())),
    }
}

async fn heartbeat(client: Client, node: String) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let _ = leases
            .patch(
                &node,
                &PatchParams::apply("kube-migros-test-node").force(),
                &Patch::Apply(&lease),
            )
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A pod spec with one container `app`, bound to `node`.
pub fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            init_containers: Some(vec![Container {
                name: "init".into(),
                image: Some("localhost:5000/kube-migros/demo:test".into()),
                ..Default::default()
            }]),
            containers: vec![Container {
                name: "app".into(),
                image: Some("localhost:5000/kube-migros/demo:test".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Creates `pod` and reports it Running with `ip`, as the kubelet of its node would.
pub async fn run_pod(client: &Client, ns: &str, pod: &Pod, ip: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = pod.metadata.name.clone().unwrap_or_default();
    pods.create(&PostParams::default(), pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    mark_running(client, ns, &name, ip).await
}

/// Reports pod `name` Running with `ip`.
pub async fn mark_running(client: &Client, ns: &str, name: &str, ip: &str) -> Pod {
    let status = PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP { ip: ip.into() }]),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("mark pod {name} Running: {e}"))
}

/// Plays the kubelet of the API nodes for replacement pods (those a migration created, marked with
/// `migros.io/migration-uid`): reports them Running with the IP the migration reserved. It watches
/// the namespace's pods, as a kubelet watches its node's. Runs until aborted.
pub async fn report_replacements_running(client: Client, ns: String) {
    use futures::StreamExt;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    loop {
        let mut events =
            kube::runtime::watcher(pods.clone(), kube::runtime::watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let (Ok(kube::runtime::watcher::Event::Apply(pod))
            | Ok(kube::runtime::watcher::Event::InitApply(pod))) = event
            else {
                continue;
            };
            let annotations = pod.metadata.annotations.clone().unwrap_or_default();
            let replacement = annotations.contains_key("migros.io/migration-uid");
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            let bound = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some();
            if replacement
                && bound
                && phase.as_deref() != Some("Running")
                && pod.metadata.deletion_timestamp.is_none()
            {
                let ip = annotations
                    .get("migros.io/pod-ip")
                    .cloned()
                    .unwrap_or_else(|| "10.244.255.1".into());
                let name = pod.metadata.name.clone().unwrap_or_default();
                let _ = mark_running_quietly(&client, &ns, &name, &ip).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn mark_running_quietly(
    client: &Client,
    ns: &str,
    name: &str,
    ip: &str,
) -> Result<Pod, kube::Error> {
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
}

/// Plays the kubelet of the API nodes for every pod of `ns` bound to one of `nodes`: reports it
/// Running and Ready (a replacement with the IP its migration reserved, any other pod with a fresh address
/// of 10.77.0.0/16) and removes a pod being deleted, as a kubelet does once its containers are
/// stopped. Runs until aborted.
pub async fn play_kubelets(client: Client, ns: String, nodes: Vec<String>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut next: u32 = 1;
    loop {
        for pod in pods
            .list(&kube::api::ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            if !node.is_some_and(|n| nodes.contains(&n)) {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                continue;
            }
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            // Another stand-in may have reported it Running without its conditions.
            if status.phase.as_deref() == Some("Running") && ready {
                continue;
            }
            let annotations = pod.metadata.annotations.clone().unwrap_or_default();
            let ip = status
                .pod_ip
                .clone()
                .or_else(|| annotations.get("migros.io/pod-ip").cloned())
                .unwrap_or_else(|| {
                    next += 1;
                    format!("10.77.{}.{}", next / 250, next % 250 + 1)
                });
            let now = Time(Timestamp::now());
            let ready =
                |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now});
            let status = json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [ready("Ready"), ready("ContainersReady")],
            }});
            let _ = pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
