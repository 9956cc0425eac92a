//! The operator as a real process against the sandbox's real API server, talking real gRPC with
//! mutual TLS to scriptable test agents (the real agents are in `live.rs` and the runtime suite).
//! Nodes are API objects kept Ready by the test; replacement pods are reported Running by it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::time::Duration;

use agent_api::{Role, Step};
use crds::{Phase, PodMigration};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use support::{Operator, Options, Scenario};
use testkit::{
    harness::{eventually, with_namespace},
    testagent::{Behaviour, CHECKPOINT_TIME, MEMORY_BYTES, Scripted},
};

const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// The steps of a migration that succeeds, in their order, with the test agent (node) that takes
/// each.
const SUCCEEDING: [(usize, Step); 6] = [
    (2, Step::PrepareTarget),
    (1, Step::Checkpoint),
    (1, Step::Transfer),
    (1, Step::Commit(Role::Source)),
    (2, Step::StageRestore),
    (2, Step::FinishRestore),
];

#[tokio::test]
async fn a_migration_goes_through_every_phase_to_succeeded() {
    with_namespace("op-happy", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let source = s.pod("server", 1, "10.244.1.5").await;
        let operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move", "server", Some(2)).await;
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;

        let status = pm.status.clone().unwrap();
        let phases: Vec<Phase> = status.phase_transitions.iter().map(|t| t.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Pending,
                Phase::Preparing,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::Restoring,
                Phase::Succeeded
            ]
        );
        assert_eq!(status.source_node, Some(s.node(1)));
        assert_eq!(status.target_node, Some(s.node(2)));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(status.source_pod_uid, source.uid());
        assert!(status.committed && status.commit_time.is_some());
        let timings = status.timings.unwrap();
        // The checkpoint's duration is the one the agent measured (its checkpoint takes 25 ms).
        let checkpoint_ms = u64::try_from(timings.checkpoint_ms.unwrap()).unwrap();
        assert!(
            timings.downtime_ms.is_some()
                && timings.total_ms.is_some()
                && checkpoint_ms >= CHECKPOINT_TIME.as_millis() as u64,
            "{timings:?}"
        );
        assert_eq!(status.checkpoint.as_ref().map(|c| c.bytes), Some(4096));

        // The replacement: same name and labels, on the target, no init containers, restored image.
        let pod = s.pods().get("server").await.unwrap();
        assert_ne!(pod.uid(), source.uid());
        assert_eq!(status.target_pod_uid, pod.uid());
        assert_eq!(pod.labels(), source.labels());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name, Some(s.node(2)));
        assert_eq!(spec.init_containers, None);
        // The checkpoint image of the archive the source recorded, pinned by digest.
        let recorded = &status.checkpoint.as_ref().unwrap().containers[0];
        let image = agent_api::checkpoint_image::Parts::new(
            "app",
            &recorded.digest,
            u64::try_from(recorded.bytes).unwrap(),
        );
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some(
                format!(
                    "localhost/checkpoint:{}-app@{}",
                    pm.uid().unwrap(),
                    image.manifest_digest()
                )
                .as_str()
            )
        );
        assert_eq!(
            pod.metadata.annotations.unwrap()["migros.io/pod-ip"],
            "10.244.1.5"
        );

        // Each agent step ran exactly once on the right node.
        for (agent, step) in SUCCEEDING {
            assert_eq!(
                s.agent(agent).count(step).executions,
                1,
                "{step:?} on node {agent}"
            );
        }
        assert_eq!(s.agent(3).count(Step::PrepareTarget).calls, 0);

        // Events at the start, the commit point and the end (the phases between are in the
        // status), and metrics that saw it.
        for phase in ["Preparing", "Restoring", "Succeeded"] {
            s.wait_event("move", phase).await;
        }
        let mut reasons = s.event_reasons("move").await;
        reasons.sort();
        assert_eq!(reasons, ["Preparing", "Restoring", "Succeeded"]);
        let (code, metrics) = operator.get("/metrics").await;
        assert_eq!(code, 200);
        assert!(
            metrics.contains(r#"migros_migrations_total{result="Succeeded"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("migros_downtime_seconds_count 1"),
            "{metrics}"
        );
        assert_eq!(operator.get("/live").await.0, 200);
        assert_eq!(
            operator.get("/ready").await,
            (200, "ok: leading".to_string())
        );
    })
    .await;
}

/// Makes the runtime wrapper's RuntimeClass, named `ns` (the operator of the test is told that
/// name); answers the API to delete it with.
async fn runtime_class(client: &kube::Client, ns: &str) -> Api<RuntimeClass> {
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let class: RuntimeClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": ns}, "handler": "kube-migros",
    }))
    .unwrap();
    classes.create(&Default::default(), &class).await.unwrap();
    classes
}

