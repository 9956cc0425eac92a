//! The demo workload on the sandbox cluster, as the demo and the live tests drive it: its pods,
//! reading its state, and the agents it is migrated by. Single checks: callers poll them.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Api, Client};
use tokio::io::AsyncReadExt;

use crate::{controlplane::Env, nodes::BRIDGE_IP};

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
    let prefix = agent_api::discovery::LEASE_PREFIX;
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
