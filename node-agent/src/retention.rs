//! What an agent keeps, and how much: the byte budget of its kept checkpoints, and the list it
//! publishes on its Lease (docs/node-agent.md#kept-checkpoints).
//!
//! A checkpoint is kept past its migration's commit point (or once received whole) until the
//! PodMigration is deleted or its retention time passes (`gc.rs`). With a byte budget, the kept
//! checkpoints of *ended* migrations may take at most that many bytes on the node: past it, the
//! agent removes them, after undoing what they hold, oldest first: first those whose pod runs
//! anyway (Succeeded, RolledBack, or Failed before the commit point), then those that may be the
//! only copy of their pod (Failed past the commit point, and those whose PodMigration is gone: a
//! deletion after a failed restore keeps the checkpoint for the retention time).
//! A migration that has not ended (its PodMigration is in any other phase) or a
//! step of which runs is never touched, and its bytes do not count: nothing a running migration
//! needs is removed. The agent learns which migrations ended by listing PodMigrations; when it
//! cannot, it removes nothing.

use std::{
    collections::HashMap,
    time::{SystemTime, UNIX_EPOCH},
};

use crds::{PodMigration, discovery::KeptCheckpoint};
use kube::{Api, Client, ResourceExt, api::ListParams};

use crate::store::{Kept, Role};

/// Where a kept checkpoint's migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Ended with its pod running (on the target, or on the source again): removed first.
    Redundant,
    /// Failed past its commit point: the checkpoint is the pod's only copy.
    OnlyCopy,
    /// Its PodMigration is gone: a Cleanup that never came, or a deletion after a failed restore
    /// (whose checkpoint is kept for the retention time, the pod's only copy); removed with the
    /// only copies.
    Gone,
    /// Not ended: never removed, not counted.
    InFlight,
}

impl Standing {
    /// The order in which the budget removes checkpoints (then oldest first).
    fn rank(self) -> u8 {
        match self {
            Self::Redundant => 0,
            Self::OnlyCopy | Self::Gone => 1,
            Self::InFlight => 2,
        }
    }

    /// Where migration `pm` stands (`None`: it is gone). A failure past the commit point counts
    /// as a possible only copy whatever its reason: removed later rather than sooner.
    pub fn of(pm: Option<&PodMigration>) -> Self {
        use crds::Phase;
        let Some(pm) = pm else {
            return Self::Gone;
        };
        let status = pm.status.as_ref();
        match status.and_then(|s| s.phase) {
            Some(Phase::Succeeded | Phase::RolledBack) => Self::Redundant,
            Some(Phase::Failed) if status.is_some_and(|s| s.committed) => Self::OnlyCopy,
            Some(Phase::Failed) => Self::Redundant,
            _ => Self::InFlight,
        }
    }
}

/// The migrations (by UID) of `kept` to remove so that the checkpoints of ended migrations take
/// at most `budget` bytes: those whose pod runs anyway first, then the (possible) only copies,
/// oldest first within each. `standing` says where a
/// migration stands, `active` whether a step of it runs (never removed, like one in flight).
pub fn over_budget(
    kept: &[Kept],
    budget: u64,
    standing: impl Fn(&str) -> Standing,
    active: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut ended: Vec<(u8, SystemTime, &Kept)> = kept
        .iter()
        .filter(|k| !active(&k.record.uid))
        .map(|k| (standing(&k.record.uid), k))
        .filter(|(s, _)| *s != Standing::InFlight)
        .map(|(s, k)| (s.rank(), k.since, k))
        .collect();
    ended.sort_by(|a, b| (a.0, a.1, &a.2.record.uid).cmp(&(b.0, b.1, &b.2.record.uid)));
    let mut total: u64 = ended.iter().map(|(_, _, k)| k.bytes).sum();
    let mut evict = Vec::new();
    for (_, _, k) in ended {
        if total <= budget {
            break;
        }
        total -= k.bytes;
        evict.push(k.record.uid.clone());
    }
    evict
}

/// The byte budget and how the agent learns where migrations stand.
#[derive(Clone, Debug)]
pub struct Budget {
    pub bytes: u64,
    migrations: Api<PodMigration>,
}

impl Budget {
    pub fn new(bytes: u64, client: Client) -> Self {
        Self {
            bytes,
            migrations: Api::all(client),
        }
    }

    /// Every PodMigration's standing by UID; a UID not in it is [`Standing::Gone`].
    pub async fn standings(&self) -> Result<HashMap<String, Standing>, kube::Error> {
        let list = self.migrations.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .filter_map(|pm| Some((pm.uid()?, Standing::of(Some(pm)))))
            .collect())
    }
}

