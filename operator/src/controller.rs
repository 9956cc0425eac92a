//! The PodMigration controller: observes the migration, its pod, the nodes and the agents, asks the
//! state machine what to do, does it (agent call, pod delete or create, status write) and records
//! every step in the status, so that a restarted operator resumes where the last one stopped.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_api::{Role, Step, StepArgs, v1};
use crds::{Compression, Phase, PodMigration, PodMigrationStatus, Strategy};
use futures::{StreamExt, future::join_all};
use k8s_openapi::{
    api::core::v1::{Node, PersistentVolumeClaim, Pod},
    api::node::v1::RuntimeClass,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action as Requeue,
        events::{Event, EventType, Recorder},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    admission::Policy,
    agents::Agents,
    claims::{Claim, Claims},
    metrics::Metrics,
    movable, network,
    queue::{self, Admission, Limits, Queue},
    replacement::{self, Restore},
    rxe_blocks,
    statemachine::{self, Action, Answer, Facts, PodFacts, Target},
    strategy,
    targets::{self, Candidate},
};

/// Finalizer that lets the operator roll back or clean up before a PodMigration goes away.
pub const FINALIZER: &str = "migros.io/cleanup";
/// Field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "kube-migros-operator";
/// Steps one reconcile performs before yielding to other objects.
const STEPS_PER_RECONCILE: usize = 16;

/// The restore backends the operator may choose, beyond what the agents offer.
#[derive(Debug, Clone)]
pub struct Backends {
    /// The RuntimeClass of replacement pods restored by the runtime wrapper.
    pub runtime_class: String,
    /// Whether the checkpoint-image backend may be chosen (it restores on every restart).
    pub checkpoint_images: bool,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub agents: Agents,
    pub rxe: rxe_blocks::Allocator,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub backends: Backends,
    /// One migration per pod.
    pub claims: Claims,
    /// Which pods may be migrated.
    pub policy: Policy,
    /// How many migrations may be in flight, and which waiting one starts next.
    pub queue: Queue,
    /// Every pod of the cluster as watched: what target choice counts as used on each node.
    pods: reflector::Store<Pod>,
    /// Every Node, as watched: target choice reads them from here.
    nodes: reflector::Store<Node>,
    /// Every RuntimeClass, as watched: whether the runtime wrapper's exists.
    runtime_classes: reflector::Store<RuntimeClass>,
    watches: Vec<tokio::task::JoinHandle<()>>,
    /// What this operator knows of each migration it drives (by UID): its last write, results
    /// not written yet, and what its pod's watched copy should show. See [`Known`].
    known: Mutex<HashMap<String, Known>>,
    /// Consecutive transient failures per migration UID, for per-object back-off.
    failures: Mutex<HashMap<String, u32>>,
    /// UIDs of migrations not yet in a final phase (the `active` gauge).
    active: Mutex<BTreeSet<String>>,
}

/// What the operator knows of a migration beyond its watched copy.
///
/// A PodMigration is written by this operator alone (its spec is immutable; users only delete
/// it), so its last write is its state: the watch, which may lag behind, is not read again
/// (`drive`). A step that succeeded without changing the phase is kept here rather than written at
/// once, and goes out with the next write (the next phase at the latest): every agent step is
/// idempotent, so an operator that stopped before writing it asks again and gets the same answer
/// (docs/operator.md, "What a migration costs the API server").
#[derive(Default)]
struct Known {
    /// The migration as last written, with the results not written yet in its status.
    pm: Option<PodMigration>,
    /// Since when results wait to be written.
    unwritten_since: Option<std::time::Instant>,
    /// When this operator last wrote the status.
    written_at: Option<std::time::Instant>,
    /// What this operator last did to the migration's pod, until the watch shows it.
    pod: Option<Expected>,
}

/// A change of a migration's pod this operator made that the watched copy may not show yet (the
/// pattern of the ReplicaSet controller's expectations).
#[derive(Clone)]
enum Expected {
    /// The pod of this UID was deleted.
    Gone(String),
    /// This pod was created.
    Created(Box<Pod>),
}

/// How often at most a transfer's progress (or a post-copy's memory) is written while it runs.
/// A running step answers after the agent's quick-answer wait (2 s by default), so each answer
/// that moved is written: a progress display shows it every few seconds.
const PROGRESS_EVERY: Duration = Duration::from_millis(1500);

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        agents: Agents,
        rxe: rxe_blocks::Allocator,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        backends: Backends,
        claims: Claims,
    ) -> Self {
        let (pods, pods_watch) = watched(Api::<Pod>::all(client.clone()));
        let (nodes, nodes_watch) = watched(Api::<Node>::all(client.clone()));
        let (runtime_classes, runtime_classes_watch) =
            watched(Api::<RuntimeClass>::all(client.clone()));
        Self {
            client,
            agents,
            rxe,
            metrics,
            recorder,
            backends,
            claims,
            policy: Policy::default(),
            queue: Queue::new(Limits::default()),
            pods,
            nodes,
            runtime_classes,
            watches: vec![pods_watch, nodes_watch, runtime_classes_watch],
            known: Mutex::default(),
            failures: Mutex::default(),
            active: Mutex::default(),
        }
    }
}

/// A store of every `K` kept by a watch that runs until the handle is aborted.
fn watched<K>(api: Api<K>) -> (reflector::Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let events =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    (
        store,
        tokio::spawn(events.for_each(|_| futures::future::ready(()))),
    )
}

