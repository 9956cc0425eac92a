//! The live demo (`cargo run -p e2e -- demo`): brings up the sandbox cluster, runs kube-migros
//! (the operator as a process on this machine, the node agent inside each node), starts the demo
//! workload with a peer streaming to it over TCP from another node, and moves it node-1 -> node-2
//! -> node-3 by `kubectl apply` of PodMigrations, printing a timeline of each move and the
//! workload's state, IP and peer connection before and after.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crds::{Phase, PodMigration};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tokio::io::AsyncReadExt;

use crate::{
    Dirs, agents, binaries, cluster,
    controlplane::Env,
    fixtures::Certificates,
    install,
    nodes::{BRIDGE_IP, Nodes},
};

/// The demo's namespace (made anew by every run).
pub const NAMESPACE: &str = "kube-migros-demo";

fn say(line: impl AsRef<str>) {
    eprintln!("{}", line.as_ref());
}

/// The demo workload's status line, as key=value pairs.
async fn workload(ip: Ipv4Addr) -> Option<BTreeMap<String, String>> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect((ip, 8080)).await.ok()?;
        let mut line = String::new();
        s.read_to_string(&mut line).await.ok()?;
        let map: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
}

fn num(s: &BTreeMap<String, String>, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn show(s: &BTreeMap<String, String>) -> String {
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    format!(
        "process {} counter {} received {} B on {} connection(s), records lost or repeated: {}",
        get("id"),
        get("counter"),
        get("received"),
        get("conns"),
        get("gaps")
    )
}

async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Processes the demo started; stopped when dropped.
struct Running {
    operator: Option<Child>,
    nodes: Nodes,
    cluster_nodes: Vec<crate::nodes::Node>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut op) = self.operator.take() {
            let _ = op.kill();
            let _ = op.wait();
        }
        for node in &self.cluster_nodes {
            let _ = self.nodes.stop_all(node, "node-agent");
        }
    }
}

async fn fresh_namespace(client: &Client) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(NAMESPACE).await?.is_some() {
        // PodMigrations of an earlier run keep a finalizer that no operator will lift now.
        let pms: Api<PodMigration> = Api::namespaced(client.clone(), NAMESPACE);
        for pm in pms.list(&Default::default()).await?.items {
            let name = pm.metadata.name.unwrap_or_default();
            let patch = serde_json::json!({"metadata": {"finalizers": null}});
            let _ = pms
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
        let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
        until(
            "the previous demo namespace to go",
            Duration::from_secs(120),
            || async {
                namespaces
                    .get_opt(NAMESPACE)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await?;
    }
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    Ok(())
}

fn pod(
    image: &str,
    name: &str,
    node: &str,
    args: serde_json::Value,
    labels: serde_json::Value,
    limits: serde_json::Value,
) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": image, "args": args,
                                                   "resources": {"limits": limits}}]}
    }))?)
}