/// What the agent of `node` publishes of `kept` (newest first) on its Lease: at most
/// [`crds::discovery::KEPT_LISTED`] entries and [`crds::discovery::KEPT_BYTES`] of JSON.
pub fn published(
    kept: &[Kept],
    node: &str,
    location: impl Fn(&str) -> String,
) -> Vec<KeptCheckpoint> {
    let mut room = crds::discovery::KEPT_BYTES;
    kept.iter()
        .take(crds::discovery::KEPT_LISTED)
        .map(|k| KeptCheckpoint {
            migration: k.record.uid.clone(),
            namespace: k.record.namespace.clone(),
            pod: k.record.pod.clone(),
            role: match k.record.role {
                Role::Source => "source",
                Role::Target => "target",
            }
            .into(),
            bytes: k.bytes,
            since: k
                .since
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            location: format!("{node}:{}", location(&k.record.uid)),
        })
        .take_while(|entry| {
            // Its JSON and a comma.
            let size = serde_json::to_string(entry).map_or(usize::MAX, |j| j.len() + 1);
            let fits = size <= room;
            room = room.saturating_sub(size);
            fits
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use crds::{Phase, PodMigrationSpec, PodMigrationStatus};

    use super::*;
    use crate::store::Record;

    fn kept(uid: &str, bytes: u64, age_secs: u64) -> Kept {
        Kept {
            record: Record::new(uid, Role::Target, "ns", "app"),
            bytes,
            since: SystemTime::now() - Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn standings_follow_the_phase_and_the_commit_point() {
        let pm = |phase: Option<Phase>, committed: bool| {
            let mut pm = PodMigration::new("m", PodMigrationSpec::of_pod("app"));
            pm.status = Some(PodMigrationStatus {
                phase,
                committed,
                ..Default::default()
            });
            pm
        };
        assert_eq!(Standing::of(None), Standing::Gone);
        for (phase, committed, standing) in [
            (Some(Phase::Succeeded), true, Standing::Redundant),
            (Some(Phase::RolledBack), false, Standing::Redundant),
            (Some(Phase::Failed), false, Standing::Redundant),
            (Some(Phase::Failed), true, Standing::OnlyCopy),
            (Some(Phase::Restoring), true, Standing::InFlight),
            (Some(Phase::Transferring), false, Standing::InFlight),
            (None, false, Standing::InFlight),
        ] {
            assert_eq!(
                Standing::of(Some(&pm(phase, committed))),
                standing,
                "{phase:?} committed={committed}"
            );
        }
    }

    #[test]
    fn the_budget_removes_ended_migrations_whose_pod_runs_first_then_possible_only_copies_oldest_first()
     {
        let all = [
            kept("flight", 900, 500),
            kept("running-step", 900, 400),
            kept("only-old", 100, 300),
            kept("redundant-new", 100, 10),
            kept("redundant-old", 100, 200),
            kept("gone", 100, 250),
        ];
        let standing = |uid: &str| match uid {
            "flight" => Standing::InFlight,
            "only-old" => Standing::OnlyCopy,
            "gone" => Standing::Gone,
            // "running-step" too: a step runs, so its standing does not matter.
            _ => Standing::Redundant,
        };
        let active = |uid: &str| uid == "running-step";
        // In flight or active: neither counted nor removed, whatever the budget.
        assert!(over_budget(&all, 400, standing, active).is_empty());
        assert_eq!(
            over_budget(&all, 250, standing, active),
            ["redundant-old", "redundant-new"]
        );
        // A gone migration's checkpoint may be a pod's only copy: with the only copies, by age.
        assert_eq!(
            over_budget(&all, 100, standing, active),
            ["redundant-old", "redundant-new", "only-old"]
        );
        assert_eq!(
            over_budget(&all, 0, standing, active),
            ["redundant-old", "redundant-new", "only-old", "gone"]
        );
    }

    #[test]
    fn what_is_published_names_the_migration_its_pod_size_age_and_place() {
        let mut old = kept("u1", 4096, 60);
        old.record.role = Role::Source;
        let list = published(&[kept("u2", 10, 0), old], "node-2", |uid| {
            format!("/store/migrations/{uid}")
        });
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].migration, "u1");
        assert_eq!(list[1].role, "source");
        assert_eq!(list[1].bytes, 4096);
        assert_eq!(list[1].location, "node-2:/store/migrations/u1");
        assert!(list[0].since > list[1].since);
        let many: Vec<Kept> = (0..300).map(|i| kept(&format!("u{i}"), 1, 0)).collect();
        assert_eq!(
            published(&many, "n", |_| String::new()).len(),
            crds::discovery::KEPT_LISTED
        );
        // Long locations: the list stops before its JSON passes the limit.
        let long = published(&many, "n", |_| "/x".repeat(400));
        let json = serde_json::to_string(&long).unwrap();
        assert!(!long.is_empty() && long.len() < crds::discovery::KEPT_LISTED);
        assert!(json.len() <= crds::discovery::KEPT_BYTES, "{}", json.len());
    }
}