#[tokio::test]
async fn a_target_with_the_runtime_wrapper_restores_under_its_runtime_class_keeping_the_images() {
    with_namespace("op-wrapper", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        // Node 2 has both backends, node 3 checkpoint images alone.
        s.agent(2)
            .with_backends(&["runtime-wrapper", "cri-checkpoint-image"]);
        s.agent(3).with_backends(&["cri-checkpoint-image"]);
        // As installed: checkpoint images are not allowed (they restore on every restart).
        let without_images = Options {
            checkpoint_images: false,
            ..Options::new(&s.certs)
        };
        let mut operator = Operator::start_with(&ns, "op-a", without_images).await;
        // Without the wrapper's RuntimeClass a replacement pod naming it would be refused after
        // the commit, and checkpoint images are not allowed: the pod stays where it is.
        let early = s.pod("early", 1, "10.244.1.4").await;
        s.migrate("before-class", "early", Some(2)).await;
        let pm = s
            .wait_phase("before-class", Phase::Failed, PHASE_TIMEOUT)
            .await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "TargetUnavailable", "{message}");
        assert!(
            message.contains("no RuntimeClass") && message.contains("--allow-checkpoint-images"),
            "{message}"
        );
        let still = s.pods().get("early").await.unwrap();
        assert_eq!(still.metadata.uid, early.metadata.uid);

        let classes = runtime_class(&client, &ns).await;
        let source = s.pod("server", 1, "10.244.1.5").await;
        s.migrate("move", "server", Some(2)).await;
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        assert_eq!(
            pm.status.unwrap().backend.as_deref(),
            Some("runtime-wrapper")
        );
        let spec = s.pods().get("server").await.unwrap().spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some(ns.as_str()));
        assert_eq!(
            spec.containers[0].image,
            source.spec.unwrap().containers[0].image,
            "the replacement keeps its image; the node restores its first start"
        );

        // Node 3 could restore only from checkpoint images.
        s.pod("other", 1, "10.244.1.6").await;
        s.migrate("refused", "other", Some(3)).await;
        let pm = s.wait_phase("refused", Phase::Failed, PHASE_TIMEOUT).await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "TargetUnavailable", "{message}");
        assert!(
            message.contains("without a restore backend the kubelet can use")
                && message.contains("cri-checkpoint-image: not allowed"),
            "{message}"
        );
        // An admin who allows them gets them, and the status says what they mean.
        operator.terminate();
        let mut operator = Operator::start(&ns, "op-a", &s.certs).await;
        operator.wait_ready().await;
        s.migrate("allowed", "other", Some(3)).await;
        let pm = s
            .wait_phase("allowed", Phase::Succeeded, PHASE_TIMEOUT)
            .await;
        let status = pm.status.unwrap();
        assert_eq!(status.backend.as_deref(), Some("cri-checkpoint-image"));
        let message = status.message.unwrap_or_default();
        assert!(
            message.contains(operator::targets::CHECKPOINT_IMAGE_CAVEAT),
            "{message}"
        );
        operator.terminate();
        classes.delete(&ns, &Default::default()).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_post_copy_pod_runs_on_the_target_before_its_memory_and_succeeds_once_it_is_in() {
    with_namespace("op-postcopy", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        for i in [1, 2] {
            s.agent(i).with_strategy("PostCopy", None);
            s.agent(i).with_backends(&["runtime-wrapper"]);
        }
        let classes = runtime_class(&client, &ns).await;
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        // The memory arrives until the test lets it all in.
        s.agent(2).script(Step::Memory, Behaviour::Hold);
        let source = s.pod("server", 1, "10.244.1.5").await;
        let post_copy = serde_json::json!({"strategy": "PostCopy"});
        s.migrate_with("move", "server", Some(2), post_copy.clone())
            .await;
        let pm = s
            .wait_phase("move", Phase::CopyingMemory, PHASE_TIMEOUT)
            .await;
        // The pod runs on the target while the source serves its memory.
        let status = pm.status.unwrap();
        assert!(status.committed);
        let timings = status.timings.unwrap();
        assert!(timings.downtime_ms.is_some() && timings.memory_ms.is_none());
        let replacement = s.pods().get("server").await.unwrap();
        assert_ne!(replacement.uid(), source.uid());
        assert_eq!(replacement.spec.unwrap().node_name, Some(s.node(2)));
        assert!(s.agent(1).asked_post_copy(Step::Checkpoint));
        assert!(s.agent(2).asked_post_copy(Step::StageRestore));
        s.wait_event("move", "CopyingMemory").await;
        // The status shows what came and what is left while it comes.
        let quarter = i64::try_from(MEMORY_BYTES / 4).unwrap();
        let total = i64::try_from(MEMORY_BYTES).unwrap();
        let memory = eventually(Duration::from_secs(30), || async {
            let pm = s.migrations().get("move").await.ok()?;
            pm.status?.memory.filter(|m| m.bytes_transferred == quarter)
        })
        .await;
        assert_eq!(
            (memory.bytes_total, memory.bytes_remaining),
            (total, total - quarter)
        );
        assert!(memory.last_progress_time.is_some());
        s.agent(2).release(Step::Memory);
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        let status = pm.status.unwrap();
        let memory = status.memory.unwrap();
        assert_eq!(
            (memory.bytes_transferred, memory.bytes_remaining),
            (total, 0)
        );
        assert!(status.timings.unwrap().memory_ms.is_some());
        let complete = status
            .conditions
            .iter()
            .find(|c| c.type_ == "MemoryComplete")
            .unwrap();
        assert_eq!(complete.status, "True");

        // Memory that cannot all come (the target's agent says why): Failed, with an Event.
        s.agent(2).script(
            Step::Memory,
            Behaviour::Fail {
                message: "container app: the source closed the page stream".into(),
                times: 1,
            },
        );
        s.pod("other", 1, "10.244.1.6").await;
        s.migrate_with("lost", "other", Some(2), post_copy).await;
        let pm = s.wait_phase("lost", Phase::Failed, PHASE_TIMEOUT).await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "PostCopyFailed", "{message}");
        assert!(
            message.contains("the source closed the page stream") && message.contains("lost"),
            "{message}"
        );
        s.wait_event("lost", "PostCopyFailed").await;
        // The source's frozen pod serves no one any more: its agent is asked to stop it now.
        eventually(Duration::from_secs(30), || async {
            (s.agent(1).count(Step::Cleanup(Role::Source)).executions >= 1).then_some(())
        })
        .await;
        classes.delete(&ns, &Default::default()).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn unmet_preconditions_fail_with_a_reason_and_touch_nothing() {
    with_namespace("op-pre", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        s.pod_with("optout", 1, "10.244.1.6", &[("app", "optout")])
            .await;
        testkit::fixtures::run_pod(
            &s.client,
            &ns,
            &testkit::fixtures::pod("pending", &s.node(1), &[(crds::MIGRATABLE_LABEL, "true")]),
            "10.244.1.7",
        )
        .await;
        // "pending" is reported Pending again, as a kubelet still pulling images would.
        s.pods()
            .patch_status(
                "pending",
                &Default::default(),
                &kube::api::Patch::Merge(serde_json::json!({"status": {"phase": "Pending"}})),
            )
            .await
            .unwrap();
        s.nodes[2].set_unschedulable(true).await;
        let not_ready =
            testkit::fixtures::ApiNode::create(&s.client, &format!("{ns}-node-4")).await;
        not_ready.set_ready(false).await;
        let no_agent = testkit::fixtures::ApiNode::create(&s.client, &format!("{ns}-node-5")).await;
        let rdma = [(crds::MIGRATABLE_LABEL, "true"), (crds::RDMA_LABEL, "true")];
        s.pod_with("rdma", 1, "10.244.1.8", &rdma).await;
        s.agent(2).without_rxe();
        // Pods that cannot follow to another node, though they opted in.
        let unmovable = unmovable_pods(&s, &ns).await;
        let server_before = s.pods().get("server").await.unwrap();
        let host_before = s.pods().get("host-net").await.unwrap();
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;

        let cases = [
            (
                "missing",
                "nobody",
                Some(s.node(2)),
                "PodNotFound",
                "not found",
            ),
            (
                "opted-out",
                "optout",
                Some(s.node(2)),
                "PodNotMigratable",
                "migros.io/migratable",
            ),
            (
                "not-running",
                "pending",
                Some(s.node(2)),
                "PodNotRunning",
                "is not Running",
            ),
            (
                "no-node",
                "server",
                Some(format!("{ns}-nowhere")),
                "TargetUnavailable",
                "does not exist",
            ),
            (
                "same-node",
                "server",
                Some(s.node(1)),
                "TargetUnavailable",
                "is the pod's current node",
            ),
            (
                "cordoned",
                "server",
                Some(s.node(3)),
                "TargetUnavailable",
                "is cordoned",
            ),
            (
                "not-ready",
                "server",
                Some(not_ready.name.clone()),
                "TargetUnavailable",
                "is not Ready",
            ),
            (
                "no-agent",
                "server",
                Some(no_agent.name.clone()),
                "TargetUnavailable",
                "has no running kube-migros agent",
            ),
            (
                // An RDMA pod, to a node whose agent reports no rxe device.
                "no-rxe",
                "rdma",
                Some(s.node(2)),
                "TargetUnavailable",
                "has no rxe (SoftRoCE) device for this RDMA pod",
            ),
            (
                "host-network",
                "host-net",
                Some(s.node(2)),
                "PodNotMovable",
                "uses the node's network (hostNetwork)",
            ),
            (
                // Its content moves with the runtime wrapper alone, whose class is missing here.
                "empty-dir",
                "scratch",
                Some(s.node(2)),
                "TargetUnavailable",
                "has emptyDir volumes, whose content moves only with the runtime-wrapper",
            ),
            (
                "rwo-claim",
                "database",
                Some(s.node(2)),
                "PodNotMovable",
                "claim db-data is ReadWriteOnce",
            ),
        ];
        assert_eq!(unmovable, ["host-net", "scratch", "database"]);
        // Strategies beyond stop-and-copy: node 2 lacks what PostCopy needs, node 3 has it (it
        // is cordoned, which the strategy's judgement does not look at); the agents report
        // nothing about PreCopy, as an older agent would.
        s.agent(1).with_strategy("PostCopy", None);
        s.agent(2)
            .with_strategy("PostCopy", Some("fs.pipe-max-size is 1048576 bytes"));
        s.agent(3).with_strategy("PostCopy", None);
        let mut cases: Vec<_> = cases
            .into_iter()
            .map(|(name, pod, target, reason, message)| {
                let spec = serde_json::json!({"targetNode": target});
                (name, pod, spec, reason, message.to_string())
            })
            .collect();
        cases.extend([
            (
                "post-copy-lacking",
                "server",
                serde_json::json!({"targetNode": s.node(2), "strategy": "PostCopy"}),
                "StrategyUnavailable",
                format!(
                    "target node {} cannot do PostCopy: fs.pipe-max-size is 1048576 bytes",
                    s.node(2)
                ),
            ),
            (
                "pre-copy-unreported",
                "server",
                serde_json::json!({"targetNode": s.node(2), "strategy": "PreCopy"}),
                "StrategyUnavailable",
                format!(
                    "source node {} cannot do PreCopy: its agent does not report",
                    s.node(1)
                ),
            ),
            (
                // Multus static IPAM keeps the addresses its entries pin; this pod has none:
                // refused before anything, not when its replacement is made past the commit.
                "multus-unpinned",
                "server",
                serde_json::json!({"targetNode": s.node(2), "network": {"mechanism": "MultusStatic"}}),
                "PodNotMovable",
                "its address cannot be kept on the target: the pod has no \
                 k8s.v1.cni.cncf.io/networks annotation"
                    .to_string(),
            ),
            (
                // Node 3 has what PostCopy needs, but no node here restores with the runtime
                // wrapper, which alone restores a process whose memory is still to come.
                "post-copy-no-wrapper",
                "server",
                serde_json::json!({"strategy": "PostCopy"}),
                "TargetUnavailable",
                "PostCopy restores only with the runtime-wrapper backend".to_string(),
            ),
        ]);
        // One at a time: a second active migration of the same pod would be refused as PodBusy.
        for (name, pod, spec, reason, message) in cases {
            s.migrate_with(name, pod, None, spec).await;
            let pm = s.wait_phase(name, Phase::Failed, PHASE_TIMEOUT).await;
            let (got_reason, got_message) = Scenario::reason(&pm);
            assert_eq!(got_reason, reason, "{name}: {got_message}");
            assert!(
                got_message.contains(&message),
                "{name}: {got_message:?} lacks {message:?}"
            );
            let phases: Vec<Phase> = pm
                .status
                .unwrap()
                .phase_transitions
                .iter()
                .map(|t| t.phase)
                .collect();
            assert_eq!(
                phases,
                [Phase::Pending, Phase::Failed],
                "{name} went through other phases"
            );
        }
        for before in [server_before, host_before] {
            let after = s.pods().get(&before.name_any()).await.unwrap();
            assert_eq!(
                after.resource_version(),
                before.resource_version(),
                "pod {} was touched",
                before.name_any()
            );
        }
        for agent in &s.agents {
            assert_eq!(agent.count(Step::Checkpoint).calls, 0);
            assert_eq!(agent.count(Step::PrepareTarget).calls, 0);
        }
        // Node 2 cannot do PostCopy; StopAndCopy moves the pod there all the same.
        s.migrate("stop-and-copy", "server", Some(2)).await;
        s.wait_phase("stop-and-copy", Phase::Succeeded, PHASE_TIMEOUT)
            .await;

        // A pod whose Multus attachment pins its address moves with MultusStatic: the
        // replacement asks for the same address, and Multus's old record of it is gone.
        let networks = r#"[{"name": "rdma-net", "interface": "net1", "ips": ["10.10.0.5/24"]}]"#;
        let mut multus =
            testkit::fixtures::pod("multus", &s.node(1), &[(crds::MIGRATABLE_LABEL, "true")]);
        multus.metadata.annotations = Some(
            [
                ("k8s.v1.cni.cncf.io/networks", networks),
                (
                    "k8s.v1.cni.cncf.io/network-status",
                    &format!(r#"[{{"name": "{ns}/rdma-net", "interface": "net1", "ips": ["10.10.0.5"]}}]"#),
                ),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        );
        testkit::fixtures::run_pod(&s.client, &ns, &multus, "10.244.1.9").await;
        let spec = serde_json::json!({"targetNode": s.node(2), "network": {"mechanism": "MultusStatic"}});
        s.migrate_with("multus", "multus", None, spec).await;
        s.wait_phase("multus", Phase::Succeeded, PHASE_TIMEOUT).await;
        let moved = s.pods().get("multus").await.unwrap();
        let annotations = moved.annotations();
        assert_eq!(
            annotations.get("k8s.v1.cni.cncf.io/networks").map(String::as_str),
            Some(networks)
        );
        assert!(!annotations.contains_key("k8s.v1.cni.cncf.io/network-status"));
        assert_eq!(
            moved.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(s.node(2).as_str())
        );
    })
    .await;
}

/// Opted-in pods on node 1 that cannot move: one on the node's network, one with an emptyDir (no
/// node restores with the runtime wrapper here), one with a ReadWriteOnce claim; answers their
/// names.
async fn unmovable_pods(s: &Scenario, ns: &str) -> Vec<String> {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Volume};
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    kube::Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), ns)
        .create(&Default::default(), &claim)
        .await
        .unwrap();
    let volume = |v: serde_json::Value| -> Volume { serde_json::from_value(v).unwrap() };
    let cases = [
        ("host-net", None, "10.88.0.11"),
        (
            "scratch",
            Some(volume(
                serde_json::json!({"name": "scratch", "emptyDir": {}}),
            )),
            "10.244.1.9",
        ),
        (
            "database",
            Some(volume(serde_json::json!({"name": "data",
                "persistentVolumeClaim": {"claimName": "db-data"}}))),
            "10.244.1.10",
        ),
    ];
    let mut names = Vec::new();
    for (name, volume, ip) in cases {
        let mut pod = testkit::fixtures::pod(name, &s.node(1), &[(crds::MIGRATABLE_LABEL, "true")]);
        let spec = pod.spec.as_mut().unwrap();
        spec.host_network = Some(volume.is_none());
        spec.volumes = volume.map(|v| vec![v]);
        testkit::fixtures::run_pod(&s.client, ns, &pod, ip).await;
        names.push(name.to_string());
    }
    names
}

