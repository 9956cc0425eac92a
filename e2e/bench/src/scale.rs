//! The control plane alone: N PodMigrations processed by the operator (the release binary) against
//! the sandbox's API server, with agents that answer at once (the scriptable test agents) on three
//! Node objects, and a stand-in kubelet reporting replacement pods Running. The operator runs as a
//! user of its own whose requests an API Priority and Fairness FlowSchema counts, so that "API
//! requests per migration" are the operator's requests only.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crds::PodMigration;
use futures::{StreamExt, TryStreamExt, stream};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sandbox::{
    Dirs,
    controlplane::{APISERVER_PORT, ControlPlane},
    install, release,
};
use testkit::{
    fixtures::{self, ApiNode, Certificates},
    testagent::TestAgent,
    workload,
};

use crate::ScaleRun;

/// The operator's user, its FlowSchema and binding.
const USER: &str = "kube-migros-bench-operator";

/// Runs `n` migrations; returns what was measured.
pub async fn run(dirs: &Dirs, n: usize) -> anyhow::Result<ScaleRun> {
    let cp = ControlPlane::new(dirs);
    let env = cp.up().await?;
    let client = env.client().await?;
    // An installed kube-migros would reconcile these PodMigrations too.
    release::retire(dirs)?;
    install::apply_chart_crds(&client).await?;
    let built = release::build_static(dirs)?;
    let ns = format!("kube-migros-scale-{n}");
    workload::fresh_namespace(&client, &ns).await?;
    ensure_identity(&client).await?;
    let certs = Certificates::generate();
    let (nodes, agents) = nodes_and_agents(&client, &ns, &certs).await?;
    let kubelet = tokio::spawn(fixtures::report_replacements_running(
        client.clone(),
        ns.clone(),
    ));
    create_pods(&client, &ns, n, &nodes).await;

    let kubeconfig = dirs.state.join(format!("bench/{USER}.kubeconfig"));
    std::fs::create_dir_all(dirs.state.join("bench"))?;
    std::fs::write(
        &kubeconfig,
        cp.user_kubeconfig(USER, &[], &format!("https://127.0.0.1:{APISERVER_PORT}"))?,
    )?;
    let log = std::fs::File::create(dirs.state.join(format!("bench/operator-{n}.log")))?;
    let mut operator = Operator::start(&built.join("operator"), &kubeconfig, &ns, &certs, log)?;
    operator.wait_leading(&client, &ns).await?;
    let requests_before = operator_requests(&client).await?;
    let kinds_before = operator.requests_by_kind().await?;

    let pms: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    create_migrations(&pms, n).await?;
    let succeeded = wait_final(&pms, n).await?;
    // A run whose migrations fail measures failing, not migrating.
    if succeeded < n {
        let failed = pms
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|pm| pm.status.as_ref().and_then(|s| s.phase) != Some(crds::Phase::Succeeded));
        bail!(
            "{succeeded} of {n} PodMigrations succeeded; one that did not: {:?}",
            failed.and_then(|pm| pm.status?.message)
        );
    }
    let all_final_ms = started.elapsed().as_secs_f64() * 1000.0;
    let requests = operator_requests(&client).await? - requests_before;
    let mut requests_by_kind = operator.requests_by_kind().await?;
    for (kind, count) in &mut requests_by_kind {
        *count = (*count - kinds_before.get(kind).copied().unwrap_or(0.0)) / n as f64;
    }
    let (rss, cpu) = usage(operator.0.id()).context("the operator's resource usage")?;

    // Clean up while the operator still lifts its finalizers.
    pms.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !pms.list(&ListParams::default()).await?.items.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    operator.stop();
    kubelet.abort();
    drop(agents);
    drop(nodes);
    workload::delete_namespace(&client, &ns).await?;
    Ok(ScaleRun {
        migrations: n,
        all_final_ms,
        succeeded,
        requests_per_migration: requests / n as f64,
        operator_peak_rss_mib: rss,
        operator_cpu_s: cpu,
        requests_by_kind,
    })
}

