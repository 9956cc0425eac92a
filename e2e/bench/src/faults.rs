//! The fault matrix (`cargo run -p e2e -- faults`, docs/reliability.md): kube-migros installed with
//! its chart on the sandbox cluster moves the demo workload between node-1 and node-2 (a peer on
//! node-3 streams to it) while something goes wrong at a chosen step: an agent or the operator's
//! leader is killed with SIGKILL, the link between the two nodes is cut, the target's store fills
//! up, the target node loses its kubelet and agent, or the PodMigration is deleted.
//!
//! Each run is judged by what runs afterwards, not by what the operator says: exactly one process
//! of the workload (found by a mark in its environment, which a restored process carries too),
//! not frozen, answering at the pod's IP with the same process identity and its counter going on,
//! on the target ("moved") or on the source as before ("stayed"). Anything else (no copy, two
//! copies, a copy left paused, a changed IP or process) is a violation.
//!
//! A fault lands where the watch of the PodMigration sees the step it waits for; a step that
//! passes faster than the watch is reported as not landed, never counted as a success of it.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crds::{Phase, PodMigration};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde::{Deserialize, Serialize};

use sandbox::{
    Dirs,
    controlplane::Env,
    kubelets::{self, Kubelets},
    nodes::{Node, Nodes},
    release,
};
use testkit::workload::{self, State, num};

/// Where the scenarios' pods and PodMigrations live.
pub const NAMESPACE: &str = "kube-migros-faults";
/// The nodes the workload moves between (the peer runs on node-3).
const NODES: [&str; 2] = ["node-1", "node-2"];
/// The workload's memory: small, so that a run is quick; the transfer is slowed instead (below).
const TOUCH: &str = "16Mi";
/// Each migration's bandwidth limit: the transfer lasts a few seconds, long enough for a fault to
/// land in it.
const BANDWIDTH: &str = "4Mi";
/// Each migration's timeout: a fault that keeps it from finishing ends it within a minute.
const TIMEOUT_SECONDS: u64 = 60;
/// How long a run may take until its migration is final (or, deleted, gone).
const RUN_DEADLINE: Duration = Duration::from_secs(300);
/// The store directory of the chart's agents (`agent.storeDir`).
const STORE_DIR: &str = "/var/lib/kube-migros";
/// The environment variable that marks the workload's process of one run.
const MARK: &str = "MIGROS_FAULT_MARK";

/// Whom a kill hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    SourceAgent,
    TargetAgent,
    Leader,
}

/// The step of a migration a fault waits for, as its status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum At {
    /// Preparing: the target agent reserves room.
    Prepare,
    /// Checkpointing: the source agent pauses and checkpoints the pod.
    Checkpoint,
    /// Transferring, the checkpoint not yet whole on the target.
    Transfer,
    /// The commit point: the checkpoint is on the target, the source is being stopped for good.
    Commit,
    /// Past the commit, the source stopped: the target stages the restore.
    Stage,
    /// Staged: the replacement pod is created and restored.
    Restore,
    /// A rollback (the migration timed out during a transfer too slow to finish).
    Rollback,
}

impl At {
    pub const ALL: [At; 7] = [
        At::Prepare,
        At::Checkpoint,
        At::Transfer,
        At::Commit,
        At::Stage,
        At::Restore,
        At::Rollback,
    ];

    fn name(self) -> &'static str {
        match self {
            At::Prepare => "prepare",
            At::Checkpoint => "checkpoint",
            At::Transfer => "transfer",
            At::Commit => "commit",
            At::Stage => "stage",
            At::Restore => "restore",
            At::Rollback => "rollback",
        }
    }
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of every process of that pod's containers (the kubelet restarts them).
    Kill(Who, At),
    /// The nodes' link cut (both directions, on the target) during the transfer, until the end.
    LinkCut,
    /// The target's store (a small file system of its own here) filled up during the transfer.
    StoreFull,
    /// The target node's kubelet stopped and its agent killed after the commit, until the end.
    TargetGone,
    /// The PodMigration deleted when it is in this phase.
    Delete(Phase),
}

impl Fault {
    /// The scenario's name in the table and in `--only`.
    pub fn name(self) -> String {
        match self {
            Fault::Kill(who, at) => {
                let who = match who {
                    Who::SourceAgent => "source-agent",
                    Who::TargetAgent => "target-agent",
                    Who::Leader => "leader",
                };
                format!("kill-{who}@{}", at.name())
            }
            Fault::LinkCut => "link-cut@transfer".into(),
            Fault::StoreFull => "store-full@transfer".into(),
            Fault::TargetGone => "target-node-gone@stage".into(),
            Fault::Delete(phase) => format!("delete@{}", format!("{phase:?}").to_lowercase()),
        }
    }

