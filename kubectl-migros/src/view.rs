//! What `kubectl migros` prints, pure: sizes, durations and ages as kubectl writes them, the
//! outcome of a migration and its exit code, the status table and the plain progress lines.

use std::time::Duration;

use crds::{Phase, PodMigration, PodMigrationStatus, discovery::KeptCheckpoint};
use k8s_openapi::jiff::Timestamp;

/// How a followed migration ended, and the exit code it gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod runs on the target node.
    Succeeded,
    /// Failed before its commit point: the source pod runs as before.
    RolledBack { reason: String, message: String },
    /// Failed: see the reason (past the commit point, the checkpoint is kept).
    Failed { reason: String, message: String },
}

/// Exit codes, besides 0 (every followed migration succeeded) and clap's 2 (bad usage).
pub mod exit {
    /// The cluster could not be reached or refused a request, or the input was wrong.
    pub const ERROR: u8 = 1;
    /// A migration rolled back: the pod runs on its node as before.
    pub const ROLLED_BACK: u8 = 3;
    /// A migration failed.
    pub const FAILED: u8 = 4;
    /// `--timeout` passed before the migration ended (it goes on).
    pub const TIMED_OUT: u8 = 5;

    /// The code of several outcomes: the one that says most, a failure before a rollback, before
    /// an error, before a wait that ran out; 0 when all are 0.
    pub fn worst(codes: impl IntoIterator<Item = u8>) -> u8 {
        let rank = |c: u8| match c {
            FAILED => 4,
            ROLLED_BACK => 3,
            ERROR => 2,
            TIMED_OUT => 1,
            _ => 0,
        };
        codes.into_iter().max_by_key(|c| rank(*c)).unwrap_or(0)
    }
}

impl Outcome {
    /// The outcome of `pm` once its phase is final, `None` before.
    pub fn of(pm: &PodMigration) -> Option<Self> {
        let status = pm.status.as_ref()?;
        let (reason, message) = (reason(status), status.message.clone().unwrap_or_default());
        match status.phase? {
            Phase::Succeeded => Some(Outcome::Succeeded),
            Phase::RolledBack => Some(Outcome::RolledBack { reason, message }),
            Phase::Failed => Some(Outcome::Failed { reason, message }),
            _ => None,
        }
    }

    /// The process exit code of this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::RolledBack { .. } => exit::ROLLED_BACK,
            Outcome::Failed { .. } => exit::FAILED,
        }
    }
}

/// The reason of the `Ready` condition (`TargetUnavailable`, `Deleted`, ...), empty when none.
pub fn reason(status: &PodMigrationStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// Bytes in binary units as kubectl shows quantities: `512B`, `16.0Mi`, `1.50Gi`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if n.abs() < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value.abs() >= 100.0 {
        0
    } else if value.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$}{}", UNITS[unit])
}

/// A pause or part of a migration: `850ms`, `1.61s`, `12.3s`, `2m05s`.
pub fn millis(ms: i64) -> String {
    match ms {
        ..1_000 => format!("{ms}ms"),
        1_000..10_000 => format!("{:.2}s", ms as f64 / 1000.0),
        10_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// An age as kubectl prints it: `45s`, `3m20s`, `5h10m`, `4d`.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        ..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// A duration given on the command line: `90s`, `10m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        _ => (text, 1),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 10m or 1h"))
}

/// One line of `kubectl migros status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub pod: String,
    pub phase: String,
    pub source: String,
    pub target: String,
    pub downtime: String,
    pub age: String,
    pub reason: String,
}

impl Row {
    /// The row of `pm`, its age counted to `now`.
    pub fn of(pm: &PodMigration, now: Timestamp) -> Self {
        let status = pm.status.clone().unwrap_or_default();
        let created = pm.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let phase = status.phase.unwrap_or_default();
        Row {
            namespace: pm.metadata.namespace.clone().unwrap_or_default(),
            name: pm.metadata.name.clone().unwrap_or_default(),
            pod: pm.spec.pod_name.clone(),
            phase: format!("{phase:?}"),
            source: status.source_node.clone().unwrap_or_else(|| "-".into()),
            target: status
                .target_node
                .clone()
                .or_else(|| pm.spec.target_node.clone())
                .unwrap_or_else(|| "-".into()),
            downtime: status
                .timings
                .and_then(|t| t.downtime_ms)
                .map(millis)
                .unwrap_or_else(|| "-".into()),
            age: created
                .map(|c| age(now.duration_since(c).as_secs()))
                .unwrap_or_else(|| "-".into()),
            // Why it failed or rolled back, or what it waits for (`Queued`); a migration on its
            // way has its phase for a reason.
            reason: match phase {
                Phase::Failed | Phase::RolledBack | Phase::Pending => reason(&status),
                _ => String::new(),
            },
        }
    }
}