/// Three Node objects kept Ready, each with a test agent (those of an interrupted run of the
/// same size are deleted first).
async fn nodes_and_agents(
    client: &Client,
    ns: &str,
    certs: &Certificates,
) -> anyhow::Result<(Vec<ApiNode>, Vec<TestAgent>)> {
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let (mut nodes, mut agents) = (Vec::new(), Vec::new());
    for i in 1..=3 {
        let name = format!("{ns}-node-{i}");
        if node_api.get_opt(&name).await?.is_some() {
            node_api.delete(&name, &DeleteParams::default()).await?;
            while node_api.get_opt(&name).await?.is_some() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        nodes.push(ApiNode::create(client, &name).await);
        agents.push(TestAgent::start(client.clone(), ns, &name, &certs.agent(&name)).await);
    }
    Ok((nodes, agents))
}

/// `n` migratable pods marked Running, spread over the first two nodes.
async fn create_pods(client: &Client, ns: &str, n: usize, nodes: &[ApiNode]) {
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (client, ns, node) = (client.clone(), ns.to_string(), nodes[i % 2].name.clone());
            async move {
                let name = format!("app-{i}");
                let pod = fixtures::pod(&name, &node, &[(crds::MIGRATABLE_LABEL, "true")]);
                let ip = format!("10.244.{}.{}", i / 250, i % 250 + 2);
                fixtures::run_pod(&client, &ns, &pod, &ip).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    eprintln!(
        "bench: {n} pods running in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A PodMigration per pod, 16 created at a time.
async fn create_migrations(pms: &Api<PodMigration>, n: usize) -> anyhow::Result<()> {
    stream::iter(0..n)
        .map(|i| {
            let pms = pms.clone();
            async move {
                let pm: PodMigration = serde_json::from_value(serde_json::json!({
                    "apiVersion": "migros.io/v1alpha1", "kind": "PodMigration",
                    "metadata": {"name": format!("move-{i}")},
                    "spec": {"podName": format!("app-{i}")},
                }))?;
                pms.create(&PostParams::default(), &pm).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Waits until all `n` PodMigrations are final; answers how many succeeded. It watches them, as
/// a client would: a list of a thousand migrations every few milliseconds would load the API
/// server more than the operator does.
async fn wait_final(pms: &Api<PodMigration>, n: usize) -> anyhow::Result<usize> {
    let (store, writer) = kube::runtime::reflector::store();
    let events = kube::runtime::reflector::reflector(
        writer,
        kube::runtime::watcher(pms.clone(), kube::runtime::watcher::Config::default()),
    );
    let mut events = std::pin::pin!(events);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let phases: Vec<crds::Phase> = store
            .state()
            .iter()
            .filter_map(|pm| pm.status.as_ref()?.phase)
            .filter(|p| p.is_final())
            .collect();
        if phases.len() == n {
            return Ok(phases
                .iter()
                .filter(|p| **p == crds::Phase::Succeeded)
                .count());
        }
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => bail!("watching the PodMigrations: {e}"),
            Ok(None) => bail!("the watch of the PodMigrations ended"),
            Err(_) => bail!(
                "{} of {n} PodMigrations final after 10 minutes",
                phases.len()
            ),
        }
    }
}

/// The operator process, killed when dropped, and the address of its metrics.
struct Operator(Child, std::net::SocketAddr);

impl Operator {
    /// The release binary at `bin` as user [`USER`], one replica, reconciling namespace `ns`.
    fn start(
        bin: &std::path::Path,
        kubeconfig: &std::path::Path,
        ns: &str,
        certs: &Certificates,
        log: std::fs::File,
    ) -> anyhow::Result<Self> {
        let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .args(["--namespace", ns, "--watch-namespace", ns])
            .args(["--identity", "bench", "--lease-retry-seconds", "1"])
            // The test agents restore from checkpoint images (they offer nothing else).
            .arg("--allow-checkpoint-images")
            // What the operator itself costs per migration, not how long the queue holds them:
            // the limits on migrations in flight are lifted.
            .args([
                "--max-leaving-per-node=1000",
                "--max-arriving-per-node=1000",
            ])
            .arg("--max-in-flight=1000")
            .arg(format!("--tls-dir={}", certs.operator_dir().display()))
            .arg(format!("--http-addr={http}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the operator")?;
        Ok(Self(child, http))
    }

    /// Waits until it holds the leader Lease (it answers /ready either way).
    async fn wait_leading(&self, client: &Client, ns: &str) -> anyhow::Result<()> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let holder = leases
                .get_opt("kube-migros-operator")
                .await?
                .and_then(|l| l.spec?.holder_identity);
            if holder.as_deref() == Some("bench") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the operator did not take the leader Lease");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its API requests so far, by `VERB resource` (its metric `migros_api_requests_total`).
    async fn requests_by_kind(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut stream = tokio::net::TcpStream::connect(self.1).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        let mut kinds = BTreeMap::new();
        for line in text.lines() {
            let Some(labels) = line.strip_prefix("migros_api_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = labels.rsplit_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_string())
            };
            if let (Some(verb), Some(resource), Ok(value)) =
                (label("verb"), label("resource"), value.parse::<f64>())
            {
                kinds.insert(format!("{verb} {resource}"), value);
            }
        }
        Ok(kinds)
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Peak RSS (MiB) and CPU time (s) of process `pid`.
fn usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th after it, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc/pid/stat")?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    Ok((hwm_kib / 1024.0, ticks / 100.0))
}

/// The operator's user: a FlowSchema that counts its requests, and cluster-admin (the benchmark
/// measures the reconciler, not RBAC).
async fn ensure_identity(client: &Client) -> anyhow::Result<()> {
    let apply = |kind: &str, api_version: &str, path: String, body: serde_json::Value| {
        let client = client.clone();
        let (kind, api_version) = (kind.to_string(), api_version.to_string());
        async move {
            let mut body = body;
            body["kind"] = kind.into();
            body["apiVersion"] = api_version.into();
            let request =
                http::Request::patch(format!("{path}?fieldManager=kube-migros-bench&force=true"))
                    .header("Content-Type", "application/apply-patch+yaml")
                    .body(serde_json::to_vec(&body)?)?;
            client.request_text(request).await?;
            anyhow::Ok(())
        }
    };
    apply(
        "FlowSchema",
        "flowcontrol.apiserver.k8s.io/v1",
        format!("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas/{USER}"),
        serde_json::json!({
            "metadata": {"name": USER},
            "spec": {
                "priorityLevelConfiguration": {"name": "workload-high"},
                "matchingPrecedence": 100,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{
                    "subjects": [{"kind": "User", "user": {"name": USER}}],
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                       "clusterScope": true, "namespaces": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
                }]
            }
        }),
    )
    .await?;
    apply(
        "ClusterRoleBinding",
        "rbac.authorization.k8s.io/v1",
        format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{USER}"),
        serde_json::json!({
            "metadata": {"name": USER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]
        }),
    )
    .await?;
    Ok(())
}

/// Requests dispatched for the operator's FlowSchema so far (the API server's metrics).
async fn operator_requests(client: &Client) -> anyhow::Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_flowcontrol_dispatched_requests_total{")
                && l.contains(&format!("flow_schema=\"{USER}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}
