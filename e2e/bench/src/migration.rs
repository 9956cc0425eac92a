//! kube-migros moving the demo workload, as users run it: the chart installed from images built
//! here, an RDMA pod touching a given amount of memory on node-1 with a peer on node-3 streaming to
//! it, a PodMigration to node-2. Phases are taken from watch events of the PodMigration and the
//! pods, timed on arrival; an outside client probes the workload's status port all along.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crds::{Phase, PodMigration, Strategy};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::DeleteParams, runtime::watcher};
use tokio::io::AsyncReadExt;

use sandbox::Dirs;
use testkit::workload::{self, num};

use crate::{MigrationRun, Options, TransferRuns};

/// The phases of a migration, in order, as measured here:
/// - `prepare`: apply until Checkpointing (checks, target choice, rxe block, target agent prepared);
/// - `checkpoint`: Checkpointing until Transferring (IP blocked, paused, checkpointed);
/// - `transfer`: Transferring until Restoring (the stream and the target's staging: with the runtime
///   wrapper the archive unpacked as it arrives; with checkpoint images the checks, then the image
///   packed, pushed to the registry and pulled into the node's runtime);
/// - `commit`: Restoring until the source pod is being deleted (target staged, rxe counters and IP
///   reservation set: the commit point);
/// - `source teardown`: until the source pod is gone;
/// - `pod creation`: until the replacement pod exists;
/// - `restore`: until the replacement runs (scheduling is skipped: it names its node; the kubelet
///   creates its sandbox and containerd restores the container, through migros-runc or from the
///   checkpoint image);
/// - `running`: until the PodMigration is Succeeded (the operator sees it run, unblocks the IP).
pub const PHASES: [&str; 8] = [
    "prepare",
    "checkpoint",
    "transfer",
    "commit",
    "source teardown",
    "pod creation",
    "restore",
    "running",
];

const NAMESPACE: &str = "kube-migros-bench";

/// Times of what the watches saw, from the apply.
#[derive(Debug, Default)]
struct Seen {
    phases: BTreeMap<String, f64>,
    source_deleting: Option<f64>,
    source_gone: Option<f64>,
    replacement_created: Option<f64>,
    replacement_running: Option<f64>,
}

impl Seen {
    /// The duration of each of [`PHASES`], from the marks that were seen.
    fn durations(&self) -> BTreeMap<String, f64> {
        let at = |phase: &str| self.phases.get(phase).copied();
        let marks = [
            Some(0.0),
            at("Checkpointing"),
            at("Transferring"),
            at("Restoring"),
            self.source_deleting,
            self.source_gone,
            self.replacement_created,
            self.replacement_running,
            at("Succeeded"),
        ];
        let mut phases = BTreeMap::new();
        for (i, name) in PHASES.iter().enumerate() {
            if let (Some(a), Some(b)) = (marks[i], marks[i + 1]) {
                phases.insert((*name).to_string(), (b - a).max(0.0));
            }
        }
        phases
    }
}

/// Runs per size class.
pub type BySize = BTreeMap<String, Vec<MigrationRun>>;

