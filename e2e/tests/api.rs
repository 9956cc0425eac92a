//! The PodMigration API against the sandbox's real kube-apiserver: the chart's CRD installs, a valid
//! object is accepted and defaulted, bad input is rejected by the schema and CEL rules with their
//! messages (and nothing is stored), the spec cannot change, and kubectl shows the printer columns.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use crds::PodMigration;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    core::Status,
};
use serde_json::{Value, json};
use testkit::harness::{self, with_namespace};

fn dynamic_api(client: Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<PodMigration>(&()))
}

fn podmigration(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "migros.io/v1alpha1",
        "kind": "PodMigration",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a PodMigration object")
}

/// The API server's refusal of a create or update, which the test expects.
fn rejection<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> Status {
    match result {
        Err(kube::Error::Api(response)) => *response,
        other => panic!("{what}: expected the API server to reject it, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_installs_and_is_established() {
    let client = harness::client().await;
    let crds = harness::install_crds(&client).await;
    let crd = crds
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("podmigrations.migros.io"))
        .expect("the chart ships podmigrations.migros.io");
    let status = crd.status.as_ref().expect("CRD status");
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .map(|c| c.status.clone())
    };
    assert_eq!(condition("Established").as_deref(), Some("True"));
    assert_eq!(condition("NamesAccepted").as_deref(), Some("True"));
    assert_eq!(
        status
            .accepted_names
            .as_ref()
            .and_then(|n| n.short_names.as_deref()),
        Some(&["pm".to_string()][..])
    );
}