    /// In words, for the document.
    pub fn describe(self) -> String {
        match self {
            Fault::Kill(who, at) => {
                let who = match who {
                    Who::SourceAgent => "the source agent",
                    Who::TargetAgent => "the target agent",
                    Who::Leader => "the operator's leader",
                };
                format!("SIGKILL of {who} at the {} step", at.name())
            }
            Fault::LinkCut => "the link between source and target node cut during the transfer, \
                               for the rest of the run"
                .into(),
            Fault::StoreFull => "the target's store file system filled during the transfer".into(),
            Fault::TargetGone => {
                "the target node's kubelet stopped, its agent killed and the node \
                                  tainted out-of-service right after the commit, for the rest of \
                                  the run"
                    .into()
            }
            Fault::Delete(phase) => format!("the PodMigration deleted in phase {phase:?}"),
        }
    }

    /// The step the fault waits for.
    fn at(self) -> At {
        match self {
            Fault::Kill(_, at) => at,
            Fault::LinkCut | Fault::StoreFull => At::Transfer,
            Fault::TargetGone => At::Stage,
            Fault::Delete(Phase::Preparing) => At::Prepare,
            Fault::Delete(Phase::Checkpointing) => At::Checkpoint,
            Fault::Delete(Phase::Transferring) => At::Transfer,
            Fault::Delete(_) => At::Restore,
        }
    }
}

/// Every scenario of the matrix, in the order of the document.
pub fn scenarios() -> Vec<Fault> {
    let mut all = Vec::new();
    for who in [Who::SourceAgent, Who::TargetAgent, Who::Leader] {
        for at in At::ALL {
            all.push(Fault::Kill(who, at));
        }
    }
    all.extend([Fault::LinkCut, Fault::StoreFull, Fault::TargetGone]);
    for phase in [
        Phase::Preparing,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::Restoring,
    ] {
        all.push(Fault::Delete(phase));
    }
    all
}

/// What one run came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub scenario: String,
    pub run: usize,
    /// Where the fault hit (the status the watch saw), or why it did not.
    pub landed: String,
    /// Whether it hit at the step it waited for.
    pub on_step: bool,
    /// `moved`, `stayed` or `violated`.
    pub result: String,
    /// What was found (for a violation: what is wrong).
    pub detail: String,
    /// The migration's last phase (`deleted` once gone).
    pub phase: String,
    /// From the fault until the outcome held (the migration final or gone, the workload
    /// answering as before).
    pub seconds: f64,
}

impl Outcome {
    pub fn violated(&self) -> bool {
        self.result == "violated"
    }
}

