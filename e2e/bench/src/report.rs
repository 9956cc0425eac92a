//! `docs/benchmarks.md` and `docs/benchmarks.svg` from the measured results (pure functions of the
//! JSON document, so that a reader can regenerate or check them).

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    Document, FloorRun, MigrationRun, RawRun, Results, ScaleRun,
    migration::PHASES,
    stats::{Summary, ratio},
};

fn summary(values: impl IntoIterator<Item = f64>) -> Option<Summary> {
    Summary::of(&values.into_iter().collect::<Vec<_>>())
}

fn show(s: Option<Summary>, scale: f64, decimals: usize) -> String {
    s.map(|s| {
        Summary {
            median: s.median * scale,
            min: s.min * scale,
            max: s.max * scale,
            n: s.n,
        }
        .show(decimals)
    })
    .unwrap_or_else(|| "-".into())
}

fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

/// Sizes in the order of their bytes ("16Mi" < "256Mi" < "1Gi").
fn ordered<T>(map: &std::collections::BTreeMap<String, T>) -> Vec<(&String, &T)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by_key(|(k, _)| bytes_of(k));
    v
}

/// `16Mi` -> 16 MiB in bytes (0 when not a size).
pub fn bytes_of(size: &str) -> u64 {
    let (digits, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let n: u64 = digits.parse().unwrap_or(0);
    n * match unit {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => 1,
    }
}

/// The phases from the freeze (checkpoint) until the replacement runs: all but the first
/// (prepare) and the last (the operator seeing it run).
fn frozen() -> &'static [&'static str] {
    &PHASES[1..PHASES.len() - 1]
}

/// Downtime as the watches saw it: the sum of the frozen phases (the operator's own figure in the
/// status takes the container's start time, which has second resolution).
pub fn downtime(run: &MigrationRun) -> f64 {
    let phases: Option<Vec<f64>> = frozen()
        .iter()
        .map(|p| run.phases.get(*p).copied())
        .collect();
    phases.map_or(run.downtime_ms, |v| v.iter().sum())
}

fn phase(runs: &[MigrationRun], name: &str) -> Option<Summary> {
    summary(runs.iter().filter_map(|r| r.phases.get(name).copied()))
}

/// The headline numbers of one result set, for the summary table and the comparison.
struct Headline {
    size: String,
    total: Option<Summary>,
    downtime: Option<Summary>,
    raw_downtime: Option<Summary>,
    floor_downtime: Option<Summary>,
}

fn headline(r: &Results, size: &str) -> Headline {
    let runs = r.migrations.get(size).map(Vec::as_slice).unwrap_or(&[]);
    let raw = r.raw.get(size).map(Vec::as_slice).unwrap_or(&[]);
    let floor = r.floor.get(size).map(Vec::as_slice).unwrap_or(&[]);
    Headline {
        size: size.into(),
        total: summary(runs.iter().map(|m| m.total_ms)),
        downtime: summary(runs.iter().map(downtime)),
        raw_downtime: summary(raw.iter().map(|r| r.downtime_ms())),
        floor_downtime: summary(floor.iter().map(FloorRun::downtime_ms)),
    }
}

/// From the commit until the restored process runs: the phases after the transfer but the
/// operator's last look.
const AFTER_COMMIT: [&str; 4] = ["commit", "source teardown", "pod creation", "restore"];

fn after_commit(run: &MigrationRun) -> Option<f64> {
    AFTER_COMMIT
        .iter()
        .map(|p| run.phases.get(*p).copied())
        .sum()
}

/// The template of the document (`e2e/bench/report.md`): prose with `{{name}}` slots, in sections.
const TEMPLATE: &str = include_str!("../report.md");

/// A markdown table: a header row and rows of cells.
#[derive(Debug, Default)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "| {} |", self.header.join(" | "))?;
        writeln!(f, "|{}", "---|".repeat(self.header.len()))?;
        for row in &self.rows {
            writeln!(f, "| {} |", row.join(" | "))?;
        }
        Ok(())
    }
}

/// The values of a section's slots.
type Slots = Vec<(&'static str, String)>;

/// Section `name` of the template with its slots filled.
fn section(name: &str, slots: &Slots) -> String {
    let marker = format!("<!-- section {name} -->\n");
    let text = TEMPLATE
        .split_once(&marker)
        .map(|(_, rest)| rest.split("<!-- section ").next().unwrap_or(rest))
        .unwrap_or_default();
    let mut out = text.to_string();
    for (slot, value) in slots {
        out = out.replace(&format!("{{{{{slot}}}}}"), value.trim_end());
    }
    out
}

/// What the sections need to know of one result set.
struct Context<'a> {
    r: &'a Results,
    smallest: String,
    middle: String,
    /// The sizes from the middle up (where the floor target applies).
    large: Vec<String>,
    rate: BTreeMap<&'static str, Option<Summary>>,
    /// The run whose control-plane scale results are shown: this one's, else the newest that
    /// has them (the scale benchmark does not depend on the restore backend, and runs alone).
    scale: &'a Results,
    thousand: Option<&'a ScaleRun>,
}

