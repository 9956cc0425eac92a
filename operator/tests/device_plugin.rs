//! RDMA pods own their rxe block from their first start: the node agents' device plugin on the
//! sandbox's real kubelets (docs/node-agent.md#device-plugin, docs/rxe-blocks.md). Everything is
//! real (the operator process, the agents in the nodes, kubelets, containerd, runc, CRIU) but the
//! rxe counters, which are files in a per-node directory; the plugin mounts them into RDMA
//! containers, where the demo workload takes its queue-pair and memory-region numbers from them
//! as rxe would hand them out (`--rxe`), and reports them. One test: it owns the nodes.
//!
//! - `rdma/rxe` is advertised by the plugin alone (node-3 runs an agent without it), pods asking
//!   for it go only where it is, and a node's free devices go down and up as pods come and go;
//! - three RDMA pods started at once on one node each took their numbers from the start of their
//!   own block (the workload's numbers and the plugin's records say so);
//! - a pod whose block cannot be had (its namespace's share is taken) does not start, its events
//!   say why, and it starts once a block is free;
//! - a pod that took numbers past its block is reported (Event, metric) and refused as a
//!   migration source, untouched;
//! - a migration afterwards restores each of the three with its block;
//! - the agent restarted, then the kubelet restarted: the plugin registers again and starts go on;
//! - the two RDMA containers of one pod share its block, the second after the first.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use crds::{Phase, PodMigration, RxeBlock};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use sandbox::{
    Dirs, agents,
    kubelets::{self, Kubelets},
    nodes::{Node, Nodes},
};
use support::{Operator, Options, RealNodes};
use testkit::{
    fixtures::Certificates,
    harness,
    workload::{self, State, until},
};

/// Devices the plugin advertises on node-1 and node-2; node-3 runs no plugin.
const DEVICES: [u32; 2] = [3, 8];
/// rxe blocks the test's namespace may hold (the operator's `--rxe-blocks-per-namespace`).
const BLOCKS_PER_NAMESPACE: usize = 5;
/// Numbers each workload takes at its start.
const QPS: u32 = 3;
const MRS: u32 = 2;

/// The test's view of the cluster.
struct Rdma {
    client: Client,
    ns: String,
    pods: Api<Pod>,
    nodes: Nodes,
    wanted: Vec<Node>,
    demo: String,
}

