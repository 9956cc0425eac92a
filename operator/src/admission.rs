//! What the operator's admission webhooks answer, pure (the server is `webhook.rs`; the design is
//! in docs/drain.md).
//!
//! - **Pod creation** of a pod a ReplicaSet or StatefulSet makes while one of its pods is being
//!   restored elsewhere is refused: the controller would otherwise start a fresh, unrestored
//!   instance in the place the restored pod is about to take (the source pod is deleted after the
//!   commit point, before the replacement exists). The operator then creates the replacement, owned
//!   by the same controller, which counts it as its own.
//! - **Eviction** of a migratable pod starts a PodMigration and answers 429 (Too Many Requests)
//!   until the pod has left its node: `kubectl drain` retries every 5 s and finishes by itself.

use std::collections::{BTreeMap, BTreeSet};

use crds::{Phase, PodMigration};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;

use crate::replacement::{MIGRATION_UID_ANNOTATION, TEMPLATE_ANNOTATION};

/// Label of a PodMigration that says why it exists (the eviction webhook's: [`REASON_EVICTION`]).
pub use crds::REASON_LABEL;
/// Value of [`REASON_LABEL`] for migrations made for an eviction (a drain).
pub const REASON_EVICTION: &str = "eviction";
/// Annotation of a PodMigration the eviction webhook created: the UID of the evicted pod.
pub const EVICTED_POD_UID_ANNOTATION: &str = "migros.io/evicted-pod-uid";

/// An admission answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with the HTTP code and reason the client sees.
    Deny {
        code: u16,
        reason: &'static str,
        message: String,
    },
}

impl Verdict {
    fn deny(code: u16, reason: &'static str, message: String) -> Self {
        Verdict::Deny {
            code,
            reason,
            message,
        }
    }
}

/// Which pods the operator migrates: those labelled `migros.io/migratable: "true"`, and every pod
/// of the namespaces of a namespace-wide policy (the chart's `migration.namespaces`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub namespaces: BTreeSet<String>,
}

impl Policy {
    pub fn migratable(&self, pod: &Pod) -> bool {
        pod.labels()
            .get(crds::MIGRATABLE_LABEL)
            .is_some_and(|v| v == "true")
            || pod
                .namespace()
                .is_some_and(|ns| self.namespaces.contains(&ns))
    }
}

/// UID of the controller (owner reference with `controller: true`) of `pod`, with its kind.
pub fn controller_of(pod: &Pod) -> Option<(&str, &str)> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.uid.as_str()))
}

/// The controller UID of the pod a migration moves, from the replacement template it stored
/// before touching the source; `None` when the template is not stored (yet), names none, or was
/// changed since the start.
pub fn migrated_controller(pm: &PodMigration) -> Option<String> {
    // A template changed since the start is not the operator's: its migration stops anyway.
    let recorded = pm
        .status
        .as_ref()
        .and_then(|s| s.template_digest.as_deref());
    if recorded.is_some() && crate::replacement::template_digest(pm).as_deref() != recorded {
        return None;
    }
    let template: Pod = serde_json::from_str(pm.annotations().get(TEMPLATE_ANNOTATION)?).ok()?;
    controller_of(&template).map(|(_, uid)| uid.to_string())
}

