//! The demo workload on the sandbox cluster, as the demo and the live tests drive it: its pods,
//! reading its state, and the agents it is migrated by. Single checks: callers poll them.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Api, Client, api::PostParams};
use tokio::io::AsyncReadExt;

use sandbox::{bridge::BRIDGE_IP, controlplane::Env};

/// The workload's state as its status port reports it (`id=... counter=... received=...`).
pub type State = BTreeMap<String, String>;

/// Reads the workload's state at `ip:8080` (from the host, over the bridge), within a second.
pub async fn state(ip: Ipv4Addr) -> Option<State> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect((ip, 8080)).await.ok()?;
        let mut line = String::new();
        s.read_to_string(&mut line).await.ok()?;
        let map: State = line
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

/// The workload's check of every page of its touched memory (`serve --verify :8081`):
/// `memok=<bool> pages=N bad=N`.
pub async fn verify_memory(ip: Ipv4Addr) -> Result<String, String> {
    let read = async {
        let mut c = tokio::net::TcpStream::connect((ip, 8081)).await?;
        let mut line = String::new();
        c.read_to_string(&mut line).await?;
        Ok::<_, std::io::Error>(line.trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .map_err(|_| format!("{ip}:8081 did not answer"))?
        .map_err(|e| format!("{ip}:8081: {e}"))
}

/// A number of the state (0 when missing).
pub fn num(s: &State, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A pod of one container `app` running `image` with `args` on `node`.
pub fn pod(
    image: &str,
    name: &str,
    node: &str,
    args: serde_json::Value,
    labels: serde_json::Value,
    limits: serde_json::Value,
) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": image, "args": args,
                                                   "resources": {"limits": limits}}]}
    }))
    .unwrap_or_default()
}

/// Pod `name` if it runs and has an IP (and, with `not_uid`, is not that pod any more).
pub async fn running(pods: &Api<Pod>, name: &str, not_uid: Option<&str>) -> Option<Pod> {
    let p = pods.get(name).await.ok()?;
    let s = p.status.clone()?;
    let fresh = not_uid.is_none() || p.metadata.uid.as_deref() != not_uid;
    (fresh && s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(p)
}

pub fn ip_of(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

pub fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Whether `count` agents announced themselves with a Lease in `namespace`.
pub async fn agents_announced(client: &Client, namespace: &str, count: usize) -> bool {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = leases.list(&Default::default()).await else {
        return false;
    };
    let prefix = crds::discovery::LEASE_PREFIX;
    list.items
        .iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .count()
        == count
}

/// The admin kubeconfig pointed at the API server's bridge address, for processes inside the
/// nodes (they cannot reach the host's loopback).
pub fn node_kubeconfig(env: &Env) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(&env.kubeconfig)?
        .replace("https://127.0.0.1:", &format!("https://{BRIDGE_IP}:")))
}

/// Polls `probe` every 100 ms until it gives a value; fails naming `what` after `timeout`.
pub async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the peer of a workload (the demo's `stream`) judged: read when every record it had sent
/// when asked is answered.
#[derive(Debug, Clone)]
pub struct PeerJudgement {
    /// The peer process (random per start).
    pub id: String,
    /// Answers that came out of order (lost or repeated records).
    pub gaps: u64,
    /// The longest time between two answers, ms.
    pub longest_pause_ms: u64,
    /// Every time between two answers longer than 100 ms, ms, the latest last (the last 32).
    pub pauses_ms: Vec<u64>,
}

/// Waits until the peer pod `peer` has every record it sent so far answered, and answers what it
/// judged on its own clock. A status without the fields is an error, not a zero.
pub async fn peer_judgement(pods: &Api<Pod>, peer: &str) -> anyhow::Result<PeerJudgement> {
    // The kubelet reports the pod's IP up to a status period after the peer runs.
    let ip = until(
        &format!("peer {peer}'s IP"),
        Duration::from_secs(60),
        || async { pods.get(peer).await.ok().as_ref().and_then(ip_of) },
    )
    .await?;
    let field = |s: &State, key: &str| -> anyhow::Result<u64> {
        s.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("peer {peer}'s status has no {key}: {s:?}"))
    };
    let now = until(
        &format!("peer {peer}'s status"),
        Duration::from_secs(30),
        || state(ip),
    )
    .await?;
    let sent = field(&now, "counter")?;
    let judged = until(
        &format!("peer {peer}'s {sent} records to be answered"),
        Duration::from_secs(90),
        || async move {
            state(ip).await.filter(|s| {
                s.get("answered")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|answered| answered >= sent)
            })
        },
    )
    .await?;
    let pauses = judged
        .get("pauses_ms")
        .ok_or_else(|| anyhow::anyhow!("peer {peer}'s status has no pauses_ms: {judged:?}"))?;
    Ok(PeerJudgement {
        id: judged
            .get("id")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("peer {peer}'s status has no id: {judged:?}"))?,
        gaps: field(&judged, "gaps")?,
        longest_pause_ms: field(&judged, "maxgap_ms")?,
        pauses_ms: pauses
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?,
    })
}