/// The sandbox with the chart installed, as the runs need it.
#[derive(Clone)]
pub struct Matrix {
    pub dirs: Dirs,
    pub env: Env,
    pub client: Client,
    pub nodes: Vec<Node>,
    pub demo: String,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Matrix {
    /// Brings up the sandbox and installs the chart (release images built here) unless it runs.
    pub async fn install(dirs: &Dirs) -> anyhow::Result<Self> {
        let (cluster, _, _) = testkit::harness::chart_installed(dirs, &[]).await?;
        let env = cluster.env.clone();
        let client = env.client().await?;
        Ok(Self {
            dirs: dirs.clone(),
            env,
            client,
            nodes: cluster.nodes.clone(),
            demo: cluster.images.get("demo").context("no demo image")?.clone(),
        })
    }

    fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Runs `faults` `runs` times each; answers every outcome (runs that could not be carried
    /// out are errors). One workload goes from run to run, between node-1 and node-2, as long as
    /// it comes through whole; after a violation a new one starts.
    pub async fn run(&self, faults: &[Fault], runs: usize) -> anyhow::Result<Vec<Outcome>> {
        workload::fresh_namespace(&self.client, NAMESPACE).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let mut outcomes = Vec::new();
        let mut current: Option<Workload> = None;
        let mut started = 0;
        for fault in faults {
            for run in 1..=runs {
                let mut w = match current.take() {
                    Some(w) => w,
                    None => {
                        started += 1;
                        self.start_workload(started).await?
                    }
                };
                let began = Instant::now();
                let outcome = self
                    .one(*fault, run, &mut w)
                    .await
                    .with_context(|| format!("{} run {run}", fault.name()))?;
                eprintln!(
                    "faults: {} #{run}: {} in {:.1} s ({}; landed: {}; the run took {:.0} s){}",
                    outcome.scenario,
                    outcome.result,
                    outcome.seconds,
                    outcome.phase,
                    outcome.landed,
                    began.elapsed().as_secs_f64(),
                    if outcome.violated() {
                        format!(": {}", outcome.detail)
                    } else {
                        String::new()
                    }
                );
                if outcome.violated() {
                    self.clear_pods(&pods, &[&w.app, &w.peer]).await?;
                } else {
                    current = Some(w);
                }
                outcomes.push(outcome);
            }
        }
        if let Some(w) = current {
            self.clear_pods(&pods, &[&w.app, &w.peer]).await?;
        }
        Ok(outcomes)
    }

    /// A new workload on node-1 with its peer on node-3, its process marked.
    async fn start_workload(&self, n: usize) -> anyhow::Result<Workload> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let (app, peer) = (format!("app-{n}"), format!("peer-{n}"));
        let mark = format!(
            "{app}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let (pod, _) = workload::start_with_peer_env(
            &pods,
            &self.demo,
            (&app, &peer),
            Some(TOUCH),
            &[(MARK, &mark)],
        )
        .await?;
        Ok(Workload {
            ip: workload::ip_of(&pod).context("no pod IP")?,
            uid: pod.uid().unwrap_or_default(),
            node: workload::node_of(&pod),
            app,
            peer,
            mark,
        })
    }

    async fn one(&self, fault: Fault, run: usize, w: &mut Workload) -> anyhow::Result<Outcome> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pms: Api<PodMigration> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pm_name = format!("m-{}-{run}", short(fault));
        // Between node-1 and node-2 (node-3 runs the peer, and takes the pod when its target goes).
        let route = Route {
            source: w.node.clone(),
            target: if w.node == NODES[0] {
                NODES[1]
            } else {
                NODES[0]
            }
            .to_string(),
        };
        let target = self.node(&route.target)?.clone();
        if fault == Fault::StoreFull {
            self.small_store(&target).await?;
        }
        let ip = w.ip;
        let before = workload::until("the workload's state", Duration::from_secs(30), || {
            workload::state(ip)
        })
        .await?;
        let source_pod = pods.get(&w.app).await?;
        // A rollback is had by a timeout during a transfer that cannot finish in time.
        let extra = if fault.at() == At::Rollback {
            "  timeoutSeconds: 10\n  bandwidthLimit: 64Ki\n".to_string()
        } else {
            format!("  timeoutSeconds: {TIMEOUT_SECONDS}\n  bandwidthLimit: {BANDWIDTH}\n")
        };
        let manifest =
            workload::migration_manifest(NAMESPACE, &pm_name, &w.app, Some(&route.target), &extra);
        let path = std::env::temp_dir().join(format!("kube-migros-faults-{pm_name}.yaml"));
        workload::kubectl_apply(&self.env, &path, &manifest)?;

        // Watch for the step; strike there.
        let started = Instant::now();
        let mut landed: Option<(String, bool, Instant)> = None;
        let mut last_phase = String::from("none");
        let mut last_message = String::new();
        // The small store goes after the run whether or not the fault struck.
        let mut healing = Heal {
            store: fault == Fault::StoreFull,
            ..Heal::default()
        };
        let ended = loop {
            if started.elapsed() > RUN_DEADLINE {
                break None;
            }
            let pm = pms.get_opt(&pm_name).await?;
            let Some(pm) = pm else {
                break Some("deleted".to_string());
            };
            let status = pm.status.clone().unwrap_or_default();
            let phase = status.phase.unwrap_or_default();
            last_phase = format!("{phase:?}");
            last_message = status.message.clone().unwrap_or_default();
            if landed.is_none() {
                let pod = pods.get_opt(&w.app).await?;
                let hit = match fault {
                    Fault::Delete(want) => hit_phase(phase, want),
                    _ => hit_step(step(&pm, pod.as_ref(), &source_pod), fault.at(), phase),
                };
                let what = match hit {
                    Hit::Now => Some((
                        format!("{phase:?}: {}", status.message.unwrap_or_default()),
                        true,
                    )),
                    // Past it (a step the watch did not see), or over: the fault goes in late,
                    // and the run says so.
                    Hit::Late => Some((format!("late, in {phase:?}"), false)),
                    Hit::NotYet => None,
                };
                if let Some((what, on_step)) = what {
                    self.strike(fault, &route, &pms, &pm_name, &mut healing)
                        .await?;
                    landed = Some((what, on_step, Instant::now()));
                }
            }
            if landed.is_some() && phase.is_final() && !matches!(fault, Fault::Delete(_)) {
                break Some(last_phase.clone());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let (landed, on_step, struck) = landed.unwrap_or(("never".into(), false, started));
        let over = ended.is_some();
        let end = match ended {
            Some(phase) => phase,
            None => format!("still {last_phase} after {}s", RUN_DEADLINE.as_secs()),
        };
        // The workload answers as before, wherever it runs (or the outcome is no answer).
        let answered = answer(ip, &before).await;
        let seconds = struck.elapsed().as_secs_f64();
        let source_uid = source_pod.uid();
        let started_run = Started {
            app: &w.app,
            mark: &w.mark,
            ip,
            before: &before,
            source: &route.source,
            source_uid: source_uid.as_deref(),
        };
        // Judged as the fault left it, and again once the cluster is whole (a node that comes
        // back must not bring a second copy): the first violation counts.
        let at_outcome = if over {
            self.judge(&pods, &started_run, answered).await
        } else {
            Err(format!("the migration did not end: {end}"))
        };
        self.heal(healing, &route).await?;
        let answered = answer(ip, &before).await;
        let healed = self.judge(&pods, &started_run, answered).await;
        let (result, detail) = match (at_outcome, healed) {
            (Err(why), _) => ("violated".to_string(), why),
            (Ok(_), Err(why)) => ("violated".to_string(), format!("after the heal: {why}")),
            (Ok((result, detail)), Ok(_)) => (result, detail),
        };
        // Why it ended where it did, in the operator's words.
        let detail = if last_message.is_empty() {
            detail
        } else {
            format!("{detail}; {last_message}")
        };
        if result != "violated" {
            let now = pods.get(&w.app).await?;
            w.uid = now.uid().unwrap_or_default();
            w.node = workload::node_of(&now);
        }
        self.clear_migration(&pms, &pm_name).await?;
        Ok(Outcome {
            scenario: fault.name(),
            run,
            landed,
            on_step,
            result,
            detail,
            phase: end,
            seconds,
        })
    }

    /// Does the fault; notes in `heal` what undoes it after the run.
    async fn strike(
        &self,
        fault: Fault,
        route: &Route,
        pms: &Api<PodMigration>,
        pm_name: &str,
        heal: &mut Heal,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(who, _) => {
                let pod = match who {
                    Who::SourceAgent => self.agent_pod(&route.source).await?,
                    Who::TargetAgent => self.agent_pod(&route.target).await?,
                    Who::Leader => self.leader_pod().await?,
                };
                let killed = kill_pod(&pod.uid().unwrap_or_default());
                if killed == 0 {
                    bail!("no process of pod {} to kill", pod.name_any());
                }
                heal.restarted = Some(pod);
            }
            Fault::LinkCut => {
                let (source, target) = (self.node(&route.source)?, self.node(&route.target)?);
                let s = source.ip().to_string();
                run_in(target, &["nft", "add", "table", "inet", "migros-fault"])?;
                for (chain, hook, dir) in
                    [("input", "input", "saddr"), ("output", "output", "daddr")]
                {
                    let base = format!("{{ type filter hook {hook} priority -10 ; }}");
                    run_in(
                        target,
                        &["nft", "add", "chain", "inet", "migros-fault", chain, &base],
                    )?;
                    run_in(
                        target,
                        &[
                            "nft",
                            "add",
                            "rule",
                            "inet",
                            "migros-fault",
                            chain,
                            "ip",
                            dir,
                            &s,
                            "drop",
                        ],
                    )?;
                }
                heal.link = true;
            }
            Fault::StoreFull => {
                // Whatever room is left goes to one file; dd ends with "No space left".
                let target = self.node(&route.target)?;
                let _ = target.exec(&[
                    "dd",
                    "if=/dev/zero",
                    &format!("of={STORE_DIR}/filler"),
                    "bs=1M",
                ]);
            }
            Fault::TargetGone => {
                // The node dies (its kubelet and agent, not its containerd: what ran there would
                // show as a second copy), and whoever looks after the nodes says so with the
                // out-of-service taint, as for Kubernetes' non-graceful node shutdown.
                let target = self.node(&route.target)?;
                let agent = self.agent_pod(&route.target).await?;
                Nodes::new(&self.dirs).stop_all(target, "kubelet")?;
                kill_pod(&agent.uid().unwrap_or_default());
                heal.kubelet = true;
                self.out_of_service(&route.target, true).await?;
            }
            Fault::Delete(_) => {
                pms.delete(pm_name, &DeleteParams::default()).await?;
            }
        }
        Ok(())
    }

    /// Undoes what [`Self::strike`] did and waits until the cluster is whole again: every node
    /// Ready, every agent and operator replica running and ready, a leader.
    async fn heal(&self, heal: Heal, route: &Route) -> anyhow::Result<()> {
        let target = self.node(&route.target)?;
        if heal.link {
            run_in(target, &["nft", "delete table inet migros-fault"])?;
        }
        if heal.kubelet {
            self.out_of_service(&route.target, false).await?;
            Kubelets::new(&self.dirs).start(target)?;
            kubelets::wait_ready(
                &self.client,
                std::slice::from_ref(target),
                Duration::from_secs(120),
            )
            .await
            .map_err(anyhow::Error::msg)?;
            // The node lifecycle controller tainted the node while its kubelet was away; a
            // migration to it would be refused until the taints are gone.
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
            workload::until(
                &format!("node {} to lose its taints", target.name),
                Duration::from_secs(120),
                || async {
                    let node = nodes.get(&target.name).await.ok()?;
                    let spec = node.spec?;
                    spec.taints.is_none_or(|t| t.is_empty()).then_some(())
                },
            )
            .await?;
        }
        if heal.store {
            self.whole_store(target).await?;
        }
        if let Some(pod) = heal.restarted {
            // The killed container restarted (the kubelet saw it die).
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), release::NAMESPACE);
            let before = restarts(&pod);
            let name = pod.name_any();
            workload::until(
                &format!("pod {name} to restart its container"),
                Duration::from_secs(120),
                || async {
                    let now = pods.get_opt(&name).await.ok()??;
                    (restarts(&now) > before || now.metadata.deletion_timestamp.is_some())
                        .then_some(())
                },
            )
            .await?;
        }
        release::wait_rolled_out(&self.client, Duration::from_secs(180)).await?;
        workload::until("a leader", Duration::from_secs(120), || self.leader()).await?;
        // A restarted agent's device plugin registers again: until then its node offers no
        // rdma/rxe, and a migration of the next (RDMA) workload there would be refused.
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        kubelets::wait_rxe(&self.client, &nodes, Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// The verdict on what runs now: `moved` or `stayed` with what was found, or why not.
    async fn judge(
        &self,
        pods: &Api<Pod>,
        run: &Started<'_>,
        answered: Option<State>,
    ) -> Result<(String, String), String> {
        let Started {
            app,
            mark,
            ip,
            before,
            source,
            source_uid: before_uid,
        } = *run;
        let copies = marked(mark);
        let running: Vec<&Copy> = copies.iter().filter(|c| !c.frozen).collect();
        if let Some(frozen) = copies.iter().find(|c| c.frozen) {
            return Err(format!(
                "a copy is left paused on {} (pid {})",
                frozen.node, frozen.pid
            ));
        }
        let copy = match running.as_slice() {
            [] => return Err("no copy of the workload runs".into()),
            [one] => *one,
            many => {
                let nodes: Vec<&str> = many.iter().map(|c| c.node.as_str()).collect();
                return Err(format!(
                    "{} copies run, on {}",
                    many.len(),
                    nodes.join(", ")
                ));
            }
        };
        let Some(after) = answered else {
            return Err(format!(
                "one copy runs on {}, but it does not answer at {ip} as the same process",
                copy.node
            ));
        };
        let pod = pods
            .get_opt(app)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the copy on {} has no pod object", copy.node))?;
        let node = workload::node_of(&pod);
        if node != copy.node || workload::ip_of(&pod) != Some(ip) {
            return Err(format!(
                "the pod says {node} {:?}, the copy runs on {} at {ip}",
                workload::ip_of(&pod),
                copy.node
            ));
        }
        let detail = format!(
            "counter {} -> {}, received {} -> {}",
            num(before, "counter"),
            num(&after, "counter"),
            num(before, "received"),
            num(&after, "received")
        );
        if node == source {
            if pod.uid().as_deref() != before_uid {
                return Err(format!("a new pod runs on the source ({node})"));
            }
            Ok(("stayed".into(), detail))
        } else {
            Ok(("moved".into(), format!("to {node}, {detail}")))
        }
    }

    /// Deletes the run's PodMigration and waits until it is gone (the operator lifts its
    /// finalizer after the cleanup; one it could not finish, which the run reports, has it lifted
    /// here so that the next run starts clean).
    async fn clear_migration(&self, pms: &Api<PodMigration>, pm_name: &str) -> anyhow::Result<()> {
        let _ = pms.delete(pm_name, &DeleteParams::default()).await;
        let gone = || async { pms.get_opt(pm_name).await.ok()?.is_none().then_some(()) };
        let what = format!("PodMigration {pm_name} to go");
        if workload::until(&what, Duration::from_secs(120), &gone)
            .await
            .is_err()
        {
            eprintln!("faults: {pm_name} is not gone after 120 s; lifting its finalizer");
            let patch = serde_json::json!({"metadata": {"finalizers": null}});
            let _ = pms
                .patch(pm_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            workload::until(&what, Duration::from_secs(60), &gone).await?;
        }
        Ok(())
    }

    /// Deletes pods `names` and waits until they are gone.
    async fn clear_pods(&self, pods: &Api<Pod>, names: &[&str]) -> anyhow::Result<()> {
        for name in names {
            let _ = pods
                .delete(name, &DeleteParams::default().grace_period(0))
                .await;
        }
        workload::until(
            "the workload's pods to go",
            Duration::from_secs(120),
            || async {
                for name in names {
                    if pods.get_opt(name).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await?;
        Ok(())
    }

    /// Puts the `node.kubernetes.io/out-of-service` taint on the target node, or takes it off.
    async fn out_of_service(&self, node: &str, on: bool) -> anyhow::Result<()> {
        let taints = if on {
            serde_json::json!([{
                "key": "node.kubernetes.io/out-of-service",
                "value": "nodeshutdown",
                "effect": "NoExecute",
            }])
        } else {
            serde_json::json!(null)
        };
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"taints": taints}})),
            )
            .await?;
        Ok(())
    }

