//! How many migrations may be in flight at once, and in which order waiting ones start: at most
//! `per_source` leaving one node, `per_target` arriving on one node and `cluster` in all (chart
//! values `limits.*`). A migration over a limit stays in Pending (Ready reason `Queued`, its
//! position in the message) and starts in creation order. The decision is pure (`admit`); `Queue`
//! keeps what it needs in the operator and serialises the starts, so two reconciles never both take
//! the last slot.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
};

use crds::{Phase, PodMigration};
use k8s_openapi::jiff::Timestamp;
use kube::{ResourceExt, runtime::reflector};

/// The bounds on migrations in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_source: usize,
    pub per_target: usize,
    pub cluster: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_source: 2,
            per_target: 2,
            cluster: 5,
        }
    }
}

/// One migration, as the queue sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `namespace/name`.
    pub key: String,
    pub created: Timestamp,
    pub source: Option<String>,
    pub target: Option<String>,
}

/// Whether a waiting migration may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Start,
    /// It waits: `position` among the `waiting` ones that cannot start, and why.
    Queued {
        position: usize,
        waiting: usize,
        why: String,
    },
}

/// Decides for `me` (one of `waiting`, which are the migrations not started yet) given the ones
/// `in_flight`. Waiting migrations are taken in creation order; each that fits is counted as
/// started, so an older one always goes first; once an older one waits for a cluster-wide slot,
/// no younger one takes it.
pub fn admit(me: &str, waiting: &[Entry], in_flight: &[Entry], limits: Limits) -> Admission {
    let mut order: Vec<&Entry> = waiting.iter().collect();
    order.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    let mut counts = Counts::default();
    for e in in_flight {
        counts.add(e);
    }
    let mut queued = Vec::new();
    let mut cluster_full = false;
    for e in order {
        let why = if cluster_full {
            Some(format!(
                "{} migrations in flight in the cluster, the limit",
                counts.all
            ))
        } else {
            counts.blocked(e, limits)
        };
        match why {
            None if e.key == me => return Admission::Start,
            None => counts.add(e),
            Some(why) => {
                cluster_full |= counts.all >= limits.cluster;
                queued.push((e.key.as_str(), why));
            }
        }
    }
    let waiting = queued.len();
    match queued.iter().position(|(key, _)| *key == me) {
        Some(i) => Admission::Queued {
            position: i + 1,
            waiting,
            why: queued[i].1.clone(),
        },
        // Not among the waiting (it just started elsewhere): nothing holds it back.
        None => Admission::Start,
    }
}

#[derive(Debug, Default)]
struct Counts {
    all: usize,
    leaving: BTreeMap<String, usize>,
    arriving: BTreeMap<String, usize>,
}

impl Counts {
    fn add(&mut self, e: &Entry) {
        self.all += 1;
        if let Some(s) = &e.source {
            *self.leaving.entry(s.clone()).or_default() += 1;
        }
        if let Some(t) = &e.target {
            *self.arriving.entry(t.clone()).or_default() += 1;
        }
    }

    fn blocked(&self, e: &Entry, limits: Limits) -> Option<String> {
        if self.all >= limits.cluster {
            return Some(format!(
                "{} migrations in flight in the cluster, the limit",
                self.all
            ));
        }
        if let Some(s) = &e.source {
            let n = self.leaving.get(s).copied().unwrap_or_default();
            if n >= limits.per_source {
                return Some(format!("{n} migrations leaving node {s}, the limit"));
            }
        }
        if let Some(t) = &e.target {
            let n = self.arriving.get(t).copied().unwrap_or_default();
            if n >= limits.per_target {
                return Some(format!("{n} migrations arriving on node {t}, the limit"));
            }
        }
        None
    }
}

