//! A live migration on the sandbox cluster, all parts real: the operator process, the node agent
//! in each node, kubelets, containerd, runc, CRIU, the CNI pod network and the registry. A demo
//! pod with a TCP peer on another node is moved by `kubectl apply` of a PodMigration; its process,
//! state, IP and the peer's connection survive. The one simulated part is the rxe device (counter
//! files in a per-node directory; `rdma/rxe` is advertised by the agents' device plugin). One
//! test: it owns the nodes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::{net::Ipv4Addr, time::Duration};

use crds::Phase;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use sandbox::{
    agents,
    containerd::Containerd,
    nodes::{Node, Nodes},
};
use support::{Operator, Options, RealNodes, Scenario};
use testkit::{
    fixtures::Certificates,
    harness::{self, eventually},
    history,
    workload::{self, State, node_of, num},
};

async fn running_pod(pods: &Api<Pod>, name: &str, not_uid: Option<String>) -> Pod {
    eventually(Duration::from_secs(90), || {
        workload::running(pods, name, not_uid.as_deref())
    })
    .await
}

fn ip_of(pod: &Pod) -> Ipv4Addr {
    workload::ip_of(pod).expect("a running pod has an IPv4 address")
}

/// The test's view of the cluster.
struct Live {
    client: kube::Client,
    ns: String,
    pods: Api<Pod>,
    nodes: Nodes,
    wanted: Vec<sandbox::nodes::Node>,
}

impl Live {
    /// `kubectl apply` of PodMigration `name` of pod `app` (to `target`, or anywhere).
    async fn apply(&self, name: &str, target: Option<&str>, extra: &str) {
        let manifest = workload::migration_manifest(&self.ns, name, "app", target, extra);
        let path = std::env::temp_dir().join(format!("{}-{name}.yaml", self.ns));
        let env = harness::env().await;
        workload::kubectl_apply(&env, &path, &manifest).unwrap();
    }