    /// Makes the target's store a 256 MiB file system of its own and restarts its agent on it.
    async fn small_store(&self, target: &Node) -> anyhow::Result<()> {
        run_in(
            target,
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "size=256m",
                "migros-fault",
                STORE_DIR,
            ],
        )?;
        self.restart_agent(target).await
    }

    /// Removes the small store and restarts the target's agent on the node's own.
    async fn whole_store(&self, target: &Node) -> anyhow::Result<()> {
        run_in(target, &["umount", "-l", STORE_DIR])?;
        self.restart_agent(target).await
    }

    /// Deletes the agent pod of `node`; waits until its successor is ready.
    async fn restart_agent(&self, node: &Node) -> anyhow::Result<()> {
        let old = self.agent_pod(&node.name).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), release::NAMESPACE);
        pods.delete(&old.name_any(), &DeleteParams::default())
            .await?;
        let old_uid = old.uid();
        workload::until(
            &format!("a new agent on {}", node.name),
            Duration::from_secs(120),
            || async {
                let now = self.agent_pod(&node.name).await.ok()?;
                (now.uid() != old_uid && ready(&now)).then_some(())
            },
        )
        .await?;
        Ok(())
    }

    /// The agent pod on `node`.
    async fn agent_pod(&self, node: &str) -> anyhow::Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), release::NAMESPACE);
        let list = pods
            .list(
                &ListParams::default()
                    .labels("app.kubernetes.io/component=agent")
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await?;
        list.items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
            .with_context(|| format!("no agent pod on {node}"))
    }

    /// The operator pod that holds the leader Lease.
    async fn leader_pod(&self) -> anyhow::Result<Pod> {
        let name = self.leader().await.context("no leader")?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), release::NAMESPACE);
        Ok(pods.get(&name).await?)
    }

    /// The holder of the leader Lease when it is a running, ready operator pod.
    async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), release::NAMESPACE);
        let holder = leases
            .get(&format!("{}-operator", release::RELEASE))
            .await
            .ok()?
            .spec?
            .holder_identity?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), release::NAMESPACE);
        let pod = pods.get_opt(&holder).await.ok()??;
        ready(&pod).then_some(holder)
    }
}