#[tokio::test]
async fn a_failure_at_each_step_before_the_commit_point_rolls_back_and_leaves_the_source() {
    with_namespace("op-rollback", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        for (i, (agent, step, reason)) in [
            (2, Step::PrepareTarget, "PrepareFailed"),
            (1, Step::Checkpoint, "CheckpointFailed"),
            (1, Step::Transfer, "TransferFailed"),
        ]
        .into_iter()
        .enumerate()
        {
            let pod = format!("server-{i}");
            let before = s.pod(&pod, 1, &format!("10.244.1.{}", 10 + i)).await;
            s.agent(agent).script(
                step,
                Behaviour::Fail {
                    message: "injected failure".into(),
                    times: 1,
                },
            );
            let aborts_before = s.agent(1).count(Step::Abort(Role::Source)).executions;
            let name = format!("fail-{i}");
            s.migrate(&name, &pod, Some(2)).await;
            let pm = s.wait_phase(&name, Phase::RolledBack, PHASE_TIMEOUT).await;
            let (got, message) = Scenario::reason(&pm);
            assert_eq!(got, reason, "{message}");
            assert!(
                message.contains("injected failure") && message.contains("runs as before"),
                "{message}"
            );
            let status = pm.status.unwrap();
            assert!(!status.committed);
            assert_eq!(
                s.agent(1).count(Step::Abort(Role::Source)).executions,
                aborts_before + 1,
                "{step:?}: source not resumed"
            );
            let after = s.pods().get(&pod).await.unwrap();
            assert_eq!(
                after.uid(),
                before.uid(),
                "{step:?}: the source pod was replaced"
            );
            assert_eq!(
                after.resource_version(),
                before.resource_version(),
                "{step:?}: the source pod was touched"
            );
            s.wait_event(&name, reason).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_failure_after_the_commit_point_is_retried_until_the_restore_succeeds() {
    with_namespace("op-retry", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        s.agent(2).script(
            Step::StageRestore,
            Behaviour::Fail {
                message: "runtime busy".into(),
                times: 2,
            },
        );
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move", "server", Some(2)).await;
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        assert!(pm.status.unwrap().committed);
        assert_eq!(s.agent(2).count(Step::StageRestore).executions, 3);
        assert_eq!(
            s.agent(1).count(Step::Abort(Role::Source)).calls,
            0,
            "a committed migration must not roll back"
        );
    })
    .await;
}

#[tokio::test]
async fn a_target_gone_after_the_commit_point_is_replaced_by_another_node() {
    with_namespace("op-retarget", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        // The replacement is made on node 2 and runs; then node 2 goes before the restore is
        // finished: its agent dies and whoever shut it down marks it out of service.
        s.agent(2).script(Step::FinishRestore, Behaviour::Hold);
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move", "server", Some(2)).await;
        let stranded = eventually(PHASE_TIMEOUT, || async {
            let pod = s.pods().get_opt("server").await.ok()??;
            let on_2 = pod.spec.as_ref()?.node_name.as_deref() == Some(s.node(2).as_str());
            (on_2 && s.agent(2).count(Step::FinishRestore).calls > 0).then_some(pod)
        })
        .await;
        // Not yet gone: NotReady alone is waited for (the node may still run the pod). Nothing
        // is to happen here, so there is no condition to wait for: the operator gets a few of its
        // 2-second retries.
        s.agent(2).crash();
        s.nodes[1].set_ready(false).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waiting = s.migrations().get("move").await.unwrap();
        let status = waiting.status.unwrap();
        assert_eq!(status.target_node, Some(s.node(2)), "{:?}", status.message);
        assert_eq!(s.agent(3).count(Step::PrepareTarget).calls, 0);

        let taint = serde_json::json!({"spec": {"taints": [{
            "key": operator::controller::OUT_OF_SERVICE_TAINT,
            "value": "nodeshutdown",
            "effect": "NoExecute",
        }]}});
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(s.client.clone())
            .patch(
                &s.node(2),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&taint),
            )
            .await
            .unwrap();
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        let status = pm.status.unwrap();
        assert_eq!(status.target_node, Some(s.node(3)));
        let retargeted = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Retargeted")
            .expect("a Retargeted condition");
        assert_eq!(retargeted.reason, "TargetGone");
        assert!(
            retargeted.message.contains("out of service")
                && retargeted.message.contains(&s.node(3)),
            "{}",
            retargeted.message
        );
        // The stranded replacement went; the new one runs on node 3 with the pod's IP.
        let pod = s.pods().get("server").await.unwrap();
        assert_ne!(pod.uid(), stranded.uid());
        assert_eq!(status.target_pod_uid, pod.uid());
        assert_eq!(pod.spec.unwrap().node_name, Some(s.node(3)));
        assert_eq!(
            pod.metadata.annotations.unwrap()["migros.io/pod-ip"],
            "10.244.1.5"
        );
        // The checkpoint went again from the source, which kept it, to node 3 only; node 3 did
        // each target step once.
        assert_eq!(s.agent(1).count(Step::Transfer).executions, 2);
        assert_eq!(s.agent(1).count(Step::Checkpoint).executions, 1);
        for step in [Step::PrepareTarget, Step::StageRestore, Step::FinishRestore] {
            assert_eq!(s.agent(3).count(step).executions, 1, "{step:?} on node 3");
        }
        assert_eq!(s.agent(3).count(Scripted::Receive).executions, 1);
        assert_eq!(
            s.agent(1).count(Step::Abort(Role::Source)).calls,
            0,
            "a committed migration must not roll back"
        );
    })
    .await;
}