impl Context {
    /// Migrates, besides the labelled pods, those `policy` names.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Bounds the migrations in flight by `limits`.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.queue = Queue::new(limits);
        self
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

/// PodMigrations reconciled at the same time, at most.
pub const RECONCILE_CONCURRENCY: u16 = 32;

/// Runs the controller until `shutdown` resolves. `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (api, pods): (Api<PodMigration>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    if let Err(e) = ctx.claims.tidy(&api).await {
        warn!(error = %e, "could not tidy the pods' claims");
    }
    let controller = Controller::new(api, watcher::Config::default());
    ctx.queue.watch(controller.store());
    let forgetting = tokio::spawn(forget_the_gone(ctx.clone(), controller.store()));
    controller
        // Reconciles at once are bounded: a thousand at once held a thousand listings in memory.
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        // A replacement pod names its migration: a change to it (scheduled, running, failed)
        // wakes the migration at once instead of at its next poll.
        .watches(pods, watcher::Config::default(), |pod: Pod| {
            let name = pod
                .annotations()
                .get(replacement::MIGRATION_ANNOTATION)
                .cloned();
            name.zip(pod.namespace())
                .map(|(name, ns)| ObjectRef::<PodMigration>::new(&name).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    forgetting.abort();
}

/// How often what the operator keeps per migration is checked against the migrations that exist.
const FORGET_EVERY: Duration = Duration::from_secs(30);

/// Forgets, now and then, what is kept for migrations that are gone without a last reconcile (a
/// migration deleted before it started has no finalizer, so none comes), and gives back their
/// pods' claims.
async fn forget_the_gone(ctx: Arc<Context>, store: reflector::Store<PodMigration>) {
    loop {
        tokio::time::sleep(FORGET_EVERY).await;
        if futures::FutureExt::now_or_never(store.wait_until_ready()).is_none() {
            continue;
        }
        let alive: BTreeSet<String> = store.state().iter().filter_map(|pm| pm.uid()).collect();
        if let Ok(mut known) = ctx.known.lock() {
            known.retain(|uid, _| alive.contains(uid));
        }
        if let Ok(mut failures) = ctx.failures.lock() {
            failures.retain(|uid, _| alive.contains(uid));
        }
        if let Ok(mut active) = ctx.active.lock() {
            active.retain(|uid| alive.contains(uid));
            ctx.metrics.set_active(active.len());
        }
        ctx.metrics.forget_gone(&alive);
        ctx.claims.release_gone(&alive).await;
    }
}

async fn reconcile(pm: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Requeue> {
    let ns = pm
        .namespace()
        .ok_or_else(|| Error::Invalid(pm.name_any()))?;
    let name = format!("{ns}/{}", pm.name_any());
    let phase = pm.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    let span = info_span!("reconcile", migration = %name, phase = ?phase);
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = pm.uid().unwrap_or_default();
    let result = async {
        let ours = pm.finalizers().iter().position(|f| f == FINALIZER);
        match (pm.metadata.deletion_timestamp.is_some(), ours) {
            (false, _) => drive(pm, &ctx, false).await,
            (true, Some(at)) => {
                let requeue = drive(pm.clone(), &ctx, true).await?;
                remove_finalizer(&api, &pm, at).await?;
                Ok(requeue)
            }
            // Deleted before it started (the finalizer comes with the start): nothing to undo.
            (true, None) => Ok(Requeue::await_change()),
        }
    }
    .instrument(span)
    .await;
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&uid);
    }
    result
}

/// Lets go of a deleted migration whose cleanup is done: removes the finalizer at `at`, if it is
/// still there.
async fn remove_finalizer(api: &Api<PodMigration>, pm: &PodMigration, at: usize) -> Result<()> {
    let path = format!("/metadata/finalizers/{at}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))?;
    match api
        .patch::<PodMigration>(&pm.name_any(), &PatchParams::default(), &Patch::Json(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Backs off per object on transient errors; waits for a change on invalid objects.
fn error_policy(pm: Arc<PodMigration>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_error(error.metric_label());
    match error.kind() {
        crate::ErrorKind::Invalid => Requeue::await_change(),
        crate::ErrorKind::Pending => Requeue::requeue(Duration::from_secs(1)),
        crate::ErrorKind::Transient => {
            let uid = pm.uid().unwrap_or_default();
            let attempt = ctx.failures.lock().map_or(1, |mut f| {
                let n = f.entry(uid).or_default();
                *n = n.saturating_add(1);
                *n
            });
            let delay = Duration::from_millis(250u64.saturating_mul(1 << attempt.min(8)))
                .min(Duration::from_secs(60));
            warn!(migration = %pm.name_any(), %error, attempt, "reconcile failed; retrying in {delay:?}");
            Requeue::requeue(delay)
        }
    }
}

// One value lives per reconcile step: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Written (or nothing to write): go on with this.
    Continue(PodMigration),
    /// A result kept in memory, written with the next write ([`Known`]); look again after this
    /// long.
    Kept(PodMigration, Duration),
    /// Look again after this long, with the migration as it is now (as just written, if so).
    Requeue(PodMigration, Duration),
    Done,
}

/// Performs steps until the state machine has to wait, or the migration is over.
async fn drive(watched: Arc<PodMigration>, ctx: &Context, cleanup: bool) -> Result<Requeue> {
    let uid = watched.uid().unwrap_or_default();
    let (known, mut unwritten_since) = ctx.known_migration(&uid);
    let mut pm = match known {
        // This operator's last write, and what it has not written yet: newer than the watch
        // (which shows the same version, or lags behind) unless the migration is being deleted
        // since; then it is read again, and results not written are asked for again.
        Some(known)
            if watched.metadata.deletion_timestamp.is_none()
                || known.metadata.deletion_timestamp.is_some() =>
        {
            known
        }
        Some(_) => {
            unwritten_since = None;
            let api: Api<PodMigration> =
                Api::namespaced(ctx.client.clone(), &watched.namespace().unwrap_or_default());
            let Some(stored) = api.get_opt(&watched.name_any()).await? else {
                return Ok(Requeue::await_change());
            };
            ctx.remember(&uid, &stored, None);
            stored
        }
        None => (*watched).clone(),
    };
    let mut requeue = Requeue::requeue(Duration::ZERO);
    let mut over = false;
    let mut settled = false;
    for _ in 0..STEPS_PER_RECONCILE {
        let facts = observe(&pm, ctx).await?;
        let action = statemachine::next(&facts);
        track_active(ctx, &pm, &facts);
        if action == Action::DeleteSourcePod && unwritten_since.is_some() {
            // The source's stop is written before its pod goes: an operator that takes over
            // must not need the source's agent (its node may be going away) to go on.
            pm = write_status(&pm, facts.status.phase, facts.status.clone(), None, ctx).await?;
            unwritten_since = None;
        }
        match execute(&pm, &facts, action, ctx).await? {
            Next::Continue(updated) => {
                if updated.resource_version() != pm.resource_version() {
                    unwritten_since = None;
                }
                pm = updated;
            }
            Next::Kept(updated, after) => {
                unwritten_since.get_or_insert_with(std::time::Instant::now);
                pm = updated;
                if !after.is_zero() && cleanup {
                    ctx.remember(&uid, &pm, unwritten_since);
                    return Err(Error::CleanupPending(pm.name_any()));
                }
                if !after.is_zero() {
                    requeue = Requeue::requeue(after);
                    break;
                }
            }
            Next::Requeue(updated, after) => {
                if updated.resource_version() != pm.resource_version() {
                    unwritten_since = None;
                }
                pm = updated;
                requeue = Requeue::requeue(after);
                break;
            }
            Next::Done => {
                // Results of a final migration's last steps (the target released) are written
                // before it is let go; a deleted one's go with its finalizer.
                if unwritten_since.is_some()
                    && !facts.deleting
                    && let Some(status) = pm.status.clone()
                {
                    pm = write_status(&pm, facts.status.phase, status, None, ctx).await?;
                    unwritten_since = None;
                }
                settled = true;
                // A deletion seen in a run that was not the cleanup: the cleanup run comes and
                // starts from what is known here.
                over = if cleanup {
                    true
                } else {
                    !facts.deleting && facts.status.phase.is_some_and(Phase::is_final)
                };
                requeue = Requeue::await_change();
                break;
            }
        }
    }
    if over {
        ctx.forget(&uid);
        return Ok(requeue);
    }
    // The finalizer stays until the cleanup is done; the error policy looks again soon.
    if cleanup && !settled {
        ctx.remember(&uid, &pm, unwritten_since);
        return Err(Error::CleanupPending(pm.name_any()));
    }
    // A transfer's progress (or a post-copy's memory) kept while it runs is written, at most
    // every PROGRESS_EVERY, so that its status shows it.
    let progress = |pm: &PodMigration| {
        pm.status
            .as_ref()
            .map(|s| (s.progress, s.memory.as_ref().map(|m| m.bytes_transferred)))
    };
    if unwritten_since.is_some()
        && ctx
            .written_at(&uid)
            .is_none_or(|at| at.elapsed() >= PROGRESS_EVERY)
        && progress(&pm) != progress(&watched)
        && let Some(status) = pm.status.clone()
    {
        let phase = status.phase;
        write_status(&pm, phase, status, None, ctx).await?;
    } else if unwritten_since.is_some() {
        ctx.remember(&uid, &pm, unwritten_since);
    }
    Ok(requeue)
}

impl Context {
    /// The migration as this operator last knew it, and since when results wait to be written.
    fn known_migration(&self, uid: &str) -> (Option<PodMigration>, Option<std::time::Instant>) {
        self.known
            .lock()
            .ok()
            .and_then(|known| {
                let k = known.get(uid)?;
                Some((k.pm.clone(), k.unwritten_since))
            })
            .unwrap_or_default()
    }

    /// Remembers `pm` as this operator knows it now (`unwritten_since`: with results not written
    /// since then; none when it was just written or read).
    fn remember(&self, uid: &str, pm: &PodMigration, unwritten_since: Option<std::time::Instant>) {
        if let Ok(mut known) = self.known.lock() {
            let k = known.entry(uid.to_string()).or_default();
            k.pm = Some(pm.clone());
            k.unwritten_since = unwritten_since;
        }
    }

    /// When this operator last wrote migration `uid`'s status.
    fn written_at(&self, uid: &str) -> Option<std::time::Instant> {
        self.known.lock().ok()?.get(uid)?.written_at
    }

    /// Forgets a migration that is over.
    fn forget(&self, uid: &str) {
        if let Ok(mut known) = self.known.lock() {
            known.remove(uid);
        }
    }

    /// Remembers a change of the pod of migration `uid` until the watch shows it.
    fn expect(&self, uid: &str, expected: Expected) {
        if let Ok(mut known) = self.known.lock() {
            known.entry(uid.to_string()).or_default().pod = Some(expected);
        }
    }

    /// The pod of migration `uid` as this operator knows it: the watched copy (`watched`), unless
    /// it does not show this operator's last change yet.
    fn expected_pod(&self, uid: &str, watched: Option<Pod>) -> Option<Pod> {
        let Ok(mut known) = self.known.lock() else {
            return watched;
        };
        let Some(k) = known.get_mut(uid) else {
            return watched;
        };
        let shown = match (&k.pod, &watched) {
            (None, _) => return watched,
            (Some(Expected::Gone(gone)), Some(pod)) if pod.uid().as_ref() == Some(gone) => {
                return None;
            }
            (Some(Expected::Created(created)), Some(pod)) if pod.uid() != created.uid() => {
                return Some((**created).clone());
            }
            (Some(Expected::Created(created)), None) => return Some((**created).clone()),
            // The watch shows the change.
            (Some(_), _) => watched,
        };
        k.pod = None;
        shown
    }
}

fn track_active(ctx: &Context, pm: &PodMigration, f: &Facts) {
    let finished = f.status.phase.is_some_and(Phase::is_final);
    let final_or_gone = finished || f.deleting;
    // A deleted migration still in flight (rolling back, or restoring past its commit point)
    // keeps its series until it ends: it can be stuck too.
    let namespace = pm.namespace().unwrap_or_default();
    ctx.metrics.in_phase(
        &f.uid,
        (!finished).then_some((namespace.as_str(), pm.name_any().as_str(), &f.status)),
    );
    if let Ok(mut active) = ctx.active.lock() {
        if final_or_gone {
            active.remove(&f.uid)
        } else {
            active.insert(f.uid.clone())
        };
        ctx.metrics.set_active(active.len());
    }
}

/// What the state machine decides on. The pod is the watched copy, with the changes this
/// operator made that the watch does not show yet ([`Context::expected_pod`]); it is read from
/// the API server before the pods are watched, and before a start when the watched copy would
/// refuse it (a pod just made Running may not be watched as such yet).
async fn observe(pm: &PodMigration, ctx: &Context) -> Result<Facts> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = pm.uid().unwrap_or_default();
    let starting = pm
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_none_or(|p| p == Phase::Pending);
    let watching = futures::FutureExt::now_or_never(ctx.pods.wait_until_ready())
        .is_some_and(|ready| ready.is_ok());
    let cached = watching
        .then(|| ctx.pods.get(&ObjectRef::new(&pm.spec.pod_name).within(&ns)))
        .flatten()
        .map(|pod| (*pod).clone());
    let startable = |pod: &Pod| {
        let f = pod_facts(pod, &ctx.policy);
        f.running() && f.migratable
    };
    let pod = match cached {
        Some(pod) if starting && !startable(&pod) => pods.get_opt(&pm.spec.pod_name).await?,
        None if starting || !watching => pods.get_opt(&pm.spec.pod_name).await?,
        cached => ctx.expected_pod(&uid, cached),
    };
    let mut status = pm.status.clone().unwrap_or_default();
    status.observed_generation = pm.metadata.generation;
    let mut facts = Facts {
        uid: pm.uid().unwrap_or_default(),
        now: Timestamp::now(),
        created: pm
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(Timestamp::now, |t| t.0),
        deleting: pm.metadata.deletion_timestamp.is_some(),
        spec: pm.spec.clone(),
        status,
        pod: pod.as_ref().map(|p| pod_facts(p, &ctx.policy)),
        target: None,
        strategy: None,
        rxe: None,
        template_changed: false,
        target_gone: None,
    };
    if let Some(recorded) = facts.status.template_digest.as_deref() {
        facts.template_changed = replacement::template_digest(pm).as_deref() != Some(recorded);
    }
    let pending = facts.status.phase.unwrap_or_default() == Phase::Pending;
    let startable = facts
        .pod
        .as_ref()
        .is_some_and(|p| p.migratable && p.phase.as_deref() == Some("Running"));
    if pending && !facts.deleting && startable {
        if let (Some(pod), Some(pf)) = (&pod, facts.pod.as_mut()) {
            pf.unmovable = movable::why_not(pod, &claims_of(pod, &ns, ctx).await?);
            // A pod whose address could not be kept would fail only at its replacement, past
            // the commit point: the reservation is tried on a copy now, before anything.
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
            if pf.unmovable.is_none()
                && pm.spec.network.keep_ip
                && let Some(ip) = ip
            {
                pf.unmovable = network::cannot_keep(pm.spec.network.mechanism, pod, ip)
                    .map(|why| format!("its address cannot be kept on the target: {why}"));
            }
        }
        if let (Some(pod), Some(pf)) = (&pod, &facts.pod) {
            let post_copy = pm.spec.strategy == Strategy::PostCopy;
            let choice = Choice {
                source: pf.node.as_deref().unwrap_or_default(),
                rdma: pf.rdma,
                named: pm.spec.target_node.as_deref(),
                avoid: None,
                // Only the runtime wrapper restores a process whose memory is still to come.
                backend: post_copy.then_some(agent_api::backend::RUNTIME_WRAPPER),
                strategy: pm.spec.strategy,
            };
            // Each agent is asked once for both judgements.
            let asked = Asked::default();
            facts.target = Some(choose_target(pod, choice, &asked, ctx).await?);
            if pm.spec.strategy != Strategy::StopAndCopy {
                let source = pf.node.as_deref().unwrap_or_default();
                let named = pm.spec.target_node.as_deref();
                facts.strategy =
                    Some(strategy_support(pm.spec.strategy, source, named, &asked, ctx).await?);
            }
            if pf.rdma {
                facts.rxe = ctx
                    .rxe
                    .find(&ns, &pm.spec.pod_name)
                    .await?
                    .map(|block| block.spec.ranges());
            }
        }
    }
    let restoring = matches!(
        facts.status.phase,
        Some(Phase::Restoring | Phase::CopyingMemory)
    ) && facts.status.committed;
    if restoring
        && let Some(target) = facts.status.target_node.clone()
        && let Some(why) = target_gone(&target, ctx).await?
    {
        if pm.spec.strategy == Strategy::PostCopy {
            // The memory left on the source goes to that target only: no other node is chosen.
            facts.target_gone = Some(why);
            return Ok(facts);
        }
        // Another node, chosen for the pod as the source had it (its template).
        let template = template_of(pm)?;
        let choice = Choice {
            source: facts.status.source_node.as_deref().unwrap_or_default(),
            rdma: template
                .labels()
                .get(crds::RDMA_LABEL)
                .is_some_and(|v| v == "true"),
            named: None,
            avoid: Some(&target),
            // The checkpoint was taken for this backend (the runtime wrapper's is a task
            // directory the CRI backends cannot restore).
            backend: facts.status.backend.as_deref(),
            strategy: Strategy::StopAndCopy,
        };
        facts.target = Some(choose_target(&template, choice, &Asked::default(), ctx).await?);
        facts.target_gone = Some(why);
    }
    Ok(facts)
}

/// Why node `name` is gone for good, if it is: its Node object was deleted, or it carries the
/// `node.kubernetes.io/out-of-service` taint, which says that whoever shut it down made sure that
/// nothing of it runs any more (Kubernetes' non-graceful node shutdown). A node that is only
/// NotReady or unreachable may still run the pod: it is waited for.
async fn target_gone(name: &str, ctx: &Context) -> Result<Option<String>> {
    // From the watch while it says the node is there and in service; read to be sure otherwise.
    let watched = futures::FutureExt::now_or_never(ctx.nodes.wait_until_ready())
        .is_some_and(|ready| ready.is_ok());
    let cached = watched
        .then(|| ctx.nodes.get(&ObjectRef::new(name)))
        .flatten();
    let node = match cached {
        Some(node) if !out_of_service(&node) => return Ok(None),
        _ => Api::<Node>::all(ctx.client.clone()).get_opt(name).await?,
    };
    Ok(match node {
        None => Some(format!("target node {name} was deleted")),
        Some(node) if out_of_service(&node) => Some(format!(
            "target node {name} is out of service ({OUT_OF_SERVICE_TAINT})"
        )),
        Some(_) => None,
    })
}

/// Whether `node` carries the out-of-service taint.
fn out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT))
}