/// `rows` as kubectl prints a table: upper-case headers, columns padded to their widest cell and
/// three spaces apart; the namespace column only when `namespaces` (`--all-namespaces`).
pub fn table(rows: &[Row], namespaces: bool) -> String {
    let mut lines: Vec<Vec<&str>> = vec![];
    let mut header = vec![
        "NAME", "POD", "PHASE", "SOURCE", "TARGET", "DOWNTIME", "AGE", "REASON",
    ];
    if namespaces {
        header.insert(0, "NAMESPACE");
    }
    lines.push(header);
    for r in rows {
        let mut cells = vec![
            r.name.as_str(),
            &r.pod,
            &r.phase,
            &r.source,
            &r.target,
            &r.downtime,
            &r.age,
            &r.reason,
        ];
        if namespaces {
            cells.insert(0, &r.namespace);
        }
        lines.push(cells);
    }
    columns(&lines)
}

/// Cells padded into columns, three spaces apart, without trailing blanks.
pub fn columns(lines: &[Vec<&str>]) -> String {
    let width = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            lines
                .iter()
                .filter_map(|l| l.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            text.push_str(cell);
            if i + 1 < line.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// Where a migration stands, in one line without the bar: the phase, the nodes, and what it
/// waits for or how far the bytes are.
pub fn state(pm: &PodMigration) -> String {
    let status = pm.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    let nodes = match (&status.source_node, &status.target_node) {
        (Some(s), Some(t)) => format!(" {s} -> {t}"),
        (Some(s), None) => format!(" from {s}"),
        _ => String::new(),
    };
    let detail = match phase {
        Phase::Pending if reason(&status) == "Queued" => {
            status.message.map(|m| format!(": {m}")).unwrap_or_default()
        }
        Phase::Transferring => status
            .progress
            .filter(|p| p.bytes_total > 0)
            .map(|p| {
                format!(
                    ": {} of {}",
                    bytes(p.bytes_transferred),
                    bytes(p.bytes_total)
                )
            })
            .unwrap_or_default(),
        Phase::CopyingMemory => status
            .memory
            .map(|m| {
                format!(
                    ": memory {} of {}, {}/s",
                    bytes(m.bytes_transferred),
                    bytes(m.bytes_total),
                    bytes(m.bytes_per_second)
                )
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!("{phase:?}{nodes}{detail}")
}

/// The last words on a migration that ended: downtime and sizes, or the reason it did not move.
pub fn summary(pm: &PodMigration) -> String {
    let status = pm.status.clone().unwrap_or_default();
    match Outcome::of(pm) {
        Some(Outcome::Succeeded) => {
            let timings = status.timings.unwrap_or_default();
            let mut parts = vec![format!(
                "Succeeded: {} runs on {}",
                pm.spec.pod_name,
                status.target_node.as_deref().unwrap_or("?")
            )];
            if let Some(ms) = timings.downtime_ms {
                parts.push(format!("downtime {}", millis(ms)));
            }
            if let Some(checkpoint) = &status.checkpoint {
                parts.push(format!("checkpoint {}", bytes(checkpoint.bytes)));
            }
            if let Some(ms) = timings.total_ms {
                parts.push(format!("total {}", millis(ms)));
            }
            parts.join(", ")
        }
        Some(Outcome::RolledBack { reason, message }) => {
            // The operator's message says that the source runs as before; say where.
            let message = message
                .replace("the source pod runs as before", "")
                .replace("; ;", ";");
            format!(
                "RolledBack ({reason}): {}; {} runs on {} as before",
                message.trim_end_matches([';', ' ']),
                pm.spec.pod_name,
                status.source_node.as_deref().unwrap_or("its node")
            )
        }
        Some(Outcome::Failed { reason, message }) => {
            let kept = status
                .checkpoint
                .and_then(|c| c.location)
                .map(|l| format!(" (checkpoint kept at {l})"))
                .unwrap_or_default();
            format!("Failed ({reason}): {message}{kept}")
        }
        None => state(pm),
    }
}

/// The checkpoints the agents keep, as their Leases list them, joined with the migrations `pms`
/// by UID: the rows of `kubectl migros status`'s second table, in the order of `pms` (oldest
/// first), then by age; those of a migration not among them (deleted) last, named `-`.
/// `namespaces` adds the namespace column.
pub fn kept_checkpoints(
    kept: &[KeptCheckpoint],
    pms: &[PodMigration],
    namespaces: bool,
    now: Timestamp,
) -> Option<String> {
    let order = |k: &KeptCheckpoint| {
        pms.iter()
            .position(|pm| pm.metadata.uid.as_deref() == Some(k.migration.as_str()))
    };
    let mut rows: Vec<(Option<usize>, &KeptCheckpoint)> =
        kept.iter().map(|k| (order(k), k)).collect();
    rows.sort_by(|a, b| {
        let key = |(at, k): &(Option<usize>, &KeptCheckpoint)| {
            (at.is_none(), *at, k.since, k.role.clone())
        };
        key(a).cmp(&key(b))
    });
    let mut lines = vec![
        [
            "NAMESPACE",
            "MIGRATION",
            "POD",
            "ROLE",
            "KEPT AT",
            "SIZE",
            "AGE",
        ]
        .map(String::from)[usize::from(!namespaces)..]
            .to_vec(),
    ];
    let now = now.as_second();
    for (at, k) in rows {
        let name = at
            .and_then(|i| pms[i].metadata.name.clone())
            .unwrap_or_else(|| "-".into());
        let mut line = vec![
            name,
            k.pod.clone(),
            k.role.clone(),
            k.location.clone(),
            bytes(i64::try_from(k.bytes).unwrap_or(i64::MAX)),
            age(now.saturating_sub(i64::try_from(k.since).unwrap_or(i64::MAX))),
        ];
        if namespaces {
            line.insert(0, k.namespace.clone());
        }
        lines.push(line);
    }
    (lines.len() > 1).then(|| {
        let cells: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| l.iter().map(String::as_str).collect())
            .collect();
        columns(&cells)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{CheckpointStatus, PodMigrationSpec, Progress, Timings};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn pm(phase: Phase, reason: &str, message: &str) -> PodMigration {
        let mut pm = PodMigration::new("app-1", PodMigrationSpec::of_pod("app"));
        pm.metadata.namespace = Some("demo".into());
        pm.metadata.creation_timestamp = Some(Time("2026-12-04T10:00:00Z".parse().unwrap()));
        pm.status = Some(PodMigrationStatus {
            phase: Some(phase),
            message: Some(message.into()),
            source_node: Some("node-1".into()),
            target_node: Some("node-2".into()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: Time("2026-12-04T10:00:00Z".parse().unwrap()),
                observed_generation: None,
            }],
            ..Default::default()
        });
        pm
    }

    #[test]
    fn outcomes_give_their_exit_codes_and_unfinished_migrations_none() {
        assert_eq!(
            Outcome::of(&pm(Phase::Succeeded, "Succeeded", "")).map(|o| o.exit_code()),
            Some(0)
        );
        let rolled = Outcome::of(&pm(Phase::RolledBack, "Deleted", "deleted")).unwrap();
        assert_eq!(rolled.exit_code(), exit::ROLLED_BACK);
        assert_eq!(
            rolled,
            Outcome::RolledBack {
                reason: "Deleted".into(),
                message: "deleted".into()
            }
        );
        let failed = Outcome::of(&pm(Phase::Failed, "TargetUnavailable", "no node"));
        assert_eq!(failed.map(|o| o.exit_code()), Some(exit::FAILED));
        // Several: the one that says most, whatever the order.
        assert_eq!(exit::worst([0, exit::TIMED_OUT, exit::ERROR]), exit::ERROR);
        assert_eq!(exit::worst([exit::ERROR, exit::TIMED_OUT]), exit::ERROR);
        assert_eq!(
            exit::worst([exit::ROLLED_BACK, exit::FAILED, 0]),
            exit::FAILED
        );
        assert_eq!(exit::worst([0, 0]), 0);
        assert_eq!(exit::worst([]), 0);
        for phase in [Phase::Pending, Phase::Transferring, Phase::CopyingMemory] {
            assert_eq!(Outcome::of(&pm(phase, "", "")), None, "{phase:?}");
        }
    }

    #[test]
    fn sizes_durations_and_ages_read_as_kubectl_writes_them() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(16 << 20), "16.0Mi");
        assert_eq!(bytes(256 << 20), "256Mi");
        assert_eq!(bytes(3 << 29), "1.50Gi");
        assert_eq!(millis(850), "850ms");
        assert_eq!(millis(1_610), "1.61s");
        assert_eq!(millis(12_345), "12.3s");
        assert_eq!(millis(125_000), "2m05s");
        assert_eq!(age(45), "45s");
        assert_eq!(age(200), "3m20s");
        assert_eq!(age(1_800), "30m");
        assert_eq!(age(5 * 3600 + 600), "5h10m");
        assert_eq!(age(4 * 86_400 + 10), "4d");
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn the_table_pads_columns_and_shows_why_a_migration_did_not_move() {
        let now: Timestamp = "2026-12-04T10:03:20Z".parse().unwrap();
        let mut done = pm(Phase::Succeeded, "Succeeded", "");
        done.status.as_mut().unwrap().timings = Some(Timings {
            downtime_ms: Some(1_610),
            ..Default::default()
        });
        let mut failed = pm(Phase::Failed, "TargetUnavailable", "no node");
        failed.metadata.name = Some("app-2".into());
        let rows = [Row::of(&done, now), Row::of(&failed, now)];
        assert_eq!(
            table(&rows, false),
            "NAME    POD   PHASE       SOURCE   TARGET   DOWNTIME   AGE     REASON\n\
             app-1   app   Succeeded   node-1   node-2   1.61s      3m20s\n\
             app-2   app   Failed      node-1   node-2   -          3m20s   TargetUnavailable\n"
        );
        assert!(table(&rows, true).starts_with("NAMESPACE   NAME"));
    }

    #[test]
    fn states_show_bytes_while_they_move_and_summaries_say_how_it_ended() {
        let mut moving = pm(Phase::Transferring, "", "");
        moving.status.as_mut().unwrap().progress = Some(Progress {
            bytes_transferred: 8 << 20,
            bytes_total: 16 << 20,
        });
        assert_eq!(
            state(&moving),
            "Transferring node-1 -> node-2: 8.00Mi of 16.0Mi"
        );
        let queued = pm(Phase::Pending, "Queued", "queued: 1 of 2 waiting to start");
        assert_eq!(
            state(&queued),
            "Pending node-1 -> node-2: queued: 1 of 2 waiting to start"
        );
        let mut done = pm(Phase::Succeeded, "Succeeded", "");
        let status = done.status.as_mut().unwrap();
        status.timings = Some(Timings {
            downtime_ms: Some(1_610),
            total_ms: Some(5_000),
            ..Default::default()
        });
        status.checkpoint = Some(CheckpointStatus {
            bytes: 16 << 20,
            ..Default::default()
        });
        assert_eq!(
            summary(&done),
            "Succeeded: app runs on node-2, downtime 1.61s, checkpoint 16.0Mi, total 5.00s"
        );
        assert_eq!(
            summary(&pm(
                Phase::RolledBack,
                "Deleted",
                "the PodMigration was deleted"
            )),
            "RolledBack (Deleted): the PodMigration was deleted; app runs on node-1 as before"
        );
    }

    #[test]
    fn kept_checkpoints_are_listed_with_their_migration_role_place_size_and_age() {
        let now: Timestamp = "2026-12-04T11:00:00Z".parse().unwrap();
        let kept = |uid: &str, role: &str, node: &str, bytes: u64, ago: u64| KeptCheckpoint {
            migration: uid.into(),
            namespace: "ns".into(),
            pod: "app".into(),
            role: role.into(),
            bytes,
            since: u64::try_from(now.as_second()).unwrap() - ago,
            location: format!("{node}:/var/lib/kube-migros/migrations/{uid}"),
        };
        let mut first = pm(Phase::Succeeded, "Succeeded", "");
        first.metadata.uid = Some("u1".into());
        let mut second = pm(Phase::Failed, "RestoreFailed", "");
        second.metadata.name = Some("app-2".into());
        second.metadata.uid = Some("u2".into());
        let agents = [
            kept("u2", "target", "node-3", 300 << 20, 3600),
            kept("u1", "target", "node-2", 48 << 20, 120),
            kept("u1", "source", "node-1", 48 << 20, 125),
            kept("gone", "target", "node-2", 1 << 20, 60),
        ];
        assert_eq!(kept_checkpoints(&[], &[first.clone()], false, now), None);
        // In the migrations' order (oldest first), then by age; one of no listed migration last.
        assert_eq!(
            kept_checkpoints(&agents, &[first, second.clone()], false, now).unwrap(),
            "MIGRATION   POD   ROLE     KEPT AT                                       SIZE     AGE\n\
             app-1       app   source   node-1:/var/lib/kube-migros/migrations/u1     48.0Mi   2m5s\n\
             app-1       app   target   node-2:/var/lib/kube-migros/migrations/u1     48.0Mi   2m0s\n\
             app-2       app   target   node-3:/var/lib/kube-migros/migrations/u2     300Mi    60m\n\
             -           app   target   node-2:/var/lib/kube-migros/migrations/gone   1.00Mi   60s\n"
        );
        // With the namespace column.
        let all = kept_checkpoints(&agents, &[second], true, now).unwrap();
        let last = all.lines().last().unwrap();
        assert!(
            last.starts_with("ns          -           app   target"),
            "{all}"
        );
        assert!(all.starts_with("NAMESPACE   MIGRATION"), "{all}");
    }
}
