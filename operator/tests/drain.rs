//! `kubectl drain` and pods of controllers, with the operator's admission webhooks registered for
//! the test's namespace, the real kube-controller-manager (ReplicaSet, StatefulSet and DaemonSet
//! controllers), the real scheduler and the real `kubectl` of the sandbox's Kubernetes version.
//! Nodes are API objects whose kubelet the test plays (pods reported Running, deleted pods
//! removed); the agents are test agents (the real ones are in `live.rs`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::time::Duration;

use crds::{Phase, PodMigration};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    core::v1::Pod,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use support::{Operator, Options, Scenario};
use testkit::{
    fixtures,
    harness::{self, eventually, with_namespace},
    history::{self, owner},
};

/// The annotation of a pod a migration made.
const MIGRATION_UID: &str = "migros.io/migration-uid";

/// Pods of the workloads may run on the scenario's nodes only.
fn affinity(nodes: &[String]) -> serde_json::Value {
    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": nodes}]}
    ]}}})
}

fn template(
    app: &str,
    migratable: bool,
    nodes: &[String],
    volumes: serde_json::Value,
) -> serde_json::Value {
    let mut labels = json!({"app": app});
    if migratable {
        labels[crds::MIGRATABLE_LABEL] = json!("true");
    }
    json!({
        "metadata": {"labels": labels},
        "spec": {
            "affinity": affinity(nodes),
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "app", "image": "localhost:5000/kube-migros/demo:test",
                            "volumeMounts": volumes["mounts"]}],
            "volumes": volumes["volumes"],
        }
    })
}

