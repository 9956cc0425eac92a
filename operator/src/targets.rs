//! Target-node selection, pure: which nodes can take a pod (ready, schedulable, a capable agent,
//! the pod's node selector, required node affinity and tolerations, room for its requests) and, when
//! the user named none, which one to pick (the one with the most memory left, then by name).

use std::collections::BTreeMap;

use agent_api::{backend, v1::NodeCapabilities};
use crds::quantity::milli;
use k8s_openapi::{
    api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration},
    apimachinery::pkg::api::resource::Quantity,
};

/// A node as the selection sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub node: &'a Node,
    /// Requests of the pods already bound to the node (not finished).
    pub used: Resources,
    /// What its agent reported; `None` when no live agent runs there.
    pub agent: Option<&'a NodeCapabilities>,
    /// The backends the cluster can use, the preferred first (a subset of [`BACKENDS`]: the
    /// runtime wrapper only while its RuntimeClass exists).
    pub backends: &'a [&'static str],
}

/// The restore backends a replacement pod started by the kubelet can use, the preferred first: the
/// runtime wrapper (any containerd 2.x, no registry, restored once) before checkpoint images.
pub const BACKENDS: [&str; 2] = [backend::RUNTIME_WRAPPER, backend::CRI_CHECKPOINT_IMAGE];

/// The backend the target's agent restores with: the first of `usable` it offers.
pub fn backend(agent: &NodeCapabilities, usable: &[&'static str]) -> Option<&'static str> {
    usable
        .iter()
        .copied()
        .find(|b| agent.restore_backends.iter().any(|o| o == b))
}

/// What users read when a pod is restored from checkpoint images: the image of each of its
/// containers is the checkpoint, so the restore is not once.
pub const CHECKPOINT_IMAGE_CAVEAT: &str =
    "restored from checkpoint images: every restart of a container restores the checkpoint again";

/// The backends the cluster can use: of [`BACKENDS`], the runtime wrapper only when the
/// RuntimeClass that runs it exists (a replacement pod naming a missing one is refused by the API
/// server, after the commit point), and checkpoint images only when the admin allowed them
/// (`checkpoint_images`), as they restore again on every restart.
pub fn usable_backends(runtime_class_exists: bool, checkpoint_images: bool) -> Vec<&'static str> {
    BACKENDS
        .into_iter()
        .filter(|b| runtime_class_exists || *b != backend::RUNTIME_WRAPPER)
        .filter(|b| checkpoint_images || *b != backend::CRI_CHECKPOINT_IMAGE)
        .collect()
}

/// Amounts per resource name, in milli-units (so `cpu: 1500m` and `memory: 1Gi` both fit).
pub type Resources = BTreeMap<String, i128>;

/// Why a node cannot take the pod; the `Display` is what users read in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    SameAsSource,
    NotReady,
    Unschedulable,
    NoAgent,
    /// The agent offers no backend the kubelet can restore with; what it said about that.
    AgentCannotRestore(String),
    NoRxe,
    NoSpace {
        needed: u64,
        free: u64,
    },
    NodeSelector,
    NodeAffinity,
    Taint(String),
    Insufficient(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::SameAsSource => write!(f, "is the pod's current node"),
            Rejection::NotReady => write!(f, "is not Ready"),
            Rejection::Unschedulable => write!(f, "is cordoned"),
            Rejection::NoAgent => write!(f, "has no running kube-migros agent"),
            Rejection::AgentCannotRestore(notes) if notes.is_empty() => write!(
                f,
                "has an agent without a restore backend the kubelet can use ({})",
                BACKENDS.join(", ")
            ),
            Rejection::AgentCannotRestore(notes) => write!(
                f,
                "has an agent without a restore backend the kubelet can use: {notes}"
            ),
            Rejection::NoRxe => write!(f, "has no rxe (SoftRoCE) device for this RDMA pod"),
            Rejection::NoSpace { needed, free } => {
                write!(f, "has {free} bytes free for checkpoints, {needed} needed")
            }
            Rejection::NodeSelector => write!(f, "does not match the pod's nodeSelector"),
            Rejection::NodeAffinity => write!(f, "does not match the pod's required node affinity"),
            Rejection::Taint(t) => write!(f, "has the taint {t} that the pod does not tolerate"),
            Rejection::Insufficient(r) => write!(f, "has not enough {r} left for the pod"),
        }
    }
}