/// The taint that marks a node shut down for good (Kubernetes' non-graceful node shutdown).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

fn pod_facts(pod: &Pod, policy: &Policy) -> PodFacts {
    let label = |key: &str| pod.labels().get(key).is_some_and(|v| v == "true");
    let status = pod.status.as_ref();
    PodFacts {
        uid: pod.uid().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        phase: status.and_then(|s| s.phase.clone()),
        ip: status.and_then(|s| s.pod_ip.clone()),
        migratable: policy.migratable(pod),
        unmovable: None,
        rdma: label(crds::RDMA_LABEL),
        created_by_migration: pod
            .annotations()
            .get(replacement::MIGRATION_UID_ANNOTATION)
            .cloned(),
        deleting: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// The PersistentVolumeClaims `pod`'s volumes name, those that exist.
async fn claims_of(pod: &Pod, ns: &str, ctx: &Context) -> Result<Vec<PersistentVolumeClaim>> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut claims = Vec::new();
    for name in movable::claim_names(pod) {
        claims.extend(api.get_opt(&name).await?);
    }
    Ok(claims)
}

/// Whether `strategy` can run from `source` to `named` (or to any node with a live agent), as
/// the agents report their nodes.
async fn strategy_support(
    strategy: Strategy,
    source: &str,
    named: Option<&str>,
    asked: &Asked,
    ctx: &Context,
) -> Result<Result<(), String>> {
    let live = ctx.agents.live().await?;
    let targets: Vec<&str> = match named {
        Some(node) => vec![node],
        None => live
            .keys()
            .map(String::as_str)
            .filter(|n| *n != source)
            .collect(),
    };
    let from = asked.of(source, &live, ctx).await;
    let to = join_all(targets.iter().map(|node| asked.of(node, &live, ctx))).await;
    let to: Vec<strategy::Node<'_>> = targets
        .iter()
        .copied()
        .zip(to.iter().map(Option::as_ref))
        .collect();
    Ok(strategy::support(strategy, (source, from.as_ref()), &to))
}

/// What the agents reported of their nodes during one look at a migration: each agent is asked
/// once, whoever needs its answer (the target's choice, the strategy's judgement).
#[derive(Default)]
struct Asked(tokio::sync::Mutex<BTreeMap<String, Option<v1::NodeCapabilities>>>);

impl Asked {
    /// What the agent of `node` reports (`None`: no live agent in `live`, or no answer).
    async fn of(
        &self,
        node: &str,
        live: &BTreeMap<String, String>,
        ctx: &Context,
    ) -> Option<v1::NodeCapabilities> {
        if let Some(known) = self.0.lock().await.get(node) {
            return known.clone();
        }
        let got = match live.get(node) {
            Some(endpoint) => ctx.agents.capabilities(node, endpoint).await.ok(),
            None => None,
        };
        self.0.lock().await.insert(node.to_string(), got.clone());
        got
    }
}

/// Where a migration may go.
struct Choice<'a> {
    /// The node the pod comes from.
    source: &'a str,
    rdma: bool,
    /// This node only (`spec.targetNode`), or any.
    named: Option<&'a str>,
    /// Never this one (a target that went after the commit).
    avoid: Option<&'a str>,
    /// Only with this restore backend (the one a checkpoint was taken for, or the one a strategy
    /// needs).
    backend: Option<&'a str>,
    /// Only a node whose agent reports what this strategy needs (`strategy::lacks`).
    strategy: Strategy,
}