async fn create<K>(client: &Client, ns: &str, object: serde_json::Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
    K::DynamicType: Default,
{
    let object: K = serde_json::from_value(object).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

async fn pods_on(pods: &Api<Pod>, node: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn kubectl_drain_moves_the_pods_of_controllers_without_a_second_instance() {
    with_namespace("drain", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        let nodes = vec![s.node(1), s.node(2), s.node(3)];
        let kubelets = tokio::spawn(fixtures::play_kubelets(
            client.clone(),
            ns.clone(),
            nodes.clone(),
        ));
        let _operator = Operator::start_with(
            &ns,
            "op-drain",
            Options {
                webhooks: true,
                ..Options::new(&s.certs)
            },
        )
        .await;
        let (history, recorder) = history::record_pods(client.clone(), &ns);
        let (flights, flight_recorder) = history::record_flights(client.clone(), &ns);

        // Everything lands on node 1: the others are cordoned while it is scheduled.
        s.nodes[1].set_unschedulable(true).await;
        s.nodes[2].set_unschedulable(true).await;
        let none = json!({"mounts": [], "volumes": []});
        let selector = |app: &str| json!({"matchLabels": {"app": app}});
        create::<Deployment>(
            &client,
            &ns,
            json!({
                "metadata": {"name": "web"},
                "spec": {"replicas": 3, "selector": selector("web"),
                         "template": template("web", true, &nodes, none.clone())}
            }),
        )
        .await;
        create::<StatefulSet>(
            &client,
            &ns,
            json!({
                "metadata": {"name": "db"},
                "spec": {"replicas": 2, "serviceName": "db", "selector": selector("db"),
                         "template": template("db", true, &nodes, none.clone())}
            }),
        )
        .await;
        create::<DaemonSet>(
            &client,
            &ns,
            json!({
                "metadata": {"name": "logs"},
                "spec": {"selector": selector("logs"),
                         "template": template("logs", false, &nodes, none.clone())}
            }),
        )
        .await;
        let host_path = json!({
            "mounts": [{"name": "logs", "mountPath": "/logs"}],
            "volumes": [{"name": "logs", "hostPath": {"path": "/var/log"}}],
        });
        let mut bare = template("solo", true, &nodes, none.clone());
        bare["metadata"]["name"] = json!("solo");
        create::<Pod>(&client, &ns, bare).await;
        let mut pinned = template("pinned", true, &nodes, host_path);
        pinned["metadata"]["name"] = json!("pinned");
        create::<Pod>(&client, &ns, pinned).await;

        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let before = eventually(Duration::from_secs(60), || async {
            let on = pods_on(&pods, &s.node(1)).await;
            let running = on
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            // web x3, db x2, logs, solo, pinned
            (running == 8).then_some(on)
        })
        .await;
        s.nodes[1].set_unschedulable(false).await;
        s.nodes[2].set_unschedulable(false).await;
        let uid_of = |name: &str| {
            before
                .iter()
                .find(|p| p.name_any() == name)
                .and_then(|p| p.uid())
                .unwrap()
        };
        let daemon = before.iter().find(|p| owner(p) == "logs").unwrap().uid();

        // The drain, as an administrator types it (`--force` because of the bare pods, as always
        // with kubectl): it must finish by itself.
        let env = harness::env().await;
        let stderr = harness::kubectl_drain(&env, &s.node(1), &[], "180s").await;
        // While the pods moved, the drain was told to wait.
        assert!(stderr.contains("will retry after 5s"), "{stderr}");

        // The migratable pods run elsewhere, made by their migrations, under their names.
        let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        let moved: Vec<Pod> = before
            .iter()
            .filter(|p| ["web", "db", "solo"].contains(&p.labels()["app"].as_str()))
            .cloned()
            .collect();
        assert_eq!(moved.len(), 6);
        for old in &moved {
            let name = old.name_any();
            let now = pods.get(&name).await.unwrap();
            assert_ne!(now.uid(), old.uid(), "{name} was not replaced");
            let on = now.spec.as_ref().unwrap().node_name.clone().unwrap();
            assert_ne!(on, s.node(1), "{name} is still on the drained node");
            let made_by = now.annotations()[MIGRATION_UID].clone();
            let pm = migrations
                .list(&ListParams::default().fields(&format!("spec.podName={name}")))
                .await
                .unwrap()
                .items;
            assert_eq!(pm.len(), 1, "one migration for {name}");
            let pm = &pm[0];
            assert_eq!(pm.uid().unwrap(), made_by);
            assert_eq!(pm.labels()["migros.io/reason"], "eviction");
            assert_eq!(pm.status.as_ref().unwrap().phase, Some(Phase::Succeeded));
            assert_eq!(owner(&now), owner(old), "{name} keeps its controller");
        }
        // The hostPath pod was evicted as usual, without a migration; the DaemonSet's pod stays.
        assert!(
            pods.get_opt("pinned")
                .await
                .unwrap()
                .is_none_or(|p| p.uid() != Some(uid_of("pinned")))
        );
        assert!(
            migrations
                .list(&ListParams::default().fields("spec.podName=pinned"))
                .await
                .unwrap()
                .items
                .is_empty()
        );
        let still: Vec<Option<String>> = pods_on(&pods, &s.node(1))
            .await
            .iter()
            .map(ResourceExt::uid)
            .collect();
        assert_eq!(still, vec![daemon]);

        // The controllers count the restored pods as theirs and make no other.
        let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        let rs = replica_sets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        assert_eq!(rs.len(), 1);
        eventually(Duration::from_secs(30), || async {
            let status = replica_sets.get(&rs[0].name_any()).await.ok()?.status?;
            (status.replicas == 3 && status.ready_replicas == Some(3)).then_some(())
        })
        .await;
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        eventually(Duration::from_secs(30), || async {
            let status = sets.get("db").await.ok()?.status?;
            (status.replicas == 2 && status.ready_replicas == Some(2)).then_some(())
        })
        .await;

        // Six pods left node 1, never more than two at once (the default limit); the others
        // waited in the queue.
        flight_recorder.abort();
        let flights = flights.lock().unwrap();
        assert_eq!(flights.most, 2, "{flights:?}");
        assert!(flights.queued, "{flights:?}");
        drop(flights);

        recorder.abort();
        kubelets.abort();
        let h = history.lock().unwrap();
        // Every pod of a migrated owner is either one that ran before or a restored one: no
        // fresh instance ever started, not even for a moment.
        let originals: Vec<&Pod> = before.iter().collect();
        let fresh = h.fresh_instances(&originals, &["web", "db", "solo"]);
        assert!(fresh.is_empty(), "fresh instances {fresh:?}: {h:?}");
        assert_eq!(
            h.most_alive_of("web-"),
            Some(3),
            "the Deployment had more than 3 pods at once: {h:?}"
        );
        assert_eq!(h.most_alive.get("db"), Some(&2), "{h:?}");
    })
    .await;
}

#[tokio::test]
async fn a_drain_whose_migrations_keep_failing_exits_with_the_reason_and_the_pod_keeps_running() {
    with_namespace("drain-fail", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        let nodes = vec![s.node(1), s.node(2), s.node(3)];
        let kubelets = tokio::spawn(fixtures::play_kubelets(
            client.clone(),
            ns.clone(),
            nodes.clone(),
        ));
        // Every checkpoint on node 1 fails: each migration rolls back.
        s.agent(1).script(
            agent_api::Step::Checkpoint,
            testkit::testagent::Behaviour::Fail {
                message: "CRIU cannot dump this process".into(),
                times: 100,
            },
        );
        let _operator = Operator::start_with(
            &ns,
            "op-drain-fail",
            Options {
                webhooks: true,
                ..Options::new(&s.certs)
            },
        )
        .await;
        s.nodes[1].set_unschedulable(true).await;
        s.nodes[2].set_unschedulable(true).await;
        let none = json!({"mounts": [], "volumes": []});
        let mut bare = template("stuck", true, &nodes, none);
        bare["metadata"]["name"] = json!("stuck");
        create::<Pod>(&client, &ns, bare).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let before = eventually(Duration::from_secs(60), || async {
            let pod = pods.get_opt("stuck").await.ok()??;
            (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
        })
        .await;
        s.nodes[1].set_unschedulable(false).await;
        s.nodes[2].set_unschedulable(false).await;

        let env = harness::env().await;
        let node = s.node(1);
        let out = tokio::task::spawn_blocking(move || {
            harness::kubectl(
                &env,
                &[
                    "drain",
                    &node,
                    "--ignore-daemonsets",
                    "--force",
                    "--timeout=120s",
                ],
            )
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        // The drain does not hang and does not kill the pod: it says why and exits.
        assert!(!out.status.success(), "the drain succeeded: {stderr}");
        assert!(
            stderr.contains("could not be migrated") && stderr.contains("3 attempts"),
            "{stderr}"
        );
        assert!(stderr.contains("CRIU cannot dump this process"), "{stderr}");
        assert!(!stderr.contains("timed out"), "{stderr}");
        let now = pods.get("stuck").await.unwrap();
        assert_eq!(now.uid(), before.uid(), "the pod was replaced or deleted");
        assert_eq!(now.spec.unwrap().node_name, Some(s.node(1)));
        let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        let tried = migrations.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(tried.len(), 3, "one migration per attempt");
        assert!(
            tried
                .iter()
                .all(|pm| { pm.status.as_ref().and_then(|s| s.phase) == Some(Phase::RolledBack) })
        );
        kubelets.abort();
    })
    .await;
}