/// Whether `candidate` can take `pod`, which runs on `source` now.
pub fn check(
    pod: &Pod,
    source: &str,
    candidate: &Candidate<'_>,
    rdma: bool,
) -> Result<(), Rejection> {
    let node = candidate.node;
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if name == source {
        return Err(Rejection::SameAsSource);
    }
    if !is_ready(node) {
        return Err(Rejection::NotReady);
    }
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        return Err(Rejection::Unschedulable);
    }
    let agent = candidate.agent.ok_or(Rejection::NoAgent)?;
    if backend(agent, candidate.backends).is_none() {
        let mut notes = agent.notes.clone();
        let wrapper = backend::RUNTIME_WRAPPER;
        if agent.restore_backends.iter().any(|b| b == wrapper)
            && !candidate.backends.contains(&wrapper)
        {
            notes.push(format!(
                "{wrapper}: the cluster has no RuntimeClass for it (the operator's --runtime-class)"
            ));
        }
        let images = backend::CRI_CHECKPOINT_IMAGE;
        if agent.restore_backends.iter().any(|b| b == images)
            && !candidate.backends.contains(&images)
        {
            notes.push(format!(
                "{images}: not allowed, every restart of a container would restore the checkpoint \
                 again (the operator's --allow-checkpoint-images)"
            ));
        }
        return Err(Rejection::AgentCannotRestore(notes.join("; ")));
    }
    if rdma && !agent.rxe_present {
        return Err(Rejection::NoRxe);
    }
    let needed = expected_checkpoint_bytes(pod);
    if agent.free_bytes < needed {
        return Err(Rejection::NoSpace {
            needed,
            free: agent.free_bytes,
        });
    }
    let spec = pod.spec.as_ref();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(selector) = spec.and_then(|s| s.node_selector.as_ref())
        && selector.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return Err(Rejection::NodeSelector);
    }
    let required = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(required) = required
        && !required
            .node_selector_terms
            .iter()
            .any(|t| term_matches(t, name, &labels))
    {
        return Err(Rejection::NodeAffinity);
    }
    let tolerations = spec.and_then(|s| s.tolerations.clone()).unwrap_or_default();
    for taint in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
    {
        let blocking = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if blocking && !tolerations.iter().any(|t| tolerates(t, taint)) {
            return Err(Rejection::Taint(format!(
                "{}={}:{}",
                taint.key,
                taint.value.as_deref().unwrap_or(""),
                taint.effect
            )));
        }
    }
    let allocatable = node_allocatable(node);
    for (resource, wanted) in pod_requests(pod) {
        let free = allocatable.get(&resource).copied().unwrap_or(0)
            - candidate.used.get(&resource).copied().unwrap_or(0);
        if wanted > free {
            return Err(Rejection::Insufficient(resource));
        }
    }
    Ok(())
}

/// Picks the best node for `pod`, or explains per node why none fits.
pub fn choose(
    pod: &Pod,
    source: &str,
    candidates: &[Candidate<'_>],
    rdma: bool,
) -> Result<String, String> {
    let mut fitting = Vec::new();
    let mut rejected = Vec::new();
    for candidate in candidates {
        let name = candidate.node.metadata.name.clone().unwrap_or_default();
        match check(pod, source, candidate, rdma) {
            Ok(()) => {
                let memory = "memory".to_string();
                let free = node_allocatable(candidate.node)
                    .get(&memory)
                    .copied()
                    .unwrap_or(0)
                    - candidate.used.get(&memory).copied().unwrap_or(0);
                fitting.push((free, name));
            }
            Err(why) => rejected.push(format!("{name} {why}")),
        }
    }
    // Most free memory first; ties go to the smallest name so the choice is stable.
    fitting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    match fitting.into_iter().next() {
        Some((_, name)) => Ok(name),
        None if rejected.is_empty() => Err("no node other than the source exists".into()),
        None => Err(format!("no node can take the pod: {}", rejected.join("; "))),
    }
}

/// Whether the node's `Ready` condition is `True`.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The sum of the pod's container requests (init containers are dropped by a migration).
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::new();
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    for container in containers {
        let requests = container
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref());
        for (name, q) in requests.into_iter().flatten() {
            *total.entry(name.clone()).or_default() += milli(q).unwrap_or(0);
        }
    }
    total
}