impl<'a> Context<'a> {
    fn new(r: &'a Results, doc: &'a Document) -> Self {
        let scale = doc
            .values()
            .filter(|o| !o.scale.is_empty())
            .max_by(|a, b| a.started.cmp(&b.started))
            .filter(|newest| newest.started > r.started || r.scale.is_empty())
            .unwrap_or(r);
        let sizes: Vec<&String> = ordered(&r.migrations).into_iter().map(|(k, _)| k).collect();
        let transfer = r.transfer.clone().unwrap_or_default();
        let rate = ["agent", "agent stream", "tcp pipe", "scp", "memory copy"]
            .into_iter()
            .map(|m| {
                let runs = transfer.mb_per_s.get(m).cloned().unwrap_or_default();
                (m, summary(runs))
            })
            .collect();
        Self {
            r,
            smallest: sizes.first().map_or("16Mi".into(), |s| s.to_string()),
            middle: sizes
                .get(sizes.len() / 2)
                .map_or("256Mi".into(), |s| s.to_string()),
            large: sizes[sizes.len() / 2..]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rate,
            scale,
            thousand: scale.scale.iter().find(|s| s.migrations == 1000),
        }
    }

    fn runs(&self, size: &str) -> &'a [MigrationRun] {
        self.r
            .migrations
            .get(size)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn rate(&self, method: &str) -> Option<Summary> {
        self.rate.get(method).copied().flatten()
    }
}

/// The document for result set `label` (others in `doc` appear in the before/after section).
pub fn markdown(doc: &Document, label: &str) -> String {
    let Some(r) = doc.get(label) else {
        return "# Benchmarks\n\nNo results.\n".into();
    };
    let c = Context::new(r, doc);
    let header = vec![
        ("label", label.to_string()),
        ("backend", r.backend.clone()),
        ("started", r.started.clone()),
        ("commit", r.commit.clone()),
        ("machine", r.machine.clone()),
        ("targets", targets(&c).to_string()),
    ];
    let mut md = section("header", &header);
    let others: Vec<&Results> = doc.values().filter(|o| o.label != label).collect();
    let parts = [
        ("migrations", !r.migrations.is_empty(), migrations(&c)),
        ("postcopy", !r.post_copy.is_empty(), post_copy(&c)),
        ("floor", !r.floor.is_empty(), floor(&c)),
        ("raw", !r.raw.is_empty(), raw(&c)),
        ("transfer", r.transfer.is_some(), transfer(&c)),
        ("scale", !c.scale.scale.is_empty(), scale(&c)),
        ("time", !r.migrations.is_empty(), time(&c)),
        ("missed", true, missed(&c)),
        ("comparison", !others.is_empty(), comparison(&others, r)),
    ];
    for (name, measured, slots) in parts {
        if measured {
            md.push_str(&section(name, &slots));
        }
    }
    md.trim_end().to_string() + "\n"
}

fn targets(c: &Context<'_>) -> Table {
    let met = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    };
    let small = c.runs(&c.smallest);
    let client_gap = summary(small.iter().map(|m| m.client_gap_ms));
    let peer_pause = summary(small.iter().map(|m| m.peer_pause_ms));
    let mid = headline(c.r, &c.middle);
    let dt_ratio = ratio(mid.downtime, mid.raw_downtime);
    let (agent, stream, pipe) = (c.rate("agent"), c.rate("agent stream"), c.rate("tcp pipe"));
    let (phase_vs_pipe, stream_vs_pipe) = (ratio(agent, pipe), ratio(stream, pipe));
    let mut t = Table::new(&["target", "measured", "met"]);
    t.row(vec![
        format!("the pause a TCP peer sees per hop at {}: at most 0.3 s", c.smallest),
        format!(
            "{} s (the peer's longest time between two answers to its stream, on its own clock); a client polling the pod's status port: {} s",
            show(peer_pause, 0.001, 2),
            show(client_gap, 0.001, 2)
        ),
        met(peer_pause.map(|g| g.median <= 300.0)).into(),
    ]);
    for size in &c.large {
        let h = headline(c.r, size);
        let x = ratio(h.downtime, h.floor_downtime);
        t.row(vec![
            format!(
                "downtime at {size} ({}): at most 1.5x the CRIU floor",
                c.r.backend
            ),
            format!(
                "{} s vs {} s: {}",
                show(h.downtime, 0.001, 2),
                show(h.floor_downtime, 0.001, 2),
                times(x)
            ),
            met(x.map(|x| x <= 1.5)).into(),
        ]);
    }
    // PostCopy at the largest size: the pause no longer grows with the memory.
    if let Some((size, runs)) = ordered(&c.r.post_copy).last().copied() {
        let down = summary(runs.iter().map(downtime));
        t.row(vec![
            format!("PostCopy downtime at {size}: at most 0.25 s"),
            format!("{} s", show(down, 0.001, 2)),
            met(down.map(|d| d.median <= 250.0)).into(),
        ]);
        let pause = summary(runs.iter().map(|m| m.peer_pause_ms));
        t.row(vec![
            format!("the pause a TCP peer sees with PostCopy at {size}: at most 0.3 s"),
            format!("{} s", show(pause, 0.001, 2)),
            met(pause.map(|p| p.median <= 300.0)).into(),
        ]);
    }
    let commit_to_running = summary(small.iter().filter_map(after_commit));
    t.row(vec![
        format!(
            "from the commit until the restored process runs at {}: at most 0.5 s",
            c.smallest
        ),
        format!(
            "{} s ({})",
            show(commit_to_running, 0.001, 2),
            AFTER_COMMIT.join(" + ")
        ),
        met(commit_to_running.map(|s| s.median <= 500.0)).into(),
    ]);
    t.row(vec![
        "the agents' stream alone: at least 0.9x a plain TCP pipe".into(),
        format!(
            "{} MB/s vs {} MB/s: {}",
            show(stream, 1.0, 0),
            show(pipe, 1.0, 0),
            times(stream_vs_pipe)
        ),
        met(stream_vs_pipe.map(|x| x >= 0.9)).into(),
    ]);
    t.row(vec![
        "the transfer phase as a whole: at least 0.5x a plain TCP pipe".into(),
        format!("{} MB/s: {}", show(agent, 1.0, 0), times(phase_vs_pipe)),
        met(phase_vs_pipe.map(|x| x >= 0.5)).into(),
    ]);
    t.row(vec![
        format!("downtime at {}: at most 1.5x the raw recipe's", c.middle),
        format!(
            "{} s vs {} s: {}",
            show(mid.downtime, 0.001, 2),
            show(mid.raw_downtime, 0.001, 2),
            times(dt_ratio)
        ),
        met(dt_ratio.map(|x| x <= 1.5)).into(),
    ]);
    t.row(vec![
        "1000 PodMigrations with instant agents: all Succeeded within 60 s, operator RSS at most \
         100 MiB, at most 15 API requests each"
            .into(),
        c.thousand.map_or_else(
            || "-".into(),
            |s| {
                format!(
                    "{} Succeeded, {:.1} s, {:.0} MiB, {:.1} requests",
                    s.succeeded,
                    s.all_final_ms / 1000.0,
                    s.operator_peak_rss_mib,
                    s.requests_per_migration
                )
            },
        ),
        met(c.thousand.map(scale_met)).into(),
    ]);
    t
}

