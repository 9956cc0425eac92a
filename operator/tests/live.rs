//! A live migration on the sandbox cluster, all parts real: the operator process, the node agent
//! in each node, kubelets, containerd, runc, CRIU, the CNI pod network and the registry. A demo
//! pod with a TCP peer on another node is moved by `kubectl apply` of a PodMigration; its process,
//! state, IP and the peer's connection survive. The one simulated part is the rxe device (counter
//! files in a per-node directory, `rdma/rxe` advertised in the Node status). One test: it owns
//! the nodes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::{net::Ipv4Addr, time::Duration};

use crds::Phase;
use e2e::{
    Dirs, agents, binaries,
    fixtures::Certificates,
    harness::{self, eventually},
    kubelets::{self, Kubelets},
    nodes::Nodes,
    registry::Registry,
};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use support::{Operator, Scenario};
use tokio::io::AsyncReadExt;

/// The demo's status line as key=value pairs.
async fn status(ip: Ipv4Addr) -> Option<std::collections::BTreeMap<String, String>> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((ip, 8080)).await.ok()?;
        let mut line = String::new();
        s.read_to_string(&mut line).await.ok()?;
        let map: std::collections::BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

fn num(s: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn running_pod(pods: &Api<Pod>, name: &str, not_uid: Option<String>) -> Pod {
    eventually(Duration::from_secs(90), || {
        let (pods, not_uid) = (pods.clone(), not_uid.clone());
        async move {
            let p = pods.get(name).await.ok()?;
            let s = p.status.clone()?;
            let fresh = not_uid.is_none() || p.metadata.uid != not_uid;
            (fresh && s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(p)
        }
    })
    .await
}

fn ip_of(pod: &Pod) -> Ipv4Addr {
    pod.status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_pod_moves_between_real_nodes_keeping_its_state_ip_and_tcp_peer() {
    let env = harness::env().await;
    let client = harness::client().await;
    harness::install_crds(&client).await;
    let dirs = Dirs::from_env();
    let nodes = Nodes::new(&dirs);
    let wanted = Nodes::named(&["node-1", "node-2", "node-3"]).unwrap();
    nodes.up(&wanted).expect("nodes up");
    let registry = Registry::new(&dirs);
    registry.up().expect("registry up");
    let images = e2e::images::ensure(&dirs, &registry).expect("images");
    let kubelets = Kubelets::new(&dirs);
    for node in &wanted {
        kubelets.start(node).expect("kubelet");
    }
    kubelets::wait_ready(&client, &wanted, Duration::from_secs(120))
        .await
        .expect("nodes Ready");
    for node in &wanted {
        kubelets::advertise_rxe(&client, node, 16).await.unwrap();
    }
    let agent_binary = binaries::ensure("node-agent", "node-agent").expect("agent built");
    // The agents announce themselves with the admin's credentials, at the API server's bridge
    // address (the nodes cannot reach the host's loopback).
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig).unwrap().replace(
        "https://127.0.0.1:",
        &format!("https://{}:", e2e::nodes::BRIDGE_IP),
    );

    harness::with_namespace("live", |client, ns| {
        let (nodes, wanted, kubeconfig) = (nodes.clone(), wanted.clone(), kubeconfig.clone());
        let (agent_binary, demo) = (agent_binary.clone(), images["demo"].clone());
        async move {
            let certs = Certificates::generate();
            let mut children = Vec::new();
            for node in &wanted {
                certs.write_agent(&nodes.host_dir(node).join("tls"));
                let options = agents::AgentOptions {
                    args: Vec::new(),
                    announce: Some((ns.clone(), kubeconfig.clone())),
                };
                children.push(agents::start(&nodes, node, &agent_binary, &options).unwrap());
            }
            let mut operator = Operator::start(&ns, "live-1", &certs).await;
            operator.wait_ready().await;
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let pod = |name: &str, node: &str, args: serde_json::Value, labels: serde_json::Value| {
                serde_json::from_value::<Pod>(serde_json::json!({
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"nodeName": node, "containers": [{
                        "name": "app", "image": demo, "args": args}]}
                }))
                .unwrap()
            };
            let app = pod(
                "app",
                "node-1",
                serde_json::json!(["serve", "--status", ":8080", "--listen", ":9000"]),
                serde_json::json!({"migros.io/migratable": "true", "app": "demo"}),
            );
            pods.create(&PostParams::default(), &app).await.unwrap();
            let app = running_pod(&pods, "app", None).await;
            let ip = ip_of(&app);
            let peer = pod(
                "peer",
                "node-3",
                serde_json::json!(["stream", "--to", format!("{ip}:9000"), "--status", ":8080"]),
                serde_json::json!({}),
            );
            pods.create(&PostParams::default(), &peer).await.unwrap();
            let before = eventually(Duration::from_secs(30), || async move {
                status(ip).await.filter(|s| num(s, "received") > 0 && num(s, "counter") > 50)
            })
            .await;

            let manifest = format!(
                "apiVersion: migros.io/v1alpha1\nkind: PodMigration\nmetadata:\n  name: hop-1\n  namespace: {ns}\nspec:\n  podName: app\n  targetNode: node-2\n"
            );
            let path = std::env::temp_dir().join(format!("{ns}-hop-1.yaml"));
            std::fs::write(&path, manifest).unwrap();
            let env = harness::env().await;
            let out = harness::kubectl(&env, &["apply", "-f", &path.display().to_string()]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

            let done = Scenario::wait_phase_in(
                &client,
                &ns,
                "hop-1",
                Phase::Succeeded,
                Duration::from_secs(180),
            );
            let done = match std::panic::AssertUnwindSafe(done).catch_unwind().await {
                Ok(pm) => pm,
                Err(panic) => {
                    for node in &wanted {
                        eprintln!("--- agent {}:\n{}", node.name, agents::log_tail(&nodes, node, 30));
                    }
                    std::panic::resume_unwind(panic);
                }
            };
            let moved = running_pod(&pods, "app", app.metadata.uid.clone()).await;
            assert_eq!(moved.spec.as_ref().unwrap().node_name.as_deref(), Some("node-2"));
            assert_eq!(ip_of(&moved), ip, "the pod IP changed");
            let received_before = num(&before, "received");
            let after = eventually(Duration::from_secs(30), || async move {
                status(ip).await.filter(|s| num(s, "received") > received_before + 64 * 50)
            })
            .await;
            assert_eq!(after.get("id"), before.get("id"), "not the same process");
            assert!(num(&after, "counter") >= num(&before, "counter"));
            assert_eq!(num(&after, "conns"), 1, "the peer reconnected: {after:?}");
            assert_eq!(num(&after, "gaps"), 0, "records lost or repeated: {after:?}");
            eprintln!(
                "hop-1: {:?}; peer's longest pause {} ms",
                done.status.as_ref().map(|s| &s.timings),
                after.get("maxgap_ms").cloned().unwrap_or_default()
            );

            operator.kill();
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    })
    .await;

    nodes.down().expect("nodes down");
    kubelets::forget(&client, &wanted)
        .await
        .expect("nodes forgotten");
}