/// The demo workload and its peer, from run to run.
#[derive(Debug)]
struct Workload {
    app: String,
    peer: String,
    /// The mark in its process's environment.
    mark: String,
    ip: std::net::Ipv4Addr,
    /// Its pod now, and where it runs.
    uid: String,
    node: String,
}

/// Where one run moves the workload.
#[derive(Debug)]
struct Route {
    source: String,
    target: String,
}

/// The workload of one run as it started.
#[derive(Debug, Clone, Copy)]
struct Started<'a> {
    app: &'a str,
    mark: &'a str,
    ip: std::net::Ipv4Addr,
    before: &'a State,
    source: &'a str,
    source_uid: Option<&'a str>,
}

/// What a strike left to undo.
#[derive(Debug, Default)]
struct Heal {
    /// The pod whose containers were killed (it restarts them).
    restarted: Option<Pod>,
    link: bool,
    store: bool,
    kubelet: bool,
}

/// A short name of the scenario for object names (DNS labels).
fn short(fault: Fault) -> String {
    fault
        .name()
        .replace("kill-", "k-")
        .replace("source-agent", "src")
        .replace("target-agent", "tgt")
        .replace("target-node-gone", "gone")
        .replace(['@', '_'], "-")
}

/// The step a migration is at, from its status and the pods: what the operator keeps in memory
/// until its next write (a step done without a change of phase) shows in what it does to the pods.
fn step(pm: &PodMigration, pod: Option<&Pod>, source: &Pod) -> Option<At> {
    let status = pm.status.as_ref()?;
    let has = |t: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    let phase = status.phase?;
    if phase.is_final() {
        return None;
    }
    if has("Aborting") {
        return Some(At::Rollback);
    }
    let source_there = pod.is_some_and(|p| p.uid() == source.uid());
    let replacement = pod.is_some_and(|p| {
        p.annotations()
            .get("migros.io/migration-uid")
            .map(String::as_str)
            == pm.uid().as_deref()
    });
    Some(match phase {
        Phase::Pending | Phase::Preparing => At::Prepare,
        Phase::Checkpointing => At::Checkpoint,
        Phase::Transferring if has("Transferred") => At::Commit,
        Phase::Transferring => At::Transfer,
        // Past the commit point: the source pod goes once its containers are stopped for good,
        // then the target stages and the replacement is made.
        Phase::Restoring if source_there => At::Commit,
        Phase::Restoring if !replacement => At::Stage,
        Phase::Restoring => At::Restore,
        _ => return None,
    })
}

