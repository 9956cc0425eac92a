//! The Helm chart on the sandbox cluster, as users install it: images of the operator and the node
//! agent built from this workspace and pushed to the sandbox registry, `helm upgrade --install`, two
//! operator replicas of which one leads, an agent pod per node announcing itself; a pod migrated by
//! the installed kube-migros (and again after the leader pod was deleted and the standby took over);
//! `helm uninstall` leaves none of the chart's objects behind and the workload running. One test: it
//! owns the nodes' agents.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::{collections::BTreeSet, time::Duration};

use crds::{Phase, PodMigration};
use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    apps::v1::{DaemonSet, Deployment},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    certificates::v1::CertificateSigningRequest,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
    node::v1::RuntimeClass,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use sandbox::{
    Dirs,
    release::{self, NAMESPACE},
};
use serde::de::DeserializeOwned;
use testkit::{
    harness::{self, eventually},
    workload::{self, node_of, num},
};

const INSTANCE: &str = "app.kubernetes.io/instance=kube-migros";

async fn names<K>(api: &Api<K>, selector: &str) -> Vec<String>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .iter()
        .map(|o| o.name_any())
        .collect()
}

async fn operator_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items
}

/// The holder of the operator's leader Lease, when it is one of the running operator pods.
async fn leader(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder = leases
        .get("kube-migros-operator")
        .await
        .ok()?
        .spec?
        .holder_identity?;
    let running = operator_pods(client).await.into_iter().any(|p| {
        p.name_any() == holder
            && p.metadata.deletion_timestamp.is_none()
            && p.status.and_then(|s| s.phase).as_deref() == Some("Running")
    });
    running.then_some(holder)
}

/// `kubectl apply` of a PodMigration of pod `app` to `target`; waits until it is final.
async fn migrate(client: &Client, ns: &str, name: &str, target: &str) -> PodMigration {
    let manifest = workload::migration_manifest(ns, name, "app", Some(target), "");
    let path = std::env::temp_dir().join(format!("{ns}-{name}.yaml"));
    let env = harness::env().await;
    workload::kubectl_apply(&env, &path, &manifest).unwrap();
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(180), || async {
        let pm = pms.get(name).await.ok()?;
        let phase = pm.status.as_ref()?.phase?;
        phase.is_final().then_some(pm)
    })
    .await
}

