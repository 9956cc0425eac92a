//! Watches held through a test: every pod of a namespace ever seen (did a controller start a
//! fresh instance? how many of its pods were alive at once?) and the PodMigrations in flight.

// Test support: a failed watch fails the test that asked for it.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use crds::{Phase, PodMigration};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, runtime::watcher};

/// The annotation of a pod a migration made.
const MIGRATION_UID: &str = "migros.io/migration-uid";

/// Every pod of a namespace ever seen, by UID, and the most pods of each owner alive at once.
#[derive(Debug, Default)]
pub struct History {
    /// UID -> (name, owner name, made by a migration).
    pub seen: BTreeMap<String, (String, String, bool)>,
    pub alive: BTreeMap<String, String>,
    pub most_alive: BTreeMap<String, usize>,
}

impl History {
    /// The pods of owners named with one of `prefixes` that were neither among `originals` (by
    /// UID) nor made by a migration: fresh instances a controller started.
    pub fn fresh_instances(&self, originals: &[&Pod], prefixes: &[&str]) -> Vec<String> {
        let originals: Vec<Option<String>> = originals.iter().map(|p| p.uid()).collect();
        self.seen
            .iter()
            .filter(|(_, (_, owner, _))| prefixes.iter().any(|p| owner.starts_with(p)))
            .filter(|(uid, (_, _, made))| !made && !originals.contains(&Some((*uid).clone())))
            .map(|(_, (name, _, _))| name.clone())
            .collect()
    }

    /// The most pods alive at once of the owner named with `prefix`.
    pub fn most_alive_of(&self, prefix: &str) -> Option<usize> {
        self.most_alive
            .iter()
            .find(|(owner, _)| owner.starts_with(prefix))
            .map(|(_, n)| *n)
    }
}

/// The controller of `pod` by name, or the pod's own name for a pod without one.
pub fn owner(pod: &Pod) -> String {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map_or_else(|| pod.name_any(), |o| o.name.clone())
}

/// Watches the pods of `ns` until the task is aborted.
pub fn record_pods(client: Client, ns: &str) -> (Arc<Mutex<History>>, tokio::task::JoinHandle<()>) {
    let history = Arc::new(Mutex::new(History::default()));
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let h = history.clone();
    let task = tokio::spawn(async move {
        let mut events = watcher(pods, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let Ok(event) = event else { continue };
            let mut h = h.lock().unwrap();
            match event {
                watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                    let uid = pod.uid().unwrap_or_default();
                    let made = pod.annotations().contains_key(MIGRATION_UID);
                    h.seen
                        .insert(uid.clone(), (pod.name_any(), owner(&pod), made));
                    if pod.metadata.deletion_timestamp.is_none() {
                        h.alive.insert(uid, owner(&pod));
                    } else {
                        h.alive.remove(&uid);
                    }
                }
                watcher::Event::Delete(pod) => {
                    h.alive.remove(&pod.uid().unwrap_or_default());
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for o in h.alive.values() {
                *counts.entry(o.clone()).or_default() += 1;
            }
            for (o, n) in counts {
                let most = h.most_alive.entry(o).or_default();
                *most = (*most).max(n);
            }
        }
    });
    (history, task)
}

/// The most migrations in flight at once (past Pending, not final), and whether one was queued.
#[derive(Debug, Default)]
pub struct Flights {
    pub in_flight: BTreeSet<String>,
    pub most: usize,
    pub queued: bool,
}

/// Watches the PodMigrations of `ns` until the task is aborted.
pub fn record_flights(
    client: Client,
    ns: &str,
) -> (Arc<Mutex<Flights>>, tokio::task::JoinHandle<()>) {
    let flights = Arc::new(Mutex::new(Flights::default()));
    let api: Api<PodMigration> = Api::namespaced(client, ns);
    let f = flights.clone();
    let task = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let (watcher::Event::Apply(pm) | watcher::Event::InitApply(pm)) =
                event.unwrap_or(watcher::Event::Init)
            else {
                continue;
            };
            let mut f = f.lock().unwrap();
            let status = pm.status.clone().unwrap_or_default();
            let phase = status.phase.unwrap_or_default();
            if phase == Phase::Pending || phase.is_final() {
                f.in_flight.remove(&pm.name_any());
            } else {
                f.in_flight.insert(pm.name_any());
            }
            f.most = f.most.max(f.in_flight.len());
            f.queued |= status.conditions.iter().any(|c| c.reason == "Queued");
        }
    });
    (flights, task)
}