/// Whether a fault strikes now, late or not yet.
#[derive(Debug, PartialEq, Eq)]
enum Hit {
    Now,
    Late,
    NotYet,
}

/// At step `at` now; or past it without the watch seeing it (or over).
fn hit_step(now: Option<At>, at: At, phase: Phase) -> Hit {
    match now {
        Some(now) if now == at => Hit::Now,
        // A rollback step is only reached through its own cause.
        Some(now) if at != At::Rollback && now != At::Rollback && now > at => Hit::Late,
        None if phase.is_final() => Hit::Late,
        _ => Hit::NotYet,
    }
}

/// In phase `want` now; or past it.
fn hit_phase(phase: Phase, want: Phase) -> Hit {
    let rank = |p: Phase| match p {
        Phase::Pending => 0,
        Phase::Preparing => 1,
        Phase::Checkpointing => 2,
        Phase::Transferring => 3,
        Phase::Restoring => 4,
        Phase::CopyingMemory => 5,
        Phase::Succeeded | Phase::Failed | Phase::RolledBack => 6,
    };
    match rank(phase).cmp(&rank(want)) {
        std::cmp::Ordering::Equal => Hit::Now,
        std::cmp::Ordering::Greater => Hit::Late,
        std::cmp::Ordering::Less => Hit::NotYet,
    }
}