/// Runs `options.runs` migrations per size with StopAndCopy, then (with the runtime wrapper) as
/// many with PostCopy; returns the runs per size of each.
pub async fn run(dirs: &Dirs, options: &Options) -> anyhow::Result<(BySize, BySize)> {
    // The backend to measure: the agents offer the runtime wrapper first when it is installed;
    // checkpoint images only where the operator is allowed to choose them.
    let wrapper = options.backend == "runtime-wrapper";
    let (wrapper, images_allowed) = (wrapper.to_string(), (!wrapper).to_string());
    let (cluster, _, _) = testkit::harness::chart_installed(
        dirs,
        &[
            ("runtimeWrapper.enabled", wrapper.as_str()),
            ("operator.allowCheckpointImages", images_allowed.as_str()),
            // PostCopy needs pipes of 4 MiB on the nodes.
            ("agent.raisePipeMaxSize", "true"),
            // No removals of GiB checkpoints while the next run is measured: no byte budget, and
            // collections at the chart's default interval.
            ("agent.retentionBudget", ""),
            ("agent.gcIntervalSeconds", "60"),
        ],
    )
    .await?;
    let env = cluster.env.clone();
    let client = env.client().await?;
    workload::fresh_namespace(&client, NAMESPACE).await?;
    let demo = cluster.images.get("demo").context("no demo image")?.clone();
    let mut strategies = vec![Strategy::StopAndCopy];
    // Only the runtime wrapper restores a process whose memory is still to come.
    if options.backend == "runtime-wrapper" && !options.skip.iter().any(|s| s == "post-copy") {
        strategies.push(Strategy::PostCopy);
    }
    let (mut stop_and_copy, mut post_copy) = (BTreeMap::new(), BTreeMap::new());
    for strategy in strategies {
        for size in &options.sizes {
            let mut runs = Vec::new();
            for i in 0..options.runs {
                let name = strategy.as_str();
                let run = one(&client, &env, &demo, size, strategy, i)
                    .await
                    .with_context(|| format!("{name} {} of the {size} workload", i + 1))?;
                eprintln!(
                    "bench: {name} {size} #{}: total {:.0} ms, downtime {:.0} ms, client gap {:.0} ms, peer's pause {:.0} ms, memory after {:.0} ms, {} bytes",
                    i + 1,
                    run.total_ms,
                    run.downtime_ms,
                    run.client_gap_ms,
                    run.peer_pause_ms,
                    run.memory_ms,
                    run.checkpoint_bytes
                );
                runs.push(run);
            }
            let all = match strategy {
                Strategy::PostCopy => &mut post_copy,
                _ => &mut stop_and_copy,
            };
            all.insert(size.clone(), runs);
        }
    }
    Ok((stop_and_copy, post_copy))
}

/// The agents' throughput of the size whose archive is closest to the one the other methods
/// moved: checkpoint bytes over the transfer phase (`agent`) and over the stream alone (`agent
/// stream`).
pub fn add_agent_throughput(
    transfer: &mut TransferRuns,
    migrations: &BTreeMap<String, Vec<MigrationRun>>,
) {
    let closest = migrations
        .values()
        .filter(|runs| !runs.is_empty())
        .min_by_key(|runs| runs[0].checkpoint_bytes.abs_diff(transfer.bytes));
    if let Some(runs) = closest {
        let rate = |ms: f64, bytes: u64| (ms > 0.0).then(|| bytes as f64 / 1e6 / (ms / 1000.0));
        let phase: Vec<f64> = runs
            .iter()
            .filter_map(|r| rate(*r.phases.get("transfer")?, r.checkpoint_bytes))
            .collect();
        let stream: Vec<f64> = runs
            .iter()
            .filter_map(|r| rate(r.stream_ms, r.checkpoint_bytes))
            .collect();
        transfer.mb_per_s.insert("agent".into(), phase);
        transfer.mb_per_s.insert("agent stream".into(), stream);
    }
}

/// One status line of the workload within `timeout`, or `None`.
async fn probe(ip: Ipv4Addr, timeout: Duration) -> Option<String> {
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect((ip, 8080)).await.ok()?;
        let mut line = String::new();
        s.read_to_string(&mut line).await.ok()?;
        (!line.is_empty()).then_some(line)
    })
    .await
    .ok()
    .flatten()
}

/// What the outside client saw: its longest stretch without an answer (ms), and the workload's
/// tick counter at each answer (ms since `started`, counter).
#[derive(Debug, Default)]
struct Probed {
    longest_gap_ms: f64,
    counters: Vec<(f64, u64)>,
}

impl Probed {
    /// The workload's ticks per second between `from` and `to` (ms since the start), from the
    /// first answer after `from` to the last before `to`; `None` under 200 ms of answers.
    fn ticks_per_s(&self, from: f64, to: f64) -> Option<f64> {
        let within = || {
            self.counters
                .iter()
                .filter(|(at, _)| *at >= from && *at <= to)
        };
        let (first, last) = (within().next()?, within().next_back()?);
        let span = last.0 - first.0;
        (span >= 200.0).then(|| (last.1.saturating_sub(first.1)) as f64 / (span / 1000.0))
    }
}

