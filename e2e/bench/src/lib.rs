//! The benchmarks (`cargo run -p e2e -- bench`; the measured operator and agent are release
//! builds): where migration time goes, against the floor (CRIU alone), the raw recipe and the
//! physical limits, measured on the sandbox cluster in one run, and written to
//! `docs/benchmarks.md`, `docs/benchmarks.json` and `docs/benchmarks.svg`.
//!
//! 1. the raw recipe (CRI checkpoint, scp, CRI restore; no Kubernetes) and the CRIU floor (CRIU
//!    dump to memory, a TCP copy, CRIU restore; no Kubernetes, no containerd) at each memory size;
//! 2. the transfer limits on the same archive and nodes: a plain TCP pipe between the nodes' network
//!    namespaces, and a copy in memory;
//! 3. kube-migros installed with its chart moving the demo workload at each memory size, with a
//!    streaming peer and an outside client probing it, phases taken from watch events;
//! 4. the control plane alone: N PodMigrations against the API server with agents that answer at
//!    once.

pub mod baseline;
pub mod demo;
pub mod faults;
pub mod migration;
pub mod report;
pub mod scale;
pub mod stats;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use sandbox::Dirs;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Touched memory of the demo workload per size class (`16Mi`, `256Mi`, `1Gi`).
    pub sizes: Vec<String>,
    /// Runs per figure.
    pub runs: usize,
    /// Numbers of PodMigrations of the control-plane benchmark.
    pub scale: Vec<usize>,
    /// Skip parts: `raw`, `migration`, `scale`.
    pub skip: Vec<String>,
    /// Where the documents go.
    pub out_dir: PathBuf,
    /// A label for this run (e.g. "before"/"after" a change); results of other labels already in
    /// the JSON are kept, so that a document can compare them.
    pub label: String,
    /// Only write the documents again from the JSON (after a change of the report).
    pub report_only: bool,
    /// What this run measures that others do not (a change), shown in the before/after section.
    pub note: String,
    /// The restore backend of the migrations (`runtime-wrapper` or `cri-checkpoint-image`).
    pub backend: String,
}

/// One migration of the demo workload by kube-migros.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationRun {
    pub checkpoint_bytes: u64,
    /// `kubectl apply` until the PodMigration is seen Succeeded.
    pub total_ms: f64,
    /// The operator's downtime: source frozen until the target runs.
    pub downtime_ms: f64,
    /// The stream alone within the transfer, as the target agent measured it (0: not recorded).
    #[serde(default)]
    pub stream_ms: f64,
    /// The longest time an outside client (on the host, polling the status port every few ms)
    /// got no answer from the workload.
    pub client_gap_ms: f64,
    /// The peer's pause: the longest time between two answers to its stream, on its own clock
    /// (0: not measured, a run from before the peer judged).
    #[serde(default)]
    pub peer_pause_ms: f64,
    /// Phase durations (see [`migration::PHASES`]).
    pub phases: BTreeMap<String, f64>,
    /// PostCopy: from the pod running on the target until all its memory is in, as the operator
    /// recorded it (0: stop-and-copy).
    #[serde(default)]
    pub memory_ms: f64,
    /// PostCopy: the workload's ticks per second while its memory came in, as the outside client
    /// read its counter (100 unhindered; none where that took too short to tell, or stop-and-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_ticks_per_s: Option<f64>,
}

/// One run of the raw recipe.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawRun {
    pub archive_bytes: u64,
    pub checkpoint_ms: f64,
    pub copy_ms: f64,
    pub scp_ms: f64,
    pub restore_ms: f64,
}

impl RawRun {
    /// Frozen until the restored process runs: checkpoint, network copy (scp), restore.
    pub fn downtime_ms(&self) -> f64 {
        self.checkpoint_ms + self.scp_ms + self.restore_ms
    }
}

/// One run of the CRIU floor (`e2e/bench/criu-floor.sh`): CRIU alone, no Kubernetes, no
/// containerd.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloorRun {
    /// The CRIU images of the workload.
    pub image_bytes: u64,
    /// `criu dump` into the source node's memory.
    pub dump_ms: f64,
    /// The images over a plain TCP connection between the nodes (tar into nc).
    pub transfer_ms: f64,
    /// `criu restore` on the target node from its memory.
    pub restore_ms: f64,
}

impl FloorRun {
    /// Frozen until the restored process runs: dump, transfer, restore.
    pub fn downtime_ms(&self) -> f64 {
        self.dump_ms + self.transfer_ms + self.restore_ms
    }
}

/// Throughput of moving the same bytes between the same two nodes, per method.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransferRuns {
    pub bytes: u64,
    /// MB/s per method (`memory copy`, `tcp pipe`, `scp`, `agent` (the transfer phase),
    /// `agent stream` (the stream alone)), one value per run.
    pub mb_per_s: BTreeMap<String, Vec<f64>>,
}