/// The workload's state at `ip` once it answers as the same process with its counter gone on,
/// within 30 s.
async fn answer(ip: std::net::Ipv4Addr, before: &State) -> Option<State> {
    let counter = num(before, "counter");
    let id = before.get("id").cloned();
    workload::until("the workload to answer", Duration::from_secs(30), || {
        let id = id.clone();
        async move {
            workload::state(ip)
                .await
                .filter(|s| s.get("id") == id.as_ref() && num(s, "counter") > counter)
        }
    })
    .await
    .ok()
}

/// A process of the workload, found by its mark.
#[derive(Debug)]
struct Copy {
    pid: i32,
    node: String,
    frozen: bool,
}

/// Every process on this machine whose environment holds `MARK=<mark>`: the workload of one run
/// (the container's process and its restored copies carry it), with its node (from its cgroup,
/// `/kube-migros-nodes/<node>/...`) and whether its freezer cgroup is frozen.
fn marked(mark: &str) -> Vec<Copy> {
    let want = format!("{MARK}={mark}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut copies = Vec::new();
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            continue;
        }
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let path_of = |controller: &str| {
            cgroups.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_string())
            })
        };
        let node = path_of("freezer")
            .or_else(|| path_of("memory"))
            .and_then(|p| {
                p.strip_prefix(&format!("/{}/", sandbox::nodes::NODE_CGROUP_PARENT))
                    .and_then(|rest| rest.split('/').next().map(str::to_string))
            })
            .unwrap_or_else(|| "?".into());
        let frozen = path_of("freezer").is_some_and(|p| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{p}/freezer.state"))
                .is_ok_and(|s| s.trim() != "THAWED")
        });
        copies.push(Copy { pid, node, frozen });
    }
    copies
}

