//! `kubectl migros drain NODE`: cordon the node, then move each of its migratable pods with a
//! PodMigration of its own (the operator queues them within its limits), one line per pod. Pods
//! that cannot move are listed with the reason and left to `kubectl drain`.

use std::collections::{BTreeMap, BTreeSet};

use clap::Args;
use crds::{PodMigration, PodMigrationSpec, movable};
use k8s_openapi::{
    api::{
        admissionregistration::v1::ValidatingWebhookConfiguration,
        core::v1::{Namespace, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{
    REASON_LABEL,
    follow::{self, Display, End, Key, Mode},
    short,
    view::{Outcome, exit},
};

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node to drain.
    node: String,
    /// Stop waiting after this long (90s, 10m, 1h); the migrations go on.
    #[arg(long, value_parser = crate::view::parse_duration)]
    timeout: Option<std::time::Duration>,
}

/// The webhooks that guard migratable pods against a second copy from their controller (the
/// chart's `pods.migros.io`, and `namespace-pods.migros.io` for `migration.namespaces`): a pod
/// they select is migratable.
const POD_WEBHOOK_SUFFIX: &str = "pods.migros.io";

/// What becomes of one pod of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// It moves (by a new migration or one already under way).
    Move,
    /// It stays, for this reason.
    Stay(String),
}

pub async fn drain(client: &Client, args: DrainArgs) -> anyhow::Result<u8> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(&args.node).await?;
    if !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        let patch = serde_json::json!({"spec": {"unschedulable": true}});
        nodes
            .patch(&args.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        println!("node/{} cordoned", args.node);
    } else {
        println!("node/{} already cordoned", args.node);
    }

    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={}", args.node)))
        .await?;
    let guard = Guard::read(client).await;
    if let Some(note) = &guard.note {
        println!("{note}");
    }
    let migrations: Api<PodMigration> = Api::all(client.clone());
    let in_flight: Vec<PodMigration> = migrations
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|pm| {
            pm.metadata.deletion_timestamp.is_none()
                && !pm
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_final())
        })
        .collect();

    let mut moving: Vec<(Key, String)> = vec![];
    let mut staying: Vec<(String, String)> = vec![];
    let mut refused: Vec<(String, String)> = vec![];
    for pod in on_node.items.iter().filter(|p| runs(p)) {
        let ns = pod.namespace().unwrap_or_default();
        let label = format!("{ns}/{}", pod.name_any());
        match plan(client, &guard, pod).await? {
            Plan::Stay(why) => staying.push((label, why)),
            Plan::Move => {
                let name = match in_flight.iter().find(|pm| moves(pm, pod)) {
                    Some(pm) => pm.name_any(),
                    None => match create(client, &ns, pod).await {
                        Ok(name) => name,
                        // The others go on; this pod is reported with the reason.
                        Err(e) => {
                            refused.push((label, format!("{e:#}")));
                            continue;
                        }
                    },
                };
                moving.push(((ns, name), label));
            }
        }
    }
    if !staying.is_empty() {
        println!("Left to `kubectl drain` (not moved):");
        for (pod, why) in &staying {
            println!("  {pod}: {why}");
        }
    }
    for (pod, why) in &refused {
        eprintln!("error: no migration of {pod}: {why}");
    }
    let worst_refusal = if refused.is_empty() { 0 } else { exit::ERROR };
    if moving.is_empty() {
        println!("No migratable pods on node/{}.", args.node);
        return Ok(worst_refusal);
    }
    println!(
        "Moving {} off node/{}:",
        count_pods(moving.len()),
        args.node
    );
    let mut display = Display::new(Mode::detect(), &moving);
    let keys: Vec<Key> = moving.iter().map(|(k, _)| k.clone()).collect();
    let ends = follow::follow(client, &mut display, &keys, false, args.timeout).await?;
    let mut codes = vec![worst_refusal];
    let mut failed: Vec<String> = refused.iter().map(|(pod, _)| pod.clone()).collect();
    for (key, label) in &moving {
        let this = match ends.get(key) {
            Some(End::Final(Outcome::Succeeded)) => continue,
            Some(End::Final(outcome)) => outcome.exit_code(),
            Some(End::Waiting(_)) => exit::TIMED_OUT,
            Some(End::Gone(_)) | None => exit::ERROR,
        };
        failed.push(format!("{label} ({})", key.1));
        codes.push(this);
    }
    let code = exit::worst(codes);
    if failed.is_empty() {
        display.println(&format!(
            "node/{}: {} moved",
            args.node,
            count_pods(moving.len())
        ));
    } else {
        display.println(&format!("not moved: {}", failed.join(", ")));
    }
    Ok(code)
}

/// Whether `pm`, in flight, moves `pod` away from where it runs: one that has not started yet
/// (it takes the pod by name), or one whose source is this very pod (not one whose replacement
/// of the same name this pod is).
fn moves(pm: &PodMigration, pod: &Pod) -> bool {
    let status = pm.status.clone().unwrap_or_default();
    pm.namespace() == pod.namespace()
        && pm.spec.pod_name == pod.name_any()
        && status
            .source_pod_uid
            .as_ref()
            .is_none_or(|uid| Some(uid) == pod.metadata.uid.as_ref())
}

/// `n` pods, in words.
fn count_pods(n: usize) -> String {
    match n {
        1 => "1 pod".to_string(),
        n => format!("{n} pods"),
    }
}