impl Rdma {
    /// An RDMA pod of the demo workload that takes `qps` queue-pair numbers at its start, placed
    /// as `on` says.
    async fn create(&self, name: &str, on: On<'_>, qps: u32) {
        let (node_name, selector) = match on {
            On::Bound(node) => (Some(node), None),
            On::Selected(node) => (
                None,
                Some(serde_json::json!({"kubernetes.io/hostname": node})),
            ),
            On::Anywhere => (None, None),
        };
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name,
                         "labels": {"migros.io/migratable": "true", "migros.io/rdma": "true"}},
            "spec": {"nodeName": node_name,
                     "nodeSelector": selector,
                     "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": self.demo,
                                     "args": ["serve", "--status", ":8080",
                                              "--rxe", agents::RXE_COUNTERS_MOUNT,
                                              "--qps", qps.to_string(), "--mrs", MRS.to_string()],
                                     "resources": {"limits": {"rdma/rxe": "1"}}}]}
        }))
        .unwrap();
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    /// Waits until pod `name` runs (and is not `not_uid`), and answers it with the workload's
    /// status.
    async fn running(&self, name: &str, not_uid: Option<&str>) -> (Pod, State) {
        let found = until(
            &format!("pod {name} to run and report"),
            Duration::from_secs(120),
            || async {
                let pod = workload::running(&self.pods, name, not_uid).await?;
                let state = workload::state(workload::ip_of(&pod)?).await?;
                Some((pod, state))
            },
        )
        .await;
        match found {
            Ok(found) => found,
            Err(e) => {
                let events = self.events(name).await;
                panic!("{e}; its events: {events:?}\n{}", self.logs());
            }
        }
    }

    /// An RDMA pod of two containers on `node`, each taking [`QPS`] numbers (status on 8080 and
    /// 8081).
    async fn two_containers(&self, name: &str, node: &str) {
        let container = |c: &str, port: u16| {
            serde_json::json!({"name": c, "image": self.demo,
                "args": ["serve", "--status", format!(":{port}"),
                         "--rxe", agents::RXE_COUNTERS_MOUNT,
                         "--qps", QPS.to_string(), "--mrs", MRS.to_string()],
                "resources": {"limits": {"rdma/rxe": "1"}}})
        };
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"migros.io/rdma": "true"}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [container("a", 8080), container("b", 8081)]}
        }))
        .unwrap();
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    async fn delete(&self, name: &str) {
        self.pods
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        until(
            &format!("pod {name} to be gone"),
            Duration::from_secs(60),
            || async { self.pods.get_opt(name).await.ok()?.is_none().then_some(()) },
        )
        .await
        .unwrap();
    }

    /// (reason, message) of the Events of pod `name`, oldest first.
    async fn events(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .unwrap();
        list.items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    /// The block of pod `name`.
    async fn block(&self, name: &str) -> crds::RxeBlockSpec {
        let blocks: Api<RxeBlock> = Api::all(self.client.clone());
        until(
            &format!("the rxe block of {name}"),
            Duration::from_secs(30),
            || async {
                let list = blocks.list(&ListParams::default()).await.ok()?;
                list.items
                    .into_iter()
                    .map(|b| b.spec)
                    .filter(|s| s.pod.namespace == self.ns && s.pod.name == name)
                    .min_by_key(|s| s.index)
            },
        )
        .await
        .unwrap()
    }

    /// The start records of the agent on node `i` (its `/rxe/starts`) of the pods of this test.
    async fn starts(&self, i: usize) -> Vec<serde_json::Value> {
        let body = http_get((self.wanted[i].ip(), 9465), "/rxe/starts").await;
        let all: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        all.into_iter()
            .filter(|s| s["namespace"] == self.ns.as_str())
            .collect()
    }

    /// The agent on node `i`'s latest start record of pod `name`, once it is done (the agent
    /// records a start when it sets the counters, and again when it lets go of them, after the
    /// container settled).
    async fn record(&self, i: usize, name: &str, how: &str) -> serde_json::Value {
        let found = until(
            &format!("a start record of {name} by {how}"),
            Duration::from_secs(30),
            || async {
                self.starts(i)
                    .await
                    .into_iter()
                    .rev()
                    .find(|s| s["pod"] == name)
                    .filter(|s| s["how"] == how && s["done"] == true)
            },
        )
        .await;
        match found {
            Ok(found) => found,
            Err(e) => panic!("{e}: {:#?}", self.starts(i).await),
        }
    }

    async fn metrics(&self, i: usize) -> String {
        http_get((self.wanted[i].ip(), 9465), "/metrics").await
    }

    /// The free `rdma/rxe` devices of `node` as the scheduler counts them: allocatable less the
    /// requests of the pods bound there.
    async fn free(&self, node: &str) -> i64 {
        let allocatable = kubelets::rxe_allocatable(&self.client, node).await.unwrap();
        let all: Api<Pod> = Api::all(self.client.clone());
        let bound = all
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .unwrap();
        let requested: i64 = bound
            .items
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
            .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get("rdma/rxe"))
            .filter_map(|q| q.0.parse::<i64>().ok())
            .sum();
        allocatable - requested
    }

    /// Creates PodMigration `name` of pod `pod` to `target`.
    async fn migrate(&self, name: &str, pod: &str, target: &str) {
        let pm: PodMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "migros.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": name},
            "spec": {"podName": pod, "targetNode": target}
        }))
        .unwrap();
        Api::<PodMigration>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &pm)
            .await
            .unwrap();
    }

    /// Waits until PodMigration `name` ends; its phase and Ready reason.
    async fn outcome(&self, name: &str) -> (Phase, String, String) {
        let pms: Api<PodMigration> = Api::namespaced(self.client.clone(), &self.ns);
        let found = until(
            &format!("migration {name} to end"),
            Duration::from_secs(240),
            || async {
                let status = pms.get(name).await.ok()?.status?;
                let phase = status.phase.filter(|p| p.is_final())?;
                let reason = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| c.reason.clone())
                    .unwrap_or_default();
                Some((phase, reason, status.message.unwrap_or_default()))
            },
        )
        .await;
        found.unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        self.wanted
            .iter()
            .map(|n| {
                format!(
                    "--- agent on {}:\n{}",
                    n.name,
                    agents::log_tail(&self.nodes, n, 25)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Where a test pod goes.
#[derive(Debug, Clone, Copy)]
enum On<'a> {
    /// Bound to the node (`spec.nodeName`, as a migration may rebind it).
    Bound(&'a str),
    /// On the node by the scheduler (its hostname label in `nodeSelector`).
    Selected(&'a str),
    /// Wherever the scheduler finds room.
    Anywhere,
}

/// The numbers in a `qpns=`/`mrns=` value of the workload's status.
fn numbers(state: &State, key: &str) -> Vec<u32> {
    state
        .get(key)
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// The demo workload's status line on `port`.
async fn workload_status(ip: Ipv4Addr, port: u16) -> Option<State> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
    let mut line = String::new();
    stream.read_to_string(&mut line).await.ok()?;
    let state: State = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (!state.is_empty()).then_some(state)
}

/// GET `path` over plain HTTP/1.1; the body.
async fn http_get(addr: (Ipv4Addr, u16), path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn pair(v: &serde_json::Value) -> (u64, u64) {
    (v[0].as_u64().unwrap(), v[1].as_u64().unwrap())
}

#[tokio::test]
async fn rdma_pods_get_their_rxe_block_from_their_first_start() {
    let RealNodes {
        nodes,
        wanted,
        images,
        agent_binary,
        kubeconfig,
        ..
    } = RealNodes::up().await;

    harness::with_namespace("rdma", |client, ns| {
        let (nodes, wanted, kubeconfig) = (nodes.clone(), wanted.clone(), kubeconfig.clone());
        let (agent_binary, demo) = (agent_binary.clone(), images["demo"].clone());
        async move {
            let certs = Certificates::generate();
            let start_agent = |i: usize| {
                let node = &wanted[i];
                certs.write_agent(&nodes.host_dir(node).join("tls"), &node.name);
                let mut args = vec![
                    "--rxe-settle-ms".to_string(),
                    "1000".into(),
                    "--rxe-block-wait-seconds".into(),
                    "3".into(),
                ];
                if let Some(devices) = DEVICES.get(i) {
                    args.extend(["--rxe-devices".into(), devices.to_string()]);
                }
                let options = agents::AgentOptions {
                    args,
                    announce: Some((ns.clone(), kubeconfig.clone())),
                    without_wrapper: false,
                    device_plugin: i < DEVICES.len(),
                };
                agents::start(&nodes, node, &agent_binary, &options).unwrap()
            };
            let mut children: Vec<_> = (0..wanted.len()).map(start_agent).collect();
            let cap = BLOCKS_PER_NAMESPACE.to_string();
            let options = Options {
                runtime_class: Some(sandbox::release::RUNTIME_CLASS),
                args: &["--rxe-blocks-per-namespace", &cap],
                ..Options::new(&certs)
            };
            let _operator = Operator::start_with(&ns, "rdma-1", options).await;
            until(
                "the agents to announce themselves",
                Duration::from_secs(60),
                || {
                    let client = client.clone();
                    let ns = ns.clone();
                    async move {
                        workload::agents_announced(&client, &ns, 3)
                            .await
                            .then_some(())
                    }
                },
            )
            .await
            .unwrap();
            let t = Rdma {
                client: client.clone(),
                ns: ns.clone(),
                pods: Api::namespaced(client.clone(), &ns),
                nodes: nodes.clone(),
                wanted: wanted.clone(),
                demo,
            };

            // The plugin advertises its devices; node-3 has none (its agent serves no plugin).
            kubelets::wait_rxe(&client, &["node-1", "node-2"], Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", t.logs()));
            for (node, want) in [("node-1", 3), ("node-2", 8), ("node-3", 0)] {
                assert_eq!(
                    kubelets::rxe_allocatable(&client, node).await.unwrap(),
                    want,
                    "rdma/rxe allocatable on {node}"
                );
            }

            // Three RDMA pods at the same moment on node-1: each takes its numbers from the
            // start of its own block.
            let created = std::time::Instant::now();
            futures::future::join_all(
                ["r1", "r2", "r3"].map(|name| t.create(name, On::Bound("node-1"), QPS)),
            )
            .await;
            let mut first = Vec::new();
            let mut taken = BTreeSet::new();
            for name in ["r1", "r2", "r3"] {
                let (pod, state) = t.running(name, None).await;
                assert_eq!(workload::node_of(&pod), "node-1");
                let block = t.block(name).await;
                let qpns = numbers(&state, "qpns");
                let mrns = numbers(&state, "mrns");
                let want_qpns: Vec<u32> = (1..=QPS).map(|k| block.qpn_start + k).collect();
                let want_mrns: Vec<u32> = (1..=MRS).map(|k| block.mrn_start + k).collect();
                assert_eq!(qpns, want_qpns, "{name}'s QPNs, block {block:?}");
                assert_eq!(mrns, want_mrns, "{name}'s MRNs, block {block:?}");
                for q in &qpns {
                    assert!(taken.insert(*q), "QPN {q} handed out twice");
                }
                first.push((name, state, block));
            }
            eprintln!(
                "three RDMA pods created at once ran within {:.1} s, one after another under \
                 the node's counter lock",
                created.elapsed().as_secs_f64()
            );
            for (name, _, block) in &first {
                let r = t.record(0, name, "Plugin").await;
                assert_eq!(
                    pair(&r["set"]),
                    (u64::from(block.qpn_start), u64::from(block.mrn_start)),
                    "{r}"
                );
                assert_eq!(
                    pair(&r["after"]),
                    (
                        u64::from(block.qpn_start + QPS),
                        u64::from(block.mrn_start + MRS)
                    ),
                    "{r}"
                );
                assert_eq!(r["inside"], true, "{r}");
                assert_eq!(r["ran"], true, "{r}");
                assert!(
                    t.events(name)
                        .await
                        .iter()
                        .any(|(reason, _)| reason == "RxeBlockApplied"),
                    "{name}"
                );
            }

            // node-1's devices are all taken: a fourth pod for it waits; one without a node
            // goes to node-2, never to node-3.
            assert_eq!(t.free("node-1").await, 0);
            t.create("r4", On::Selected("node-1"), QPS).await;
            t.create("r5", On::Anywhere, QPS).await;
            let (r5, _) = t.running("r5", None).await;
            assert_eq!(workload::node_of(&r5), "node-2");
            until(
                "r4 to be refused for want of devices",
                Duration::from_secs(30),
                || async {
                    t.events("r4")
                        .await
                        .iter()
                        .any(|(reason, message)| {
                            reason == "FailedScheduling"
                                && message.contains("Insufficient rdma/rxe")
                        })
                        .then_some(())
                },
            )
            .await
            .unwrap();
            assert!(workload::running(&t.pods, "r4", None).await.is_none());
            assert_eq!(t.free("node-2").await, 7);
            // One goes: the device is free again and the fourth pod takes it.
            t.delete("r3").await;
            let (r4, _) = t.running("r4", None).await;
            assert_eq!(workload::node_of(&r4), "node-1");
            assert_eq!(t.free("node-1").await, 0);

            // The namespace's share: r1, r2, r4, r5 and r6 hold the five blocks; r7 gets none
            // and does not start, saying why, until r6 goes.
            t.create("r6", On::Selected("node-2"), QPS).await;
            t.running("r6", None).await;
            t.create("r7", On::Selected("node-2"), QPS).await;
            until(
                "r7's start to be refused for want of a block",
                Duration::from_secs(60),
                || async {
                    t.events("r7")
                        .await
                        .iter()
                        .any(|(_, message)| message.contains("has no rxe block"))
                        .then_some(())
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", t.logs()));
            let r7 = t.pods.get("r7").await.unwrap();
            let status = r7.status.unwrap_or_default();
            assert!(
                status
                    .container_statuses
                    .iter()
                    .flatten()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_none())),
                "r7 runs without a block: {:?}",
                status.container_statuses
            );
            t.delete("r6").await;
            let (_, r7_state) = t.running("r7", None).await;
            let r7_block = t.block("r7").await;
            assert_eq!(
                numbers(&r7_state, "qpns")[0],
                r7_block.qpn_start + 1,
                "r7 started at its block"
            );

            t.delete("r5").await;
            // A migration restores each of the three pods started together with its block:
            // the same process with the same numbers, and its container started on node-2 with
            // the counters at its block (held by the restore).
            let moved = [("r1", &first[0]), ("r2", &first[1])];
            for (name, _) in &moved {
                t.migrate(&format!("m-{name}"), name, "node-2").await;
            }
            for (name, (_, before, block)) in &moved {
                let (phase, _, message) = t.outcome(&format!("m-{name}")).await;
                assert_eq!(phase, Phase::Succeeded, "{name}: {message}");
                let pm = Api::<PodMigration>::namespaced(t.client.clone(), &t.ns)
                    .get(&format!("m-{name}"))
                    .await
                    .unwrap();
                eprintln!(
                    "{name} moved to node-2: {:?}",
                    pm.status.and_then(|s| s.timings)
                );
                let (pod, after) = t.running(name, None).await;
                assert_eq!(workload::node_of(&pod), "node-2");
                assert_eq!(
                    after["id"], before["id"],
                    "{name} restarted instead of moving"
                );
                assert_eq!(after["qpns"], before["qpns"], "{name}'s QPNs");
                let r = t.record(1, name, "Restore").await;
                assert_eq!(
                    pair(&r["set"]),
                    (u64::from(block.qpn_start), u64::from(block.mrn_start)),
                    "{r}"
                );
                assert_eq!(r["inside"], true, "{r}");
            }

            // A start that took numbers past its block (more queue pairs than the block holds)
            // is reported and refused as a migration source; the pod stays as it is.
            let per_block = r7_block.qpn_count;
            t.create("r8", On::Bound("node-2"), per_block + 5).await;
            let (r8, r8_state) = t.running("r8", None).await;
            until(
                "r8's start to be reported outside its block",
                Duration::from_secs(30),
                || async {
                    t.events("r8")
                        .await
                        .iter()
                        .any(|(reason, _)| reason == "RxeOutsideBlock")
                        .then_some(())
                },
            )
            .await
            .unwrap();
            assert_eq!(t.record(1, "r8", "Plugin").await["inside"], false);
            let metrics = t.metrics(1).await;
            assert!(
                metrics.contains(r#"how="plugin",result="outside"} 1"#),
                "{metrics}"
            );
            // node-1 has room since r1 and r2 left it.
            t.migrate("m8", "r8", "node-1").await;
            let (phase, reason, message) = t.outcome("m8").await;
            assert_eq!(phase, Phase::RolledBack, "{message}");
            assert_eq!(reason, "RxeOutsideBlock", "{message}");
            assert!(message.contains("outside its block"), "{message}");
            let (still, still_state) = t.running("r8", None).await;
            assert_eq!(still.uid(), r8.uid(), "r8 was replaced");
            assert_eq!(still_state["id"], r8_state["id"], "r8's process restarted");
            t.delete("r8").await;

            // The agent restarts: its plugin registers again, and starts go on.
            children[1].kill().unwrap();
            children[1] = start_agent(1);
            until(
                "node-2's agent to register again",
                Duration::from_secs(60),
                || async {
                    agents::log_tail(&t.nodes, &t.wanted[1], 200)
                        .contains("registered with the kubelet as a device plugin")
                        .then_some(())
                },
            )
            .await
            .unwrap();
            t.create("r9", On::Selected("node-2"), QPS).await;
            let (_, r9_state) = t.running("r9", None).await;
            assert_eq!(
                numbers(&r9_state, "qpns")[0],
                t.block("r9").await.qpn_start + 1
            );
            t.delete("r9").await;

            // The kubelet restarts: the plugin sees its socket made anew and registers again.
            Kubelets::new(&Dirs::from_env())
                .restart(&t.wanted[1])
                .unwrap();
            until(
                "the plugin to register with the new kubelet",
                Duration::from_secs(90),
                || async {
                    agents::log_tail(&t.nodes, &t.wanted[1], 200)
                        .contains("the kubelet restarted; registering again")
                        .then_some(())
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", t.logs()));
            kubelets::wait_ready(
                &client,
                std::slice::from_ref(&t.wanted[1]),
                Duration::from_secs(120),
            )
            .await
            .unwrap();
            kubelets::wait_rxe(&client, &["node-2"], Duration::from_secs(60))
                .await
                .unwrap();
            t.create("r10", On::Selected("node-2"), QPS).await;
            let (_, r10_state) = t.running("r10", None).await;
            assert_eq!(
                numbers(&r10_state, "qpns")[0],
                t.block("r10").await.qpn_start + 1
            );
            // The pods that ran across the restart still run.
            for name in ["r1", "r2", "r7"] {
                t.running(name, None).await;
            }

            // A pod of two RDMA containers: they share its block, the second one's numbers
            // following the first one's.
            t.delete("r10").await;
            t.two_containers("r11", "node-2").await;
            let (pod, a) = t.running("r11", None).await;
            let b = until(
                "r11's second container to report",
                Duration::from_secs(60),
                || workload_status(workload::ip_of(&pod).unwrap(), 8081),
            )
            .await
            .unwrap();
            let block = t.block("r11").await;
            let mut qpns = numbers(&a, "qpns");
            qpns.extend(numbers(&b, "qpns"));
            qpns.sort_unstable();
            let want: Vec<u32> = (1..=2 * QPS).map(|k| block.qpn_start + k).collect();
            assert_eq!(qpns, want, "the two containers' QPNs, block {block:?}");

            for child in &mut children {
                child.kill().unwrap();
            }
        }
    })
    .await;
}