    /// Waits for `phase`; on failure prints the agents' logs.
    async fn wait(&self, name: &str, phase: Phase) -> crds::PodMigration {
        let wait = Scenario::wait_phase_in(
            &self.client,
            &self.ns,
            name,
            phase,
            Duration::from_secs(180),
        );
        match std::panic::AssertUnwindSafe(wait).catch_unwind().await {
            Ok(pm) => pm,
            Err(panic) => {
                for node in &self.wanted {
                    eprintln!(
                        "--- agent {}:\n{}",
                        node.name,
                        agents::log_tail(&self.nodes, node, 30)
                    );
                }
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// Waits until the workload at `ip` received more of the peer's stream than `before` and
    /// checks that it is the same process, counting on, on the peer's one connection, with no
    /// record lost or repeated.
    async fn continued(&self, ip: Ipv4Addr, before: &State, step: &str) -> State {
        let received = num(before, "received");
        // A peer's TCP retransmissions back off while the pod is frozen (up to seconds apart), and
        // a rollback keeps it frozen for the transfer's retries: give it time.
        eprintln!("{step}: waiting for the peer's stream to go on");
        let after = eventually(Duration::from_secs(90), || async move {
            workload::state(ip)
                .await
                .filter(|s| num(s, "received") > received + 64 * 50)
        })
        .await;
        assert_eq!(
            after.get("id"),
            before.get("id"),
            "{step}: not the same process"
        );
        assert!(
            num(&after, "counter") > num(before, "counter"),
            "{step}: {after:?}"
        );
        assert_eq!(
            num(&after, "conns"),
            1,
            "{step}: the peer reconnected: {after:?}"
        );
        assert_eq!(
            num(&after, "gaps"),
            0,
            "{step}: records lost or repeated: {after:?}"
        );
        after
    }

    /// The peer is the judge: waits until every record it sent is answered, checks that the
    /// answers came in order on its one connection, and answers what it judged (its pauses, on
    /// its own clock: one per move).
    async fn peer(&self, step: &str) -> workload::PeerJudgement {
        let judged = workload::peer_judgement(&self.pods, "peer")
            .await
            .unwrap_or_else(|e| panic!("{step}: {e:#}"));
        assert_eq!(
            judged.gaps, 0,
            "{step}: answers lost or out of order at the peer: {judged:?}"
        );
        judged
    }
}

/// Deletes the workload `app` and its peer at once (a test's move is over).
fn delete_workload(env: &sandbox::controlplane::Env, ns: &str) {
    kubectl(
        env,
        &[
            "delete",
            "pod",
            "app",
            "peer",
            "-n",
            ns,
            "--grace-period=0",
            "--force",
        ],
    );
}

/// PostCopy: a fresh workload with 256 MiB written moves node-1 -> node-3; it runs there before
/// its memory arrived, and once all is in it is the same process, every page as it wrote it, its
/// peer's connection whole.
async fn post_copy_moves_a_pod_before_its_memory(live: &Live, image: &str) {
    let env = harness::env().await;
    delete_workload(&env, &live.ns);
    eventually(Duration::from_secs(60), || async {
        let gone = live.pods.get_opt("app").await.ok()?.is_none()
            && live.pods.get_opt("peer").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    let args = ["--touch", "256Mi", "--verify", ":8081"];
    let (source, before) =
        workload::start_with_peer_args(&live.pods, image, ("app", "peer"), &args, &[])
            .await
            .unwrap();
    let ip = ip_of(&source);
    let peer = live.peer("post-copy start").await;
    live.apply("postcopy-1", Some("node-3"), "  strategy: PostCopy\n")
        .await;
    let done = live.wait("postcopy-1", Phase::Succeeded).await;
    let status = done.status.clone().unwrap_or_default();
    let phases: Vec<Phase> = status.phase_transitions.iter().map(|t| t.phase).collect();
    assert_eq!(
        phases[phases.len() - 3..],
        [Phase::Restoring, Phase::CopyingMemory, Phase::Succeeded],
        "{phases:?}"
    );
    // The 256 MiB written came after the pod resumed, all of it.
    let memory = status.memory.clone().expect("the memory's account");
    assert!(
        memory.bytes_total >= 256 << 20 && memory.bytes_remaining == 0,
        "{memory:?}"
    );
    assert_eq!(memory.bytes_transferred, memory.bytes_total);
    let complete = status
        .conditions
        .iter()
        .find(|c| c.type_ == "MemoryComplete")
        .map(|c| c.status.as_str());
    assert_eq!(complete, Some("True"));
    let moved = running_pod(&live.pods, "app", source.metadata.uid.clone()).await;
    assert_eq!(node_of(&moved), "node-3");
    assert_eq!(ip_of(&moved), ip, "the pod IP changed");
    let after = live.continued(ip, &before, "postcopy-1").await;
    let checked = workload::verify_memory(ip).await.unwrap();
    assert!(
        checked.starts_with("memok=true"),
        "postcopy-1: pages differ after the move: {checked}"
    );
    let now = live.peer("postcopy-1").await;
    assert_eq!(now.id, peer.id, "the peer's connection broke");
    assert!(
        now.pauses_ms.len() > peer.pauses_ms.len(),
        "postcopy-1: the peer saw no pause, though the pod moved: {now:?}"
    );
    eprintln!(
        "postcopy-1: node-1 -> node-3, timings {:?}, memory {memory:?}, the peer's pause {} ms \
         (the workload's own clock: longest {} ms); {checked}",
        status.timings,
        now.pauses_ms.last().copied().unwrap_or_default(),
        after.get("maxgap_ms").cloned().unwrap_or_default()
    );
}

/// Stops the container of `pod` (as a crash would) and waits for the kubelet's restart: a fresh
/// process, not the checkpoint again; answers its state.
async fn restarted_fresh(pod: &Pod, nodes: &[Node], ip: Ipv4Addr, last: &State) -> State {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone());
    let id = statuses.unwrap_or_default()[0]
        .container_id
        .clone()
        .unwrap_or_default();
    let node = nodes.iter().find(|n| n.name == node_of(pod)).unwrap();
    let id = id.trim_start_matches("containerd://");
    let out = node
        .exec(&["crictl", "stop", "--timeout", "0", id])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_id = last.get("id").cloned();
    let restarted = eventually(Duration::from_secs(90), || {
        let last_id = last_id.clone();
        async move {
            workload::state(ip)
                .await
                .filter(|s| s.get("id") != last_id.as_ref())
        }
    })
    .await;
    assert!(
        num(&restarted, "counter") < num(last, "counter"),
        "the restart restored the checkpoint again: {restarted:?} after {last:?}"
    );
    restarted
}

/// `kubectl args`, which must succeed.
fn kubectl(env: &sandbox::controlplane::Env, args: &[&str]) -> std::process::Output {
    let out = harness::kubectl(env, args);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pod template of the demo workload serving its state, labelled `app`.
fn demo_template(
    image: &str,
    app: &str,
    migratable: bool,
    volumes: serde_json::Value,
) -> serde_json::Value {
    let mut labels = serde_json::json!({"app": app});
    if migratable {
        labels[crds::MIGRATABLE_LABEL] = serde_json::json!("true");
    }
    serde_json::json!({
        "metadata": {"labels": labels},
        "spec": {
            "containers": [{"name": "app", "image": image, "args": ["serve", "--status", ":8080"],
                            "volumeMounts": volumes["mounts"]}],
            "volumes": volumes["volumes"],
        }
    })
}

/// The workloads of the drain that move.
const MOVED: [&str; 4] = ["web", "db", "solo", "scratch"];

/// The file `path` of the emptyDir volume `volume` of `pod`, read on its node.
fn empty_dir_file(nodes: &[Node], pod: &Pod, volume: &str, path: &str) -> String {
    let node = nodes.iter().find(|n| n.name == node_of(pod)).unwrap();
    let file = format!(
        "/var/lib/kubelet/pods/{}/volumes/kubernetes.io~empty-dir/{volume}/{path}",
        pod.uid().unwrap()
    );
    let out = node.exec(&["cat", &file]).unwrap();
    assert!(
        out.status.success(),
        "cat {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `kubectl drain node-1` of a node holding three pods of a Deployment, two of a StatefulSet, a
/// bare pod, a pod with an emptyDir file, a DaemonSet pod and a pod with a hostPath volume: the
/// drain finishes by itself, each migratable pod runs elsewhere as the same process under the same
/// name and IP (the emptyDir file with it), no controller started a fresh instance, at most two
/// left at once; the hostPath pod was evicted and the DaemonSet's stays.
async fn drain_moves_live_pods(live: &Live, image: &str) {
    let (client, ns, pods) = (&live.client, live.ns.as_str(), &live.pods);
    let env = harness::env().await;
    // The earlier workload goes; the drain's start on node-1.
    delete_workload(&env, ns);
    kubectl(&env, &["cordon", "node-2", "node-3"]);
    let none = serde_json::json!({"mounts": [], "volumes": []});
    let selector = |app: &str| serde_json::json!({"matchLabels": {"app": app}});
    let objects = [
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": selector("web"),
                     "template": demo_template(image, "web", true, none.clone())}}),
        serde_json::json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"replicas": 2, "serviceName": "db", "selector": selector("db"),
                     "template": demo_template(image, "db", true, none.clone())}}),
        serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "logs"},
            "spec": {"selector": selector("logs"),
                     "template": demo_template(image, "logs", false, none.clone())}}),
    ];
    let mut solo = demo_template(image, "solo", true, none.clone());
    solo["apiVersion"] = serde_json::json!("v1");
    solo["kind"] = serde_json::json!("Pod");
    solo["metadata"]["name"] = serde_json::json!("solo");
    let host_path = serde_json::json!({
        "mounts": [{"name": "logs", "mountPath": "/logs"}],
        "volumes": [{"name": "logs", "hostPath": {"path": "/tmp"}}],
    });
    // Its process writes its id into its emptyDir volume when it starts.
    let mut scratch = demo_template(
        image,
        "scratch",
        true,
        serde_json::json!({
            "mounts": [{"name": "data", "mountPath": "/data"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }),
    );
    scratch["spec"]["containers"][0]["args"] =
        serde_json::json!(["serve", "--status", ":8080", "--note", "/data/id"]);
    scratch["apiVersion"] = serde_json::json!("v1");
    scratch["kind"] = serde_json::json!("Pod");
    scratch["metadata"]["name"] = serde_json::json!("scratch");
    let mut pinned = demo_template(image, "pinned", true, host_path);
    pinned["apiVersion"] = serde_json::json!("v1");
    pinned["kind"] = serde_json::json!("Pod");
    pinned["metadata"]["name"] = serde_json::json!("pinned");
    let items: Vec<serde_json::Value> = objects
        .into_iter()
        .chain([solo, scratch, pinned])
        .map(|mut o| {
            o["metadata"]["namespace"] = serde_json::json!(ns);
            o
        })
        .collect();
    let manifest =
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    let path = std::env::temp_dir().join(format!("{ns}-drain.json"));
    workload::kubectl_apply(&env, &path, &manifest).unwrap();

    // web x3, db x2, solo, scratch, pinned and the DaemonSet's pod run on node-1.
    let on_node_1 = || async {
        let list = pods
            .list(&kube::api::ListParams::default().fields("spec.nodeName=node-1"))
            .await
            .ok()?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        Some(running)
    };
    let before = eventually(Duration::from_secs(180), || async {
        on_node_1().await.filter(|p| p.len() == 9)
    })
    .await;
    kubectl(&env, &["uncordon", "node-2", "node-3"]);
    let mut states = Vec::new();
    for pod in before
        .iter()
        .filter(|p| MOVED.contains(&p.labels()["app"].as_str()))
    {
        let ip = ip_of(pod);
        let state = eventually(Duration::from_secs(60), || workload::state(ip)).await;
        states.push((pod.clone(), ip, state));
    }
    assert_eq!(states.len(), 7);
    let scratch_before = before.iter().find(|p| p.name_any() == "scratch").unwrap();
    let note = empty_dir_file(&live.wanted, scratch_before, "data", "id");
    let daemon = before
        .iter()
        .find(|p| p.labels()["app"] == "logs")
        .unwrap()
        .uid();
    let (history, pod_recorder) = history::record_pods(client.clone(), ns);
    let (flights, flight_recorder) = history::record_flights(client.clone(), ns);

    // The drain, as an administrator types it: `--force` for the bare pods and
    // `--delete-emptydir-data` for the pod with an emptyDir, as kubectl always asks (for a pod that
    // moves, the volume's content moves with it).
    harness::kubectl_drain(&env, "node-1", &["--delete-emptydir-data"], "300s").await;

    for (old, ip, state) in &states {
        let name = old.name_any();
        let now = running_pod(pods, &name, old.uid()).await;
        assert_ne!(node_of(&now), "node-1", "{name} is still on node-1");
        assert_eq!(ip_of(&now), *ip, "{name} changed its IP");
        let after = eventually(Duration::from_secs(60), || workload::state(*ip)).await;
        assert_eq!(
            after.get("id"),
            state.get("id"),
            "{name} is not the same process"
        );
        assert!(
            num(&after, "counter") > num(state, "counter"),
            "{name}: {after:?}"
        );
        assert_eq!(
            history::owner(&now),
            history::owner(old),
            "{name} keeps its controller"
        );
        if name == "scratch" {
            // The file its process wrote before the move is in the new pod's volume.
            assert_eq!(empty_dir_file(&live.wanted, &now, "data", "id"), note);
            assert_eq!(Some(&note), after.get("id"), "the note is the process's id");
        }
    }
    assert!(
        pods.get_opt("pinned").await.unwrap().is_none(),
        "the hostPath pod was evicted"
    );
    let left: Vec<Option<String>> = on_node_1()
        .await
        .unwrap()
        .iter()
        .map(ResourceExt::uid)
        .collect();
    assert_eq!(left, vec![daemon], "only the DaemonSet's pod stays");

    pod_recorder.abort();
    flight_recorder.abort();
    let h = history.lock().unwrap();
    let originals: Vec<&Pod> = before.iter().collect();
    let fresh = h.fresh_instances(&originals, &MOVED);
    assert!(fresh.is_empty(), "fresh instances {fresh:?}: {h:?}");
    assert_eq!(h.most_alive_of("web-"), Some(3), "{h:?}");
    let f = flights.lock().unwrap();
    assert!(
        f.most <= 2,
        "more than two migrations left node-1 at once: {f:?}"
    );
    drop((h, f));
    kubectl(&env, &["uncordon", "node-1"]);
}

#[tokio::test]
async fn a_pod_moves_between_real_nodes_keeping_its_state_ip_and_tcp_peer() {
    let RealNodes {
        nodes,
        wanted,
        images,
        agent_binary,
        kubeconfig,
        ..
    } = RealNodes::up().await;

    harness::with_namespace("live", |client, ns| {
        let (nodes, wanted, kubeconfig) = (nodes.clone(), wanted.clone(), kubeconfig.clone());
        let (agent_binary, demo) = (agent_binary.clone(), images["demo"].clone());
        async move {
            let certs = Certificates::generate();
            let start_agent = |i: usize| {
                let node = &wanted[i];
                certs.write_agent(&nodes.host_dir(node).join("tls"), &node.name);
                let options = agents::AgentOptions {
                    // node-2 (Debian's containerd 2.1) offers only checkpoint images here, so that
                    // both backends restore through the kubelet.
                    without_wrapper: node.containerd == Containerd::Debian,
                    // PostCopy needs pipes of 4 MiB (the chart's agent.raisePipeMaxSize).
                    args: vec!["--raise-pipe-max-size".into()],
                    announce: Some((ns.clone(), kubeconfig.clone())),
                    // The RDMA workload's devices and its block at every start.
                    device_plugin: true,
                };
                agents::start(&nodes, node, &agent_binary, &options).unwrap()
            };
            let mut children: Vec<_> = (0..wanted.len()).map(start_agent).collect();
            // The operator uses the class the chart would make (ensured above), and checkpoint
            // images where the wrapper is missing (node-2).
            let options = Options {
                runtime_class: Some(sandbox::release::RUNTIME_CLASS),
                webhooks: true,
                ..Options::new(&certs)
            };
            let mut operator = Operator::start_with(&ns, "live-1", options).await;
            operator.wait_ready().await;
            // Every agent announced itself before anything is asked of them.
            eventually(Duration::from_secs(60), || async {
                workload::agents_announced(&client, &ns, wanted.len())
                    .await
                    .then_some(())
            })
            .await;
            let live = Live {
                client: client.clone(),
                ns: ns.clone(),
                pods: Api::namespaced(client.clone(), &ns),
                nodes: nodes.clone(),
                wanted: wanted.clone(),
            };
            // The workload is an RDMA pod: it asks for an rxe device and owns an rxe block.
            let (mut current, mut before) =
                workload::start_with_peer(&live.pods, &demo, ("app", "peer"), None)
                    .await
                    .unwrap();
            let ip = ip_of(&current);
            // The peer's judgement so far (its start may show a pause).
            let mut peer = live.peer("start").await;

            // node-1 -> node-2 -> node-3, then with no target node.
            for (hop, target) in [
                ("hop-1", Some("node-2")),
                ("hop-2", Some("node-3")),
                ("hop-3", None),
            ] {
                let from = node_of(&current);
                live.apply(hop, target, "").await;
                let done = live.wait(hop, Phase::Succeeded).await;
                eprintln!("{hop}: succeeded; waiting for the replacement pod to run");
                let moved = running_pod(&live.pods, "app", current.metadata.uid.clone()).await;
                let to = node_of(&moved);
                match target {
                    Some(t) => assert_eq!(to, t),
                    None => assert!(
                        to != from && wanted.iter().any(|n| n.name == to),
                        "{from} -> {to}"
                    ),
                }
                assert_eq!(ip_of(&moved), ip, "the pod IP changed on {hop}");
                eprintln!("{hop}: the replacement runs on {to}; checking the workload");
                let after = live.continued(ip, &before, hop).await;
                // `kubectl get pm` shows the outcome and the downtime.
                let env = harness::env().await;
                let out = harness::kubectl(&env, &["get", "pm", hop, "-n", &ns]);
                let table = String::from_utf8_lossy(&out.stdout).to_string();
                let row = table.lines().nth(1).unwrap_or_default().to_string();
                let cells: Vec<&str> = row.split_whitespace().collect();
                assert!(
                    cells.get(4) == Some(&"Succeeded")
                        && cells.get(5).is_some_and(|d| d.parse::<u64>().is_ok()),
                    "kubectl get pm:\n{table}"
                );
                let status = done.status.clone().unwrap_or_default();
                // Restored by the runtime wrapper (under its class, with the workload's own
                // image) where the node offers it, else from checkpoint images.
                let spec = moved.spec.clone().unwrap_or_default();
                if to == "node-2" {
                    assert_eq!(
                        status.backend.as_deref(),
                        Some("cri-checkpoint-image"),
                        "{hop}"
                    );
                    // and says that it restores on every restart.
                    let message = status.message.clone().unwrap_or_default();
                    assert!(
                        message.contains(operator::targets::CHECKPOINT_IMAGE_CAVEAT),
                        "{hop}: {message}"
                    );
                    assert_eq!(spec.runtime_class_name, None);
                    // The image of the archive the source recorded, pinned by its digest.
                    let recorded = &status.checkpoint.as_ref().expect("checkpoint").containers[0];
                    let image = agent_api::checkpoint_image::Parts::new(
                        &recorded.name,
                        &recorded.digest,
                        u64::try_from(recorded.bytes).unwrap(),
                    );
                    let pinned = spec.containers[0].image.clone().unwrap_or_default();
                    assert!(
                        pinned.ends_with(&format!("@{}", image.manifest_digest())),
                        "{hop}: {pinned}"
                    );
                } else {
                    assert_eq!(status.backend.as_deref(), Some("runtime-wrapper"), "{hop}");
                    assert_eq!(
                        spec.runtime_class_name.as_deref(),
                        Some(sandbox::release::RUNTIME_CLASS)
                    );
                    assert_eq!(spec.containers[0].image.as_deref(), Some(demo.as_str()));
                }
                // The target's rxe counters hold the pod's block (its restore set them).
                let block = status.rxe.expect("the RDMA pod's block");
                let node = wanted.iter().find(|n| n.name == to).unwrap();
                let qpn =
                    std::fs::read_to_string(nodes.host_dir(node).join("rxe/last_qpn")).unwrap();
                assert_eq!(
                    qpn.trim(),
                    block.qpn_start.to_string(),
                    "{hop}: last_qpn on {to}"
                );
                // Every move pauses the peer once (its records are answered again after it).
                let now = live.peer(hop).await;
                // A peer that started again (its workload restarted fresh) saw none before.
                let seen = if now.id == peer.id {
                    peer.pauses_ms.len()
                } else {
                    0
                };
                assert!(
                    now.pauses_ms.len() > seen,
                    "{hop}: the peer saw no pause, though the pod moved: {now:?}"
                );
                peer = now;
                eprintln!(
                    "{hop}: {from} -> {to}, timings {:?}, the peer's pause {} ms (the workload's \
                     own clock: longest {} ms)",
                    status.timings,
                    peer.pauses_ms.last().copied().unwrap_or_default(),
                    after.get("maxgap_ms").cloned().unwrap_or_default()
                );
                current = moved;
                before = after;
                if hop == "hop-2" {
                    // Restored by the wrapper, once: when the restored process dies, the kubelet's
                    // restart of the container is a fresh start of its image, as it would have
                    // been on the source node.
                    before = restarted_fresh(&current, &wanted, ip, &before).await;
                    // Its peer's connection broke with it: the peer starts again and connects
                    // to the fresh process.
                    let again = live.peer("hop-2 restart").await;
                    assert_ne!(again.id, peer.id, "the peer kept a connection that broke");
                    peer = again;
                }
            }

            // The target agent dies during a (slowed) transfer: rolled back, the source pod is the
            // same pod, running, its state and its peer's connection intact.
            let from = node_of(&current);
            let target_index = (0..wanted.len()).find(|i| wanted[*i].name != from).unwrap();
            let target = wanted[target_index].name.clone();
            live.apply(
                "crash-1",
                Some(&target),
                "  compression: None\n  bandwidthLimit: 100Ki\n",
            )
            .await;
            live.wait("crash-1", Phase::Transferring).await;
            let _ = children[target_index].kill();
            let _ = children[target_index].wait();
            let rolled = live.wait("crash-1", Phase::RolledBack).await;
            let (_, message) = Scenario::reason(&rolled);
            eprintln!("crash-1 rolled back: {message}");
            let same = running_pod(&live.pods, "app", None).await;
            assert_eq!(
                same.metadata.uid, current.metadata.uid,
                "the source pod was replaced"
            );
            assert_eq!(node_of(&same), from);
            before = live.continued(ip, &before, "crash-1").await;
            children[target_index] = start_agent(target_index);
            // Its device plugin registers again; until then the node has no rdma/rxe to offer.
            sandbox::kubelets::wait_rxe(&client, &[target.as_str()], Duration::from_secs(60))
                .await
                .unwrap();

            // A PodMigration deleted in the middle of its transfer: aborted, nothing changes.
            live.apply(
                "gone-1",
                Some(&target),
                "  compression: None\n  bandwidthLimit: 100Ki\n",
            )
            .await;
            live.wait("gone-1", Phase::Transferring).await;
            let env = harness::env().await;
            let out = harness::kubectl(&env, &["delete", "pm", "gone-1", "-n", &ns, "--wait=true"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let same = running_pod(&live.pods, "app", None).await;
            assert_eq!(
                same.metadata.uid, current.metadata.uid,
                "the source pod was replaced"
            );
            live.continued(ip, &before, "gone-1").await;

            post_copy_moves_a_pod_before_its_memory(&live, &demo).await;
            drain_moves_live_pods(&live, &demo).await;

            operator.kill();
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    })
    .await;

    nodes.down().expect("nodes down");
    sandbox::kubelets::forget(&harness::client().await, &wanted)
        .await
        .expect("nodes forgotten");
}