/// N PodMigrations processed by the operator with instant agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleRun {
    pub migrations: usize,
    /// Creating the first PodMigration until all are final.
    pub all_final_ms: f64,
    pub succeeded: usize,
    /// API requests of the operator (its own user's flow schema) per migration.
    pub requests_per_migration: f64,
    pub operator_peak_rss_mib: f64,
    pub operator_cpu_s: f64,
    /// The same requests by verb and resource (`PATCH podmigrations/status`), per migration, as
    /// the operator's own metrics count them.
    #[serde(default)]
    pub requests_by_kind: BTreeMap<String, f64>,
}

/// Everything one benchmark run measured at one label.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub label: String,
    #[serde(default)]
    pub note: String,
    /// The restore backend of the migrations (runs before it was recorded used checkpoint images).
    #[serde(default = "image_backend")]
    pub backend: String,
    pub started: String,
    pub commit: String,
    pub machine: String,
    /// Per size class.
    pub migrations: BTreeMap<String, Vec<MigrationRun>>,
    /// The same workloads moved with `strategy: PostCopy`, per size class (runtime-wrapper runs
    /// only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub post_copy: BTreeMap<String, Vec<MigrationRun>>,
    pub raw: BTreeMap<String, Vec<RawRun>>,
    /// The CRIU floor per size class.
    #[serde(default)]
    pub floor: BTreeMap<String, Vec<FloorRun>>,
    pub transfer: Option<TransferRuns>,
    pub scale: Vec<ScaleRun>,
}

fn image_backend() -> String {
    "cri-checkpoint-image".into()
}

/// The JSON file: results by label.
pub type Document = BTreeMap<String, Results>;

/// Runs the benchmarks and writes the documents.
pub async fn run(dirs: &Dirs, options: &Options) -> anyhow::Result<()> {
    let wanted = |part: &str| !options.skip.iter().any(|s| s == part);
    let json_path = options.out_dir.join("benchmarks.json");
    let mut document: Document = std::fs::read(&json_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut results = Results {
        label: options.label.clone(),
        note: options.note.clone(),
        backend: options.backend.clone(),
        started: k8s_openapi::jiff::Timestamp::now().to_string(),
        commit: git_commit(),
        machine: machine(),
        ..Default::default()
    };
    // Skipped parts keep what an earlier run of this label measured.
    if let Some(earlier) = document.get(&options.label) {
        if !wanted("raw") {
            results.raw = earlier.raw.clone();
            results.floor = earlier.floor.clone();
            results.transfer = earlier.transfer.clone();
        }
        if !wanted("migration") {
            results.migrations = earlier.migrations.clone();
            results.post_copy = earlier.post_copy.clone();
        }
        // Sizes of the control-plane benchmark not measured now are kept too.
        results.scale = earlier
            .scale
            .iter()
            .filter(|s| !wanted("scale") || !options.scale.contains(&s.migrations))
            .cloned()
            .collect();
    }
    let save = |document: &Document| -> anyhow::Result<()> {
        std::fs::create_dir_all(&options.out_dir)?;
        std::fs::write(&json_path, serde_json::to_vec_pretty(document)?)?;
        let md = report::markdown(document, &options.label);
        std::fs::write(options.out_dir.join("benchmarks.md"), md)?;
        std::fs::write(
            options.out_dir.join("benchmarks.svg"),
            report::svg(document, &options.label),
        )?;
        Ok(())
    };

    if options.report_only {
        save(&document)?;
        eprintln!(
            "bench: wrote {} from the JSON",
            options.out_dir.join("benchmarks.md").display()
        );
        return Ok(());
    }
    if wanted("raw") {
        let baselines = baseline::run(dirs, options)
            .await
            .context("the raw recipe, the CRIU floor and the transfer limits")?;
        results.raw = baselines.raw;
        results.floor = baselines.floor;
        results.transfer = Some(baselines.transfer);
        document.insert(options.label.clone(), results.clone());
        save(&document)?;
    }
    if wanted("migration") {
        (results.migrations, results.post_copy) = migration::run(dirs, options)
            .await
            .context("the kube-migros migrations")?;
        if let Some(transfer) = results.transfer.as_mut() {
            migration::add_agent_throughput(transfer, &results.migrations);
        }
        document.insert(options.label.clone(), results.clone());
        save(&document)?;
    }
    if wanted("scale") {
        for n in &options.scale {
            let run = scale::run(dirs, *n)
                .await
                .with_context(|| format!("{n} PodMigrations"))?;
            eprintln!(
                "bench: {n} migrations final in {:.1} s, {:.1} requests each, RSS {:.1} MiB",
                run.all_final_ms / 1000.0,
                run.requests_per_migration,
                run.operator_peak_rss_mib
            );
            results.scale.push(run);
            results.scale.sort_by_key(|s| s.migrations);
            document.insert(options.label.clone(), results.clone());
            save(&document)?;
        }
    }
    document.insert(options.label.clone(), results);
    save(&document)?;
    eprintln!(
        "bench: wrote {}",
        options.out_dir.join("benchmarks.md").display()
    );
    Ok(())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs, {:.0} GiB, Linux {}",
        mem as f64 / 1048576.0,
        kernel.trim()
    )
}