fn phase(pm: &PodMigration) -> Phase {
    pm.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// How long after a migration succeeded a fresh pod of its controller is still refused: the
/// controller may not have seen the restored pod yet (its watch lags the API server), and would
/// count one pod short and start another. A scale-up in that moment waits for the controller's
/// next try.
pub const SETTLING: std::time::Duration = std::time::Duration::from_secs(10);

/// True while `pm` is past its commit point and not over: its source is (being) deleted and its
/// replacement is being made; and for [`SETTLING`] after it succeeded.
pub fn restoring(pm: &PodMigration, now: Timestamp) -> bool {
    pm.status.as_ref().is_some_and(|s| s.committed) && (!phase(pm).is_final() || settling(pm, now))
}

/// Whether `pm` succeeded less than [`SETTLING`] before `now`.
fn settling(pm: &PodMigration, now: Timestamp) -> bool {
    let Some(status) = pm.status.as_ref() else {
        return false;
    };
    let ended = status
        .phase_transitions
        .last()
        .filter(|t| t.phase == Phase::Succeeded)
        .map(|t| t.time.0);
    // `now` may be read before the migration ended (it was read before the migrations were).
    ended.is_some_and(|at| at.checked_add(SETTLING).is_ok_and(|until| now < until))
}

/// The migrations among `cached` the pod-creation check must look at for `pod` (a pod of a
/// controller): those of its namespace in flight whose pod has the same controller, or whose
/// template is not known yet. The caller reads them fresh from the API server unless they are
/// already restoring (which lasts until they are final), since a cache may lag the commit.
pub fn candidates<'a>(
    pod: &Pod,
    cached: &'a [&'a PodMigration],
    now: Timestamp,
) -> Vec<&'a PodMigration> {
    let Some((_, owner)) = controller_of(pod) else {
        return Vec::new();
    };
    cached
        .iter()
        .copied()
        .filter(|pm| pm.namespace() == pod.namespace())
        .filter(|pm| !phase(pm).is_final() || settling(pm, now))
        .filter(|pm| migrated_controller(pm).is_none_or(|uid| uid == owner))
        .collect()
}

/// Whether `pod` may be created, given the fresh state of the `candidates`: a pod of a ReplicaSet
/// or StatefulSet whose pod is being restored by a migration is refused, unless it is that (or
/// another restoring) migration's own replacement.
pub fn pod_create(pod: &Pod, fresh: &[PodMigration], now: Timestamp) -> Verdict {
    let Some((kind, owner)) = controller_of(pod) else {
        return Verdict::Allow;
    };
    let restoring: Vec<&PodMigration> = fresh
        .iter()
        .filter(|pm| pm.namespace() == pod.namespace() && restoring(pm, now))
        .filter(|pm| migrated_controller(pm).as_deref() == Some(owner))
        .collect();
    let own = pod.annotations().get(MIGRATION_UID_ANNOTATION);
    if restoring
        .iter()
        .any(|pm| pm.uid().as_ref().is_some_and(|uid| Some(uid) == own))
    {
        return Verdict::Allow;
    }
    match restoring.first() {
        None => Verdict::Allow,
        Some(pm) => Verdict::deny(
            403,
            "Forbidden",
            format!(
                "a pod of this {kind} is being restored on node {} by PodMigration {}: the \
                 restored pod takes this place (docs/drain.md)",
                pm.status
                    .as_ref()
                    .and_then(|s| s.target_node.as_deref())
                    .unwrap_or("?"),
                pm.name_any()
            ),
        ),
    }
}

/// What the eviction webhook knows about one eviction.
#[derive(Debug)]
pub struct Eviction<'a> {
    /// The pod named by the eviction, as it is now.
    pub pod: &'a Pod,
    /// Whether the policy migrates it.
    pub migratable: bool,
    /// Why it cannot move to another node (`movable::why_not`), if so.
    pub unmovable: Option<String>,
    /// The PodMigrations of its namespace naming it (`spec.podName`).
    pub migrations: &'a [PodMigration],
    /// Whether a node is being drained (cordoned, or tainted NoSchedule/NoExecute as autoscalers
    /// do), by name, for the nodes of the pod and of its migrations' sources that exist.
    pub draining: &'a BTreeMap<String, bool>,
    /// Migrations tried per pod for evictions before the eviction is refused.
    pub attempts: u32,
}

/// What to do with an eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictionVerdict {
    /// Let it evict the pod as Kubernetes does without kube-migros.
    Allow,
    /// Create this PodMigration (attempt `attempt` for this pod) and answer 429.
    Migrate { name: String, attempt: u32 },
    /// A migration of the pod is in flight: answer 429 with this message.
    Wait(String),
    /// The pod already left the node being drained that it was evicted from: answer 404
    /// (kubectl drain then checks that the pod it evicted, by UID, is gone).
    Gone(String),
    /// Every attempt failed: answer 403 with this message, the pod keeps running where it is
    /// (kubectl drain reports the error and exits instead of waiting forever).
    Refuse(String),
}