/// PostCopy beside StopAndCopy and the floor, per size.
fn post_copy(c: &Context<'_>) -> Slots {
    let seconds = |values: Vec<f64>| show(summary(values), 0.001, 2);
    let mut t = Table::new(&[
        "memory",
        "runs",
        "checkpoint MB",
        "downtime s",
        "StopAndCopy downtime s",
        "floor downtime s",
        "PostCopy / floor",
        "client gap s",
        "peer's pause s",
        "StopAndCopy peer's pause s",
        "memory after s",
        "ticks/s meanwhile",
    ]);
    for (size, runs) in ordered(&c.r.post_copy) {
        let h = headline(c.r, size);
        let post = summary(runs.iter().map(downtime));
        t.row(vec![
            size.clone(),
            runs.len().to_string(),
            show(
                summary(runs.iter().map(|m| m.checkpoint_bytes as f64)),
                1e-6,
                2,
            ),
            show(post, 0.001, 2),
            show(h.downtime, 0.001, 2),
            show(h.floor_downtime, 0.001, 2),
            times(ratio(post, h.floor_downtime)),
            seconds(runs.iter().map(|m| m.client_gap_ms).collect()),
            seconds(runs.iter().map(|m| m.peer_pause_ms).collect()),
            seconds(c.runs(size).iter().map(|m| m.peer_pause_ms).collect()),
            seconds(runs.iter().map(|m| m.memory_ms).collect()),
            show(
                summary(runs.iter().filter_map(|m| m.memory_ticks_per_s)),
                1.0,
                0,
            ),
        ]);
    }
    vec![("post_copy", t.to_string())]
}

fn migrations(c: &Context<'_>) -> Slots {
    let seconds = |values: Vec<f64>| show(summary(values), 0.001, 2);
    let mut runs_table = Table::new(&[
        "memory",
        "runs",
        "checkpoint MB",
        "total s",
        "downtime s",
        "client gap s",
        "peer's pause s",
    ]);
    let mut header = vec!["memory"];
    header.extend(PHASES);
    let mut phases = Table::new(&header);
    for (size, runs) in ordered(&c.r.migrations) {
        runs_table.row(vec![
            size.clone(),
            runs.len().to_string(),
            show(
                summary(runs.iter().map(|m| m.checkpoint_bytes as f64)),
                1e-6,
                1,
            ),
            seconds(runs.iter().map(|m| m.total_ms).collect()),
            seconds(runs.iter().map(downtime).collect()),
            seconds(runs.iter().map(|m| m.client_gap_ms).collect()),
            seconds(runs.iter().map(|m| m.peer_pause_ms).collect()),
        ]);
        let mut row = vec![size.clone()];
        row.extend(PHASES.iter().map(|p| show(phase(runs, p), 0.001, 2)));
        phases.row(row);
    }
    vec![
        ("migrations", runs_table.to_string()),
        ("phases", phases.to_string()),
        ("checkpoint_phase", checkpoint_phase(&c.r.backend).into()),
        ("transfer_phase", transfer_phase(&c.r.backend).into()),
        ("restore_phase", restore_phase(&c.r.backend).into()),
    ]
}

/// What the checkpoint phase does with a backend.
fn checkpoint_phase(backend: &str) -> &'static str {
    match backend {
        "runtime-wrapper" => {
            "IP blocked, paused, the task checkpointed through containerd into the agent's store, \
             the writable layer written beside it"
        }
        _ => "IP blocked, paused, CRI checkpoint (CRIU, then containerd packs an archive)",
    }
}