#[tokio::test]
async fn the_chart_installs_kube_migros_that_migrates_pods_and_uninstalls_cleanly() {
    let dirs = Dirs::from_env();
    let (cluster, images, installed_at) = harness::chart_installed(&dirs, &[])
        .await
        .unwrap_or_else(|e| panic!("kube-migros installed and rolled out: {e:#}"));
    eprintln!("images {}:{}", images.repository, images.tag);
    let env = cluster.env.clone();
    let client = env.client().await.unwrap();

    // Two operator replicas and an agent on every node, ready.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let operator = deployments.get("kube-migros-operator").await.unwrap();
    assert_eq!(operator.status.unwrap().ready_replicas, Some(2));
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let agents = daemonsets.get("kube-migros-agent").await.unwrap();
    assert_eq!(agents.status.unwrap().number_ready, 3);
    // One replica leads, and every agent announced itself with a Lease owned by its pod.
    let first_leader = eventually(Duration::from_secs(60), || leader(&client)).await;
    eprintln!("leader: {first_leader}");
    eventually(Duration::from_secs(60), || async {
        workload::agents_announced(&client, NAMESPACE, 3)
            .await
            .then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    for lease in leases
        .list(&ListParams::default().labels(crds::discovery::LEASE_LABEL))
        .await
        .unwrap()
        .items
    {
        let owners = lease.owner_references();
        assert!(
            owners.len() == 1 && owners[0].kind == "Pod",
            "{}: {owners:?}",
            lease.name_any()
        );
    }

    agents_have_their_own_nodes_certificates(&client, installed_at).await;
    an_agent_writes_only_its_own_lease(&env).await;
    agents_only_list_podmigrations(&client).await;

    let (first_leader_ref, cluster_ref) = (&first_leader, &cluster);
    harness::with_namespace("chart", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let app = workload::pod(
            &cluster_ref.images["demo"],
            "app",
            "node-1",
            serde_json::json!(["serve", "--status", ":8080", "--listen", ":9000"]),
            serde_json::json!({"migros.io/migratable": "true", "migros.io/rdma": "true"}),
            serde_json::json!({"rdma/rxe": "1"}),
        );
        pods.create(&PostParams::default(), &app).await.unwrap();
        let mut current = eventually(Duration::from_secs(90), || {
            workload::running(&pods, "app", None)
        })
        .await;
        let ip = workload::ip_of(&current).unwrap();
        let mut before = eventually(Duration::from_secs(60), || async move {
            workload::state(ip).await.filter(|s| num(s, "counter") > 20)
        })
        .await;

        for (hop, target) in [("chart-1", "node-2"), ("chart-2", "node-3")] {
            let done = migrate(&client, &ns, hop, target).await;
            let status = done.status.clone().unwrap_or_default();
            assert_eq!(
                status.phase,
                Some(Phase::Succeeded),
                "{hop}: {:?}",
                status.message
            );
            let moved = eventually(Duration::from_secs(90), || {
                workload::running(&pods, "app", current.metadata.uid.as_deref())
            })
            .await;
            assert_eq!(node_of(&moved), target);
            assert_eq!(workload::ip_of(&moved), Some(ip), "{hop}: the IP changed");
            let counter = num(&before, "counter");
            let after = eventually(Duration::from_secs(60), || async move {
                workload::state(ip)
                    .await
                    .filter(|s| num(s, "counter") > counter)
            })
            .await;
            assert_eq!(
                after.get("id"),
                before.get("id"),
                "{hop}: not the same process"
            );
            // The chart's agents offer the runtime wrapper (installed by their init container),
            // and the replacement runs under the chart's RuntimeClass.
            assert_eq!(status.backend.as_deref(), Some("runtime-wrapper"), "{hop}");
            assert_eq!(
                moved
                    .spec
                    .as_ref()
                    .and_then(|s| s.runtime_class_name.as_deref()),
                Some("kube-migros")
            );
            eprintln!("{hop}: on {target}, timings {:?}", status.timings);
            (current, before) = (moved, after);

            if hop == "chart-1" {
                // The leader goes; the standby takes the Lease and runs the next migration.
                let operators: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
                operators
                    .delete(first_leader_ref, &DeleteParams::default())
                    .await
                    .unwrap();
                let next = eventually(Duration::from_secs(90), || async {
                    leader(&client).await.filter(|l| l != first_leader_ref)
                })
                .await;
                eprintln!("the leader pod was deleted; {next} leads now");
            }
        }
        // Deleting the finished PodMigrations (the operator lifts its finalizer).
        let pms: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        for hop in ["chart-1", "chart-2"] {
            pms.delete(hop, &DeleteParams::default()).await.unwrap();
        }
        eventually(Duration::from_secs(60), || async {
            pms.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await;

        // Uninstalling removes every object of the chart and the agents' Leases, and leaves the
        // workload alone.
        release::uninstall(&dirs, &env).expect("helm uninstall");
        let gone = || async {
            let ns_pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
            let ns_leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
            let left: BTreeSet<String> = [
                names(&ns_pods, "").await,
                names(&ns_leases, "").await,
                names(
                    &Api::<Secret>::namespaced(client.clone(), NAMESPACE),
                    INSTANCE,
                )
                .await,
                names(
                    &Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
                    INSTANCE,
                )
                .await,
                names(
                    &Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE),
                    INSTANCE,
                )
                .await,
                names(
                    &Api::<Role>::namespaced(client.clone(), NAMESPACE),
                    INSTANCE,
                )
                .await,
                names(
                    &Api::<RoleBinding>::namespaced(client.clone(), NAMESPACE),
                    INSTANCE,
                )
                .await,
                names(&Api::<ClusterRole>::all(client.clone()), INSTANCE).await,
                names(&Api::<RuntimeClass>::all(client.clone()), INSTANCE).await,
                names(&Api::<ClusterRoleBinding>::all(client.clone()), INSTANCE).await,
                names(
                    &Api::<ValidatingAdmissionPolicy>::all(client.clone()),
                    INSTANCE,
                )
                .await,
                names(
                    &Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()),
                    INSTANCE,
                )
                .await,
            ]
            .into_iter()
            .flatten()
            .collect();
            left.is_empty().then_some(()).ok_or(left)
        };
        let mut last = BTreeSet::new();
        let clean = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match gone().await {
                    Ok(()) => return,
                    Err(left) => last = left,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        assert!(clean.is_ok(), "left after helm uninstall: {last:?}");
        assert!(
            !release::installed(&dirs, &env).expect("helm lists the releases"),
            "the release is still installed"
        );
        let still = workload::running(&pods, "app", None).await.unwrap();
        assert_eq!(still.metadata.uid, current.metadata.uid);
    })
    .await;
}

/// With a byte budget for kept checkpoints (the sandbox's values set one), the agents may list
/// PodMigrations, to know which migrations ended, and do nothing else with them.
async fn agents_only_list_podmigrations(client: &Client) {
    let agent = format!("system:serviceaccount:{NAMESPACE}:kube-migros-agent");
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    for (verb, allowed) in [
        ("list", true),
        ("get", false),
        ("watch", false),
        ("create", false),
        ("patch", false),
        ("delete", false),
    ] {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(agent.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{NAMESPACE}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("migros.io".into()),
                    resource: Some("podmigrations".into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap();
        assert_eq!(
            answer.status.map(|s| s.allowed),
            Some(allowed),
            "may an agent {verb} podmigrations?"
        );
    }
}

/// Each agent serves with a certificate of its own node, which it requested (signer
/// `migros.io/agent`) and the chart's operator approved and signed: every request issued since
/// the install came from a token bound to a pod on the node its certificate names, and every
/// node's agent has one.
async fn agents_have_their_own_nodes_certificates(
    client: &Client,
    installed_at: k8s_openapi::jiff::Timestamp,
) {
    let requests: Api<CertificateSigningRequest> = Api::all(client.clone());
    let issued = requests
        .list(&ListParams::default().fields("spec.signerName=migros.io/agent"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|r| {
            r.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                t.0 >= installed_at - k8s_openapi::jiff::SignedDuration::from_secs(1)
            })
        })
        .filter_map(|r| {
            let cert = r.status.as_ref()?.certificate.as_ref()?.0.clone();
            let named = agent_api::tls::TlsMaterial::from_pem(vec![], cert, vec![])
                .node()
                .unwrap();
            let requester =
                r.spec.extra.as_ref()?["authentication.kubernetes.io/node-name"].clone();
            assert_eq!(
                requester,
                std::slice::from_ref(&named),
                "{}: a certificate of {named} for a requester on {requester:?}",
                r.name_any()
            );
            Some(named)
        })
        .collect::<BTreeSet<String>>();
    assert_eq!(
        issued,
        ["node-1", "node-2", "node-3"].map(String::from).into(),
        "the nodes whose agents got a certificate"
    );
}

/// The agents' service account may write Leases of the namespace (RBAC), but the chart's admission
/// policy keeps each agent to its own node's Lease, held by its node: it cannot announce itself
/// for another node or take the operator's leader Lease. Checked as the agent of node-1 would
/// call (impersonated, with the node the API server sets for a pod-bound token), by dry runs.
async fn an_agent_writes_only_its_own_lease(env: &sandbox::controlplane::Env) {
    let agents = format!("system:serviceaccount:{NAMESPACE}:kube-migros-agent");
    let node_1 = [("authentication.kubernetes.io/node-name", "node-1")];
    let as_node_1: Api<Lease> =
        Api::namespaced(env.client_as(&agents, &node_1).await.unwrap(), NAMESPACE);
    let dry = PatchParams::default().dry_run();
    let touch =
        Patch::Merge(serde_json::json!({"metadata": {"annotations": {"migros.io/test": "x"}}}));
    as_node_1
        .patch("kube-migros-agent-node-1", &dry, &touch)
        .await
        .expect("an agent writes its own node's Lease");
    let refused = |what: &str, outcome: Result<Lease, kube::Error>, says: &str| match outcome {
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
            assert!(e.message.contains(says), "{what}: {}", e.message)
        }
        other => panic!("{what}: {other:?}"),
    };
    refused(
        "another node's Lease",
        as_node_1
            .patch("kube-migros-agent-node-2", &dry, &touch)
            .await,
        "may write only the Lease kube-migros-agent-node-1",
    );
    refused(
        "the leader Lease",
        as_node_1.patch("kube-migros-operator", &dry, &touch).await,
        "may write only the Lease kube-migros-agent-node-1",
    );
    refused(
        "its own Lease held for another node",
        as_node_1
            .patch(
                "kube-migros-agent-node-1",
                &dry,
                &Patch::Merge(serde_json::json!({"spec": {"holderIdentity": "node-2"}})),
            )
            .await,
        "must hold its Lease itself",
    );
    let unbound: Api<Lease> =
        Api::namespaced(env.client_as(&agents, &[]).await.unwrap(), NAMESPACE);
    refused(
        "a token bound to no node",
        unbound
            .patch("kube-migros-agent-node-1", &dry, &touch)
            .await,
        "bound to a pod on a node",
    );
}
