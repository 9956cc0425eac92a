//! The sandbox cluster: real kubelets on the three sandbox nodes register Ready Nodes of the
//! sandbox control plane; the scheduler places a pod, the kubelet runs it through containerd on
//! the pod network (an address of its node's range, reachable over the bridge); taking the nodes
//! down removes their Node objects and leaves no cgroup of theirs behind. One test: it owns the
//! nodes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::PostParams};
use sandbox::{
    Dirs,
    containerd::Containerd,
    kubelets,
    nodes::{NODE_CGROUP_PARENT, Nodes},
};
use testkit::harness::{self, eventually};

#[tokio::test]
async fn kubelets_register_ready_nodes_that_run_pods_on_the_pod_network() {
    let client = harness::client().await;
    let dirs = Dirs::from_env();
    // `cluster up` itself (its errors carry the kubelets' logs).
    let cluster = sandbox::cluster::up(&dirs)
        .await
        .expect("the sandbox cluster");
    let (nodes, wanted, images) = (Nodes::new(&dirs), cluster.nodes, cluster.images);

    let api: Api<Node> = Api::all(client.clone());
    for node in &wanted {
        let n = api.get(&node.name).await.unwrap();
        let status = n.status.unwrap();
        let info = status.node_info.unwrap();
        assert_eq!(info.kubelet_version, sandbox::k8s::K8S_VERSION);
        let runtime = match node.containerd {
            Containerd::Debian => "containerd://2.1.".to_string(),
            Containerd::Upstream => format!(
                "containerd://{}",
                sandbox::containerd::CONTAINERD.1.trim_start_matches('v')
            ),
        };
        assert!(
            info.container_runtime_version.starts_with(&runtime),
            "{} on {}",
            info.container_runtime_version,
            node.name
        );
        let addresses = status.addresses.unwrap_or_default();
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == node.ip().to_string()),
            "{addresses:?}"
        );
    }

    // The scheduler places a pod; its kubelet runs it on the pod network.
    harness::with_namespace("cluster", |client, ns| {
        let demo = images["demo"].clone();
        let wanted = wanted.clone();
        async move {
            let pods: Api<Pod> = Api::namespaced(client, &ns);
            // It asks for node-2 by its label (the agents' device plugin, which advertises
            // `rdma/rxe`, is tested with the agents: operator/tests/device_plugin.rs).
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "demo"},
                "spec": {"nodeSelector": {"kubernetes.io/hostname": "node-2"},
                         "containers": [{"name": "app", "image": demo,
                                         "args": ["serve", "--status", ":8080"]}]}
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
            let running = eventually(Duration::from_secs(60), || {
                let pods = pods.clone();
                async move {
                    let p = pods.get("demo").await.ok()?;
                    let s = p.status.clone()?;
                    (s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(p)
                }
            })
            .await;
            let node_name = running.spec.as_ref().unwrap().node_name.clone().unwrap();
            assert_eq!(
                node_name, "node-2",
                "the pod asking for node-2 went elsewhere"
            );
            let node = wanted.iter().find(|n| n.name == node_name).unwrap();
            let ip: std::net::Ipv4Addr = running.status.unwrap().pod_ip.unwrap().parse().unwrap();
            assert_eq!(
                ip.octets()[..3],
                [10, 88, node.index],
                "{ip} is not in {}'s range",
                node.name
            );
            let line = eventually(Duration::from_secs(20), || async move {
                let mut s = tokio::net::TcpStream::connect((ip, 8080)).await.ok()?;
                let mut line = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut line)
                    .await
                    .ok()?;
                line.starts_with("id=").then_some(line)
            })
            .await;
            assert!(line.contains("counter="), "{line}");
        }
    })
    .await;

    nodes.down().expect("nodes down");
    kubelets::forget(&client, &wanted)
        .await
        .expect("nodes forgotten");
    for node in &wanted {
        assert!(api.get_opt(&node.name).await.unwrap().is_none());
        for hierarchy in ["cpu", "memory", "pids", "freezer"] {
            let dir = std::path::Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(NODE_CGROUP_PARENT)
                .join(&node.name);
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }
}