/// SIGKILL of every process of pod `uid`'s containers (not its sandbox's pause process); answers
/// how many (the pods killed here, agents and operators, are never frozen).
fn kill_pod(uid: &str) -> usize {
    let want = format!("pod{uid}/");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let in_pod =
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&want));
        let pause =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pause");
        if in_pod && !pause {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed += 1;
        }
    }
    killed
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Runs `command` in `node`; an error with its output unless it succeeds.
fn run_in(node: &Node, command: &[&str]) -> anyhow::Result<()> {
    let out = node.exec(command)?;
    if !out.status.success() {
        bail!(
            "{} on {}: {}",
            command.join(" "),
            node.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One row of the table per scenario.
#[derive(Debug, Default)]
struct Row {
    runs: usize,
    moved: usize,
    stayed: usize,
    violated: usize,
    on_step: usize,
    seconds: Vec<f64>,
    violations: Vec<String>,
}

/// docs/reliability.md from the outcomes of a run.
pub fn report(outcomes: &[Outcome], runs: usize) -> String {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let order: Vec<String> = scenarios().into_iter().map(Fault::name).collect();
    for o in outcomes {
        let row = rows.entry(o.scenario.clone()).or_default();
        row.runs += 1;
        match o.result.as_str() {
            "moved" => row.moved += 1,
            "stayed" => row.stayed += 1,
            _ => {
                row.violated += 1;
                row.violations
                    .push(format!("run {}: {} ({})", o.run, o.detail, o.phase));
            }
        }
        row.on_step += usize::from(o.on_step);
        row.seconds.push(o.seconds);
    }
    let describe: BTreeMap<String, String> = scenarios()
        .into_iter()
        .map(|f| (f.name(), f.describe()))
        .collect();
    let mut md = String::new();
    md.push_str(&format!(
        "# Reliability: the fault matrix\n\n\
         Regenerate with `cargo run -p e2e -- faults` (`--runs 1` for one of each, as \
         CI does in `e2e/tests/faults.rs`). Written by the last run: {runs} run(s) per \
         scenario.\n\n\
         kube-migros is installed with its chart on the sandbox cluster (real kubelets, containerd, \
         runc and CRIU; see docs/sandbox.md). The demo workload ({TOUCH} of memory written, an \
         RDMA pod with its rxe block, a peer on node-3 streaming to it over TCP) moves between \
         node-1 and node-2, one migration per run, with `timeoutSeconds: {TIMEOUT_SECONDS}` and \
         `bandwidthLimit: {BANDWIDTH}` (so that the transfer lasts long enough to be hit), while \
         the fault strikes at the step it waits for, as the PodMigration and the pods show it. The \
         rollback scenarios get a rollback by a 10 s timeout during a transfer limited to 64Ki/s. \
         A workload goes on to the next run as long as it came through whole.\n\n\
         A run is judged by what runs afterwards, found on the machine rather than asked of the \
         operator: the processes carrying the workload's mark in their environment (a restored \
         process carries it too), their node (cgroup) and whether they are frozen; the workload \
         must answer at its pod IP as the same process with its counter gone on. It is judged \
         once the migration ended, and again after the fault was undone (a node that comes back \
         must not bring a second copy).\n\n\
         - **moved**: exactly one copy, running on the target (or the node that replaced a \
           target that went), same process, counter going on, IP kept.\n\
         - **stayed**: exactly one copy, the source pod, running as before.\n\
         - **violated**: anything else: no copy, two, one left paused, a changed IP or process.\n\n\
         *On step* counts the runs where the fault hit the step it waited for; otherwise it \
         struck at the first status seen after it (the step was over before the watch saw it). \
         *Time* runs from the fault until the outcome held (median and maximum).\n\n\
         | Scenario | Fault | Runs | On step | Moved | Stayed | Violated | Time (median / max) |\n\
         |---|---|---|---|---|---|---|---|\n"
    ));
    for name in order.iter().filter(|n| rows.contains_key(*n)) {
        let row = &rows[name];
        let mut s = row.seconds.clone();
        s.sort_by(f64::total_cmp);
        let median = s.get(s.len() / 2).copied().unwrap_or(f64::NAN);
        let max = s.last().copied().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} | {} | {} | {median:.1} s / {max:.1} s |\n",
            describe.get(name).map_or("", String::as_str),
            row.runs,
            row.on_step,
            row.moved,
            row.stayed,
            if row.violated > 0 {
                format!("**{}**", row.violated)
            } else {
                "0".into()
            },
        ));
    }
    let violations: Vec<(&String, &Row)> = order
        .iter()
        .filter_map(|n| rows.get(n).map(|r| (n, r)))
        .filter(|(_, r)| r.violated > 0)
        .collect();
    md.push_str("\n## Violations\n\n");
    if violations.is_empty() {
        md.push_str("None: every run ended with exactly one running copy.\n");
    }
    for (name, row) in violations {
        md.push_str(&format!("- `{name}`:\n"));
        for v in &row.violations {
            md.push_str(&format!("  - {v}\n"));
        }
    }
    md
}

/// `cargo run -p e2e -- faults`: runs the matrix and writes `out_dir/reliability.md` and
/// `out_dir/reliability.json`.
pub async fn run(
    dirs: &Dirs,
    runs: usize,
    only: &[String],
    out_dir: Option<PathBuf>,
) -> anyhow::Result<Vec<Outcome>> {
    let faults: Vec<Fault> = scenarios()
        .into_iter()
        .filter(|f| only.is_empty() || only.iter().any(|o| f.name().contains(o.as_str())))
        .collect();
    if faults.is_empty() {
        bail!("no scenario matches {only:?}");
    }
    let matrix = Matrix::install(dirs).await?;
    let outcomes = matrix.run(&faults, runs).await?;
    if let Some(dir) = out_dir {
        std::fs::write(dir.join("reliability.md"), report(&outcomes, runs))?;
        std::fs::write(
            dir.join("reliability.json"),
            serde_json::to_string_pretty(&outcomes)?,
        )?;
    }
    Ok(outcomes)
}