async fn choose_target(
    pod: &Pod,
    choice: Choice<'_>,
    asked: &Asked,
    ctx: &Context,
) -> Result<Result<Target, String>> {
    let source = choice.source.to_string();
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let nodes = match choice.named {
        Some(name) => match nodes_api.get_opt(name).await? {
            Some(node) => vec![node],
            None => return Ok(Err(format!("target node {name} does not exist"))),
        },
        // Any node: as watched (a node named explicitly is read, so that its state is exact).
        None => {
            let watched =
                tokio::time::timeout(Duration::from_secs(2), ctx.nodes.wait_until_ready())
                    .await
                    .is_ok_and(|ready| ready.is_ok());
            let all = if watched {
                ctx.nodes.state().iter().map(|n| (**n).clone()).collect()
            } else {
                nodes_api.list(&ListParams::default()).await?.items
            };
            all.into_iter()
                .filter(|n| choice.avoid.is_none_or(|avoid| n.name_any() != avoid))
                .filter(|n| !out_of_service(n))
                .collect()
        }
    };
    let runtime_class =
        match futures::FutureExt::now_or_never(ctx.runtime_classes.wait_until_ready()) {
            Some(Ok(())) => ctx
                .runtime_classes
                .get(&ObjectRef::new(&ctx.backends.runtime_class))
                .is_some(),
            _ => Api::<RuntimeClass>::all(ctx.client.clone())
                .get_opt(&ctx.backends.runtime_class)
                .await?
                .is_some(),
        };
    let mut backends = targets::usable_backends(runtime_class, ctx.backends.checkpoint_images);
    if let Some(only) = choice.backend {
        backends.retain(|b| *b == only);
    }
    if backends.is_empty() && choice.strategy == Strategy::PostCopy {
        return Ok(Err(format!(
            "PostCopy restores only with the runtime-wrapper backend, and the cluster has no \
             RuntimeClass {} for it",
            ctx.backends.runtime_class
        )));
    }
    if movable::has_empty_dir(pod) {
        // Only the runtime wrapper carries emptyDir content (the checkpoint images do not).
        backends.retain(|b| *b == agent_api::backend::RUNTIME_WRAPPER);
        if backends.is_empty() {
            return Ok(Err(format!(
                "pod {} has emptyDir volumes, whose content moves only with the runtime-wrapper \
                 restore backend, and its RuntimeClass {} does not exist",
                pod.name_any(),
                ctx.backends.runtime_class
            )));
        }
    }
    let live = ctx.agents.live().await?;
    let names: Vec<String> = nodes.iter().map(ResourceExt::name_any).collect();
    let capabilities = join_all(names.iter().map(|name| asked.of(name, &live, ctx))).await;
    // A strategy beyond stop-and-copy: only the nodes that can do it (whether any can, and why
    // not, is the strategy check's to say).
    let (nodes, capabilities): (Vec<Node>, Vec<Option<v1::NodeCapabilities>>) = nodes
        .into_iter()
        .zip(capabilities)
        .filter(|(_, agent)| {
            agent
                .as_ref()
                .is_some_and(|a| strategy::lacks(choice.strategy, a).is_none())
                || choice.strategy == Strategy::StopAndCopy
        })
        .unzip();
    if nodes.is_empty() && choice.strategy != Strategy::StopAndCopy {
        return Ok(Err(format!(
            "no node that can take the pod can do {}",
            choice.strategy.as_str()
        )));
    }
    let all_pods: Api<Pod> = Api::all(ctx.client.clone());
    let mut used = Vec::with_capacity(nodes.len());
    // Pods on their way to a node take room there already (until their replacement is watched).
    let replaced: BTreeSet<String> = ctx
        .pods
        .state()
        .iter()
        .filter_map(|p| {
            p.annotations()
                .get(replacement::MIGRATION_UID_ANNOTATION)
                .cloned()
        })
        .collect();
    let arriving: Vec<(String, Pod)> = ctx
        .queue
        .arriving()
        .into_iter()
        .filter(|(uid, _, _)| !replaced.contains(uid))
        .map(|(_, target, template)| (target, template))
        .collect();
    let arriving_at = |node: String| {
        arriving
            .iter()
            .filter(move |(target, _)| *target == node)
            .map(|(_, pod)| pod)
    };
    let cached = tokio::time::timeout(Duration::from_secs(2), ctx.pods.wait_until_ready())
        .await
        .is_ok_and(|ready| ready.is_ok());
    if cached {
        let pods = ctx.pods.state();
        for node in &nodes {
            let name = node.name_any();
            used.push(targets::used_by(
                pods.iter()
                    .map(AsRef::as_ref)
                    .filter(|p: &&Pod| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                    })
                    .chain(arriving_at(name.clone())),
            ));
        }
    } else if let [node] = nodes.as_slice() {
        let on_node = all_pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", node.name_any())))
            .await?;
        used.push(targets::used_by(
            on_node.items.iter().chain(arriving_at(node.name_any())),
        ));
    } else {
        // One listing of the bound, unfinished pods rather than one per node.
        let bound = all_pods
            .list(
                &ListParams::default()
                    .fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"),
            )
            .await?;
        for node in &nodes {
            let name = node.name_any();
            used.push(targets::used_by(
                bound
                    .items
                    .iter()
                    .filter(|p| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                    })
                    .chain(arriving_at(name.clone())),
            ));
        }
    }
    let candidates: Vec<Candidate<'_>> = nodes
        .iter()
        .zip(used)
        .zip(&capabilities)
        .map(|((node, used), agent)| Candidate {
            node,
            used,
            agent: agent.as_ref(),
            backends: &backends,
        })
        .collect();
    let node = match choice.named {
        Some(name) => targets::check(pod, &source, &candidates[0], choice.rdma)
            .map(|()| name.to_string())
            .map_err(|why| format!("target node {name} {why}")),
        None => targets::choose(pod, &source, &candidates, choice.rdma),
    };
    // A node fits only with a backend (`targets::check`).
    Ok(node.map(|node| {
        let agent = candidates
            .iter()
            .find(|c| c.node.metadata.name.as_deref() == Some(node.as_str()))
            .and_then(|c| c.agent);
        Target {
            backend: agent
                .and_then(|a| targets::backend(a, &backends))
                .unwrap_or_default()
                .into(),
            node,
        }
    }))
}