#[tokio::test]
async fn a_minimal_podmigration_is_accepted_and_defaulted() {
    with_namespace("pm-defaults", |client, ns| async move {
        harness::install_crds(&client).await;
        let created = dynamic_api(client.clone(), &ns)
            .create(
                &PostParams::default(),
                &podmigration("move-server", json!({"podName": "server"})),
            )
            .await
            .expect("a minimal PodMigration is valid");
        let spec = &created.data["spec"];
        assert_eq!(spec["podName"], "server");
        assert_eq!(spec["strategy"], "StopAndCopy");
        assert_eq!(spec["timeoutSeconds"], 600);
        assert_eq!(spec["compression"], "None");
        assert_eq!(
            spec["network"],
            json!({"keepIP": true, "mechanism": "Auto"})
        );
        assert!(
            spec.get("targetNode").is_none(),
            "targetNode has no default: {spec}"
        );

        // The typed API reads back what the server stored.
        let typed: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        let stored = typed
            .get("move-server")
            .await
            .expect("get the PodMigration");
        assert_eq!(stored.spec.timeout_seconds, crds::DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(stored.status, None);

        // Any pod name: a DNS-1123 subdomain, dots and 253 characters included.
        let longest = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        for (name, pod) in [("dotted", "db.0"), ("longest", longest.as_str())] {
            dynamic_api(client.clone(), &ns)
                .create(
                    &PostParams::default(),
                    &podmigration(name, json!({"podName": pod})),
                )
                .await
                .unwrap_or_else(|e| panic!("podName {pod}: {e}"));
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server_with_their_messages() {
    let too_long = "a".repeat(254);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("missing podName", json!({}), "spec.podName: Required value"),
        (
            "empty podName",
            json!({"podName": ""}),
            "should be at least 1 chars long",
        ),
        (
            "podName with upper case and underscore",
            json!({"podName": "My_Pod"}),
            "podName must be a pod name (a DNS-1123 subdomain)",
        ),
        (
            "podName with a part ending in a dash",
            json!({"podName": "web-.1"}),
            "podName must be a pod name (a DNS-1123 subdomain)",
        ),
        (
            "podName of 254 characters",
            json!({"podName": too_long}),
            "spec.podName: Too long",
        ),
        (
            "targetNode that is not a node name",
            json!({"podName": "p", "targetNode": "Node_2"}),
            "targetNode must be a valid node name",
        ),
        (
            "targetNode ending in a dot",
            json!({"podName": "p", "targetNode": "node-2."}),
            "targetNode must be a valid node name",
        ),
        (
            "unknown strategy",
            json!({"podName": "p", "strategy": "Teleport"}),
            "spec.strategy: Unsupported value: \"Teleport\"",
        ),
        (
            "unknown compression",
            json!({"podName": "p", "compression": "Gzip"}),
            "spec.compression: Unsupported value: \"Gzip\"",
        ),
        (
            "unknown network mechanism",
            json!({"podName": "p", "network": {"mechanism": "Flannel"}}),
            "spec.network.mechanism: Unsupported value: \"Flannel\"",
        ),
        (
            "timeout below the minimum",
            json!({"podName": "p", "timeoutSeconds": 9}),
            "spec.timeoutSeconds in body should be greater than or equal to 10",
        ),
        (
            "timeout above the maximum",
            json!({"podName": "p", "timeoutSeconds": 86401}),
            "spec.timeoutSeconds in body should be less than or equal to 86400",
        ),
        (
            "bandwidthLimit that is not a quantity",
            json!({"podName": "p", "bandwidthLimit": "fast"}),
            "bandwidthLimit must be a quantity of at least 64Ki",
        ),
        (
            "bandwidthLimit too low for the stream's chunks",
            json!({"podName": "p", "bandwidthLimit": "10Ki"}),
            "bandwidthLimit must be a quantity of at least 64Ki",
        ),
    ];
    with_namespace("pm-invalid", |client, ns| async move {
        harness::install_crds(&client).await;
        let api = dynamic_api(client, &ns);
        for (i, (what, spec, expected)) in cases.into_iter().enumerate() {
            let object = podmigration(&format!("invalid-{i}"), spec);
            let response = rejection(api.create(&PostParams::default(), &object).await, what);
            assert_eq!(response.code, 422, "{what}: {response:?}");
            assert_eq!(response.reason, "Invalid", "{what}: {response:?}");
            assert!(
                response.message.contains(expected),
                "{what}: expected a message containing {expected:?}, got {:?}",
                response.message
            );
        }
        let stored = api
            .list(&ListParams::default())
            .await
            .expect("list PodMigrations");
        assert!(
            stored.items.is_empty(),
            "rejected objects were stored: {:?}",
            stored.items
        );
    })
    .await;
}

#[tokio::test]
async fn the_spec_cannot_change_after_creation_but_labels_and_status_can() {
    with_namespace("pm-immutable", |client, ns| async move {
        harness::install_crds(&client).await;
        let api = dynamic_api(client.clone(), &ns);
        let spec = json!({"podName": "server", "targetNode": "node-2", "bandwidthLimit": "100Mi"});
        api.create(&PostParams::default(), &podmigration("move", spec))
            .await
            .expect("a valid PodMigration");

        for (what, patch) in [
            ("a new timeout", json!({"spec": {"timeoutSeconds": 900}})),
            ("another target", json!({"spec": {"targetNode": "node-3"}})),
            ("another pod", json!({"spec": {"podName": "client"}})),
            (
                "a removed bandwidth limit",
                json!({"spec": {"bandwidthLimit": null}}),
            ),
        ] {
            let result = api
                .patch("move", &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            let response = rejection(result, what);
            assert_eq!(response.code, 422, "{what}: {response:?}");
            assert!(
                response.message.contains("spec is immutable"),
                "{what}: unexpected message {:?}",
                response.message
            );
        }

        let labels = json!({"metadata": {"labels": {"team": "rdma"}}});
        api.patch("move", &PatchParams::default(), &Patch::Merge(&labels))
            .await
            .expect("labels may change");
        let status = json!({"status": {"phase": "Preparing", "sourceNode": "node-1"}});
        api.patch_status("move", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("the status may change");

        let typed: Api<PodMigration> = Api::namespaced(client, &ns);
        let stored = typed.get("move").await.expect("get the PodMigration");
        assert_eq!(stored.spec.target_node.as_deref(), Some("node-2"));
        assert_eq!(stored.spec.timeout_seconds, crds::DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(stored.spec.bandwidth_limit.as_deref(), Some("100Mi"));
        let stored_status = stored.status.expect("status was written");
        assert_eq!(stored_status.phase, Some(crds::Phase::Preparing));
        assert_eq!(stored_status.source_node.as_deref(), Some("node-1"));
    })
    .await;
}

#[tokio::test]
async fn kubectl_applies_the_example_and_shows_the_printer_columns() {
    let env = harness::env().await;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/podmigration.yaml");
    with_namespace("pm-kubectl", |client, ns| async move {
        harness::install_crds(&client).await;
        let applied = harness::kubectl(&env, &["apply", "-n", &ns, "-f", example]);
        assert!(
            applied.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&applied.stdout).trim(),
            "podmigration.migros.io/demo-to-node-2 created"
        );

        let api = dynamic_api(client, &ns);
        let status = json!({"status": {
            "phase": "Succeeded",
            "sourceNode": "node-1",
            "targetNode": "node-2",
            "timings": {"downtimeMs": 412, "totalMs": 2900},
            "backend": "runtime-wrapper",
            "memory": {"bytesTotal": 100, "bytesTransferred": 40, "bytesRemaining": 60,
                       "bytesPerSecond": 20},
        }});
        api.patch_status(
            "demo-to-node-2",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("write a status");

        // `pm` is the short name; the columns come from the CRD's additionalPrinterColumns.
        let listed = harness::kubectl(&env, &["get", "pm", "-n", &ns]);
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let table = String::from_utf8_lossy(&listed.stdout).to_string();
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows.first().map(Vec::as_slice),
            Some(
                &[
                    "NAME", "POD", "SOURCE", "TARGET", "PHASE", "DOWNTIME", "AGE"
                ][..]
            ),
            "{table}"
        );
        assert_eq!(rows.len(), 2, "{table}");
        assert_eq!(
            &rows[1][..6],
            &[
                "demo-to-node-2",
                "demo",
                "node-1",
                "node-2",
                "Succeeded",
                "412"
            ]
        );

        // `-o wide` adds the backend and the memory still on the source (PostCopy).
        let wide = harness::kubectl(&env, &["get", "pm", "-n", &ns, "-o", "wide"]);
        let table = String::from_utf8_lossy(&wide.stdout).to_string();
        let header: Vec<&str> = table
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            header[header.len() - 3..],
            ["BACKEND", "MEMORY", "LEFT"],
            "{table}"
        );
        let row: Vec<&str> = table
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(row[row.len() - 2..], ["runtime-wrapper", "60"], "{table}");

        // The example's non-default fields survived the round trip.
        let got = harness::kubectl(
            &env,
            &["get", "pm", "demo-to-node-2", "-n", &ns, "-o", "json"],
        );
        let object: Value = serde_json::from_slice(&got.stdout).expect("kubectl -o json");
        assert_eq!(object["spec"]["compression"], "Zstd");
        assert_eq!(object["spec"]["targetNode"], "node-2");
    })
    .await;
}

#[tokio::test]
async fn podmigrations_can_be_selected_by_pod_name() {
    with_namespace("pm-select", |client, ns| async move {
        harness::install_crds(&client).await;
        let api = dynamic_api(client, &ns);
        for (name, pod) in [
            ("first", "server"),
            ("second", "client"),
            ("third", "server"),
        ] {
            api.create(
                &PostParams::default(),
                &podmigration(name, json!({"podName": pod})),
            )
            .await
            .expect("create a PodMigration");
        }
        let selected = api
            .list(&ListParams::default().fields("spec.podName=server"))
            .await
            .expect("a field selector on spec.podName");
        let mut names: Vec<String> = selected
            .items
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["first", "third"]);
    })
    .await;
}