fn phase(pm: &PodMigration) -> Phase {
    pm.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// The queue's view of `pm`; `source` and `target` from its status, else from its spec.
pub fn entry(pm: &PodMigration) -> Entry {
    let status = pm.status.as_ref();
    Entry {
        key: format!("{}/{}", pm.namespace().unwrap_or_default(), pm.name_any()),
        created: pm
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
        source: status.and_then(|s| s.source_node.clone()),
        target: status
            .and_then(|s| s.target_node.clone())
            .or_else(|| pm.spec.target_node.clone()),
    }
}

/// The operator's queue: the watched PodMigrations plus the starts this process made that the
/// watch has not shown yet.
#[derive(Debug)]
pub struct Queue {
    limits: Limits,
    store: OnceLock<reflector::Store<PodMigration>>,
    /// Started here, by UID, until the watch shows them started; its lock is held while a start
    /// is decided, so two reconciles never both take the last slot.
    started: Mutex<BTreeMap<String, Entry>>,
}

impl Queue {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            store: OnceLock::new(),
            started: Mutex::default(),
        }
    }

    /// The controller's watch of the PodMigrations.
    pub fn watch(&self, store: reflector::Store<PodMigration>) {
        let _ = self.store.set(store);
    }

    /// Whether `pm` (about to leave Pending as `me`, with its source and target) may start;
    /// `node_of` tells where the pod of another waiting migration runs. A start is counted at once
    /// (`unstart` gives it back when it cannot be written).
    pub fn admit(
        &self,
        pm: &PodMigration,
        me: Entry,
        node_of: impl Fn(&PodMigration) -> Option<String>,
    ) -> Admission {
        let Some(store) = self.store.get() else {
            return Admission::Start;
        };
        let all = store.state();
        let uid = pm.uid().unwrap_or_default();
        let Ok(mut started) = self.started.lock() else {
            return Admission::Start;
        };
        // Until the watch shows a start made here, the start counts from `started`.
        started.retain(|u, _| {
            all.iter()
                .find(|pm| pm.uid().as_ref() == Some(u))
                .is_some_and(|pm| {
                    phase(pm) == Phase::Pending && pm.metadata.deletion_timestamp.is_none()
                })
        });
        let mut in_flight: Vec<Entry> = started.values().cloned().collect();
        let mut waiting = vec![me.clone()];
        for other in all.iter().filter(|o| o.uid() != Some(uid.clone())) {
            let p = phase(other);
            let other_uid = other.uid().unwrap_or_default();
            if started.contains_key(&other_uid) {
                continue;
            }
            if p == Phase::Pending {
                if other.metadata.deletion_timestamp.is_none() {
                    let mut e = entry(other);
                    e.source = e.source.or_else(|| node_of(other));
                    waiting.push(e);
                }
            } else if !p.is_final() {
                in_flight.push(entry(other));
            }
        }
        let admission = admit(&me.key, &waiting, &in_flight, self.limits);
        if admission == Admission::Start {
            started.insert(uid, me);
        }
        admission
    }

    /// The pods on their way to each node: `(migration UID, target node, template)` of each
    /// migration in flight (target choice counts them as if they ran there, until it sees their
    /// replacement).
    pub fn arriving(&self) -> Vec<(String, String, k8s_openapi::api::core::v1::Pod)> {
        let Some(store) = self.store.get() else {
            return Vec::new();
        };
        store
            .state()
            .iter()
            .filter(|pm| !matches!(phase(pm), Phase::Pending) && !phase(pm).is_final())
            .filter_map(|pm| {
                let status = pm.status.as_ref()?;
                let raw = pm
                    .annotations()
                    .get(crate::replacement::TEMPLATE_ANNOTATION)?;
                Some((
                    pm.uid()?,
                    status.target_node.clone()?,
                    serde_json::from_str(raw).ok()?,
                ))
            })
            .collect()
    }

    /// Gives back the slot of `pm`, whose start could not be written.
    pub fn unstart(&self, pm: &PodMigration) {
        if let Ok(mut started) = self.started.lock() {
            started.remove(&pm.uid().unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str, second: i64, source: &str, target: Option<&str>) -> Entry {
        Entry {
            key: key.into(),
            created: Timestamp::from_second(second).unwrap(),
            source: Some(source.into()),
            target: target.map(Into::into),
        }
    }

    #[test]
    fn at_most_two_leave_a_node_and_the_rest_wait_in_creation_order() {
        let waiting: Vec<Entry> = (1..=6)
            .map(|i| e(&format!("m{i}"), 10 - i, "node-1", None))
            .collect();
        // m6 is the oldest.
        let limits = Limits::default();
        assert_eq!(admit("m6", &waiting, &[], limits), Admission::Start);
        assert_eq!(admit("m5", &waiting, &[], limits), Admission::Start);
        let Admission::Queued {
            position,
            waiting: n,
            why,
        } = admit("m3", &waiting, &[], limits)
        else {
            panic!("m3 waits");
        };
        assert_eq!((position, n), (2, 4));
        assert!(why.contains("leaving node node-1"), "{why}");
        // Two already in flight from node-1: the oldest waiting one waits too.
        let flying = [
            e("a", 0, "node-1", Some("node-2")),
            e("b", 0, "node-1", Some("node-3")),
        ];
        assert!(matches!(
            admit("m6", &waiting, &flying, limits),
            Admission::Queued { position: 1, .. }
        ));
    }

    #[test]
    fn targets_and_the_cluster_are_bounded_too() {
        let limits = Limits::default();
        let flying = [
            e("a", 0, "n1", Some("t")),
            e("b", 0, "n2", Some("t")),
            e("c", 0, "n3", Some("u")),
        ];
        let to_t = [e("me", 5, "n4", Some("t"))];
        let Admission::Queued { why, .. } = admit("me", &to_t, &flying, limits) else {
            panic!("a third migration to t waits");
        };
        assert!(why.contains("arriving on node t"), "{why}");
        let elsewhere = [e("me", 5, "n4", Some("v"))];
        assert_eq!(admit("me", &elsewhere, &flying, limits), Admission::Start);

        // Five in flight: nobody else starts; once an older one waits for the cluster, a younger
        // one does not jump ahead.
        let five: Vec<Entry> = (0..5)
            .map(|i| e(&format!("f{i}"), 0, &format!("s{i}"), None))
            .collect();
        assert!(matches!(
            admit("me", &elsewhere, &five, limits),
            Admission::Queued { why, .. } if why.contains("in the cluster")
        ));
        let four = &five[..4];
        let two = [e("old", 1, "x", None), e("young", 2, "y", None)];
        assert_eq!(admit("old", &two, four, limits), Admission::Start);
        assert!(matches!(
            admit("young", &two, four, limits),
            Admission::Queued { position: 1, .. }
        ));
    }
}