/// Leaves Pending with `status`: only the migration that holds the pod's claim does (another
/// that holds it fails this one as `PodBusy`), and only when the limits on migrations in flight
/// let it (it waits in the queue, holding the claim, otherwise).
async fn start(
    pm: &PodMigration,
    f: &Facts,
    status: PodMigrationStatus,
    pods: &Api<Pod>,
    ctx: &Context,
) -> Result<Next> {
    match ctx.claims.acquire(pm).await? {
        Claim::Held => {}
        Claim::Contended => return Ok(Next::Requeue(pm.clone(), Duration::from_millis(200))),
        Claim::Busy(other) => {
            let failed = statemachine::busy(f, &other);
            return Ok(Next::Continue(
                write_status(pm, f.status.phase, failed, None, ctx).await?,
            ));
        }
    }
    let me = queue::Entry {
        source: status.source_node.clone(),
        target: status.target_node.clone(),
        ..queue::entry(pm)
    };
    let admission = ctx.queue.admit(pm, me, |other| {
        let pod = ObjectRef::<Pod>::new(&other.spec.pod_name).within(&other.namespace()?);
        ctx.pods.get(&pod)?.spec.as_ref()?.node_name.clone()
    });
    if let Admission::Queued {
        position,
        waiting,
        why,
    } = admission
    {
        let message = format!("queued: {position} of {waiting} waiting to start ({why})");
        // The further back, the less often it looks.
        let poll = QUEUE_POLL.saturating_mul(
            u32::try_from(position.div_ceil(4))
                .unwrap_or(10)
                .clamp(1, 10),
        );
        let now = if f.status.message.as_deref() == Some(message.as_str()) {
            pm.clone()
        } else {
            let queued = statemachine::queued(f, &message);
            write_status(pm, f.status.phase, queued, None, ctx).await?
        };
        return Ok(Next::Requeue(now, poll));
    }
    // Admitted: the slot is held from here; given back if the start cannot be written.
    let started = async {
        let Some(updated) = keep_template(pm, status.source_pod_uid.as_deref(), pods, ctx).await?
        else {
            // The pod went meanwhile: the next look fails the migration (PodNotFound).
            return Ok(None);
        };
        let status = PodMigrationStatus {
            template_digest: replacement::template_digest(&updated),
            ..status
        };
        write_status(&updated, f.status.phase, status, None, ctx)
            .await
            .map(Some)
    };
    match started.await {
        Ok(Some(written)) => Ok(Next::Continue(written)),
        Ok(None) => {
            ctx.queue.unstart(pm);
            Ok(Next::Requeue(pm.clone(), Duration::ZERO))
        }
        Err(e) => {
            ctx.queue.unstart(pm);
            Err(e)
        }
    }
}