/// Starts the demo workload as an RDMA pod `app` on node-1 (it asks for an `rdma/rxe` device and
/// keeps `touch` of memory written, e.g. `16Mi`) and a peer `peer` on node-3 that streams numbered
/// records to it over one TCP connection; answers the workload's pod and its state once the
/// stream flows.
pub async fn start_with_peer(
    pods: &Api<Pod>,
    image: &str,
    names: (&str, &str),
    touch: Option<&str>,
) -> anyhow::Result<(Pod, State)> {
    start_with_peer_env(pods, image, names, touch, &[]).await
}

/// [`start_with_peer`], the workload's container with these environment variables (a mark its
/// process carries wherever it is restored: `/proc/<pid>/environ`).
pub async fn start_with_peer_env(
    pods: &Api<Pod>,
    image: &str,
    (app, peer): (&str, &str),
    touch: Option<&str>,
    env: &[(&str, &str)],
) -> anyhow::Result<(Pod, State)> {
    let touch: Vec<&str> = touch.iter().flat_map(|t| ["--touch", *t]).collect();
    start_with_peer_args(pods, image, (app, peer), &touch, env).await
}

/// [`start_with_peer_env`], with these arguments of `serve` besides its status and listen ports
/// (`--touch 256Mi --verify :8081`, ...).
pub async fn start_with_peer_args(
    pods: &Api<Pod>,
    image: &str,
    (app, peer): (&str, &str),
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(Pod, State)> {
    // The kubelet admits a pod bound to its node at once: the agent's device plugin must have
    // registered its devices first, or the pod fails its admission.
    sandbox::kubelets::wait_rxe(
        &pods.clone().into_client(),
        &["node-1"],
        Duration::from_secs(60),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut args = vec!["serve", "--status", ":8080", "--listen", ":9000"];
    args.extend(extra);
    let mut workload = pod(
        image,
        app,
        "node-1",
        serde_json::json!(args),
        serde_json::json!({"migros.io/migratable": "true", "migros.io/rdma": "true"}),
        serde_json::json!({"rdma/rxe": "1"}),
    );
    if let Some(container) = workload
        .spec
        .as_mut()
        .and_then(|s| s.containers.first_mut())
    {
        container.env = Some(
            env.iter()
                .map(|(name, value)| k8s_openapi::api::core::v1::EnvVar {
                    name: (*name).to_string(),
                    value: Some((*value).to_string()),
                    ..Default::default()
                })
                .collect(),
        );
    }
    pods.create(&PostParams::default(), &workload).await?;
    let source = until(
        &format!("pod {app} to run"),
        Duration::from_secs(180),
        || running(pods, app, None),
    )
    .await?;
    let ip = ip_of(&source).ok_or_else(|| anyhow::anyhow!("pod {app} has no IPv4 address"))?;
    let streamer = pod(
        image,
        peer,
        "node-3",
        serde_json::json!(["stream", "--to", format!("{ip}:9000"), "--status", ":8080"]),
        serde_json::json!({}),
        serde_json::json!({}),
    );
    pods.create(&PostParams::default(), &streamer).await?;
    let before = until(
        "the workload to receive the peer's stream",
        Duration::from_secs(120),
        || async move {
            state(ip)
                .await
                .filter(|s| num(s, "received") > 64 * 20 && num(s, "counter") > 50)
        },
    )
    .await?;
    Ok((source, before))
}

/// The manifest of PodMigration `name` of pod `pod` in `ns`, to `target` (anywhere when `None`),
/// with `extra` spec lines (each `  key: value\n`).
pub fn migration_manifest(
    ns: &str,
    name: &str,
    pod: &str,
    target: Option<&str>,
    extra: &str,
) -> String {
    let target = target
        .map(|t| format!("  targetNode: {t}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: migros.io/v1alpha1\nkind: PodMigration\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  podName: {pod}\n{target}{extra}"
    )
}

/// Writes `manifest` to `path` and runs `kubectl apply -f` on it, as a user would; returns
/// kubectl's output.
pub fn kubectl_apply(env: &Env, path: &std::path::Path, manifest: &str) -> anyhow::Result<String> {
    std::fs::write(path, manifest)?;
    let out = std::process::Command::new(env.kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .arg("apply")
        .arg("-f")
        .arg(path)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl apply -f {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespace `ns` of an earlier run, if there is one, and waits until it is gone: its
/// PodMigrations' finalizers are lifted (no operator may run to lift them) and pods stuck
/// terminating on Node objects without a kubelet are force-deleted.
pub async fn delete_namespace(client: &Client, ns: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(ns).await?.is_none() {
        return Ok(());
    }
    let pms: Api<crds::PodMigration> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    for pm in pms.list(&ListParams::default()).await?.items {
        let name = pm.metadata.name.unwrap_or_default();
        let _ = pms
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    until(
        &format!("namespace {ns} to go"),
        Duration::from_secs(300),
        || async {
            let _ = pods
                .delete_collection(
                    &DeleteParams::default().grace_period(0),
                    &ListParams::default(),
                )
                .await;
            namespaces.get_opt(ns).await.ok()?.is_none().then_some(())
        },
    )
    .await
}

/// Namespace `ns`, made anew (see [`delete_namespace`]).
pub async fn fresh_namespace(client: &Client, ns: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    delete_namespace(client, ns).await?;
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await?;
    Ok(())
}