#[tokio::test]
async fn a_migration_that_times_out_before_the_commit_point_rolls_back() {
    with_namespace("op-timeout", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate_with(
            "slow",
            "server",
            Some(2),
            serde_json::json!({"timeoutSeconds": 10}),
        )
        .await;
        let pm = s
            .wait_phase("slow", Phase::RolledBack, Duration::from_secs(40))
            .await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "TimedOut", "{message}");
        assert!(
            message.contains("timed out after 10s in phase Checkpointing"),
            "{message}"
        );
        assert_eq!(s.agent(1).count(Step::Abort(Role::Source)).executions, 1);
        assert_eq!(s.agent(2).count(Step::Abort(Role::Target)).executions, 1);
    })
    .await;
}

#[tokio::test]
async fn a_migration_labelled_by_someone_else_mid_flight_still_commits_and_succeeds() {
    // The operator takes its own last write as the migration's state; every status write carries
    // the resourceVersion it was decided on. A change by anyone else (a label, here) makes the
    // write's precondition fail, and the operator must read the migration again rather than
    // overwrite it, or retry with the stale version until the timeout: once for a plain status
    // write (mid-checkpoint), once for the commit (mid-transfer).
    with_namespace("op-label", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        s.agent(1).script(Step::Transfer, Behaviour::Hold);
        let operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate_with(
            "labelled",
            "server",
            Some(2),
            serde_json::json!({"timeoutSeconds": 30}),
        )
        .await;
        let label = |value: &'static str| {
            let pms = s.migrations();
            async move {
                let patch = serde_json::json!({"metadata": {"labels": {"team": value}}});
                pms.patch(
                    "labelled",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap();
            }
        };
        s.wait_phase("labelled", Phase::Checkpointing, PHASE_TIMEOUT)
            .await;
        label("compute").await;
        s.agent(1).release(Step::Checkpoint);
        s.wait_phase("labelled", Phase::Transferring, PHASE_TIMEOUT)
            .await;
        let (_, metrics) = operator.get("/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("migros_reconcile_errors_total{kind=\"changed\"}")),
            "the write after the label was not refused as stale:\n{metrics}"
        );
        label("storage").await;
        s.agent(1).release(Step::Transfer);
        let pm = s
            .wait_phase("labelled", Phase::Succeeded, PHASE_TIMEOUT)
            .await;
        assert!(pm.status.as_ref().unwrap().committed);
        assert_eq!(s.agent(1).count(Step::Abort(Role::Source)).executions, 0);
        // Nobody's change was overwritten.
        assert_eq!(pm.labels().get("team").map(String::as_str), Some("storage"));
    })
    .await;
}