/// Probes the workload until `stop`.
async fn client_gap(ip: Ipv4Addr, stop: Arc<AtomicBool>, started: Instant) -> Probed {
    let mut last_answer = Instant::now();
    let mut probed = Probed::default();
    let mut longest = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        if let Some(line) = probe(ip, Duration::from_millis(50)).await {
            let now = Instant::now();
            longest = longest.max(now - last_answer);
            last_answer = now;
            let counter = line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("counter="))
                .and_then(|c| c.parse().ok());
            if let Some(counter) = counter {
                let at = now.duration_since(started).as_secs_f64() * 1000.0;
                probed.counters.push((at, counter));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    probed.longest_gap_ms = longest.as_secs_f64() * 1000.0;
    probed
}

async fn one(
    client: &Client,
    env: &sandbox::controlplane::Env,
    demo: &str,
    size: &str,
    strategy: Strategy,
    index: usize,
) -> anyhow::Result<MigrationRun> {
    let kind = match strategy {
        Strategy::PostCopy => "pc-",
        _ => "",
    };
    let suffix = format!("{kind}{}-{index}", size.to_lowercase());
    let (app_name, peer_name, pm_name) = (
        format!("app-{suffix}"),
        format!("peer-{suffix}"),
        format!("move-{suffix}"),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let (source, before) =
        workload::start_with_peer(&pods, demo, (&app_name, &peer_name), Some(size)).await?;
    let ip = workload::ip_of(&source).context("no pod IP")?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let prober = tokio::spawn(client_gap(ip, stop.clone(), started));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), NAMESPACE);
    let pod_watch = tokio::spawn(watch_pod(
        pods.clone(),
        app_name.clone(),
        source.uid().unwrap_or_default(),
        seen.clone(),
        started,
    ));
    let manifest = workload::migration_manifest(
        NAMESPACE,
        &pm_name,
        &app_name,
        Some("node-2"),
        &format!("  compression: Zstd\n  strategy: {}\n", strategy.as_str()),
    );
    let path = std::env::temp_dir().join(format!("kube-migros-bench-{pm_name}.yaml"));
    workload::kubectl_apply(env, &path, &manifest)?;
    let status = follow(&pms, &pm_name, &seen, started)
        .await?
        .status
        .unwrap_or_default();
    if status.phase != Some(Phase::Succeeded) {
        bail!(
            "{pm_name} ended {:?}: {}",
            status.phase,
            status.message.unwrap_or_default()
        );
    }
    // The workload answers again and the stream went on.
    let (counter, received) = (num(&before, "counter"), num(&before, "received"));
    workload::until(
        "the workload after the move",
        Duration::from_secs(120),
        || async move {
            workload::state(ip)
                .await
                .filter(|s| num(s, "counter") > counter && num(s, "received") > received)
        },
    )
    .await?;
    // The peer is the judge of the pause: every record it sent is answered, in order.
    let peer = workload::peer_judgement(&pods, &peer_name).await?;
    if peer.gaps != 0 {
        bail!("{pm_name}: the peer's answers came out of order: {peer:?}");
    }
    // The prober gets a few more answers after the move.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let probed = prober.await.unwrap_or_default();
    pod_watch.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    // PostCopy: how the workload ticks while its pages come in (100 per second unhindered).
    let memory_ticks_per_s = match (
        seen.phases.get("CopyingMemory"),
        seen.phases.get("Succeeded"),
    ) {
        (Some(from), Some(to)) => probed.ticks_per_s(*from, *to),
        _ => None,
    };
    let run = MigrationRun {
        checkpoint_bytes: status.checkpoint.map(|c| c.bytes).unwrap_or_default() as u64,
        total_ms: seen.phases.get("Succeeded").copied().unwrap_or(f64::NAN),
        downtime_ms: status
            .timings
            .and_then(|t| t.downtime_ms)
            .map_or(f64::NAN, |d| d as f64),
        stream_ms: status
            .timings
            .and_then(|t| t.stream_ms)
            .map_or(0.0, |d| d as f64),
        client_gap_ms: if probed.counters.is_empty() {
            f64::NAN
        } else {
            probed.longest_gap_ms
        },
        peer_pause_ms: peer.longest_pause_ms as f64,
        phases: seen.durations(),
        memory_ms: status
            .timings
            .and_then(|t| t.memory_ms)
            .map_or(0.0, |d| d as f64),
        memory_ticks_per_s,
    };
    // Clean up: the PodMigration (the operator lifts its finalizer), the pods.
    pms.delete(&pm_name, &DeleteParams::default()).await?;
    for name in [&app_name, &peer_name] {
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await?;
    }
    workload::until(
        "the run's objects to go",
        Duration::from_secs(120),
        || async {
            let pm_gone = pms.get_opt(&pm_name).await.ok()?.is_none();
            let app_gone = pods.get_opt(&app_name).await.ok()?.is_none();
            let peer_gone = pods.get_opt(&peer_name).await.ok()?.is_none();
            (pm_gone && app_gone && peer_gone).then_some(())
        },
    )
    .await?;
    Ok(run)
}