/// What the transfer phase does with a backend.
fn transfer_phase(backend: &str) -> &'static str {
    match backend {
        "runtime-wrapper" => {
            "the stream of each checkpoint directory as an archive, digest taken on the way; the \
             target unpacks it as it arrives into its staging, checking every entry before it is \
             written (no sync: the source keeps its copy until the migration is cleaned up)"
        }
        _ => {
            "the stream into a file, the target's checks of the archive, staging it as the \
             checkpoint image: push to the registry, pull into the node's runtime"
        }
    }
}

/// What the restore phase does with a backend.
fn restore_phase(backend: &str) -> &'static str {
    match backend {
        "runtime-wrapper" => {
            "the kubelet creates the pod's sandbox (network, pause container) and its container \
             under the kube-migros RuntimeClass, which migros-runc restores with CRIU from the \
             staged images, until it runs"
        }
        _ => {
            "the kubelet creates the pod's sandbox and its container, which containerd restores \
             from the checkpoint image, until it runs"
        }
    }
}

fn raw(c: &Context<'_>) -> Slots {
    let mut t = Table::new(&[
        "memory",
        "archive MB",
        "checkpoint s",
        "scp s",
        "restore s",
        "downtime s",
        "kube-migros downtime / raw",
        "kube-migros total / raw",
    ]);
    for (size, runs) in ordered(&c.r.raw) {
        let h = headline(c.r, size);
        let seconds = |f: fn(&RawRun) -> f64| show(summary(runs.iter().map(f)), 0.001, 2);
        t.row(vec![
            size.clone(),
            show(
                summary(runs.iter().map(|x| x.archive_bytes as f64)),
                1e-6,
                1,
            ),
            seconds(|x| x.checkpoint_ms),
            seconds(|x| x.scp_ms),
            seconds(|x| x.restore_ms),
            show(h.raw_downtime, 0.001, 2),
            times(ratio(h.downtime, h.raw_downtime)),
            times(ratio(h.total, h.raw_downtime)),
        ]);
    }
    vec![("raw", t.to_string())]
}

fn floor(c: &Context<'_>) -> Slots {
    let mut t = Table::new(&[
        "memory",
        "images MB",
        "dump s",
        "transfer s",
        "restore s",
        "downtime s",
        "kube-migros downtime / floor",
    ]);
    for (size, runs) in ordered(&c.r.floor) {
        let h = headline(c.r, size);
        let seconds = |f: fn(&FloorRun) -> f64| show(summary(runs.iter().map(f)), 0.001, 2);
        t.row(vec![
            size.clone(),
            show(summary(runs.iter().map(|x| x.image_bytes as f64)), 1e-6, 1),
            seconds(|x| x.dump_ms),
            seconds(|x| x.transfer_ms),
            seconds(|x| x.restore_ms),
            show(h.floor_downtime, 0.001, 2),
            times(ratio(h.downtime, h.floor_downtime)),
        ]);
    }
    vec![("floor", t.to_string())]
}

fn transfer(c: &Context<'_>) -> Slots {
    let bytes = c.r.transfer.as_ref().map_or(0, |t| t.bytes);
    let pipe = c.rate("tcp pipe");
    let mut t = Table::new(&["method", "MB/s", "vs the TCP pipe"]);
    for name in ["memory copy", "tcp pipe", "scp", "agent stream", "agent"] {
        let s = c.rate(name);
        t.row(vec![name.into(), show(s, 1.0, 0), times(ratio(s, pipe))]);
    }
    vec![
        ("middle", c.middle.clone()),
        ("archive_mb", format!("{:.1}", bytes as f64 / 1e6)),
        ("transfer", t.to_string()),
        ("transfer_phase", transfer_phase(&c.r.backend).into()),
    ]
}

fn scale(c: &Context<'_>) -> Slots {
    let mut t = Table::new(&[
        "N",
        "all final s",
        "Succeeded",
        "API requests per migration",
        "operator peak RSS MiB",
        "operator CPU s",
    ]);
    for s in &c.scale.scale {
        t.row(vec![
            s.migrations.to_string(),
            format!("{:.1}", s.all_final_ms / 1000.0),
            s.succeeded.to_string(),
            format!("{:.1}", s.requests_per_migration),
            format!("{:.1}", s.operator_peak_rss_mib),
            format!("{:.1}", s.operator_cpu_s),
        ]);
    }
    let mut out = String::new();
    if c.scale.label != c.r.label {
        out.push_str(&format!(
            "Measured in run `{}` ({}, commit `{}`), the newest that has them.\n\n",
            c.scale.label, c.scale.started, c.scale.commit
        ));
    }
    out.push_str(&t.to_string());
    if let Some(largest) = c
        .scale
        .scale
        .iter()
        .filter(|s| !s.requests_by_kind.is_empty())
        .max_by_key(|s| s.migrations)
    {
        let mut kinds: Vec<(&String, &f64)> = largest.requests_by_kind.iter().collect();
        kinds.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let mut by_kind = Table::new(&["request", "per migration"]);
        for (kind, n) in kinds.into_iter().filter(|(_, n)| **n >= 0.05) {
            by_kind.row(vec![format!("`{kind}`"), format!("{n:.1}")]);
        }
        out.push_str(&format!(
            "\nThe operator's requests by kind at N = {}, per migration, as its own metric \
             `migros_api_requests_total` counts them (kinds under 0.05 left out):\n\n{by_kind}",
            largest.migrations
        ));
    }
    vec![("scale", out)]
}