/// A pod that still runs (not finished, not being deleted).
fn runs(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether `pod` moves, and why not if it does not.
async fn plan(client: &Client, guard: &Guard, pod: &Pod) -> anyhow::Result<Plan> {
    if let Some(why) = movable::why_not(pod, &movable::claims(client, pod).await?) {
        return Ok(Plan::Stay(why));
    }
    if !guard.migratable(client, pod).await? {
        return Ok(Plan::Stay(guard.not_migratable.clone()));
    }
    Ok(Plan::Move)
}

/// A PodMigration of `pod` to a node the operator chooses.
async fn create(client: &Client, ns: &str, pod: &Pod) -> anyhow::Result<String> {
    let pm = PodMigration {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-drain-", short(&pod.name_any(), 200))),
            namespace: Some(ns.to_string()),
            labels: Some([(REASON_LABEL.to_string(), "kubectl-migros-drain".to_string())].into()),
            ..Default::default()
        },
        spec: PodMigrationSpec::of_pod(&pod.name_any()),
        status: None,
    };
    let api: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    Ok(api.create(&PostParams::default(), &pm).await?.name_any())
}

/// Which pods count as migratable: those the pod webhooks guard (their namespace and object
/// selectors), or, where the cluster has none of them (webhooks off) or this user may not read
/// them, those labelled `migros.io/migratable: "true"`.
#[derive(Debug, Default)]
struct Guard {
    /// (namespace selector, object selector) of each pod webhook.
    selectors: Vec<(Option<LabelSelector>, Option<LabelSelector>)>,
    /// Why a pod that is not selected stays.
    not_migratable: String,
    /// Said once before the pods.
    note: Option<String>,
    namespaces: std::sync::Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

impl Guard {
    async fn read(client: &Client) -> Self {
        let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let label = format!("{}=\"true\"", crds::MIGRATABLE_LABEL);
        match configs.list(&ListParams::default()).await {
            Ok(list) => {
                let selectors: Vec<_> = list
                    .items
                    .iter()
                    .flat_map(|c| c.webhooks.iter().flatten())
                    .filter(|w| w.name.ends_with(POD_WEBHOOK_SUFFIX))
                    .map(|w| (w.namespace_selector.clone(), w.object_selector.clone()))
                    .collect();
                let (not_migratable, note) = if selectors.is_empty() {
                    (
                        format!("not labelled {label}"),
                        Some(format!(
                            "note: kube-migros's pod webhooks are not installed; pods labelled {label} \
                             are moved"
                        )),
                    )
                } else {
                    (
                        format!(
                            "not migratable: neither labelled {label} nor in a namespace of the \
                             chart's migration.namespaces"
                        ),
                        None,
                    )
                };
                Self {
                    selectors,
                    not_migratable,
                    note,
                    ..Default::default()
                }
            }
            Err(e) => Self {
                not_migratable: format!("not labelled {label}"),
                note: Some(format!(
                    "note: cannot read the webhook configurations ({e}); pods labelled {label} are \
                     moved"
                )),
                ..Default::default()
            },
        }
    }

    async fn migratable(&self, client: &Client, pod: &Pod) -> anyhow::Result<bool> {
        let labels = pod.labels();
        if self.selectors.is_empty() {
            return Ok(labels.get(crds::MIGRATABLE_LABEL).map(String::as_str) == Some("true"));
        }
        let ns = pod.namespace().unwrap_or_default();
        let cached = self
            .namespaces
            .lock()
            .ok()
            .and_then(|n| n.get(&ns).cloned());
        let ns_labels = match cached {
            Some(labels) => labels,
            None => {
                let namespaces: Api<Namespace> = Api::all(client.clone());
                let labels = namespaces.get(&ns).await?.labels().clone();
                if let Ok(mut n) = self.namespaces.lock() {
                    n.insert(ns, labels.clone());
                }
                labels
            }
        };
        Ok(self.selectors.iter().any(|(ns_selector, object)| {
            selects(ns_selector.as_ref(), &ns_labels) && selects(object.as_ref(), labels)
        }))
    }
}

/// Whether a webhook's label selector selects an object with `labels` (no selector: all).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let matched = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    matched
        && selector.match_expressions.iter().flatten().all(|e| {
            let values: BTreeSet<&str> = e.values.iter().flatten().map(String::as_str).collect();
            let value = labels.get(&e.key).map(String::as_str);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_as_the_api_server_matches_them() {
        let object = LabelSelector {
            match_labels: Some(labels(&[("migros.io/migratable", "true")])),
            match_expressions: None,
        };
        assert!(selects(
            Some(&object),
            &labels(&[("migros.io/migratable", "true"), ("a", "b")])
        ));
        assert!(!selects(
            Some(&object),
            &labels(&[("migros.io/migratable", "false")])
        ));
        assert!(selects(None, &labels(&[])));
        let requirement = |operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        // The chart's namespace policy: listed namespaces, never the release's own.
        let namespaces = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                requirement("In", &["apps", "kube-migros"]),
                requirement("NotIn", &["kube-migros"]),
            ]),
        };
        let ns = |name: &str| labels(&[("kubernetes.io/metadata.name", name)]);
        assert!(selects(Some(&namespaces), &ns("apps")));
        assert!(!selects(Some(&namespaces), &ns("kube-migros")));
        assert!(!selects(Some(&namespaces), &ns("other")));
        let exists = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![requirement("Exists", &[])]),
        };
        assert!(selects(Some(&exists), &ns("x")));
        assert!(!selects(Some(&exists), &labels(&[])));
    }
}