/// Records when the source pod is deleted and gone and when its replacement appears and runs.
async fn watch_pod(
    pods: Api<Pod>,
    name: String,
    source_uid: String,
    seen: Arc<Mutex<Seen>>,
    started: Instant,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(pods, config).boxed();
    while let Ok(Some(event)) = events.try_next().await {
        let at = started.elapsed().as_secs_f64() * 1000.0;
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let uid = p.uid().unwrap_or_default();
                if uid == source_uid {
                    if p.metadata.deletion_timestamp.is_some() {
                        s.source_deleting.get_or_insert(at);
                    }
                } else {
                    s.source_gone.get_or_insert(at);
                    s.replacement_created.get_or_insert(at);
                    let running =
                        p.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Running");
                    if running {
                        s.replacement_running.get_or_insert(at);
                    }
                }
            }
            watcher::Event::Delete(p) if p.uid().as_deref() == Some(source_uid.as_str()) => {
                s.source_deleting.get_or_insert(at);
                s.source_gone.get_or_insert(at);
            }
            _ => {}
        }
    }
}

/// Records when PodMigration `name` enters each phase; answers it once final.
async fn follow(
    pms: &Api<PodMigration>,
    name: &str,
    seen: &Mutex<Seen>,
    started: Instant,
) -> anyhow::Result<PodMigration> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(pms.clone(), config).boxed();
    let deadline = Duration::from_secs(600);
    loop {
        let next = tokio::time::timeout(
            deadline.saturating_sub(started.elapsed()),
            events.try_next(),
        )
        .await
        .context("the migration did not end in 10 minutes")??;
        let Some(event) = next else {
            bail!("the watch ended")
        };
        let at = started.elapsed().as_secs_f64() * 1000.0;
        let (watcher::Event::Apply(pm) | watcher::Event::InitApply(pm)) = event else {
            continue;
        };
        let Some(phase) = pm.status.as_ref().and_then(|s| s.phase) else {
            continue;
        };
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .phases
            .entry(format!("{phase:?}"))
            .or_insert(at);
        if phase.is_final() {
            return Ok(pm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_is_read_between_the_first_and_last_answers_of_the_window() {
        let probed = Probed {
            longest_gap_ms: 0.0,
            // 100 ticks a second until 1000 ms, then 50.
            counters: (0..=20)
                .map(|i| {
                    let at = f64::from(i) * 100.0;
                    let ticks = if i <= 10 { i * 10 } else { 100 + (i - 10) * 5 };
                    (at, u64::try_from(ticks).unwrap_or_default())
                })
                .collect(),
        };
        assert_eq!(probed.ticks_per_s(0.0, 1000.0), Some(100.0));
        assert_eq!(probed.ticks_per_s(1000.0, 2000.0), Some(50.0));
        // Answers 50 ms apart within the window: too short to tell.
        assert_eq!(probed.ticks_per_s(1050.0, 1150.0), None);
    }
}