#[tokio::test]
async fn a_replacement_template_changed_by_someone_else_is_never_used() {
    with_namespace("op-template", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let tamper = |name: &'static str| {
            let pms = s.migrations();
            async move {
                let pm = pms.get(name).await.unwrap();
                let raw =
                    &pm.metadata.annotations.unwrap()[operator::replacement::TEMPLATE_ANNOTATION];
                let mut template: serde_json::Value = serde_json::from_str(raw).unwrap();
                template["spec"]["volumes"] = serde_json::json!([
                    {"name": "host", "hostPath": {"path": "/"}}
                ]);
                let patch = serde_json::json!({"metadata": {"annotations": {
                    operator::replacement::TEMPLATE_ANNOTATION: template.to_string(),
                }}});
                pms.patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap();
            }
        };

        // Before the commit point: the migration rolls back, the source pod runs as before.
        let before = s.pod("server", 1, "10.244.1.5").await;
        s.agent(1).script(Step::Transfer, Behaviour::Hold);
        let mut operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("early", "server", Some(2)).await;
        s.wait_phase("early", Phase::Transferring, PHASE_TIMEOUT)
            .await;
        tamper("early").await;
        s.agent(1).release(Step::Transfer);
        let pm = s
            .wait_phase("early", Phase::RolledBack, PHASE_TIMEOUT)
            .await;
        assert_eq!(Scenario::reason(&pm).0, "TemplateChanged");
        let after = s.pods().get("server").await.unwrap();
        assert_eq!(
            (after.uid(), after.resource_version()),
            (before.uid(), before.resource_version())
        );

        // After it, an operator that takes over finds the change: it fails the migration and
        // creates no pod from that template.
        s.pod("db", 1, "10.244.1.6").await;
        s.agent(2).script(Step::StageRestore, Behaviour::Hold);
        s.migrate("late", "db", Some(2)).await;
        s.wait_phase("late", Phase::Restoring, PHASE_TIMEOUT).await;
        tamper("late").await;
        operator.kill();
        s.agent(2).release(Step::StageRestore);
        let _operator = Operator::start(&ns, "op-b", &s.certs).await;
        let pm = s.wait_phase("late", Phase::Failed, PHASE_TIMEOUT).await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "TemplateChanged", "{message}");
        assert!(message.contains("checkpoint is kept"), "{message}");
        // The target lets go of the pod's IP and counters at once, keeping the checkpoint, and
        // the status says so.
        let released = support::eventually(PHASE_TIMEOUT, || async {
            let pm = s.migrations().get("late").await.unwrap();
            pm.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "TargetReleased")
        })
        .await;
        assert_eq!(released.status, "True", "{released:?}");
        assert_eq!(s.agent(2).count(Step::Release).executions, 1);
        assert!(
            s.pods().get_opt("db").await.unwrap().is_none_or(|p| p
                .spec
                .and_then(|sp| sp.volumes)
                .unwrap_or_default()
                .iter()
                .all(|v| v.host_path.is_none())),
            "a pod was made from the changed template"
        );
    })
    .await;
}