/// How often a queued migration looks whether it may start.
const QUEUE_POLL: Duration = Duration::from_secs(1);

async fn execute(pm: &PodMigration, f: &Facts, action: Action, ctx: &Context) -> Result<Next> {
    let ns = pm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match action {
        Action::Start(status) => start(pm, f, *status, &pods, ctx).await,
        Action::Write(status) => Ok(Next::Continue(
            write_status(pm, f.status.phase, *status, None, ctx).await?,
        )),
        Action::Commit(status) => {
            match write_status(pm, f.status.phase, *status, pm.resource_version(), ctx).await {
                Ok(updated) => Ok(Next::Continue(updated)),
                // The object changed since it was read (deleted, labelled, ...): decide again on
                // it as stored (results not written yet are asked for again).
                Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
                    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
                    let stored = api.get_opt(&pm.name_any()).await?;
                    if let Some(stored) = &stored {
                        ctx.remember(&f.uid, stored, None);
                    }
                    Ok(Next::Requeue(
                        stored.unwrap_or_else(|| pm.clone()),
                        Duration::ZERO,
                    ))
                }
                Err(e) => Err(e),
            }
        }
        Action::AllocateRxe => {
            let status = match ctx.rxe.ensure(&ns, &pm.spec.pod_name).await {
                Ok(_) => return Ok(Next::Continue(pm.clone())),
                Err(
                    e @ (rxe_blocks::Error::Exhausted(_)
                    | rxe_blocks::Error::NamespaceFull { .. }
                    | rxe_blocks::Error::InvalidRanges(_)),
                ) => statemachine::allocation_failed(f, &e.to_string()),
                Err(e) => return Err(e.into()),
            };
            Ok(Next::Continue(
                write_status(pm, f.status.phase, status, None, ctx).await?,
            ))
        }
        Action::Call(step) => {
            let answer = call_agent(pm, f, step, ctx).await;
            // A step done without a change of phase, and the progress of one still running, are
            // written with the next write ([`Known`]).
            let quiet = match answer {
                Answer::Succeeded(_) => true,
                Answer::Running { .. } => true,
                Answer::Failed(_)
                | Answer::SourceResumed(_)
                | Answer::RxeOutsideBlock(_)
                | Answer::Unreachable(_) => false,
            };
            let (status, after) = statemachine::after(f, step, answer);
            if quiet && status.phase == f.status.phase {
                let mut kept = pm.clone();
                kept.status = Some(status);
                return Ok(Next::Kept(kept, after));
            }
            let updated = write_status(pm, f.status.phase, status, None, ctx).await?;
            Ok(if after.is_zero() {
                Next::Continue(updated)
            } else {
                Next::Requeue(updated, after)
            })
        }
        Action::DeleteSourcePod => {
            let preconditions = Preconditions {
                uid: f.status.source_pod_uid.clone(),
                resource_version: None,
            };
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(preconditions),
                ..Default::default()
            };
            let gone = Expected::Gone(f.status.source_pod_uid.clone().unwrap_or_default());
            match pods.delete(&pm.spec.pod_name, &params).await {
                // Gone at once: no grace period and no finalizer keeps it (the API server answers
                // the deleted pod, or a Status).
                Ok(answer)
                    if answer.as_ref().left().is_none_or(|pod| {
                        pod.metadata.deletion_grace_period_seconds == Some(0)
                            && pod.finalizers().is_empty()
                    }) =>
                {
                    info!(pod = %pm.spec.pod_name, "deleted the source pod");
                    ctx.expect(&f.uid, gone);
                }
                Ok(_) => {
                    info!(pod = %pm.spec.pod_name, "the source pod is being deleted");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => ctx.expect(&f.uid, gone),
                // The pod of that name is another one now: the state machine sees which.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(Next::Continue(pm.clone()))
        }
        Action::CreateReplacement => {
            let template: Pod = template_of(pm)?;
            let images: BTreeMap<String, String> = f
                .status
                .checkpoint
                .iter()
                .flat_map(|c| &c.containers)
                .filter_map(|c| Some((c.name.clone(), c.image.clone()?)))
                .collect();
            let target = f.status.target_node.clone().unwrap_or_default();
            let restore = match f.status.backend.as_deref() {
                Some(agent_api::backend::RUNTIME_WRAPPER) => {
                    Restore::RuntimeClass(&ctx.backends.runtime_class)
                }
                _ => Restore::Images(&images),
            };
            let mut pod = replacement::build(
                &template,
                &target,
                (&pm.name_any(), &f.uid),
                f.status.pod_ip.as_deref(),
                restore,
            );
            // The IP reservation, in the form the pod network's IPAM reads.
            if pm.spec.network.keep_ip
                && let Some(ip) = f.status.pod_ip.as_deref()
            {
                network::keeper(pm.spec.network.mechanism, &template)
                    .reserve(&mut pod, ip)
                    .map_err(|why| Error::Invalid(format!("{}: {why}", pm.name_any())))?;
            }
            let created = match pods.create(&PostParams::default(), &pod).await {
                Ok(created) => {
                    info!(node = %target, uid = ?created.uid(), "created the replacement pod");
                    Some(created)
                }
                // Made by an earlier attempt (or someone else's pod of that name: the state
                // machine sees which).
                Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => {
                    pods.get_opt(&pm.spec.pod_name).await?
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(created) = created {
                ctx.expect(&f.uid, Expected::Created(Box::new(created)));
            }
            Ok(Next::Continue(pm.clone()))
        }
        Action::DeleteStrandedReplacement(uid) => {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let deleted = match pods.delete(&pm.spec.pod_name, &params).await {
                // Gone at once unless a finalizer keeps it (then the watch shows when it goes).
                Ok(answer) => answer
                    .as_ref()
                    .left()
                    .is_none_or(|pod| pod.finalizers().is_empty()),
                Err(kube::Error::Api(s)) if s.code == 404 => true,
                // The pod of that name is another one now: the state machine sees which.
                Err(kube::Error::Api(s)) if s.code == 409 => false,
                Err(e) => return Err(e.into()),
            };
            if deleted {
                info!(pod = %pm.spec.pod_name, %uid, "deleted the replacement bound to the gone target");
                ctx.expect(&f.uid, Expected::Gone(uid));
            }
            Ok(Next::Continue(pm.clone()))
        }
        Action::CleanFormerTargets(status) => {
            // Best effort, once: a node that is still gone is left to its agent's garbage
            // collection (the retention time).
            for node in &f.status.former_targets {
                let answer = match ctx.agents.endpoint(node).await {
                    Ok(endpoint) => {
                        ctx.agents
                            .call(
                                node,
                                &endpoint,
                                Step::Cleanup(Role::Target),
                                &step_args(pm, f),
                            )
                            .await
                    }
                    Err(e) => Answer::Unreachable(e),
                };
                match answer {
                    Answer::Succeeded(_) => {
                        info!(%node, "the former target dropped what it kept of the migration");
                    }
                    other => {
                        warn!(%node, answer = ?other, "the former target could not be cleaned up");
                    }
                }
            }
            Ok(Next::Continue(
                write_status(pm, f.status.phase, *status, None, ctx).await?,
            ))
        }
        Action::Wait(after) => Ok(Next::Requeue(pm.clone(), after)),
        Action::Done => {
            if f.deleting {
                release_claim(pm, ctx).await;
            }
            Ok(Next::Done)
        }
    }
}

/// Stores the replacement pod's template in an annotation and adds the finalizer (so that a
/// deletion rolls back or cleans up), in one write before the source is touched. Guarded by the
/// resourceVersion: a migration changed meanwhile is read again and the start retried.
async fn keep_template(
    pm: &PodMigration,
    source_uid: Option<&str>,
    pods: &Api<Pod>,
    ctx: &Context,
) -> Result<Option<PodMigration>> {
    let ns = pm.namespace().unwrap_or_default();
    let cached = ctx
        .pods
        .get(&ObjectRef::new(&pm.spec.pod_name).within(&ns))
        .filter(|p| p.metadata.uid.as_deref() == source_uid);
    let pod = match cached {
        Some(pod) => (*pod).clone(),
        None => match pods.get_opt(&pm.spec.pod_name).await? {
            Some(pod) if pod.metadata.uid.as_deref() == source_uid => pod,
            _ => return Ok(None),
        },
    };
    let template = serde_json::to_string(&replacement::template(&pod))?;
    let api: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let mut finalizers = pm.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({"metadata": {
        "resourceVersion": pm.resource_version(),
        "finalizers": finalizers,
        "annotations": {replacement::TEMPLATE_ANNOTATION: template},
    }});
    let uid = pm.uid().unwrap_or_default();
    match api
        .patch(
            &pm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(updated) => {
            ctx.remember(&uid, &updated, None);
            Ok(Some(updated))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            if let Some(stored) = api.get_opt(&pm.name_any()).await? {
                ctx.remember(&uid, &stored, None);
            }
            Err(kube::Error::Api(s).into())
        }
        Err(e) => Err(e.into()),
    }
}

fn template_of(pm: &PodMigration) -> Result<Pod> {
    let raw = pm
        .annotations()
        .get(replacement::TEMPLATE_ANNOTATION)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the annotation {} is missing",
                pm.name_any(),
                replacement::TEMPLATE_ANNOTATION
            ))
        })?;
    Ok(serde_json::from_str(raw)?)
}