fn time(c: &Context<'_>) -> Slots {
    let Some((size, runs)) = ordered(&c.r.migrations).last().copied() else {
        return Vec::new();
    };
    let mut shares: Vec<(&str, f64)> = PHASES
        .iter()
        .filter_map(|p| Some((*p, phase(runs, p)?.median)))
        .collect();
    let sum: f64 = shares.iter().map(|(_, v)| v).sum();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (largest, ms) = shares.first().copied().unwrap_or(("-", 0.0));
    let remedies: Vec<String> = shares
        .iter()
        .take(3)
        .map(|(p, _)| format!("- **{p}**: {}", remedy(p, &c.r.backend)))
        .collect();
    vec![
        ("largest_size", size.clone()),
        ("largest", largest.into()),
        ("largest_s", format!("{:.2}", ms / 1000.0)),
        ("sum_s", format!("{:.2}", sum / 1000.0)),
        ("largest_share", format!("{:.0}", 100.0 * ms / sum.max(1.0))),
        (
            "shares",
            shares
                .iter()
                .map(|(p, v)| format!("{p} {:.2} s", v / 1000.0))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("remedies", remedies.join("\n")),
    ]
}

fn missed(c: &Context<'_>) -> Slots {
    let s = |x: Option<Summary>| format!("{:.2}", x.map_or(0.0, |x| x.median / 1000.0));
    let small = c.runs(&c.smallest);
    let mid = c.runs(&c.middle);
    let floor_mid = c.r.floor.get(&c.middle).map(Vec::as_slice).unwrap_or(&[]);
    let raw_mid = c.r.raw.get(&c.middle).map(Vec::as_slice).unwrap_or(&[]);
    let floor_rate = summary(
        floor_mid
            .iter()
            .filter(|f| f.transfer_ms > 0.0)
            .map(|f| f.image_bytes as f64 / 1e6 / (f.transfer_ms / 1000.0)),
    );
    let mut items = vec![format!(
        "- **The peer's pause** ({}): with stop-and-copy a peer sees the whole \
         downtime and then waits for its next retransmission (the agents answer its segments \
         while the pod's IP is blocked, so that its timer stays near 0.2 s): checkpoint {} s, transfer {} s, commit {} s and the restore phase {} s. The \
         restore phase is mostly the kubelet starting a pod (admission, the service account \
         volume, the sandbox with its network, the container; Running is reported a status \
         period later, though the target agent unblocks the IP as soon as the runtime runs the \
         container), not CRIU ({} s for the floor's restore at {}). 0.3 s needs the memory moved \
         while the workload runs (pre-copy) or after it runs again (post-copy, lazy pages), and \
         a sandbox made ready before the freeze. The peer judges on its own clock: the restored \
         workload's monotonic clock is restored too, so it would not see the whole pause.",
        c.smallest,
        s(phase(small, "checkpoint")),
        s(phase(small, "transfer")),
        s(phase(small, "commit")),
        s(phase(small, "restore")),
        s(summary(
            c.r.floor
                .get(&c.smallest)
                .into_iter()
                .flatten()
                .map(|f| f.restore_ms)
        )),
        c.smallest,
    )];
    if let Some((size, runs)) = ordered(&c.r.post_copy).last().copied() {
        items.push(format!(
            "- **PostCopy** ({size}): the memory is out of the pause (the same downtime at every \
             size, {} s here, against {} s with stop-and-copy), and what is left is the rest of \
             the move: checkpoint {} s, transfer {} s, commit {} s and the restore phase {} s, \
             the kubelet's start of the replacement pod as above. 0.25 s needs that sandbox made \
             ready before the freeze.",
            s(summary(runs.iter().map(downtime))),
            s(headline(c.r, size).downtime),
            s(phase(runs, "checkpoint")),
            s(phase(runs, "transfer")),
            s(phase(runs, "commit")),
            s(phase(runs, "restore")),
        ));
    }
    if c.r.backend == "runtime-wrapper" {
        items.push(format!(
            "- **Downtime against the floor** ({}): the floor dumps to memory, moves the images \
             over one TCP connection at {} MB/s and restores in {} s. kube-migros takes {} s to \
             checkpoint (CRIU into the agent's store, the writable layer), {} s to transfer (the \
             stream, unpacked as it arrives) and {} s from the replacement's creation until it \
             runs: the kubelet's pod start around CRIU's restore is the largest difference at \
             {} and below, the stream at larger sizes.",
            c.middle,
            show(floor_rate, 1.0, 0),
            s(summary(floor_mid.iter().map(|f| f.restore_ms))),
            s(phase(mid, "checkpoint")),
            s(phase(mid, "transfer")),
            s(phase(mid, "restore")),
            c.middle,
        ));
        items.push(format!(
            "- **Commit to running** ({}): {} s, nearly all of it the restore phase above: the \
             replacement pod is created at the commit, so the kubelet's start of it is inside. \
             A sandbox made ready before the freeze (a shadow pod that takes over the pod's \
             identity at the switch) would take it out.",
            c.smallest,
            s(summary(small.iter().filter_map(after_commit))),
        ));
        items.push(
            "- **The stream against the pipe**: the pipe moves bytes from memory with one copy \
             at each end. The agents read the checkpoint from files, take its SHA-256 at both \
             ends (about 1.8 GB/s per core here), compress with zstd, encrypt (mutual TLS), frame \
             (HTTP/2, gRPC) and write every file on the target; both nodes, the control plane and \
             the benchmark share the VM's two cores, so the stream is bound by CPU. A faster \
             digest (BLAKE3), hashing on the threads that read and write the files, and CRIU's \
             page server (pages sent as they are dumped) are the next steps."
                .to_string(),
        );
    } else {
        items.push(format!(
            "- **Downtime against the raw recipe** ({}): the difference is the transfer: {} s for \
             kube-migros against {} s of scp for the raw recipe, because the kubelet restores \
             only from an image and the checkpoint makes a round trip through the registry \
             (push, pull); the raw recipe hands the archive to the runtime directly.",
            c.middle,
            s(phase(mid, "transfer")),
            s(summary(raw_mid.iter().map(|x| x.scp_ms))),
        ));
    }
    if let Some(t) = c.thousand.filter(|t| !scale_met(t)) {
        items.push(format!(
            "- **1000 PodMigrations**: every migration costs about {:.0} API requests (status \
             writes, Events, pod reads and writes), and the API server, etcd, the operator, the \
             test agents and the stand-in kubelet share the VM's two cores; the rate is bound by \
             the API server.",
            t.requests_per_migration
        ));
    }
    vec![("missed", items.join("\n"))]
}

/// Whether a run of the control plane at scale meets its target.
fn scale_met(s: &ScaleRun) -> bool {
    s.succeeded == s.migrations
        && s.all_final_ms <= 60_000.0
        && s.operator_peak_rss_mib <= 100.0
        && s.requests_per_migration <= 15.0
}

fn comparison(others: &[&Results], r: &Results) -> Slots {
    let all: Vec<&Results> = others.iter().copied().chain(std::iter::once(r)).collect();
    let notes: Vec<String> = all
        .iter()
        .filter(|o| !o.note.is_empty())
        .map(|o| format!("- `{}` (`{}`): {}", o.label, o.commit, o.note))
        .collect();
    let mut scale = Table::new(&[
        "run",
        "N",
        "all final s",
        "API requests per migration",
        "operator peak RSS MiB",
        "operator CPU s",
    ]);
    let mut migrations = Table::new(&[
        "run",
        "commit",
        "backend",
        "memory",
        "total s",
        "downtime s",
        "transfer s",
        "floor downtime s",
        "raw downtime s",
    ]);
    for o in &all {
        for sc in &o.scale {
            scale.row(vec![
                o.label.clone(),
                sc.migrations.to_string(),
                format!("{:.1}", sc.all_final_ms / 1000.0),
                format!("{:.1}", sc.requests_per_migration),
                format!("{:.1}", sc.operator_peak_rss_mib),
                format!("{:.1}", sc.operator_cpu_s),
            ]);
        }
        for (size, runs) in ordered(&o.migrations) {
            let h = headline(o, size);
            migrations.row(vec![
                o.label.clone(),
                format!("`{}`", o.commit),
                o.backend.clone(),
                h.size,
                show(h.total, 0.001, 2),
                show(h.downtime, 0.001, 2),
                show(phase(runs, "transfer"), 0.001, 2),
                show(h.floor_downtime, 0.001, 2),
                show(h.raw_downtime, 0.001, 2),
            ]);
        }
    }
    vec![
        ("notes", notes.join("\n")),
        ("scale_runs", scale.to_string()),
        ("migration_runs", migrations.to_string()),
    ]
}

/// What would make a phase shorter (the analysis behind the numbers; see docs/node-agent.md).
fn remedy(phase: &str, backend: &str) -> &'static str {
    match phase {
        "transfer" if backend == "runtime-wrapper" => {
            "the stream is unpacked as it arrives, so the phase is the stream: its rate is bound \
             by the CPU the two ends share with everything else on these nodes (reading the \
             checkpoint from the source's store, SHA-256 at both ends, zstd, TLS, writing every \
             file on the target). CRIU images sent as they are dumped (the CRIU page server to \
             the target agent) would overlap it with the checkpoint."
        }
        "transfer" => {
            "the checkpoint makes a round trip through the registry because the kubelet restores \
             only from images: on the target the bytes are written to the incoming file, read for \
             the digest, pushed to the registry (which writes them), pulled by containerd (which \
             writes them again and unpacks them). Streaming straight into the node's content store, \
             or a restore from a local archive once the kubelet has one (KEP-5823 `RestorePod`), \
             would leave one write."
        }
        "checkpoint" => {
            "CRIU dumps every page while the container is frozen. Pre-copy (iterative dumps while \
             it runs, then a short final one: the task checkpoint the agent uses takes a parent \
             image path) or post-copy (lazy pages) would take most of it out of the downtime."
        }
        "restore" => {
            "the kubelet starts a pod (admission, volumes, the sandbox with its network and pause \
             container, the container) around CRIU's restore, which reads every page first. A \
             sandbox made ready before the freeze would take the kubelet's part out; lazy restore \
             (userfaultfd) would let the process run before its memory is in."
        }
        "prepare" => {
            "target choice, the rxe block and the target agent's preparation are sequential API \
             calls; they could run before the migration is asked for (a standby target)."
        }
        "running" | "pod creation" | "commit" | "source teardown" => {
            "operator reaction time: it waits for what it watches or polls (see the before/after \
             section)."
        }
        _ => "-",
    }
}