#[tokio::test]
async fn pods_named_with_dots_or_at_length_253_move() {
    with_namespace("op-names", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let longest = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        for (i, pod) in ["db.0", longest.as_str()].into_iter().enumerate() {
            let labels = [(crds::MIGRATABLE_LABEL, "true")];
            let before = s
                .pod_with(pod, 1, &format!("10.244.1.{}", 30 + i), &labels)
                .await;
            let name = format!("names-{i}");
            s.migrate(&name, pod, Some(2)).await;
            s.wait_phase(&name, Phase::Succeeded, PHASE_TIMEOUT).await;
            let after = s.pods().get(pod).await.unwrap();
            assert_ne!(after.uid(), before.uid(), "{pod}: replaced");
            assert_eq!(
                after.spec.and_then(|sp| sp.node_name).as_deref(),
                Some(s.node(2).as_str()),
                "{pod}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_operator_killed_in_any_phase_resumes_without_repeating_a_step() {
    with_namespace("op-restart", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let mut operator = Operator::start(&ns, "op-a", &s.certs).await;
        let forward = SUCCEEDING;
        // Killed while each step runs: before the commit point, at it and during the restore.
        for (i, (agent, held)) in forward.into_iter().enumerate() {
            let name = format!("restart-{i}");
            let pod = format!("server-{i}");
            let before = counts(&s, &forward);
            s.pod(&pod, 1, &format!("10.244.1.{}", 20 + i)).await;
            s.agent(agent).script(held, Behaviour::Hold);
            s.migrate(&name, &pod, Some(2)).await;
            let started = before[i].executions + 1;
            support::eventually(PHASE_TIMEOUT, || async {
                (s.agent(agent).count(held).executions == started).then_some(())
            })
            .await;
            operator.kill();
            let at_kill = counts(&s, &forward);
            s.agent(agent).release(held);
            operator = Operator::start(&ns, "op-a", &s.certs).await;
            s.wait_phase(&name, Phase::Succeeded, PHASE_TIMEOUT).await;
            let after = counts(&s, &forward);
            for (j, ((_, step), (was, now))) in
                forward.iter().zip(before.iter().zip(&after)).enumerate()
            {
                assert_eq!(
                    now.executions,
                    was.executions + 1,
                    "{step:?} ran again after a restart during {held:?}"
                );
                // A step done before the kill is asked for at most once by the new operator
                // (when its result was not written yet), and answered from memory.
                if j < i {
                    assert!(
                        now.calls <= at_kill[j].calls + 1,
                        "{step:?} asked {} times after a restart during {held:?}",
                        now.calls - at_kill[j].calls
                    );
                }
            }
            s.agent(agent).script(held, Behaviour::Succeed);
        }

        // Killed during a rollback: the transfer fails, and the operator dies while the source
        // resumes. The new one finishes the rollback; nothing runs twice, nothing past the
        // commit point runs at all.
        let backward = [
            (1, Step::Transfer),
            (1, Step::Abort(Role::Source)),
            (2, Step::Abort(Role::Target)),
            (1, Step::Commit(Role::Source)),
            (2, Step::StageRestore),
        ];
        let before = counts(&s, &backward);
        s.pod("server-back", 1, "10.244.1.40").await;
        s.agent(1).script(
            Step::Transfer,
            Behaviour::Fail {
                message: "link down".into(),
                times: 1,
            },
        );
        s.agent(1)
            .script(Step::Abort(Role::Source), Behaviour::Hold);
        s.migrate("restart-back", "server-back", Some(2)).await;
        let started = before[1].executions + 1;
        support::eventually(PHASE_TIMEOUT, || async {
            (s.agent(1).count(Step::Abort(Role::Source)).executions == started).then_some(())
        })
        .await;
        operator.kill();
        s.agent(1).release(Step::Abort(Role::Source));
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        let pm = s
            .wait_phase("restart-back", Phase::RolledBack, PHASE_TIMEOUT)
            .await;
        assert_eq!(Scenario::reason(&pm).0, "TransferFailed");
        let after = counts(&s, &backward);
        let ran: Vec<u32> = after
            .iter()
            .zip(&before)
            .map(|(now, was)| now.executions - was.executions)
            .collect();
        assert_eq!(ran, [1, 1, 1, 0, 0], "executions of {backward:?}");
        assert!(
            s.pods().get("server-back").await.is_ok(),
            "the source pod is gone after a rollback"
        );
    })
    .await;
}

/// The test agents' counts of `steps`, in their order.
fn counts(s: &Scenario, steps: &[(usize, Step)]) -> Vec<testkit::testagent::Count> {
    steps
        .iter()
        .map(|(agent, step)| s.agent(*agent).count(*step))
        .collect()
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_acts_and_the_other_takes_over() {
    with_namespace("op-leader", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        s.pod("server", 1, "10.244.1.5").await;
        let mut first = Operator::start(&ns, "op-first", &s.certs).await;
        first.wait_ready().await;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), &ns);
        let holder =
            |l: k8s_openapi::api::coordination::v1::Lease| l.spec.and_then(|s| s.holder_identity);
        let lease = tokio::time::timeout(
            PHASE_TIMEOUT,
            kube::runtime::wait::await_condition(
                leases.clone(),
                "kube-migros-operator",
                |l: Option<&k8s_openapi::api::coordination::v1::Lease>| {
                    l.and_then(|l| l.spec.as_ref())
                        .and_then(|s| s.holder_identity.as_deref())
                        == Some("op-first")
                },
            ),
        )
        .await
        .expect("op-first leads")
        .unwrap()
        .unwrap();
        assert_eq!(holder(lease), Some("op-first".into()));
        let second = Operator::start(&ns, "op-second", &s.certs).await;
        second.wait_ready().await;
        assert_eq!(second.get("/ready").await, (200, "ok: standing by".into()));

        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        s.migrate("move", "server", Some(2)).await;
        s.wait_phase("move", Phase::Checkpointing, PHASE_TIMEOUT)
            .await;
        // Only the leader wrote: every Event so far comes from op-first.
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
        let instances: Vec<Option<String>> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| e.reporting_instance)
            .collect();
        assert!(
            !instances.is_empty() && instances.iter().all(|i| i.as_deref() == Some("op-first")),
            "{instances:?}"
        );

        first.kill();
        s.agent(1).release(Step::Checkpoint);
        s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        assert_eq!(
            holder(leases.get("kube-migros-operator").await.unwrap()),
            Some("op-second".into())
        );
        assert_eq!(s.agent(1).count(Step::Checkpoint).executions, 1);
        assert_eq!(second.get("/ready").await, (200, "ok: leading".into()));
    })
    .await;
}

#[tokio::test]
async fn concurrent_migrations_of_different_pods_all_succeed_and_a_busy_pod_is_refused() {
    with_namespace("op-concurrent", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        for i in 0..5 {
            s.pod(&format!("worker-{i}"), 1, &format!("10.244.1.{}", 30 + i))
                .await;
        }
        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        for i in 0..5 {
            s.migrate(&format!("move-{i}"), &format!("worker-{i}"), None)
                .await;
        }
        s.wait_phase("move-0", Phase::Checkpointing, PHASE_TIMEOUT)
            .await;
        // A second migration of a pod that is being moved fails and changes nothing.
        s.migrate("again", "worker-0", Some(3)).await;
        let again = s.wait_phase("again", Phase::Failed, PHASE_TIMEOUT).await;
        let (reason, message) = Scenario::reason(&again);
        assert_eq!(reason, "PodBusy");
        assert!(message.contains("move-0"), "{message}");
        s.agent(1).release(Step::Checkpoint);
        for i in 0..5 {
            let pm = s
                .wait_phase(&format!("move-{i}"), Phase::Succeeded, PHASE_TIMEOUT)
                .await;
            let target = pm.status.unwrap().target_node.unwrap();
            assert_ne!(target, s.node(1), "move-{i} picked the source node");
            assert_ne!(target, "", "move-{i} picked no node");
        }
        assert_eq!(s.agent(1).count(Step::Checkpoint).executions, 5);
        let prepared = s.agent(2).count(Step::PrepareTarget).executions
            + s.agent(3).count(Step::PrepareTarget).executions;
        assert_eq!(prepared, 5, "each migration prepared its target once");
    })
    .await;
}