/// Adds the requests of `pods` (skipping finished ones).
pub fn used_by<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Resources {
    let mut used = Resources::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        for (k, v) in pod_requests(pod) {
            *used.entry(k).or_default() += v;
        }
    }
    used
}

fn node_allocatable(node: &Node) -> Resources {
    let status = node.status.as_ref();
    let amounts = status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
    amounts
        .into_iter()
        .flatten()
        .map(|(k, q)| (k.clone(), milli(q).unwrap_or(0)))
        .collect()
}

/// The checkpoint is about as large as the memory the pod may use: its memory limit, else its
/// request, else nothing known.
fn expected_checkpoint_bytes(pod: &Pod) -> u64 {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let milli_bytes: i128 = containers
        .iter()
        .filter_map(|c| {
            let r = c.resources.as_ref()?;
            let pick =
                |m: Option<&BTreeMap<String, Quantity>>| m.and_then(|m| m.get("memory")).cloned();
            pick(r.limits.as_ref()).or_else(|| pick(r.requests.as_ref()))
        })
        .filter_map(|q| milli(&q))
        .sum();
    u64::try_from(milli_bytes / 1000).unwrap_or(0)
}

fn term_matches(term: &NodeSelectorTerm, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let fields: BTreeMap<String, String> = [("metadata.name".to_string(), name.to_string())].into();
    let exprs = term
        .match_expressions
        .iter()
        .flatten()
        .all(|r| requirement_matches(r, labels));
    let field_exprs = term
        .match_fields
        .iter()
        .flatten()
        .all(|r| requirement_matches(r, &fields));
    // An empty term matches nothing, as in the scheduler.
    let empty = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
        && term.match_fields.as_ref().is_none_or(Vec::is_empty);
    !empty && exprs && field_exprs
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.clone().unwrap_or_default();
    let as_int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key_ok = t
        .key
        .as_deref()
        .is_none_or(|k| k.is_empty() || k == taint.key);
    let value_ok = match t.operator.as_deref() {
        Some("Exists") => true,
        _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
    };
    // An empty key with operator Exists tolerates everything.
    effect_ok && key_ok && value_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, Container, NodeAffinity, NodeCondition, NodeSelector, NodeSpec, NodeStatus,
        PodSpec, ResourceRequirements,
    };
    use kube::api::ObjectMeta;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn node(name: &str, memory: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("zone".to_string(), "a".to_string())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(
                    [
                        ("cpu".to_string(), q("2")),
                        ("memory".to_string(), q(memory)),
                    ]
                    .into(),
                ),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn pod(cpu: &str, memory: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(
                            [
                                ("cpu".to_string(), q(cpu)),
                                ("memory".to_string(), q(memory)),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn agent() -> NodeCapabilities {
        NodeCapabilities {
            restore_backends: vec!["cri-checkpoint-image".into()],
            free_bytes: 1 << 40,
            ..Default::default()
        }
    }

    fn candidate<'a>(node: &'a Node, agent: Option<&'a NodeCapabilities>) -> Candidate<'a> {
        Candidate {
            node,
            used: Resources::new(),
            agent,
            backends: &BACKENDS,
        }
    }

    #[test]
    fn each_unfit_node_is_rejected_with_its_reason() {
        let p = pod("500m", "1Gi");
        let a = agent();
        let ready = node("n", "4Gi");
        assert_eq!(
            check(&p, "n", &candidate(&ready, Some(&a)), false),
            Err(Rejection::SameAsSource)
        );
        assert_eq!(
            check(&p, "src", &candidate(&ready, None), false),
            Err(Rejection::NoAgent)
        );
        assert_eq!(
            check(&p, "src", &candidate(&ready, Some(&a)), true),
            Err(Rejection::NoRxe)
        );
        let mut not_ready = ready.clone();
        not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "Unknown".into();
        assert_eq!(
            check(&p, "src", &candidate(&not_ready, Some(&a)), false),
            Err(Rejection::NotReady)
        );
        let mut cordoned = ready.clone();
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert_eq!(
            check(&p, "src", &candidate(&cordoned, Some(&a)), false),
            Err(Rejection::Unschedulable)
        );
        let small = node("n", "512Mi");
        assert_eq!(
            check(&p, "src", &candidate(&small, Some(&a)), false),
            Err(Rejection::Insufficient("memory".into()))
        );
        let mut tainted = ready.clone();
        tainted.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "gpu".into(),
            value: Some("yes".into()),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]);
        assert!(matches!(
            check(&p, "src", &candidate(&tainted, Some(&a)), false),
            Err(Rejection::Taint(_))
        ));
        let mut tolerant = p.clone();
        tolerant.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        assert_eq!(
            check(&tolerant, "src", &candidate(&tainted, Some(&a)), false),
            Ok(())
        );
    }

    #[test]
    fn the_runtime_wrapper_is_used_only_while_its_runtime_class_exists() {
        let p = pod("500m", "1Gi");
        let ready = node("n", "4Gi");
        let mut a = agent();
        a.restore_backends = vec![
            backend::RUNTIME_WRAPPER.into(),
            backend::CRI_CHECKPOINT_IMAGE.into(),
        ];
        assert_eq!(
            super::backend(&a, &usable_backends(true, true)),
            Some(backend::RUNTIME_WRAPPER)
        );
        assert_eq!(
            super::backend(&a, &usable_backends(false, true)),
            Some(backend::CRI_CHECKPOINT_IMAGE)
        );
        assert_eq!(super::backend(&a, &usable_backends(false, false)), None);
        // An agent with the wrapper alone cannot take the pod without the class, and says why.
        a.restore_backends = vec![backend::RUNTIME_WRAPPER.into()];
        let without = usable_backends(false, true);
        let candidate = Candidate {
            backends: &without,
            ..candidate(&ready, Some(&a))
        };
        let why = check(&p, "src", &candidate, false).unwrap_err().to_string();
        assert!(why.contains("no RuntimeClass"), "{why}");
    }

    #[test]
    fn checkpoint_images_are_used_only_when_allowed() {
        let p = pod("500m", "1Gi");
        let ready = node("n", "4Gi");
        let a = agent(); // offers checkpoint images alone
        let usable = usable_backends(true, true);
        assert_eq!(
            super::backend(&a, &usable),
            Some(backend::CRI_CHECKPOINT_IMAGE)
        );
        let default = usable_backends(true, false);
        assert_eq!(default, [backend::RUNTIME_WRAPPER]);
        let candidate = Candidate {
            backends: &default,
            ..candidate(&ready, Some(&a))
        };
        let why = check(&p, "src", &candidate, false).unwrap_err().to_string();
        assert!(
            why.contains("cri-checkpoint-image: not allowed")
                && why.contains("--allow-checkpoint-images"),
            "{why}"
        );
    }

    #[test]
    fn selectors_and_required_affinity_are_respected() {
        let a = agent();
        let n = node("n", "4Gi");
        let mut p = pod("1", "1Gi");
        p.spec.as_mut().unwrap().node_selector =
            Some([("zone".to_string(), "b".to_string())].into());
        assert_eq!(
            check(&p, "src", &candidate(&n, Some(&a)), false),
            Err(Rejection::NodeSelector)
        );
        p.spec.as_mut().unwrap().node_selector =
            Some([("zone".to_string(), "a".to_string())].into());
        let term = |op: &str, values: &[&str]| NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "zone".into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            match_fields: None,
        };
        let with_affinity = |t: NodeSelectorTerm| {
            let mut p = p.clone();
            p.spec.as_mut().unwrap().affinity = Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![t],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            p
        };
        assert_eq!(
            check(
                &with_affinity(term("In", &["a", "c"])),
                "src",
                &candidate(&n, Some(&a)),
                false
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &with_affinity(term("NotIn", &["a"])),
                "src",
                &candidate(&n, Some(&a)),
                false
            ),
            Err(Rejection::NodeAffinity)
        );
    }

    #[test]
    fn the_node_with_most_free_memory_wins_and_used_requests_count() {
        let a = agent();
        let (big, small) = (node("big", "8Gi"), node("small", "4Gi"));
        let p = pod("100m", "1Gi");
        let busy = Candidate {
            node: &big,
            used: used_by([&pod("1", "6Gi")]),
            agent: Some(&a),
            backends: &BACKENDS,
        };
        let free = candidate(&small, Some(&a));
        assert_eq!(
            choose(&p, "src", &[busy, free.clone()], false),
            Ok("small".into())
        );
        let idle = candidate(&big, Some(&a));
        assert_eq!(choose(&p, "src", &[free, idle], false), Ok("big".into()));
        let err = choose(&p, "big", &[candidate(&big, Some(&a))], false).unwrap_err();
        assert!(err.contains("big is the pod's current node"), "{err}");
    }
}