impl EvictionVerdict {
    /// The admission answer; `Migrate` answers like `Wait`.
    pub fn verdict(&self) -> Verdict {
        match self {
            EvictionVerdict::Allow => Verdict::Allow,
            EvictionVerdict::Migrate { name, .. } => Verdict::deny(
                429,
                "TooManyRequests",
                format!("the pod is moved to another node by PodMigration {name}"),
            ),
            EvictionVerdict::Wait(m) => Verdict::deny(429, "TooManyRequests", m.clone()),
            EvictionVerdict::Gone(m) => Verdict::deny(404, "NotFound", m.clone()),
            EvictionVerdict::Refuse(m) => Verdict::deny(403, "Forbidden", m.clone()),
        }
    }
}

/// Name of the PodMigration of the `attempt`th migration of the pod `pod_uid` named `pod` for
/// evictions: the same for every webhook replica answering the same eviction, so that two
/// concurrent evictions create one.
pub fn eviction_migration_name(pod: &str, pod_uid: &str, attempt: u32) -> String {
    let name = format!("{pod}-drain-{pod_uid}-{attempt}");
    if name.len() <= 253 {
        return name;
    }
    // A pod name near the 253 characters of a name: its start (up to a dot or dash left out, so
    // that every part of the name still ends in a letter or digit) stands for it.
    let keep = 253 - (name.len() - pod.len());
    let start = pod[..keep].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{start}-drain-{pod_uid}-{attempt}")
}

/// Decides an eviction.
pub fn eviction(e: &Eviction<'_>) -> EvictionVerdict {
    let pod = e.pod;
    let name = pod.name_any();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if pod.metadata.deletion_timestamp.is_some() {
        return EvictionVerdict::Allow;
    }
    if let Some(pm) = e.migrations.iter().find(|pm| !phase(pm).is_final()) {
        return EvictionVerdict::Wait(format!(
            "pod {name} is being migrated by PodMigration {} ({:?})",
            pm.name_any(),
            phase(pm)
        ));
    }
    let uid = pod.uid().unwrap_or_default();
    // A drain retries the eviction by name: after its pod moved, the name is the replacement's.
    let made_by = pod.annotations().get(MIGRATION_UID_ANNOTATION);
    if let Some(pm) = e
        .migrations
        .iter()
        .find(|pm| pm.uid().is_some_and(|u| Some(&u) == made_by))
        && evicted(pm)
        && phase(pm) == Phase::Succeeded
    {
        let source = pm.status.as_ref().and_then(|s| s.source_node.as_deref());
        if let Some(source) = source.filter(|s| Some(*s) != node)
            && e.draining.get(source) == Some(&true)
            && node.is_some_and(|n| e.draining.get(n) == Some(&false))
        {
            return EvictionVerdict::Gone(format!(
                "pod {name} has left node {source}: PodMigration {} moved it to node {}",
                pm.name_any(),
                node.unwrap_or("?")
            ));
        }
    }
    if !e.migratable || pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
        return EvictionVerdict::Allow;
    }
    if e.unmovable.is_some() {
        return EvictionVerdict::Allow;
    }
    let failed: Vec<&PodMigration> = e
        .migrations
        .iter()
        .filter(|pm| evicted(pm) && pm.annotations().get(EVICTED_POD_UID_ANNOTATION) == Some(&uid))
        .collect();
    let attempt = u32::try_from(failed.len()).unwrap_or(u32::MAX);
    if attempt >= e.attempts {
        let last = failed
            .iter()
            .max_by_key(|pm| pm.metadata.creation_timestamp.clone())
            .and_then(|pm| Some((pm.name_any(), pm.status.as_ref()?.message.clone()?)));
        let (last, why) = last.unwrap_or_default();
        return EvictionVerdict::Refuse(format!(
            "pod {name} could not be migrated off node {} ({attempt} attempts, the last \
             PodMigration {last}: {why}); it keeps running there. Fix the cause and drain \
             again, or remove the label {} to evict it without migration",
            node.unwrap_or("?"),
            crds::MIGRATABLE_LABEL
        ));
    }
    EvictionVerdict::Migrate {
        name: eviction_migration_name(&name, &uid, attempt + 1),
        attempt: attempt + 1,
    }
}

