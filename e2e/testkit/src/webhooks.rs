//! The operator's admission webhooks registered for one test namespace, pointing at a test's
//! operator process on this host (the chart registers them for its in-cluster Service instead:
//! charts/kube-migros/templates/webhooks.yaml, with the same rules and failure policies).

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        RuleWithOperations, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
};

/// Label of a test's webhook configuration: the namespace it serves.
const TEST_NAMESPACE_LABEL: &str = "migros.io/test-namespace";

fn name(ns: &str) -> String {
    format!("kube-migros-test-{ns}")
}

fn rule(resource: &str) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![String::new()]),
        api_versions: Some(vec!["v1".into()]),
        operations: Some(vec!["CREATE".into()]),
        resources: Some(vec![resource.into()]),
        scope: Some("Namespaced".into()),
    }
}

/// Registers the webhooks of the operator serving `https://{addr}` (its certificate signed by
/// `ca_pem`) for namespace `ns` only.
pub async fn register(client: &Client, ns: &str, addr: &str, ca_pem: &str) {
    let only_ns = LabelSelector {
        match_labels: Some([("kubernetes.io/metadata.name".to_string(), ns.to_string())].into()),
        ..Default::default()
    };
    let hook = |name: &str, path: &str, resource: &str, failure: &str, side_effects: &str| {
        ValidatingWebhook {
            name: name.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                url: Some(format!("https://{addr}{path}")),
                ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                service: None,
            },
            failure_policy: Some(failure.into()),
            side_effects: side_effects.into(),
            namespace_selector: Some(only_ns.clone()),
            rules: Some(vec![rule(resource)]),
            timeout_seconds: Some(5),
            ..Default::default()
        }
    };
    let mut pods = hook("pods.migros.io", "/pods", "pods", "Fail", "None");
    pods.object_selector = Some(LabelSelector {
        match_labels: Some([(crds::MIGRATABLE_LABEL.to_string(), "true".to_string())].into()),
        ..Default::default()
    });
    let evictions = hook(
        "evictions.migros.io",
        "/evictions",
        "pods/eviction",
        "Ignore",
        "NoneOnDryRun",
    );
    let config = ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name(ns)),
            labels: Some([(TEST_NAMESPACE_LABEL.to_string(), ns.to_string())].into()),
            ..Default::default()
        },
        webhooks: Some(vec![pods, evictions]),
    };
    // A test that restarts its operator registers again: the new port replaces the old.
    unregister(client, ns).await;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap_or_else(|e| panic!("registering the webhooks of {ns}: {e}"));
}

/// Removes the webhooks of namespace `ns` (best effort).
pub async fn unregister(client: &Client, ns: &str) {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    match api.delete(&name(ns), &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => eprintln!("warning: could not remove the webhooks of {ns}: {e}"),
    }
}

/// Removes the webhooks of the test namespaces not in `live` (an interrupted run left them: their
/// operator is gone, and a pod webhook that fails closed would refuse the namespace's migratable
/// pods).
pub async fn unregister_stale(client: &Client, live: &[String]) {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let Ok(list) = api
        .list(&ListParams::default().labels(TEST_NAMESPACE_LABEL))
        .await
    else {
        return;
    };
    for config in list.items {
        let ns = config
            .labels()
            .get(TEST_NAMESPACE_LABEL)
            .cloned()
            .unwrap_or_default();
        if !live.contains(&ns) {
            unregister(client, &ns).await;
        }
    }
}