#[tokio::test]
async fn of_two_migrations_of_a_pod_created_at_once_exactly_one_proceeds() {
    with_namespace("op-claim", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        const PODS: usize = 20;
        for i in 0..PODS {
            s.pod(&format!("w-{i}"), 1, &format!("10.244.1.{}", 40 + i))
                .await;
        }
        // Whoever proceeds stays in Checkpointing, so that a later start cannot pass for a race.
        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        // Claims left behind by migrations that are gone: one the operator finds when it starts
        // leading (it deletes it), and one for w-0 made while it runs (the migration that comes
        // takes it over).
        let claims: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(s.client.clone(), &ns);
        let stale = |pod: &str| -> k8s_openapi::api::coordination::v1::Lease {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": operator::claims::lease_name(&ns, pod),
                    "labels": {operator::claims::CLAIM_LABEL: "true"},
                    "annotations": {operator::claims::MIGRATION_ANNOTATION: format!("{ns}/gone")},
                },
                "spec": {"holderIdentity": "uid-of-a-migration-that-is-gone"},
            }))
            .unwrap()
        };
        let forgotten = stale("left-behind");
        claims
            .create(&Default::default(), &forgotten)
            .await
            .unwrap();
        // All winners proceed at once (the limits on migrations in flight are another test's).
        let options = Options {
            limits: Some((PODS, PODS, PODS)),
            ..Options::new(&s.certs)
        };
        let operator = Operator::start_with(&ns, "op-a", options).await;
        operator.wait_ready().await;
        eventually(PHASE_TIMEOUT, || async {
            let name = forgotten.metadata.name.as_deref().unwrap_or_default();
            claims.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
        claims
            .create(&Default::default(), &stale("w-0"))
            .await
            .unwrap();
        // Each pod's two migrations are created together, with no wait between them.
        futures::future::join_all((0..PODS).map(|i| {
            let (pod, s) = (format!("w-{i}"), &s);
            async move {
                futures::future::join(
                    s.migrate(&format!("a-{i}"), &pod, None),
                    s.migrate(&format!("b-{i}"), &pod, None),
                )
                .await
            }
        }))
        .await;
        for i in 0..PODS {
            let (a, b) = (format!("a-{i}"), format!("b-{i}"));
            let pair = eventually(PHASE_TIMEOUT, || async {
                let (a, b) = (
                    s.migrations().get(&a).await.ok()?,
                    s.migrations().get(&b).await.ok()?,
                );
                let phase = |pm: &PodMigration| pm.status.as_ref().and_then(|st| st.phase);
                let decided = |pm: &PodMigration| phase(pm).is_some_and(|p| p != Phase::Pending);
                (decided(&a) && decided(&b)).then_some((a, b))
            })
            .await;
            let proceeded = |pm: &PodMigration| {
                pm.status.as_ref().is_some_and(|st| {
                    st.phase_transitions
                        .iter()
                        .any(|t| t.phase == Phase::Preparing)
                })
            };
            let (winner, loser) = match (proceeded(&pair.0), proceeded(&pair.1)) {
                (true, false) => (&pair.0, &pair.1),
                (false, true) => (&pair.1, &pair.0),
                both => panic!("w-{i}: {a} and {b} proceeded: {both:?}"),
            };
            let (reason, message) = Scenario::reason(loser);
            assert_eq!(reason, "PodBusy", "w-{i}: {message}");
            assert!(message.contains(&winner.name_any()), "{message}");
        }
        // The winners go on once the source lets them, and give their claims back when done.
        s.agent(1).release(Step::Checkpoint);
        let label = format!("{}=true", operator::claims::CLAIM_LABEL);
        eventually(PHASE_TIMEOUT, || async {
            let left = claims
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?;
            left.items.is_empty().then_some(())
        })
        .await;
        assert_eq!(s.agent(1).count(Step::Checkpoint).executions as usize, PODS);
    })
    .await;
}

#[tokio::test]
async fn deleting_a_migration_mid_flight_rolls_it_back_before_it_goes() {
    with_namespace("op-delete", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let before = s.pod("server", 1, "10.244.1.5").await;
        s.agent(1).script(Step::Transfer, Behaviour::Hold);
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move", "server", Some(2)).await;
        s.wait_phase("move", Phase::Transferring, PHASE_TIMEOUT)
            .await;
        let uid = s.migrations().get("move").await.unwrap().uid().unwrap();
        s.migrations()
            .delete("move", &DeleteParams::default())
            .await
            .unwrap();
        let gone = kube::runtime::wait::await_condition(
            s.migrations(),
            "move",
            kube::runtime::wait::conditions::is_deleted(&uid),
        );
        tokio::time::timeout(PHASE_TIMEOUT, gone)
            .await
            .expect("the PodMigration goes")
            .unwrap();
        assert_eq!(s.agent(1).count(Step::Abort(Role::Source)).executions, 1);
        assert_eq!(s.agent(2).count(Step::Abort(Role::Target)).executions, 1);
        let after = s.pods().get("server").await.unwrap();
        assert_eq!(
            (after.uid(), after.resource_version()),
            (before.uid(), before.resource_version())
        );
    })
    .await;
}

#[tokio::test]
async fn a_target_agent_killed_during_the_transfer_ends_rolled_back() {
    with_namespace("op-crash", |client, ns| async move {
        let s = Scenario::new(client, &ns).await;
        let before = s.pod("server", 1, "10.244.1.5").await;
        // A transfer of eight seconds: its progress shows in the status while it runs (the
        // operator writes it every few seconds).
        s.agent(1).with_chunk_interval(Duration::from_millis(500));
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move", "server", Some(2)).await;
        // The source agent streams to the target agent over mutual TLS; kill the target mid-stream.
        let streaming = kube::runtime::wait::await_condition(
            s.migrations(),
            "move",
            |pm: Option<&PodMigration>| {
                pm.and_then(|p| p.status.as_ref())
                    .and_then(|st| st.progress)
                    .is_some_and(|p| p.bytes_transferred > 0 && p.bytes_transferred < p.bytes_total)
            },
        );
        tokio::time::timeout(PHASE_TIMEOUT, streaming)
            .await
            .expect("the transfer shows progress")
            .unwrap();
        assert_eq!(
            s.agent(2).count(Scripted::Receive).executions,
            1,
            "the target agent accepted the source agent"
        );
        s.agent(2).crash();
        let pm = s.wait_phase("move", Phase::RolledBack, PHASE_TIMEOUT).await;
        let (reason, message) = Scenario::reason(&pm);
        assert_eq!(reason, "TransferFailed", "{message}");
        assert!(message.contains("target agent"), "{message}");
        assert!(!pm.status.unwrap().committed);
        let after = s.pods().get("server").await.unwrap();
        assert_eq!(
            (after.uid(), after.resource_version()),
            (before.uid(), before.resource_version())
        );
        assert_eq!(
            s.agent(1).count(Step::Abort(Role::Source)).executions,
            1,
            "the source was resumed"
        );
    })
    .await;
}

#[tokio::test]
async fn an_rdma_pod_keeps_its_rxe_block_across_a_migration_and_frees_it_when_gone() {
    with_namespace("op-rxe", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        let labels = [
            (crds::MIGRATABLE_LABEL, "true"),
            (crds::RDMA_LABEL, "true"),
            ("app", "rdma"),
        ];
        s.pod_with("rdma", 1, "10.244.1.5", &labels).await;
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        let blocks: Api<crds::RxeBlock> = Api::all(client.clone());
        let selector = format!(
            "{}={ns},{}=rdma",
            crds::RXE_POD_NAMESPACE_LABEL,
            crds::RXE_POD_NAME_LABEL
        );
        let owned = || async {
            blocks
                .list(&ListParams::default().labels(&selector))
                .await
                .unwrap()
                .items
        };
        // The sweep gives the pod its block before any migration.
        let block =
            support::eventually(PHASE_TIMEOUT, || async { owned().await.into_iter().next() }).await;
        s.migrate("move", "rdma", Some(2)).await;
        let pm = s.wait_phase("move", Phase::Succeeded, PHASE_TIMEOUT).await;
        assert_eq!(pm.status.unwrap().rxe, Some(block.spec.ranges()));
        assert_eq!(
            owned()
                .await
                .iter()
                .map(|b| b.name_any())
                .collect::<Vec<_>>(),
            vec![block.name_any()]
        );
        // Gone with the pod.
        s.pods()
            .delete(
                "rdma",
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let (name, uid) = (block.name_any(), block.uid().unwrap());
        let deleted = kube::runtime::wait::await_condition(
            blocks.clone(),
            &name,
            kube::runtime::wait::conditions::is_deleted(&uid),
        );
        tokio::time::timeout(PHASE_TIMEOUT, deleted)
            .await
            .expect("the block is released")
            .unwrap();
    })
    .await;
}

/// A ClusterRole and its binding that let the service account `kube-migros-agent` of a test
/// namespace create and read certificate requests (as the chart's agent ClusterRole does);
/// removed when dropped (cluster-scoped objects outlive the namespace).
struct AgentCsrRbac {
    client: kube::Client,
    name: String,
}