fn evicted(pm: &PodMigration) -> bool {
    pm.labels().get(REASON_LABEL).map(String::as_str) == Some(REASON_EVICTION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{PodMigrationSpec, PodMigrationStatus};
    use k8s_openapi::{
        api::core::v1::{PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::OwnerReference,
    };
    use kube::api::ObjectMeta;

    fn owned_pod(name: &str, owner_uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                owner_references: Some(vec![OwnerReference {
                    kind: "ReplicaSet".into(),
                    name: "web-1".into(),
                    uid: owner_uid.into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        }
    }

    fn migration(name: &str, pod: &Pod, phase: Phase, committed: bool) -> PodMigration {
        let mut pm = PodMigration::new(name, PodMigrationSpec::of_pod(&pod.name_any()));
        pm.metadata.namespace = Some("ns".into());
        pm.metadata.uid = Some(format!("pm-{name}"));
        pm.metadata.annotations = Some(
            [(
                TEMPLATE_ANNOTATION.to_string(),
                serde_json::to_string(pod).unwrap(),
            )]
            .into(),
        );
        pm.status = Some(PodMigrationStatus {
            phase: Some(phase),
            committed,
            source_node: Some("node-1".into()),
            target_node: Some("node-2".into()),
            ..Default::default()
        });
        pm
    }

    #[test]
    fn a_controller_cannot_replace_a_pod_being_restored_but_the_replacement_can_be_made() {
        let now = Timestamp::now();
        let source = owned_pod("web-a", "rs-1");
        let fresh = owned_pod("", "rs-1");
        let pm = migration("m", &source, Phase::Restoring, true);
        let Verdict::Deny { code, message, .. } =
            pod_create(&fresh, std::slice::from_ref(&pm), now)
        else {
            panic!("a fresh pod of the ReplicaSet is refused while its pod is restored");
        };
        assert_eq!(code, 403);
        assert!(
            message.contains("PodMigration m") && message.contains("node-2"),
            "{message}"
        );

        let mut replacement = fresh.clone();
        replacement.metadata.annotations =
            Some([(MIGRATION_UID_ANNOTATION.to_string(), "pm-m".to_string())].into());
        assert_eq!(
            pod_create(&replacement, std::slice::from_ref(&pm), now),
            Verdict::Allow
        );

        // Another controller's pods, and pods before the commit point or after the end, pass.
        assert_eq!(
            pod_create(&owned_pod("", "rs-2"), std::slice::from_ref(&pm), now),
            Verdict::Allow
        );
        let before = migration("m", &source, Phase::Transferring, false);
        assert_eq!(pod_create(&fresh, &[before], now), Verdict::Allow);
        let over = succeeded_at(migration("m", &source, Phase::Succeeded, true), now);
        assert_eq!(pod_create(&fresh, &[over], now + SETTLING), Verdict::Allow);
        let mut bare = fresh.clone();
        bare.metadata.owner_references = None;
        assert_eq!(pod_create(&bare, &[pm], now), Verdict::Allow);
    }

    fn succeeded_at(mut pm: PodMigration, at: Timestamp) -> PodMigration {
        if let Some(s) = pm.status.as_mut() {
            s.phase_transitions.push(crds::PhaseTransition {
                phase: Phase::Succeeded,
                time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at),
            });
        }
        pm
    }

    #[test]
    fn a_controller_that_may_not_have_seen_the_restored_pod_yet_cannot_add_one() {
        let now = Timestamp::now();
        let source = owned_pod("web-a", "rs-1");
        let fresh = owned_pod("", "rs-1");
        let done = succeeded_at(migration("m", &source, Phase::Succeeded, true), now);
        let cached = [&done];
        assert_eq!(candidates(&fresh, &cached, now).len(), 1);
        let soon = now + std::time::Duration::from_secs(2);
        assert!(matches!(
            pod_create(&fresh, std::slice::from_ref(&done), soon),
            Verdict::Deny { code: 403, .. }
        ));
        // Read a moment before the migration's end was written.
        let before = now - std::time::Duration::from_millis(20);
        assert!(matches!(
            pod_create(&fresh, std::slice::from_ref(&done), before),
            Verdict::Deny { code: 403, .. }
        ));
        let later = now + SETTLING;
        assert!(candidates(&fresh, &cached, later).is_empty());
        assert_eq!(
            pod_create(&fresh, std::slice::from_ref(&done), later),
            Verdict::Allow
        );
        // A migration that failed after its commit point restores nothing: the controller may.
        let failed = migration("f", &source, Phase::Failed, true);
        assert_eq!(pod_create(&fresh, &[failed], now), Verdict::Allow);
    }

    #[test]
    fn candidates_are_the_owners_migrations_in_flight_and_those_not_known_yet() {
        let source = owned_pod("web-a", "rs-1");
        let mine = migration("mine", &source, Phase::Preparing, false);
        let other = migration("other", &owned_pod("x", "rs-2"), Phase::Restoring, true);
        let done = migration("done", &source, Phase::Succeeded, true);
        let mut unknown = migration("unknown", &source, Phase::Pending, false);
        unknown.metadata.annotations = None;
        let cached = [&mine, &other, &done, &unknown];
        // A template changed since the start does not count.
        let mut forged = migration("forged", &owned_pod("y", "rs-2"), Phase::Restoring, true);
        forged.status.as_mut().unwrap().template_digest = Some("sha256:00".into());
        assert_eq!(migrated_controller(&forged), None);
        forged.status.as_mut().unwrap().template_digest =
            crate::replacement::template_digest(&forged);
        assert_eq!(migrated_controller(&forged).as_deref(), Some("rs-2"));
        let names: Vec<String> = candidates(&owned_pod("", "rs-1"), &cached, Timestamp::now())
            .iter()
            .map(|pm| pm.name_any())
            .collect();
        assert_eq!(names, ["mine", "unknown"]);
    }

    fn decide(pod: &Pod, migrations: &[PodMigration], cordoned: &[&str]) -> EvictionVerdict {
        let is_cordoned = ["node-1", "node-2"]
            .map(|n| (n.to_string(), cordoned.contains(&n)))
            .into();
        eviction(&Eviction {
            pod,
            migratable: true,
            unmovable: None,
            migrations,
            draining: &is_cordoned,
            attempts: 2,
        })
    }

    fn evicted_migration(name: &str, pod: &Pod, phase: Phase) -> PodMigration {
        let mut pm = migration(name, pod, phase, phase == Phase::Succeeded);
        pm.metadata.labels = Some([(REASON_LABEL.into(), REASON_EVICTION.into())].into());
        pm.annotations_mut().insert(
            EVICTED_POD_UID_ANNOTATION.into(),
            pod.uid().unwrap_or_default(),
        );
        pm
    }

    #[test]
    fn an_eviction_migrates_waits_stops_at_the_moved_pod_and_gives_up_after_the_attempts() {
        let pod = owned_pod("web-a", "rs-1");
        let first = decide(&pod, &[], &["node-1"]);
        assert_eq!(
            first,
            EvictionVerdict::Migrate {
                name: "web-a-drain-uid-web-a-1".into(),
                attempt: 1
            }
        );
        assert!(matches!(first.verdict(), Verdict::Deny { code: 429, .. }));

        let flying = evicted_migration("web-a-drain-uid-web-a-1", &pod, Phase::Transferring);
        assert!(matches!(
            decide(&pod, &[flying], &["node-1"]),
            EvictionVerdict::Wait(m) if m.contains("Transferring")
        ));

        // The drain's next eviction of the name finds the replacement on node-2.
        let done = evicted_migration("web-a-drain-uid-web-a-1", &pod, Phase::Succeeded);
        let mut moved = owned_pod("web-a", "rs-1");
        moved.metadata.uid = Some("uid-new".into());
        moved.spec.as_mut().unwrap().node_name = Some("node-2".into());
        moved.metadata.annotations = Some(
            [(
                MIGRATION_UID_ANNOTATION.into(),
                "pm-web-a-drain-uid-web-a-1".into(),
            )]
            .into(),
        );
        let gone = decide(&moved, std::slice::from_ref(&done), &["node-1"]);
        assert!(matches!(&gone, EvictionVerdict::Gone(m) if m.contains("node-2")));
        assert!(matches!(gone.verdict(), Verdict::Deny { code: 404, .. }));
        // A later drain of node-2 moves it again.
        assert!(matches!(
            decide(&moved, &[done], &["node-1", "node-2"]),
            EvictionVerdict::Migrate { attempt: 1, .. }
        ));

        let rolled_back = evicted_migration("web-a-drain-uid-web-a-1", &pod, Phase::RolledBack);
        assert!(matches!(
            decide(&pod, std::slice::from_ref(&rolled_back), &["node-1"]),
            EvictionVerdict::Migrate { attempt: 2, .. }
        ));
        let again = evicted_migration("web-a-drain-uid-web-a-2", &pod, Phase::Failed);
        let refused = decide(&pod, &[rolled_back, again], &["node-1"]);
        assert!(
            matches!(&refused, EvictionVerdict::Refuse(m) if m.contains("2 attempts") && m.contains("keeps running")),
            "{refused:?}"
        );
    }

    #[test]
    fn pods_that_are_not_migrated_are_evicted_as_usual() {
        let pod = owned_pod("web-a", "rs-1");
        let is_cordoned = BTreeMap::from([("node-1".to_string(), true)]);
        let base = Eviction {
            pod: &pod,
            migratable: false,
            unmovable: None,
            migrations: &[],
            draining: &is_cordoned,
            attempts: 3,
        };
        assert_eq!(eviction(&base), EvictionVerdict::Allow);
        let unmovable = Eviction {
            migratable: true,
            unmovable: Some("volume logs is a hostPath".into()),
            ..base
        };
        assert_eq!(eviction(&unmovable), EvictionVerdict::Allow);
        let mut pending = pod.clone();
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        let not_running = Eviction {
            pod: &pending,
            migratable: true,
            ..unmovable
        };
        assert_eq!(eviction(&not_running), EvictionVerdict::Allow);
    }

    #[test]
    fn a_pod_of_any_valid_name_gets_a_valid_migration_name_on_eviction() {
        let uid = "c559167c-d6f9-48fc-86f8-534cdcdf48d2";
        assert_eq!(
            eviction_migration_name("db.0", uid, 1),
            format!("db.0-drain-{uid}-1")
        );
        let long = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        let name = eviction_migration_name(&long, uid, 12);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with(&"a".repeat(200)) && name.ends_with(&format!("-drain-{uid}-12")));
        assert!(
            name.split('.')
                .all(|part| part.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && part.ends_with(|c: char| c.is_ascii_alphanumeric())),
            "{name}"
        );
    }

    #[test]
    fn the_policy_takes_the_label_or_the_namespace() {
        let mut pod = owned_pod("p", "rs");
        let none = Policy::default();
        assert!(!none.migratable(&pod));
        let ns = Policy {
            namespaces: ["ns".to_string()].into(),
        };
        assert!(ns.migratable(&pod));
        pod.metadata.labels = Some([(crds::MIGRATABLE_LABEL.into(), "true".into())].into());
        assert!(none.migratable(&pod));
    }
}