/// A stacked bar per memory size: the median of each phase (seconds).
pub fn svg(doc: &Document, label: &str) -> String {
    const COLOURS: [&str; 8] = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
    ];
    let Some(r) = doc.get(label) else {
        return String::from("<svg xmlns=\"http://www.w3.org/2000/svg\"/>");
    };
    let rows: Vec<(String, Vec<f64>)> = ordered(&r.migrations)
        .into_iter()
        .map(|(size, runs)| {
            let v = PHASES
                .iter()
                .map(|p| phase(runs, p).map_or(0.0, |s| s.median / 1000.0))
                .collect();
            (size.clone(), v)
        })
        .collect();
    let longest = rows
        .iter()
        .map(|(_, v)| v.iter().sum::<f64>())
        .fold(0.0_f64, f64::max)
        .max(0.001);
    let (left, width, bar, gap, top) = (70.0, 620.0, 28.0, 14.0, 40.0);
    let height = top + rows.len() as f64 * (bar + gap) + 60.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">Migration phases, median seconds (node-1 -> node-2, run {label})</text>\n",
        left + width + 30.0
    );
    for (i, (size, values)) in rows.iter().enumerate() {
        let y = top + i as f64 * (bar + gap);
        let _ = writeln!(
            s,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{size}</text>",
            left - 8.0,
            y + bar * 0.65
        );
        let mut x = left;
        for (j, v) in values.iter().enumerate() {
            let w = v / longest * width;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{bar}\" fill=\"{}\"><title>{} {v:.2} s</title></rect>",
                COLOURS[j % COLOURS.len()],
                PHASES[j]
            );
            x += w;
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.0}\">{:.2} s</text>",
            x + 4.0,
            y + bar * 0.65,
            values.iter().sum::<f64>()
        );
    }
    let legend_y = top + rows.len() as f64 * (bar + gap) + 16.0;
    for (j, p) in PHASES.iter().enumerate() {
        let x = left + (j % 4) as f64 * 150.0;
        let y = legend_y + (j / 4) as f64 * 18.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.0}\" y=\"{:.0}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{p}</text>",
            y - 10.0,
            COLOURS[j % COLOURS.len()],
            x + 16.0,
            y
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TransferRuns;

    fn run(total: f64, downtime: f64, transfer: f64) -> MigrationRun {
        MigrationRun {
            checkpoint_bytes: 20_000_000,
            total_ms: total,
            downtime_ms: downtime,
            stream_ms: transfer * 0.8,
            client_gap_ms: downtime + 100.0,
            peer_pause_ms: 50.0,
            phases: PHASES
                .iter()
                .map(|p| {
                    let v = if *p == "transfer" { transfer } else { 100.0 };
                    (p.to_string(), v)
                })
                .collect(),
            memory_ms: 0.0,
            memory_ticks_per_s: None,
        }
    }

    fn results() -> Results {
        let raw = RawRun {
            archive_bytes: 20_000_000,
            checkpoint_ms: 300.0,
            copy_ms: 10.0,
            scp_ms: 200.0,
            restore_ms: 500.0,
        };
        Results {
            label: "now".into(),
            commit: "abc".into(),
            migrations: [
                ("256Mi".to_string(), vec![run(4000.0, 2000.0, 900.0)]),
                (
                    "16Mi".to_string(),
                    vec![run(2000.0, 1000.0, 400.0), run(3000.0, 1500.0, 600.0)],
                ),
            ]
            .into(),
            raw: [("256Mi".to_string(), vec![raw])].into(),
            floor: [(
                "256Mi".to_string(),
                vec![FloorRun {
                    image_bytes: 18_000_000,
                    dump_ms: 200.0,
                    transfer_ms: 300.0,
                    restore_ms: 300.0,
                }],
            )]
            .into(),
            transfer: Some(TransferRuns {
                bytes: 20_000_000,
                mb_per_s: [
                    ("tcp pipe".to_string(), vec![1000.0]),
                    ("agent".to_string(), vec![500.0]),
                    ("agent stream".to_string(), vec![950.0]),
                    ("scp".to_string(), vec![100.0]),
                ]
                .into(),
            }),
            scale: vec![ScaleRun {
                migrations: 1000,
                all_final_ms: 45_000.0,
                succeeded: 1000,
                requests_per_migration: 12.0,
                operator_peak_rss_mib: 60.0,
                operator_cpu_s: 20.0,
                requests_by_kind: [
                    ("PATCH podmigrations/status".to_string(), 5.0),
                    ("CREATE events".to_string(), 3.0),
                ]
                .into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn downtime_is_the_frozen_phases_else_the_operators_figure() {
        assert_eq!(downtime(&run(2000.0, 1000.0, 400.0)), 900.0);
        let mut partial = run(2000.0, 1234.0, 400.0);
        partial.phases.remove("commit");
        assert_eq!(downtime(&partial), 1234.0);
    }

    #[test]
    fn sizes_order_by_bytes() {
        assert_eq!(bytes_of("16Mi"), 16 << 20);
        assert_eq!(bytes_of("1Gi"), 1 << 30);
        let map: std::collections::BTreeMap<String, ()> = [
            ("1Gi".into(), ()),
            ("16Mi".into(), ()),
            ("256Mi".into(), ()),
        ]
        .into();
        let keys: Vec<&String> = ordered(&map).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["16Mi", "256Mi", "1Gi"]);
    }

    #[test]
    fn the_document_shows_medians_ratios_and_targets() {
        let doc: Document = [("now".to_string(), results())].into();
        let md = markdown(&doc, "now");
        // 16Mi: two runs, totals 2.0 and 3.0 s; downtime the frozen phases (transfer + five of
        // 0.1 s): 0.9 and 1.1 s.
        assert!(
            md.contains("| 16Mi | 2 | 20.0 (20.0-20.0) | 2.50 (2.00-3.00) | 1.00 (0.90-1.10) |"),
            "{md}"
        );
        // Downtime at 256Mi against the raw recipe's 0.3 + 0.2 + 0.5 s.
        assert!(md.contains("1.40 s vs 1.00 s: 1.40x | yes |"), "{md}");
        // Against the floor's 0.2 + 0.3 + 0.3 s: missed.
        assert!(md.contains("1.40 s vs 0.80 s: 1.75x | **no** |"), "{md}");
        // The stream alone at 950 MB/s against the pipe's 1000, the phase at 500.
        assert!(md.contains("950 MB/s vs 1000 MB/s: 0.95x | yes |"), "{md}");
        assert!(md.contains("500 MB/s: 0.50x | yes |"), "{md}");
        // From the commit at 16Mi: four phases of 0.1 s.
        assert!(md.contains("| 0.40 (0.40-0.40) s (commit + "), "{md}");
        assert!(md.contains("45.0 s, 60 MiB, 12.0 requests | yes |"), "{md}");
        // The requests by kind, most first.
        let by_kind = md.find("| `PATCH podmigrations/status` | 5.0 |");
        assert!(by_kind.is_some(), "{md}");
        assert!(md.find("| `CREATE events` | 3.0 |") > by_kind, "{md}");
        assert!(md.contains("the largest phase is **transfer**"), "{md}");
        assert!(!md.contains("Before and after"));
        assert!(!md.contains("## PostCopy"), "no PostCopy run, no section");
        // PostCopy at 256Mi: frozen phases of 0.02 s each (0.12 s), memory in 2 s later, beside
        // StopAndCopy's 1.4 s and the floor's 0.8 s.
        let mut with_post_copy = results();
        let mut quick = run(3000.0, 150.0, 20.0);
        for v in quick.phases.values_mut() {
            *v = 20.0;
        }
        (quick.memory_ms, quick.peer_pause_ms) = (2000.0, 280.0);
        quick.memory_ticks_per_s = Some(97.0);
        with_post_copy.post_copy = [("256Mi".to_string(), vec![quick])].into();
        let md = markdown(&[("now".to_string(), with_post_copy)].into(), "now");
        assert!(md.contains("## PostCopy"), "{md}");
        assert!(
            md.contains("| 256Mi | 1 | 20.00 | 0.12 | 1.40 | 0.80 | 0.15x |"),
            "{md}"
        );
        assert!(md.contains("| 0.25 | 0.28 | 0.05 | 2.00 | 97 |"), "{md}");
        assert!(
            md.contains("PostCopy downtime at 256Mi: at most 0.25 s | 0.12 s | yes |"),
            "{md}"
        );
        assert!(
            md.contains("with PostCopy at 256Mi: at most 0.3 s | 0.28 s | yes |"),
            "{md}"
        );
        let mut before = results();
        before.label = "before".into();
        let doc: Document = [
            ("now".to_string(), results()),
            ("before".to_string(), before),
        ]
        .into();
        assert!(markdown(&doc, "now").contains("## Before and after"));

        // A later run of the scale benchmark alone is what the scale section and target show.
        let mut now = results();
        now.scale.clear();
        let mut scale = results();
        (scale.label, scale.started) = ("scale".into(), "2026-12-03T00:00:00Z".into());
        scale.migrations.clear();
        scale.scale[0].all_final_ms = 30_000.0;
        let doc: Document = [("now".to_string(), now), ("scale".to_string(), scale)].into();
        let md = markdown(&doc, "now");
        assert!(
            md.contains("Measured in run `scale` (2026-12-03T00:00:00Z"),
            "{md}"
        );
        assert!(md.contains("30.0 s, 60 MiB, 12.0 requests | yes |"), "{md}");
    }

    #[test]
    fn the_plot_has_a_bar_per_size_and_a_legend() {
        let doc: Document = [("now".to_string(), results())].into();
        let svg = svg(&doc, "now");
        assert_eq!(
            svg.matches("<rect").count(),
            2 * PHASES.len() + PHASES.len()
        );
        assert!(svg.contains(">16Mi</text>") && svg.contains(">256Mi</text>"));
        assert!(svg.ends_with("</svg>\n"));
    }
}