impl AgentCsrRbac {
    async fn grant(client: &kube::Client, ns: &str) -> Self {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        let name = format!("{ns}-agent-csr");
        let role: ClusterRole = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]}],
        }))
        .unwrap();
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "kube-migros-agent", "namespace": ns}],
        }))
        .unwrap();
        Api::<ClusterRole>::all(client.clone())
            .create(&Default::default(), &role)
            .await
            .unwrap();
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&Default::default(), &binding)
            .await
            .unwrap();
        Self {
            client: client.clone(),
            name,
        }
    }
}

impl Drop for AgentCsrRbac {
    fn drop(&mut self) {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        let (client, name) = (self.client.clone(), self.name.clone());
        tokio::spawn(async move {
            let _ = Api::<ClusterRoleBinding>::all(client.clone())
                .delete(&name, &Default::default())
                .await;
            let _ = Api::<ClusterRole>::all(client)
                .delete(&name, &Default::default())
                .await;
        });
    }
}

#[tokio::test]
async fn without_a_tls_dir_the_operator_makes_the_ca_and_certificates_in_secrets() {
    with_namespace("op-secrets", |client, ns| async move {
        testkit::harness::install_crds(&client).await;
        testkit::harness::wait_for_default_service_account(&client, &ns).await;
        let _operator = Operator::start_with(&ns, "op-a", Options::default()).await;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        let made = kube::runtime::wait::await_condition(secrets.clone(), operator::certificates::OPERATOR_SECRET, |s: Option<&k8s_openapi::api::core::v1::Secret>| s.is_some());
        tokio::time::timeout(PHASE_TIMEOUT, made).await.expect("the operator makes its Secret").unwrap();
        // The agents' Secret holds the CA certificate alone: no key an agent could serve with.
        let agent_secret = secrets.get(operator::certificates::AGENT_SECRET).await.expect("the agents' Secret");
        let keys: Vec<&String> = agent_secret.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["ca.crt"], "the agents' Secret holds only the CA certificate");
        let ca = agent_secret.data.as_ref().unwrap()["ca.crt"].0.clone();

        // Each agent asks for a certificate of its node, as the agents' service account with a
        // token bound to a pod on that node (impersonated here: the API server sets the node
        // extra for a pod-bound token, the requester cannot); the operator signs it.
        let agents_user = format!("system:serviceaccount:{ns}:kube-migros-agent");
        // The agents' RBAC, as the chart grants it: create and read certificate requests.
        let _rbac = AgentCsrRbac::grant(&client, &ns).await;
        let requester = |client: kube::Client| node_agent::certificate::Requester {
            client,
            signer: operator::signer::SIGNER_NAME.into(),
            lifetime: Duration::from_secs(3600),
            ca: ca.clone(),
        };
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        for i in 1..=2 {
            let name = format!("{ns}-node-{i}");
            nodes.push(testkit::fixtures::ApiNode::create(&client, &name).await);
            let as_agent = testkit::harness::client_as(&agents_user, &[(operator::signer::NODE_NAME_EXTRA, &name)]).await;
            let tls = node_agent::certificate::request(&requester(as_agent), &name).await.expect("the operator signs the agent's own certificate");
            assert_eq!(tls.node().unwrap(), name);
            agents.push(testkit::testagent::TestAgent::start(client.clone(), &ns, &name, &tls).await);
        }
        // Asking for another node's name: denied, with the reason.
        let node_1 = nodes[0].name.clone();
        let as_node_1 = testkit::harness::client_as(&agents_user, &[(operator::signer::NODE_NAME_EXTRA, &node_1)]).await;
        let denied = node_agent::certificate::request(&requester(as_node_1), &nodes[1].name).await.unwrap_err().to_string();
        assert!(denied.contains("denied") && denied.contains(&format!("an agent on node {node_1} may have")), "{denied}");

        // Agents serving with the signed certificates serve the operator, which uses its own.
        let _kubelet = tokio::spawn(testkit::fixtures::report_replacements_running(client.clone(), ns.clone()));
        let labels = [(crds::MIGRATABLE_LABEL, "true")];
        testkit::fixtures::run_pod(&client, &ns, &testkit::fixtures::pod("server", &nodes[0].name, &labels), "10.244.1.5").await;
        let pm: PodMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "migros.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": "move"}, "spec": {"podName": "server", "targetNode": nodes[1].name},
        }))
        .unwrap();
        let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        migrations.create(&Default::default(), &pm).await.unwrap();
        let done = kube::runtime::wait::await_condition(migrations, "move", |pm: Option<&PodMigration>| {
            pm.and_then(|p| p.status.as_ref()).and_then(|s| s.phase) == Some(Phase::Succeeded)
        });
        tokio::time::timeout(PHASE_TIMEOUT, done).await.expect("the migration succeeds over the made certificates").unwrap();
        assert_eq!(agents[0].count(Step::Checkpoint).executions, 1);
        assert_eq!(agents[1].count(Scripted::Receive).executions, 1, "the agents authenticated each other");
    })
    .await;
}

#[tokio::test]
async fn target_choice_counts_the_pods_on_their_way_to_a_node() {
    with_namespace("op-arriving", |client, ns| async move {
        let s = Scenario::new(client.clone(), &ns).await;
        // Nodes have 4 CPUs: one pod of 3 fits a node, two do not.
        for (i, name) in ["big-a", "big-b"].into_iter().enumerate() {
            let mut pod = testkit::fixtures::pod(
                name,
                &s.node(1),
                &[(crds::MIGRATABLE_LABEL, "true"), ("app", name)],
            );
            let requests = [(
                "cpu".to_string(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("3".into()),
            )];
            pod.spec.as_mut().unwrap().containers[0].resources =
                Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    requests: Some(requests.into()),
                    ..Default::default()
                });
            testkit::fixtures::run_pod(&client, &ns, &pod, &format!("10.244.1.{}", 60 + i)).await;
        }
        // The first stays on its way (held in Checkpointing) while the second chooses.
        s.agent(1).script(Step::Checkpoint, Behaviour::Hold);
        let _operator = Operator::start(&ns, "op-a", &s.certs).await;
        s.migrate("move-a", "big-a", None).await;
        let a = s
            .wait_phase("move-a", Phase::Checkpointing, PHASE_TIMEOUT)
            .await;
        s.migrate("move-b", "big-b", None).await;
        let b = s
            .wait_phase("move-b", Phase::Checkpointing, PHASE_TIMEOUT)
            .await;
        let target = |pm: &PodMigration| pm.status.clone().unwrap().target_node.unwrap();
        assert_ne!(target(&a), s.node(1));
        assert_ne!(target(&b), s.node(1));
        assert_ne!(
            target(&a),
            target(&b),
            "both went to one node, where only one fits"
        );
        s.agent(1).release(Step::Checkpoint);
        s.wait_phase("move-a", Phase::Succeeded, PHASE_TIMEOUT)
            .await;
        s.wait_phase("move-b", Phase::Succeeded, PHASE_TIMEOUT)
            .await;
    })
    .await;
}