async fn running(pods: &Api<Pod>, name: &str, not_uid: Option<String>) -> anyhow::Result<Pod> {
    until(
        &format!("pod {name} to run"),
        Duration::from_secs(120),
        || {
            let (pods, not_uid) = (pods.clone(), not_uid.clone());
            async move {
                let p = pods.get(name).await.ok()?;
                let s = p.status.clone()?;
                let fresh = not_uid.is_none() || p.metadata.uid != not_uid;
                (fresh && s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(p)
            }
        },
    )
    .await
}

fn ip_of(pod: &Pod) -> anyhow::Result<Ipv4Addr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_ref())
        .context("the pod has no IP")?
        .parse()
        .context("the pod IP")
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn kubectl(env: &Env, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env.kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(args)
        .status()
        .with_context(|| format!("running {}", env.kubectl().display()))?;
    if !status.success() {
        bail!("kubectl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs the demo.
pub async fn run(dirs: &Dirs) -> anyhow::Result<()> {
    let started = Instant::now();
    say(
        "==> the sandbox cluster: Kubernetes control plane, three nodes (kubelet, containerd, runc, CRIU), registry",
    );
    say(
        "    (the first run builds Kubernetes and the node image: several minutes; later runs take seconds)",
    );
    let cluster = cluster::up(dirs).await?;
    let env = cluster.env.clone();
    let client = env.client().await?;
    say(format!(
        "    ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    install::apply_chart_crds(&client).await?;
    fresh_namespace(&client).await?;

    say("==> kube-migros: the operator on this machine, the node agent in each node (mutual TLS)");
    let agent_binary = binaries::ensure("node-agent", "node-agent")?;
    let operator_binary = binaries::ensure("operator", "operator")?;
    let certs = Certificates::generate();
    let nodes = Nodes::new(dirs);
    let mut running_procs = Running {
        operator: None,
        nodes: nodes.clone(),
        cluster_nodes: cluster.nodes.clone(),
    };
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig)?
        .replace("https://127.0.0.1:", &format!("https://{BRIDGE_IP}:"));
    for node in &cluster.nodes {
        certs.write_agent(&nodes.host_dir(node).join("tls"));
        let options = agents::AgentOptions {
            args: Vec::new(),
            announce: Some((NAMESPACE.into(), kubeconfig.clone())),
        };
        agents::start(&nodes, node, &agent_binary, &options)?;
    }
    let log_dir = dirs.state.join("demo");
    std::fs::create_dir_all(&log_dir)?;
    let log = std::fs::File::create(log_dir.join("operator.log"))?;
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    running_procs.operator = Some(
        Command::new(&operator_binary)
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "info")
            .args([
                "--namespace",
                NAMESPACE,
                "--watch-namespace",
                NAMESPACE,
                "--identity",
                "demo",
            ])
            .arg(format!("--tls-dir={}", certs.operator_dir().display()))
            .arg(format!("--http-addr={http}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the operator")?,
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    until(
        "the agents to announce themselves",
        Duration::from_secs(60),
        || async {
            let list = leases.list(&Default::default()).await.ok()?;
            let agents = list
                .items
                .iter()
                .filter(|l| {
                    l.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("kube-migros-agent-"))
                })
                .count();
            (agents == cluster.nodes.len()).then_some(())
        },
    )
    .await?;
    say(format!(
        "    operator log: {}",
        log_dir.join("operator.log").display()
    ));

    say(
        "==> the workload: the demo program on node-1 (an RDMA pod: it asks for an rdma/rxe device),",
    );
    say("    and a peer on node-3 streaming numbered records to it over one TCP connection");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let demo = cluster.images.get("demo").context("no demo image")?;
    let app = pod(
        demo,
        "app",
        "node-1",
        serde_json::json!([
            "serve", "--status", ":8080", "--listen", ":9000", "--touch", "16Mi"
        ]),
        serde_json::json!({"migros.io/migratable": "true", "migros.io/rdma": "true"}),
        serde_json::json!({"rdma/rxe": "1"}),
    )?;
    pods.create(&PostParams::default(), &app).await?;
    let mut current = running(&pods, "app", None).await?;
    let ip = ip_of(&current)?;
    let peer = pod(
        demo,
        "peer",
        "node-3",
        serde_json::json!(["stream", "--to", format!("{ip}:9000"), "--status", ":8080"]),
        serde_json::json!({}),
        serde_json::json!({}),
    )?;
    pods.create(&PostParams::default(), &peer).await?;
    let mut before = until(
        "the workload to receive the peer's stream",
        Duration::from_secs(60),
        || async move { workload(ip).await.filter(|s| num(s, "received") > 0) },
    )
    .await?;
    say(format!(
        "    app runs on node-1 with IP {ip}: {}",
        show(&before)
    ));

    let pms: Api<PodMigration> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, target) in [("move-1", "node-2"), ("move-2", "node-3")] {
        let from = node_of(&current);
        let manifest = format!(
            "apiVersion: migros.io/v1alpha1\nkind: PodMigration\nmetadata:\n  name: {name}\nspec:\n  podName: app\n  targetNode: {target}\n  compression: Zstd\n"
        );
        let path: PathBuf = log_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, &manifest)?;
        say(format!(
            "\n==> kubectl apply -f {}   (app: {from} -> {target})",
            path.display()
        ));
        kubectl(
            &env,
            &["apply", "-n", NAMESPACE, "-f", &path.display().to_string()],
        )?;
        let applied = Instant::now();
        let mut seen: Option<Phase> = None;
        let done = loop {
            let pm = pms.get(name).await?;
            let status = pm.status.clone().unwrap_or_default();
            if status.phase != seen {
                seen = status.phase;
                let progress = status
                    .progress
                    .map(|p| format!(" ({} of {} bytes)", p.bytes_transferred, p.bytes_total))
                    .unwrap_or_default();
                say(format!(
                    "    +{:>6.2} s  {:<13} {}{progress}",
                    applied.elapsed().as_secs_f64(),
                    seen.map(|p| format!("{p:?}")).unwrap_or_default(),
                    status.message.clone().unwrap_or_default()
                ));
            }
            if seen.is_some_and(|p| p.is_final()) {
                break pm;
            }
            if applied.elapsed() > Duration::from_secs(300) {
                bail!("{name} did not end within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let status = done.status.clone().unwrap_or_default();
        if status.phase != Some(Phase::Succeeded) {
            for node in &cluster.nodes {
                say(format!(
                    "--- agent of {}:\n{}",
                    node.name,
                    agents::log_tail(&nodes, node, 20)
                ));
            }
            bail!(
                "{name} ended {:?}: {}",
                status.phase,
                status.message.unwrap_or_default()
            );
        }
        kubectl(&env, &["get", "pm", name, "-n", NAMESPACE])?;
        let moved = running(&pods, "app", current.metadata.uid.clone()).await?;
        let received = num(&before, "received");
        let after = until(
            "the peer's stream to go on",
            Duration::from_secs(60),
            || async move {
                workload(ip)
                    .await
                    .filter(|s| num(s, "received") > received + 64 * 20)
            },
        )
        .await?;
        let t = status.timings.unwrap_or_default();
        let ms = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        say(format!(
            "    timings: checkpoint {}, transfer {}, restore {}; downtime {}; checkpoint {} bytes",
            ms(t.checkpoint_ms),
            ms(t.transfer_ms),
            ms(t.restore_ms),
            ms(t.downtime_ms),
            status.checkpoint.map(|c| c.bytes).unwrap_or_default()
        ));
        say(format!("    before: on {from}, IP {ip}, {}", show(&before)));
        say(format!(
            "    after:  on {}, IP {}, {}",
            node_of(&moved),
            ip_of(&moved)?,
            show(&after)
        ));
        say(format!(
            "    same process: {}; IP kept: {}; the peer's longest pause so far: {} ms",
            if after.get("id") == before.get("id") {
                "yes"
            } else {
                "NO"
            },
            if ip_of(&moved)? == ip { "yes" } else { "NO" },
            after.get("maxgap_ms").cloned().unwrap_or_default()
        ));
        current = moved;
        before = after;
    }

    drop(running_procs);
    say(format!(
        "\nDone in {:.0} s. The operator and the agents are stopped; the cluster stays up:\n\
         eval \"$(cargo run -q -p e2e -- control-plane env)\"; kubectl get pm,pods -n {NAMESPACE} -o wide\n\
         cargo run -p e2e -- cluster down     # stops everything and removes its state",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