async fn call_agent(pm: &PodMigration, f: &Facts, step: Step, ctx: &Context) -> Answer {
    let node = match step.role() {
        Role::Source => &f.status.source_node,
        Role::Target => &f.status.target_node,
    };
    let Some(node) = node else {
        return Answer::Failed(format!("{step}: no node recorded"));
    };
    let endpoint = match ctx.agents.endpoint(node).await {
        Ok(endpoint) => endpoint,
        Err(e) => return Answer::Unreachable(e),
    };
    let mut args = step_args(pm, f);
    if step == Step::Transfer {
        match ctx.agents.endpoint(&args.target_node).await {
            Ok(target) => args.target_endpoint = target,
            Err(e) => return Answer::Failed(e),
        }
    }
    // Post-copy: the target fetches the memory from the source's agent.
    if step == Step::StageRestore
        && let Some(from) = args.post_copy.as_mut()
    {
        match ctx.agents.endpoint(&from.node).await {
            Ok(source) => from.endpoint = source,
            Err(e) => return Answer::Unreachable(e),
        }
    }
    let started = std::time::Instant::now();
    let answer = ctx.agents.call(node, &endpoint, step, &args).await;
    ctx.metrics.agent_call(step, &answer, started.elapsed());
    answer
}

/// What the agents are told of the migration: the pod, its block, and how to move it.
fn step_args(pm: &PodMigration, f: &Facts) -> StepArgs {
    let containers = template_of(pm)
        .ok()
        .and_then(|t| t.spec)
        .map(|s| s.containers)
        .unwrap_or_default()
        .into_iter()
        .map(|c| v1::ContainerRef {
            name: c.name,
            container_id: String::new(),
            image: c.image.unwrap_or_default(),
        })
        .collect();
    let s = &f.status;
    StepArgs {
        migration_uid: f.uid.clone(),
        pod: v1::PodRef {
            namespace: pm.namespace().unwrap_or_default(),
            name: pm.spec.pod_name.clone(),
            uid: s.source_pod_uid.clone().unwrap_or_default(),
            pod_ip: s.pod_ip.clone().unwrap_or_default(),
            containers,
        },
        backend: s.backend.clone().unwrap_or_default(),
        rxe: s.rxe.map(|r| v1::RxeBlock {
            qpn_start: r.qpn_start,
            qpn_count: r.qpn_count,
            mrn_start: r.mrn_start,
            mrn_count: r.mrn_count,
        }),
        expected_bytes: s
            .checkpoint
            .as_ref()
            .map_or(0, |c| u64::try_from(c.bytes).unwrap_or(0)),
        source_node: s.source_node.clone().unwrap_or_default(),
        target_endpoint: String::new(),
        target_node: s.target_node.clone().unwrap_or_default(),
        compression: match pm.spec.compression {
            Compression::None => v1::Compression::None,
            Compression::Zstd => v1::Compression::Zstd,
        },
        bandwidth_limit: pm
            .spec
            .bandwidth_limit
            .as_ref()
            .and_then(|q| {
                crds::quantity::milli(&k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    q.clone(),
                ))
            })
            .map_or(0, |m| u64::try_from(m / 1000).unwrap_or(0)),
        resume_after_seconds: statemachine::source_deadline(f).as_secs(),
        expected: s
            .checkpoint
            .iter()
            .flat_map(|c| &c.containers)
            .map(|c| v1::ContainerArchive {
                name: c.name.clone(),
                bytes: u64::try_from(c.bytes).unwrap_or(0),
                digest: c.digest.clone(),
            })
            .collect(),
        // The endpoint of the source's agent is looked up when the target needs it (StageRestore).
        post_copy: (pm.spec.strategy == Strategy::PostCopy).then(|| v1::PostCopySource {
            node: s.source_node.clone().unwrap_or_default(),
            endpoint: String::new(),
        }),
    }
}

