//! `docs/benchmarks.md` and `docs/benchmarks.svg` from the measured results (pure functions of the
//! JSON document, so that a reader can regenerate or check them).

use std::fmt::Write as _;

use super::{
    Document, MigrationRun, Results,
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
}

fn headline(r: &Results, size: &str) -> Headline {
    let runs = r.migrations.get(size).map(Vec::as_slice).unwrap_or(&[]);
    let raw = r.raw.get(size).map(Vec::as_slice).unwrap_or(&[]);
    Headline {
        size: size.into(),
        total: summary(runs.iter().map(|m| m.total_ms)),
        downtime: summary(runs.iter().map(downtime)),
        raw_downtime: summary(raw.iter().map(|r| r.downtime_ms())),
    }
}

/// The document for result set `label` (others in `doc` appear in the before/after section).
pub fn markdown(doc: &Document, label: &str) -> String {
    let Some(r) = doc.get(label) else {
        return "# Benchmarks\n\nNo results.\n".into();
    };
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo run -p e2e -- bench` (run `{label}`, {}, commit `{}`, {}). \
         Every figure is the median of its runs with (min-max); every ratio compares medians \
         measured in the same run on the same sandbox nodes. The sandbox runs everything on this \
         one VM: three nodes, the control plane, the registry and the benchmark share its cores, \
         and the nodes' network is a Linux bridge. Regenerate with the command above; \
         `docs/benchmarks.json` holds every run.\n",
        r.started, r.commit, r.machine
    );

    // Targets.
    let sizes: Vec<&String> = ordered(&r.migrations).into_iter().map(|(k, _)| k).collect();
    let smallest = sizes.first().map(|s| s.as_str()).unwrap_or("16Mi");
    let middle = sizes
        .get(sizes.len() / 2)
        .map(|s| s.as_str())
        .unwrap_or("256Mi");
    let small_runs = r.migrations.get(smallest).map(Vec::as_slice).unwrap_or(&[]);
    let client_gap = summary(small_runs.iter().map(|m| m.client_gap_ms));
    let stream_gap = summary(small_runs.iter().map(|m| m.stream_gap_ms));
    let mid = headline(r, middle);
    let transfer = r.transfer.clone().unwrap_or_default();
    let rate = |m: &str| summary(transfer.mb_per_s.get(m).cloned().unwrap_or_default());
    let (agent, pipe, scp, memory) = (
        rate("agent"),
        rate("tcp pipe"),
        rate("scp"),
        rate("memory copy"),
    );
    let thousand = r.scale.iter().find(|s| s.migrations == 1000);
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
    let met = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    };
    let _ = writeln!(
        md,
        "| gap a client of the workload sees per hop at {smallest}: at most 0.3 s | {} s (client polling the pod's status port); the peer's stream as the workload's clock saw it: {} s | {} |",
        show(client_gap, 0.001, 2),
        show(stream_gap, 0.001, 2),
        met(client_gap.map(|g| g.median <= 300.0))
    );
    let dt_ratio = ratio(mid.downtime, mid.raw_downtime);
    let _ = writeln!(
        md,
        "| downtime at {middle}: at most 1.5x the raw recipe's | {} s vs {} s: {} | {} |",
        show(mid.downtime, 0.001, 2),
        show(mid.raw_downtime, 0.001, 2),
        times(dt_ratio),
        met(dt_ratio.map(|x| x <= 1.5))
    );
    let (vs_pipe, vs_scp) = (ratio(agent, pipe), ratio(agent, scp));
    let _ = writeln!(
        md,
        "| agent transfer: at least 0.9x a plain TCP pipe and 3x scp | {} MB/s: {} the pipe, {} scp | {} |",
        show(agent, 1.0, 0),
        times(vs_pipe),
        times(vs_scp),
        met(vs_pipe.zip(vs_scp).map(|(p, s)| p >= 0.9 && s >= 3.0))
    );
    let _ = writeln!(
        md,
        "| 1000 PodMigrations with instant agents: all final within 60 s, operator RSS at most 100 MiB | {} | {} |\n",
        thousand
            .map(|s| format!(
                "{:.1} s, {:.0} MiB",
                s.all_final_ms / 1000.0,
                s.operator_peak_rss_mib
            ))
            .unwrap_or_else(|| "-".into()),
        met(thousand.map(|s| s.all_final_ms <= 60_000.0 && s.operator_peak_rss_mib <= 100.0))
    );

    // Migrations.
    if !r.migrations.is_empty() {
        let _ = writeln!(
            md,
            "## kube-migros: the demo workload moved node-1 -> node-2\n\n\
             Installed with the Helm chart from images built here (release binaries). The workload \
             keeps the given amount of memory written and receives a peer's TCP stream from node-3 \
             (64-byte records every 10 ms); the checkpoint is zstd-compressed on the wire. Total: \
             `kubectl apply` until Succeeded is seen; downtime: from the checkpoint phase (the \
             source is frozen at its start) until the replacement pod is seen Running; client gap: the longest time a client on the host polling the pod's \
             status port every 5 ms got no answer; stream gap: the longest pause between the peer's \
             records as the restored workload's own clock measured it.\n"
        );
        let _ = writeln!(
            md,
            "| memory | runs | checkpoint MB | total s | downtime s | client gap s | stream gap s |\n|---|---|---|---|---|---|---|"
        );
        for (size, runs) in ordered(&r.migrations) {
            let _ = writeln!(
                md,
                "| {size} | {} | {} | {} | {} | {} | {} |",
                runs.len(),
                show(
                    summary(runs.iter().map(|m| m.checkpoint_bytes as f64)),
                    1e-6,
                    1
                ),
                show(summary(runs.iter().map(|m| m.total_ms)), 0.001, 2),
                show(summary(runs.iter().map(downtime)), 0.001, 2),
                show(summary(runs.iter().map(|m| m.client_gap_ms)), 0.001, 2),
                show(summary(runs.iter().map(|m| m.stream_gap_ms)), 0.001, 2),
            );
        }
        let _ = writeln!(
            md,
            "\nPhases (seconds, from watch events of the PodMigration and the pod):\n"
        );
        let _ = writeln!(
            md,
            "| memory | {} |\n|---|{}",
            PHASES.join(" | "),
            "---|".repeat(PHASES.len())
        );
        for (size, runs) in ordered(&r.migrations) {
            let cells: Vec<String> = PHASES
                .iter()
                .map(|p| show(phase(runs, p), 0.001, 2))
                .collect();
            let _ = writeln!(md, "| {size} | {} |", cells.join(" | "));
        }
        let _ = writeln!(
            md,
            "\n![phases](benchmarks.svg)\n\nPhases: prepare (checks, target, rxe block, target agent \
             prepared), checkpoint (IP blocked, paused, CRI checkpoint), transfer (stream, the \
             target's checks of the archive, staging it as the checkpoint image: push to the \
             registry, pull into the node's runtime), commit (until the source pod is being deleted), source \
             teardown (until it is gone), pod creation (the replacement exists), restore (the \
             kubelet restores it from the checkpoint image until it runs), running (until the \
             operator records Succeeded).\n"
        );
    }

    // Raw recipe.
    if !r.raw.is_empty() {
        let _ = writeln!(
            md,
            "## The raw recipe (no Kubernetes)\n\n`e2e/raw-recipe.sh` on the same nodes: containerd \
             pause, CRI checkpoint to an archive, scp of the archive to the target node, CRI restore \
             (the archive as the container image). Its downtime is checkpoint + scp + restore; it \
             keeps no IP and touches no API server. kube-migros / raw compares medians.\n"
        );
        let _ = writeln!(
            md,
            "| memory | archive MB | checkpoint s | scp s | restore s | downtime s | kube-migros downtime / raw | kube-migros total / raw |\n|---|---|---|---|---|---|---|---|"
        );
        for (size, runs) in ordered(&r.raw) {
            let h = headline(r, size);
            let _ = writeln!(
                md,
                "| {size} | {} | {} | {} | {} | {} | {} | {} |",
                show(
                    summary(runs.iter().map(|x| x.archive_bytes as f64)),
                    1e-6,
                    1
                ),
                show(summary(runs.iter().map(|x| x.checkpoint_ms)), 0.001, 2),
                show(summary(runs.iter().map(|x| x.scp_ms)), 0.001, 2),
                show(summary(runs.iter().map(|x| x.restore_ms)), 0.001, 2),
                show(h.raw_downtime, 0.001, 2),
                times(ratio(h.downtime, h.raw_downtime)),
                times(ratio(h.total, h.raw_downtime)),
            );
        }
        let _ = writeln!(md);
    }

    // Transfer.
    if !transfer.mb_per_s.is_empty() {
        let _ = writeln!(
            md,
            "## Moving the bytes\n\nThe raw recipe's {middle} archive ({:.1} MB) from node-1 to node-2: a copy in memory into an already touched buffer (the limit), a plain TCP \
             pipe between the two nodes' network namespaces (1 MiB writes from memory, read and \
             dropped), scp (the raw recipe's, to disk), and the agents (checkpoint bytes of the \
             {middle} migrations over their transfer phase, which also checks the archive and \
             stages it as the checkpoint image: push to the registry, pull into the runtime).\n",
            transfer.bytes as f64 / 1e6
        );
        let _ = writeln!(md, "| method | MB/s | vs the TCP pipe |\n|---|---|---|");
        for (name, s) in [
            ("memory copy", memory),
            ("tcp pipe", pipe),
            ("scp", scp),
            ("agent", agent),
        ] {
            let _ = writeln!(
                md,
                "| {name} | {} | {} |",
                show(s, 1.0, 0),
                times(ratio(s, pipe))
            );
        }
        let _ = writeln!(md);
    }

    // Scale.
    if !r.scale.is_empty() {
        let _ = writeln!(
            md,
            "## The control plane at scale\n\nN PodMigrations created at once (16 in flight) in one \
             namespace, for N pods on three Node objects whose agents (the scriptable test agents) \
             answer every step at once; a stand-in kubelet reports replacement pods Running (it \
             polls every 200 ms). The operator is the release binary, one replica; its API requests \
             are counted by an API Priority and Fairness FlowSchema of its own user.\n"
        );
        let _ = writeln!(
            md,
            "| N | all final s | Succeeded | API requests per migration | operator peak RSS MiB | operator CPU s |\n|---|---|---|---|---|---|"
        );
        for s in &r.scale {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {:.1} | {:.1} | {:.1} |",
                s.migrations,
                s.all_final_ms / 1000.0,
                s.succeeded,
                s.requests_per_migration,
                s.operator_peak_rss_mib,
                s.operator_cpu_s
            );
        }
        let _ = writeln!(md);
    }

    // Where the time goes.
    if let Some((size, runs)) = ordered(&r.migrations).last() {
        let mut shares: Vec<(&str, f64)> = PHASES
            .iter()
            .filter_map(|p| Some((*p, phase(runs, p)?.median)))
            .collect();
        let sum: f64 = shares.iter().map(|(_, v)| v).sum();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some((largest, ms)) = shares.first() {
            let _ = writeln!(
                md,
                "## Where the time goes\n\nAt {size}, the largest phase is **{largest}**: {:.2} s of \
                 {:.2} s ({:.0} %). The phases by median: {}.\n",
                ms / 1000.0,
                sum / 1000.0,
                100.0 * ms / sum.max(1.0),
                shares
                    .iter()
                    .map(|(p, v)| format!("{p} {:.2} s", v / 1000.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(md, "What would remove the largest ones:\n");
            for (p, _) in shares.iter().take(3) {
                let _ = writeln!(md, "- **{p}**: {}", remedy(p));
            }
            let _ = writeln!(md);
        }
    }

    // Why the targets are missed.
    let small_phase = |p: &str| phase(small_runs, p).map_or(0.0, |s| s.median / 1000.0);
    let mid_runs = r.migrations.get(middle).map(Vec::as_slice).unwrap_or(&[]);
    let mid_raw = r.raw.get(middle).map(Vec::as_slice).unwrap_or(&[]);
    let mid_transfer = phase(mid_runs, "transfer").map_or(0.0, |s| s.median / 1000.0);
    let raw_scp = summary(mid_raw.iter().map(|x| x.scp_ms)).map_or(0.0, |s| s.median / 1000.0);
    let _ = writeln!(
        md,
        "## Why the targets are missed\n\n\
         - **Client gap** ({smallest}): kube-migros does stop-and-copy, so a client sees the whole \
         downtime: checkpoint {:.2} s + transfer {:.2} s + restore {:.2} s and the pod's replacement \
         in between. 0.3 s needs the memory moved while the workload runs (pre-copy) or after it \
         runs again (post-copy, lazy pages), which CRIU can do and the CRI does not expose yet. The \
         \"stream gap\" column shows what the restored workload itself measures: its monotonic \
         clock is restored too, so it does not see the pause.\n\
         - **Downtime against the raw recipe** ({middle}): the difference is the transfer: {:.2} s \
         for kube-migros against {:.2} s of scp for the raw recipe, because the kubelet restores \
         only from an image and the checkpoint makes a round trip through the registry (push, \
         pull); the raw recipe hands the archive to the runtime directly, which the kubelet cannot.\n\
         - **Agent transfer**: the figure is the whole transfer phase: the stream, the \
         checks, the push to the registry and the pull into containerd (which write the bytes \
         twice more). The stream alone is not timed separately yet, so this does not tell the \
         stream's own rate against the pipe and scp.\n\
         - **1000 PodMigrations**: every migration costs about {:.0} API requests (status writes, \
         Events, pod reads and writes), and the API server, etcd, the operator, the test agents and \
         the stand-in kubelet share the VM's two cores; the rate is bound by the API server. \
         Fewer writes per migration (one status write per phase, no Event per step) are next.\n",
        small_phase("checkpoint"),
        small_phase("transfer"),
        small_phase("restore"),
        mid_transfer,
        raw_scp,
        thousand.map_or(0.0, |s| s.requests_per_migration),
    );

    // Before and after.
    let others: Vec<&Results> = doc.values().filter(|o| o.label != label).collect();
    if !others.is_empty() {
        let _ = writeln!(md, "## Before and after\n");
        for o in others.iter().copied().chain(std::iter::once(r)) {
            if !o.note.is_empty() {
                let _ = writeln!(md, "- `{}` (`{}`): {}", o.label, o.commit, o.note);
            }
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| run | N | all final s | API requests per migration | operator peak RSS MiB | operator CPU s |\n|---|---|---|---|---|---|"
        );
        for o in others.iter().copied().chain(std::iter::once(r)) {
            for sc in &o.scale {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    o.label,
                    sc.migrations,
                    sc.all_final_ms / 1000.0,
                    sc.requests_per_migration,
                    sc.operator_peak_rss_mib,
                    sc.operator_cpu_s
                );
            }
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| run | commit | memory | total s | downtime s | transfer s | raw downtime s |\n|---|---|---|---|---|---|---|"
        );
        for o in others.iter().copied().chain(std::iter::once(r)) {
            for (size, runs) in ordered(&o.migrations) {
                let h = headline(o, size);
                let _ = writeln!(
                    md,
                    "| {} | `{}` | {} | {} | {} | {} | {} |",
                    o.label,
                    o.commit,
                    h.size,
                    show(h.total, 0.001, 2),
                    show(h.downtime, 0.001, 2),
                    show(phase(runs, "transfer"), 0.001, 2),
                    show(h.raw_downtime, 0.001, 2)
                );
            }
        }
        let _ = writeln!(md);
    }
    md
}

/// What would make a phase shorter (the analysis behind the numbers; see docs/node-agent.md).
fn remedy(phase: &str) -> &'static str {
    match phase {
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
             it runs, then a short final one) or post-copy (lazy pages) would take most of it out \
             of the downtime; both need CRIU features the CRI does not expose yet."
        }
        "restore" => {
            "the kubelet creates the sandbox (CNI) and containerd restores the process with CRIU, \
             reading every page first; lazy restore (userfaultfd) would let the process run before \
             its memory is in."
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
    use crate::bench::{RawRun, ScaleRun, TransferRuns};

    fn run(total: f64, downtime: f64, transfer: f64) -> MigrationRun {
        MigrationRun {
            checkpoint_bytes: 20_000_000,
            total_ms: total,
            downtime_ms: downtime,
            client_gap_ms: downtime + 100.0,
            stream_gap_ms: 50.0,
            phases: PHASES
                .iter()
                .map(|p| {
                    let v = if *p == "transfer" { transfer } else { 100.0 };
                    (p.to_string(), v)
                })
                .collect(),
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
            transfer: Some(TransferRuns {
                bytes: 20_000_000,
                mb_per_s: [
                    ("tcp pipe".to_string(), vec![1000.0]),
                    ("agent".to_string(), vec![500.0]),
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
        // Agent 500 MB/s: 0.5x the pipe, 5x scp: the pipe target is missed.
        assert!(
            md.contains("500 MB/s: 0.50x the pipe, 5.00x scp | **no** |"),
            "{md}"
        );
        assert!(md.contains("45.0 s, 60 MiB | yes |"), "{md}");
        assert!(md.contains("the largest phase is **transfer**"), "{md}");
        assert!(!md.contains("Before and after"));
        let mut before = results();
        before.label = "before".into();
        let doc: Document = [
            ("now".to_string(), results()),
            ("before".to_string(), before),
        ]
        .into();
        assert!(markdown(&doc, "now").contains("## Before and after"));
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