/// Writes the whole status under the operator's field manager. With `resource_version`, only if
/// the object is still the one that was read (the commit point), by server-side apply.
async fn write_status(
    pm: &PodMigration,
    before: Option<Phase>,
    status: PodMigrationStatus,
    resource_version: Option<String>,
    ctx: &Context,
) -> Result<PodMigration> {
    let api: Api<PodMigration> =
        Api::namespaced(ctx.client.clone(), &pm.namespace().unwrap_or_default());
    let updated = match resource_version {
        // The commit point: only onto the version that was read.
        Some(rv) => {
            let body = json!({
                "apiVersion": PodMigration::api_version(&()),
                "kind": PodMigration::kind(&()),
                "metadata": {"resourceVersion": rv},
                "status": status,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch_status(&pm.name_any(), &params, &Patch::Apply(&body))
                .await?
        }
        // The whole status in place of the old one: a JSON patch costs the API server less than
        // a server-side apply, which tracks every field's owner. Fenced like the commit: the
        // resourceVersion that was read goes with it, so that a replica that lost the lead, or
        // decided on an old copy, cannot overwrite what was written since.
        None => {
            let mut ops = Vec::with_capacity(2);
            if let Some(rv) = pm.resource_version() {
                ops.push(
                    json!({"op": "replace", "path": "/metadata/resourceVersion", "value": rv}),
                );
            }
            ops.push(json!({"op": "add", "path": "/status", "value": status}));
            let patch: json_patch::Patch = serde_json::from_value(json!(ops))?;
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match api
                .patch_status(&pm.name_any(), &params, &Patch::Json::<()>(patch))
                .await
            {
                Ok(updated) => updated,
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Read it again; the next look decides on the object as stored (results
                    // not written yet are asked for again, every step being idempotent).
                    if let Some(stored) = api.get_opt(&pm.name_any()).await? {
                        ctx.remember(&stored.uid().unwrap_or_default(), &stored, None);
                    }
                    return Err(Error::Changed(pm.name_any()));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let uid = updated.uid().unwrap_or_default();
    ctx.remember(&uid, &updated, None);
    if let Ok(mut known) = ctx.known.lock() {
        known.entry(uid).or_default().written_at = Some(std::time::Instant::now());
    }
    tracing::debug!(phase = ?status.phase, message = ?status.message, "wrote the status");
    if status.phase != before {
        record_phase_change(pm, before, &status, ctx).await;
        if status.phase.is_some_and(Phase::is_final) {
            release_claim(pm, ctx).await;
        }
    }
    Ok(updated)
}

/// Gives back the pod's claim of a migration that ended. A claim left behind (the API server
/// unreachable now) is taken over by the pod's next migration, as its holder is final or gone.
async fn release_claim(pm: &PodMigration, ctx: &Context) {
    if let Err(e) = ctx.claims.release(pm).await {
        warn!(error = %e, "could not give back the pod's claim");
    }
}

async fn record_phase_change(
    pm: &PodMigration,
    before: Option<Phase>,
    status: &PodMigrationStatus,
    ctx: &Context,
) {
    let Some(phase) = status.phase else { return };
    let message = status.message.clone().unwrap_or_default();
    info!(from = ?before, to = ?phase, %message, "phase changed");
    ctx.metrics.phase_changed(before, status);
    // Events mark the start, the commit point, a post-copy pod resuming and the end; the phases
    // between are in the status.
    if !matches!(
        phase,
        Phase::Preparing | Phase::Restoring | Phase::CopyingMemory
    ) && !phase.is_final()
    {
        return;
    }
    let (type_, reason) = match phase {
        Phase::Failed | Phase::RolledBack => {
            let reason = status
                .conditions
                .iter()
                .find(|c| c.type_ == statemachine::condition::READY)
                .map_or_else(|| format!("{phase:?}"), |c| c.reason.clone());
            (EventType::Warning, reason)
        }
        _ => (EventType::Normal, format!("{phase:?}")),
    };
    let event = Event {
        type_,
        reason,
        note: Some(message),
        action: "Migrate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pm.object_ref(&())).await {
        warn!(error = %e, "could not publish an Event");
    }
}
