//! The PodMigration state machine: pure functions of what was observed. [`next`] says what to do
//! now; [`after`] turns the result of doing it into the next status. No I/O happens here, so every
//! transition, failure and timeout is unit-tested without a cluster (docs/operator.md).

use std::time::Duration;

use agent_api::{Role, Step, checkpoint_image};

use crds::{
    CheckpointStatus, ContainerCheckpoint, MemoryProgress, Phase, PhaseTransition,
    PodMigrationSpec, PodMigrationStatus, Progress, RxeRanges, Strategy,
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};

/// Condition types, besides `Ready`, that record progress so that a restarted operator resumes.
pub mod condition {
    /// True when the migration succeeded; False with the phase or the failure as reason.
    pub const READY: &str = "Ready";
    /// The checkpoint reached the target agent intact.
    pub const TRANSFERRED: &str = "Transferred";
    /// The commit point is passed.
    pub const COMMITTED: &str = "Committed";
    /// After the commit point: the source agent stopped the source containers for good.
    pub const SOURCE_STOPPED: &str = "SourceStopped";
    /// Before the commit point: the migration is being rolled back (reason says why).
    pub const ABORTING: &str = "Aborting";
    /// While rolling back: the source agent resumed the source pod.
    pub const SOURCE_RESUMED: &str = "SourceResumed";
    /// After the PodMigration was deleted: the source agent dropped its data (or could not).
    pub const CLEANED_SOURCE: &str = "CleanedSource";
    /// After the PodMigration was deleted: the target agent dropped its data (or could not).
    pub const CLEANED_TARGET: &str = "CleanedTarget";
    /// After the PodMigration was deleted: the agents of the targets it left after the commit
    /// (`status.formerTargets`) dropped what they kept (or some could not).
    pub const CLEANED_FORMER_TARGETS: &str = "CleanedFormerTargets";
    /// Past the commit point the target node went (deleted, or declared shut down with the
    /// `node.kubernetes.io/out-of-service` taint): the source's checkpoint goes to another node.
    pub const RETARGETED: &str = "Retargeted";
    /// After a retarget: the new target agent reserved room for the checkpoint.
    pub const TARGET_PREPARED: &str = "TargetPrepared";
    /// Failed past the commit point: the target agent released the pod's IP block and
    /// reservation and its rxe counters, keeping the checkpoint (or could not).
    pub const TARGET_RELEASED: &str = "TargetReleased";
    /// `PostCopy`: all the memory the pod left on the source is in on the target (False with
    /// the reason while it arrives, or when it cannot).
    pub const MEMORY_COMPLETE: &str = "MemoryComplete";
}

/// Why a migration failed or rolled back; the `reason` of its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PodNotFound,
    PodNotMigratable,
    PodNotMovable,
    PodNotRunning,
    PodBusy,
    TargetUnavailable,
    RxeUnavailable,
    PrepareFailed,
    CheckpointFailed,
    TransferFailed,
    RestoreFailed,
    TimedOut,
    Deleted,
    TemplateChanged,
    /// The source's agent resumed the pod at its own deadline before it was stopped: the
    /// migration could not complete, and the pod runs on the source as before.
    SourceResumed,
    /// The nodes lack what `spec.strategy` needs, or this release does not move pods that way.
    StrategyUnavailable,
    /// `PostCopy`: the pod ran on the target, but the memory it left on the source could not all
    /// come (the source's agent or node went, the page stream broke, the target went): the
    /// restored process was stopped, and the pod's state is lost.
    PostCopyFailed,
    /// The pod got rxe numbers outside its block when it started (the source agent's record):
    /// they may be taken on any other node, so it is not moved.
    RxeOutsideBlock,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodNotFound => "PodNotFound",
            Reason::PodNotMigratable => "PodNotMigratable",
            Reason::PodNotMovable => "PodNotMovable",
            Reason::PodNotRunning => "PodNotRunning",
            Reason::PodBusy => "PodBusy",
            Reason::TargetUnavailable => "TargetUnavailable",
            Reason::RxeUnavailable => "RxeUnavailable",
            Reason::PrepareFailed => "PrepareFailed",
            Reason::CheckpointFailed => "CheckpointFailed",
            Reason::TransferFailed => "TransferFailed",
            Reason::RestoreFailed => "RestoreFailed",
            Reason::TimedOut => "TimedOut",
            Reason::Deleted => "Deleted",
            Reason::TemplateChanged => "TemplateChanged",
            Reason::SourceResumed => "SourceResumed",
            Reason::StrategyUnavailable => "StrategyUnavailable",
            Reason::PostCopyFailed => "PostCopyFailed",
            Reason::RxeOutsideBlock => "RxeOutsideBlock",
        }
    }
}

/// The pod named by `spec.podName`, as observed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodFacts {
    pub uid: String,
    pub node: Option<String>,
    pub phase: Option<String>,
    pub ip: Option<String>,
    pub migratable: bool,
    /// Why the pod cannot follow to another node (its network, its owner, its volumes), if so.
    pub unmovable: Option<String>,
    pub rdma: bool,
    /// `migros.io/migration-uid` of a replacement pod created by a migration.
    pub created_by_migration: Option<String>,
    pub deleting: bool,
}

impl PodFacts {
    /// Running and not being deleted.
    pub fn running(&self) -> bool {
        self.phase.as_deref() == Some("Running") && !self.deleting
    }
}

/// Everything `next` and `after` decide on.
#[derive(Debug, Clone)]
pub struct Facts {
    pub uid: String,
    pub now: Timestamp,
    pub created: Timestamp,
    pub deleting: bool,
    pub spec: PodMigrationSpec,
    pub status: PodMigrationStatus,
    pub pod: Option<PodFacts>,
    /// Pending only: the chosen target node and the backend it restores with, or why there is
    /// none.
    pub target: Option<Result<Target, String>>,
    /// Pending only, a strategy other than stop-and-copy: whether the source and a target node
    /// have what it needs, or why not (`strategy::support`).
    pub strategy: Option<Result<(), String>>,
    /// Pending only, RDMA pods: the pod's rxe block, if it has one.
    pub rxe: Option<RxeRanges>,
    /// The replacement template annotation no longer matches `status.templateDigest`.
    pub template_changed: bool,
    /// Restoring and CopyingMemory only: why the target node is gone for good (deleted, or tainted
    /// `node.kubernetes.io/out-of-service` by whoever shut it down), if so. With it, `target` is
    /// the choice of another node.
    pub target_gone: Option<String>,
}

/// Where a migration goes, and how the pod is restored there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    /// The restore backend (one of `targets::BACKENDS`).
    pub backend: String,
}

/// What the controller does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the migration: keep a template of the source pod, then write this status.
    Start(Box<PodMigrationStatus>),
    /// Write this status and look again.
    Write(Box<PodMigrationStatus>),
    /// Ask the agent of the step's node for it; feed the answer to [`after`].
    Call(Step),
    /// Give the RDMA pod an rxe block, then look again; [`allocation_failed`] says what a
    /// failure means.
    AllocateRxe,
    /// Pass the commit point: write this status only if the object did not change since observed.
    Commit(Box<PodMigrationStatus>),
    /// Delete the source pod object (precondition: its UID).
    DeleteSourcePod,
    /// Create the replacement pod on the target node.
    CreateReplacement,
    /// Delete this migration's replacement pod bound to a target node that is gone (force: no
    /// kubelet is left to confirm it; precondition: its UID).
    DeleteStrandedReplacement(String),
    /// Ask the agents of `status.formerTargets` once each to drop what they kept of the
    /// migration (its IP block and reservation, counters, checkpoint); then write this status.
    CleanFormerTargets(Box<PodMigrationStatus>),
    /// Nothing to do until the world changes; look again after this long at the latest.
    Wait(Duration),
    /// The migration is over (final phase, or deleted and settled).
    Done,
}

/// The answer of an agent, as [`after`] needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Running {
        bytes_done: u64,
        bytes_total: u64,
    },
    Succeeded(agent_api::Operation),
    Failed(String),
    /// The source's agent refused because it resumed the pod at its deadline
    /// (`Operation.source_resumed`).
    SourceResumed(String),
    /// The source's agent refused the checkpoint: the pod got rxe numbers outside its block
    /// when it started there (`Operation.rxe_outside_block`).
    RxeOutsideBlock(String),
    /// The agent could not be reached or did not answer.
    Unreachable(String),
}

/// How soon to look again while an agent step is running.
pub const POLL: Duration = Duration::from_millis(500);
/// How soon to retry a failed step after the commit point.
pub const RETRY: Duration = Duration::from_secs(2);

/// What to do now.
pub fn next(f: &Facts) -> Action {
    let phase = f.status.phase.unwrap_or_default();
    if phase.is_final() {
        // Failed past the commit point: the target lets go of the pod's IP and counters, unless
        // a replacement of this migration exists (it holds them) and the object stays.
        let replacement = f
            .pod
            .as_ref()
            .is_some_and(|p| p.created_by_migration.as_deref() == Some(f.uid.as_str()));
        if failed_past_commit(f)
            && !recorded(f, condition::TARGET_RELEASED)
            && (f.deleting || !replacement)
        {
            return Action::Call(Step::Release);
        }
        // A failed post-copy: the source's frozen pod serves no one any more; it stops now, not
        // at its page servers' deadline.
        if failed_past_commit(f) && post_copy(f) && !recorded(f, condition::CLEANED_SOURCE) {
            return Action::Call(Step::Cleanup(Role::Source));
        }
        return if f.deleting {
            cleanup_or_done(f)
        } else {
            Action::Done
        };
    }
    if f.deleting && phase == Phase::Pending {
        return Action::Done;
    }
    if has(f, condition::ABORTING) {
        return abort_step(f);
    }
    if !f.status.committed {
        if f.deleting {
            return Action::Write(Box::new(begin_abort(
                f,
                Reason::Deleted,
                "the PodMigration was deleted",
            )));
        }
        if timed_out(f) {
            let msg = format!(
                "timed out after {}s in phase {phase:?}",
                f.spec.timeout_seconds
            );
            return Action::Write(Box::new(begin_abort(f, Reason::TimedOut, &msg)));
        }
    } else if !has(f, condition::SOURCE_STOPPED) {
        // Past the commit point the source's fate comes first, whatever the timeout or a
        // deletion: its agent either stops it for good or says it resumed it at its own deadline
        // (then the migration fails and the pod runs there). Until it answers, nothing else is
        // done: restoring a pod whose source may still run could make two.
        return Action::Call(Step::Commit(Role::Source));
    } else if phase != Phase::CopyingMemory && timed_out(f) {
        // (A deletion past the commit point does not abandon the pod: the source is gone and the
        // checkpoint on the target is its only copy, so the restore goes on until the pod runs
        // or the timeout; the object goes after that.)
        let msg = if post_copy(f) {
            format!(
                "timed out after {}s while restoring; with PostCopy the checkpoint holds no \
                 memory, so the pod is lost",
                f.spec.timeout_seconds
            )
        } else {
            format!(
                "timed out after {}s while restoring; the checkpoint is kept at {}",
                f.spec.timeout_seconds,
                location(f)
            )
        };
        return Action::Write(Box::new(finish(
            f,
            Phase::Failed,
            Some(Reason::TimedOut),
            &msg,
        )));
    }
    if f.template_changed && phase != Phase::CopyingMemory {
        let msg = "the replacement template annotation changed after the start: no pod is made \
                   from a template the operator did not write";
        return Action::Write(Box::new(if f.status.committed {
            let msg = if post_copy(f) {
                format!("{msg}; with PostCopy the checkpoint holds no memory, so the pod is lost")
            } else {
                format!("{msg}; the checkpoint is kept at {}", location(f))
            };
            finish(f, Phase::Failed, Some(Reason::TemplateChanged), &msg)
        } else {
            begin_abort(f, Reason::TemplateChanged, msg)
        }));
    }
    match phase {
        Phase::Pending => start(f),
        Phase::Preparing => Action::Call(Step::PrepareTarget),
        Phase::Checkpointing => Action::Call(Step::Checkpoint),
        Phase::Transferring if has(f, condition::TRANSFERRED) => {
            Action::Commit(Box::new(commit(f)))
        }
        Phase::Transferring => Action::Call(Step::Transfer),
        Phase::Restoring => restore_step(f),
        Phase::CopyingMemory => memory_step(f),
        Phase::Succeeded | Phase::Failed | Phase::RolledBack => Action::Done,
    }
}

/// The status after step `call` answered `answer`.
pub fn after(f: &Facts, call: Step, answer: Answer) -> (PodMigrationStatus, Duration) {
    match answer {
        Answer::Running {
            bytes_done,
            bytes_total,
        } if call == Step::Memory => {
            let s = memory_arriving(f, bytes_done, bytes_total);
            match memory_stalled(f, &s) {
                Some(failed) => (failed, Duration::ZERO),
                None => (s, POLL),
            }
        }
        Answer::Running {
            bytes_done,
            bytes_total,
        } => {
            let mut s = f.status.clone();
            if call == Step::Transfer || bytes_total > 0 {
                s.progress = Some(Progress {
                    bytes_transferred: to_i64(bytes_done),
                    bytes_total: to_i64(bytes_total),
                });
            }
            (s, POLL)
        }
        Answer::Succeeded(op) if call == Step::StageRestore => match foreign_staging(f, &op) {
            Some(why) => failed(f, call, &why),
            None => (succeeded(f, call, &op), Duration::ZERO),
        },
        Answer::Succeeded(op) => (succeeded(f, call, &op), Duration::ZERO),
        Answer::SourceResumed(message) if call == Step::Commit(Role::Source) => {
            (source_resumed(f, &message), Duration::ZERO)
        }
        Answer::RxeOutsideBlock(message) if call == Step::Checkpoint => (
            begin_abort(
                f,
                Reason::RxeOutsideBlock,
                &format!("{call} refused: {message}"),
            ),
            Duration::ZERO,
        ),
        Answer::Failed(message)
        | Answer::SourceResumed(message)
        | Answer::RxeOutsideBlock(message) => failed(f, call, &message),
        // Memory is a question: a call that fails (the target's agent restarting, a network
        // error) says nothing of the memory; the progress timeout decides.
        Answer::Unreachable(message) if call == Step::Memory => {
            match memory_stalled(f, &f.status) {
                Some(failed) => (failed, Duration::ZERO),
                None => (
                    retry_message(
                        f,
                        &format!("asking how much memory is in failed, retrying: {message}"),
                    ),
                    RETRY,
                ),
            }
        }
        Answer::Unreachable(message) => failed(f, call, &format!("agent unreachable: {message}")),
    }
}

fn start(f: &Facts) -> Action {
    let fail = |reason: Reason, msg: String| {
        Action::Write(Box::new(finish(f, Phase::Failed, Some(reason), &msg)))
    };
    let pod_name = &f.spec.pod_name;
    let Some(pod) = &f.pod else {
        return fail(
            Reason::PodNotFound,
            format!("pod {pod_name} not found in this namespace"),
        );
    };
    if !pod.migratable {
        return fail(
            Reason::PodNotMigratable,
            format!(
                "pod {pod_name} does not opt in: label it {}=\"true\"",
                crds::MIGRATABLE_LABEL
            ),
        );
    }
    if let Some(why) = &pod.unmovable {
        return fail(
            Reason::PodNotMovable,
            format!("pod {pod_name} cannot move to another node: {why}"),
        );
    }
    let (Some(source), Some(ip), true) = (&pod.node, &pod.ip, pod.running()) else {
        let phase = pod.phase.as_deref().unwrap_or("unknown");
        return fail(
            Reason::PodNotRunning,
            format!("pod {pod_name} is not Running (phase {phase})"),
        );
    };
    match (f.spec.strategy, &f.strategy) {
        (Strategy::StopAndCopy, _) => {}
        (_, None) => return Action::Wait(POLL),
        (_, Some(Err(why))) => return fail(Reason::StrategyUnavailable, why.clone()),
        (Strategy::PostCopy, Some(Ok(()))) => {}
        (other, Some(Ok(()))) => {
            return fail(
                Reason::StrategyUnavailable,
                format!(
                    "the nodes have what {} needs, but this release of kube-migros moves pods \
                     only with StopAndCopy and PostCopy",
                    other.as_str()
                ),
            );
        }
    }
    let target = match &f.target {
        Some(Ok(target)) => target.clone(),
        Some(Err(why)) => return fail(Reason::TargetUnavailable, why.clone()),
        None => return Action::Wait(POLL),
    };
    let rxe = match (f.rxe, pod.rdma) {
        (Some(block), true) => Some(block),
        (None, true) => return Action::AllocateRxe,
        (_, false) => None,
    };
    let mut s = f.status.clone();
    s.source_node = Some(source.clone());
    s.target_node = Some(target.node.clone());
    s.backend = Some(target.backend);
    s.pod_ip = Some(ip.clone());
    s.source_pod_uid = Some(pod.uid.clone());
    s.rxe = rxe;
    let msg = format!(
        "moving pod {pod_name} from {source} to {}{}",
        target.node,
        caveat(s.backend.as_deref())
    );
    Action::Start(Box::new(enter(f, s, Phase::Preparing, &msg)))
}

/// The status when another active migration (`other`) holds the pod's claim (`claims.rs`): the
/// migration fails before anything started. The claim is taken when everything else says Start.
pub fn busy(f: &Facts, other: &str) -> PodMigrationStatus {
    let msg = format!(
        "pod {} is already being migrated by PodMigration {other}",
        f.spec.pod_name
    );
    finish(f, Phase::Failed, Some(Reason::PodBusy), &msg)
}

/// The Ready reason of a migration that waits for a slot.
pub const QUEUED: &str = "Queued";

/// The status of a migration that waits for a slot (`queue.rs`): Pending, Ready reason `Queued`.
pub fn queued(f: &Facts, message: &str) -> PodMigrationStatus {
    let mut s = enter(f, f.status.clone(), Phase::Pending, message);
    set_condition(&mut s, f.now, condition::READY, false, QUEUED, message);
    s
}

/// The status when the pod cannot get an rxe block (`why`): the migration fails before anything
/// started.
pub fn allocation_failed(f: &Facts, why: &str) -> PodMigrationStatus {
    finish(f, Phase::Failed, Some(Reason::RxeUnavailable), why)
}

fn restore_step(f: &Facts) -> Action {
    if !has(f, condition::SOURCE_STOPPED) {
        return Action::Call(Step::Commit(Role::Source));
    }
    let source_uid = f.status.source_pod_uid.as_deref();
    let pod = f.pod.as_ref();
    if let Some(p) = pod.filter(|p| Some(p.uid.as_str()) == source_uid) {
        return if p.deleting {
            Action::Wait(POLL)
        } else {
            Action::DeleteSourcePod
        };
    }
    let ours = pod.filter(|p| p.created_by_migration.as_deref() == Some(f.uid.as_str()));
    if let Some(why) = &f.target_gone {
        if post_copy(f) {
            return Action::Write(Box::new(target_lost(f, why)));
        }
        return retarget_step(f, ours, why);
    }
    if has(f, condition::RETARGETED) {
        // On a new target: room there, then the checkpoint again from the source, which keeps it.
        if !has(f, condition::TARGET_PREPARED) {
            return Action::Call(Step::PrepareTarget);
        }
        if !has(f, condition::TRANSFERRED) {
            return Action::Call(Step::Transfer);
        }
    }
    let staged = f.status.checkpoint.as_ref().is_some_and(|c| {
        !c.containers.is_empty() && c.containers.iter().all(|c| c.image.is_some())
    });
    if !staged {
        return Action::Call(Step::StageRestore);
    }
    match pod {
        None => Action::CreateReplacement,
        Some(p) if p.created_by_migration.as_deref() != Some(f.uid.as_str()) => {
            // Someone else created a pod with this name; never touch it.
            Action::Write(Box::new(retry_message(
                f,
                &format!(
                    "a pod {} not created by this migration exists; waiting for it to go",
                    f.spec.pod_name
                ),
            )))
        }
        Some(p) if p.running() => Action::Call(Step::FinishRestore),
        Some(_) => Action::Wait(POLL),
    }
}

/// `PostCopy`, the pod running on the target: ask how much of its memory is in until all is, and
/// fail when none arrived for `spec.progressTimeoutSeconds` (the overall timeout does not end a
/// pod that runs and receives its memory) or the target went.
fn memory_step(f: &Facts) -> Action {
    if let Some(why) = &f.target_gone {
        return Action::Write(Box::new(target_lost(f, why)));
    }
    Action::Call(Step::Memory)
}

/// Whether no memory has arrived for `spec.progressTimeoutSeconds`, judged when the target's
/// agent has just answered (or failed to): a stored time alone, old after an operator restart,
/// never ends a migration whose memory may have gone on arriving meanwhile.
fn memory_stalled(f: &Facts, s: &PodMigrationStatus) -> Option<PodMigrationStatus> {
    let since = s
        .memory
        .as_ref()
        .and_then(|m| m.last_progress_time.as_ref())
        .map(|t| t.0)
        .or_else(|| entered(f, Phase::CopyingMemory))?;
    let limit = f.spec.progress_timeout_seconds;
    if f.now.duration_since(since) <= SignedDuration::from_secs(limit) {
        return None;
    }
    let msg = format!(
        "no memory of pod {} arrived from {} for {limit}s (spec.progressTimeoutSeconds): the pod \
         cannot be whole",
        f.spec.pod_name,
        source(f)
    );
    let f = Facts {
        status: s.clone(),
        ..f.clone()
    };
    Some(memory_failed(&f, Reason::TimedOut, &msg))
}

/// Whether the migration moves the pod's memory after the pod resumes (`PostCopy`).
fn post_copy(f: &Facts) -> bool {
    f.spec.strategy == Strategy::PostCopy
}

/// The status while the memory arrives: bytes in, left and the average rate since the pod
/// resumed; the progress timeout counts from the last time more came.
fn memory_arriving(f: &Facts, done: u64, total: u64) -> PodMigrationStatus {
    let mut s = f.status.clone();
    let (done, total) = (to_i64(done.min(total)), to_i64(total));
    let since = entered(f, Phase::CopyingMemory).unwrap_or(f.now);
    let secs = f.now.duration_since(since).as_secs_f64();
    let rate = if secs > 0.0 {
        (done as f64 / secs) as i64
    } else {
        0
    };
    let before = f.status.memory.as_ref();
    let last_progress_time = match before {
        Some(m) if done <= m.bytes_transferred => m.last_progress_time.clone(),
        _ => Some(MicroTime(f.now)),
    };
    s.memory = Some(MemoryProgress {
        bytes_total: total,
        bytes_transferred: done,
        bytes_remaining: total - done,
        bytes_per_second: rate,
        last_progress_time,
    });
    let msg = format!(
        "pod {} runs on {}; {} of {} of its memory in from {} ({}/s)",
        f.spec.pod_name,
        target(f),
        mib(done),
        mib(total),
        source(f),
        mib(rate)
    );
    set_condition(
        &mut s,
        f.now,
        condition::MEMORY_COMPLETE,
        false,
        "Arriving",
        &msg,
    );
    s.message = Some(msg);
    s
}

/// `PostCopy`: the pod cannot be whole any more (its memory cannot all come): Failed, with why.
/// Its checkpoint, without the memory, could not be restored: no location is named.
fn memory_failed(f: &Facts, reason: Reason, message: &str) -> PodMigrationStatus {
    let mut s = f.status.clone();
    if let Some(c) = s.checkpoint.as_mut() {
        c.location = None;
    }
    set_condition(
        &mut s,
        f.now,
        condition::MEMORY_COMPLETE,
        false,
        reason.as_str(),
        message,
    );
    finish_with(f, s, Phase::Failed, Some(reason.as_str()), message)
}

/// `PostCopy`, the target gone past the commit point: the memory left on the source goes to that
/// target only, so the pod cannot be restored elsewhere.
fn target_lost(f: &Facts, why: &str) -> PodMigrationStatus {
    let msg = format!(
        "{why}: with PostCopy the pod's memory stayed on {} for that node only, so the pod \
         cannot be restored elsewhere and is lost; the source's agent stops what it kept",
        source(f)
    );
    memory_failed(f, Reason::PostCopyFailed, &msg)
}

/// Bytes in MiB, for messages.
fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The target node is gone for good past the commit point, and the source keeps the checkpoint:
/// this migration's replacement bound to the gone node goes, then another node is chosen and the
/// restore starts over there (prepare, transfer from the source, stage, create). The pod keeps its
/// IP and rxe block.
fn retarget_step(f: &Facts, ours: Option<&PodFacts>, why: &str) -> Action {
    let gone = target(f);
    if let Some(p) = ours.filter(|p| p.node.as_deref() == Some(gone)) {
        return Action::DeleteStrandedReplacement(p.uid.clone());
    }
    match &f.target {
        Some(Ok(next)) => Action::Write(Box::new(retarget(f, next, why))),
        Some(Err(none)) => {
            let msg = format!(
                "{why}; the checkpoint is kept on {} and no other node can take the pod yet: {none}",
                source(f)
            );
            if f.status.message.as_deref() == Some(msg.as_str()) {
                Action::Wait(RETRY)
            } else {
                Action::Write(Box::new(retry_message(f, &msg)))
            }
        }
        None => Action::Wait(POLL),
    }
}

/// The status that sends the migration to `next` after its target went: what the old target
/// did (received, staged, prepared) is forgotten; the checkpoint's digests stay (the new target
/// stages only archives with exactly those).
fn retarget(f: &Facts, next: &Target, why: &str) -> PodMigrationStatus {
    let mut s = f.status.clone();
    let msg = format!(
        "{why}: restoring on {} from the checkpoint kept on {}",
        next.node,
        source(f)
    );
    if let Some(gone) = s.target_node.replace(next.node.clone()) {
        s.former_targets.push(gone);
    }
    s.backend = Some(next.backend.clone());
    s.target_pod_uid = None;
    s.progress = None;
    if let Some(c) = s.checkpoint.as_mut() {
        // Until the new target has it, the checkpoint is only where the source keeps it.
        c.location = Some(format!("{}:<agent store>/migrations/{}", source(f), f.uid));
        for container in &mut c.containers {
            container.image = None;
        }
    }
    s.conditions
        .retain(|c| c.type_ != condition::TRANSFERRED && c.type_ != condition::TARGET_PREPARED);
    set_condition(
        &mut s,
        f.now,
        condition::RETARGETED,
        true,
        "TargetGone",
        &msg,
    );
    s.message = Some(msg);
    s
}

/// The status when the source's agent refused the stop because it had resumed the pod at its own
/// deadline: the pod runs on the source, the checkpoint is stale; the migration fails, and its
/// cleanup drops the data on both nodes like a rollback's.
fn source_resumed(f: &Facts, message: &str) -> PodMigrationStatus {
    let mut s = f.status.clone();
    set_condition(
        &mut s,
        f.now,
        condition::SOURCE_RESUMED,
        true,
        Reason::SourceResumed.as_str(),
        message,
    );
    if let Some(c) = s.checkpoint.as_mut() {
        c.location = None;
    }
    let msg = format!(
        "the agent of {} resumed pod {} at its deadline before the stop reached it: the pod runs \
         there as before, and the stale checkpoint is dropped",
        source(f),
        f.spec.pod_name
    );
    let mut s = enter(f, s, Phase::Failed, &msg);
    set_condition(
        &mut s,
        f.now,
        condition::READY,
        false,
        Reason::SourceResumed.as_str(),
        &msg,
    );
    timings(&mut s).total_ms = Some(millis(f.now, f.created));
    s
}

/// Whether the target keeps its checkpoint for a manual restore: past the commit point, the restore
/// did not finish, and the source was stopped (a source resumed at its deadline runs; its stale
/// checkpoint is not kept). A cleanup of the target then only releases what it holds for the pod.
pub fn keeps_checkpoint(f: &Facts) -> bool {
    // A post-copy checkpoint holds no memory: nothing could be restored from it.
    failed_past_commit(f) && !post_copy(f)
}

/// Past the commit point and not succeeded, the source stopped (not resumed at its deadline):
/// the target lets go of what it holds for the pod once no replacement holds it.
fn failed_past_commit(f: &Facts) -> bool {
    f.status.committed
        && f.status.phase != Some(Phase::Succeeded)
        && !has(f, condition::SOURCE_RESUMED)
}

fn abort_step(f: &Facts) -> Action {
    if !has(f, condition::SOURCE_RESUMED) {
        return Action::Call(Step::Abort(Role::Source));
    }
    Action::Call(Step::Abort(Role::Target))
}

fn cleanup_or_done(f: &Facts) -> Action {
    // Only a migration that started has agent state to clean; a kept checkpoint of a failed
    // restore is left for the operator to restore by hand.
    let started = f.status.source_node.is_some();
    // ...unless the source runs (resumed at its deadline): then the checkpoint is stale; or it
    // holds no memory (post-copy).
    let failed_after_commit = keeps_checkpoint(f);
    // The targets a migration left after the commit point keep nothing it needs (the checkpoint
    // is on the source and the current target): once each, whatever the outcome.
    if !f.status.former_targets.is_empty() && !recorded(f, condition::CLEANED_FORMER_TARGETS) {
        let mut s = f.status.clone();
        set_condition(
            &mut s,
            f.now,
            condition::CLEANED_FORMER_TARGETS,
            true,
            "Cleaned",
            &format!(
                "asked the agents of {} to drop what they kept",
                f.status.former_targets.join(", ")
            ),
        );
        return Action::CleanFormerTargets(Box::new(s));
    }
    if !started || failed_after_commit {
        return Action::Done;
    }
    // One attempt each: a failed cleanup is recorded and left to the agents' garbage collection.
    if !recorded(f, condition::CLEANED_SOURCE) {
        return Action::Call(Step::Cleanup(Role::Source));
    }
    if !recorded(f, condition::CLEANED_TARGET) {
        return Action::Call(Step::Cleanup(Role::Target));
    }
    Action::Done
}

fn succeeded(f: &Facts, call: Step, op: &agent_api::Operation) -> PodMigrationStatus {
    let mut s = f.status.clone();
    match call {
        Step::PrepareTarget if f.status.committed => set_condition(
            &mut s,
            f.now,
            condition::TARGET_PREPARED,
            true,
            "Prepared",
            "the new target reserved room for the checkpoint",
        ),
        Step::PrepareTarget => {
            return enter(f, s, Phase::Checkpointing, "checkpointing the source pod");
        }
        Step::Checkpoint => return checkpointed(f, s, op),
        Step::Transfer => transferred(f, &mut s, op),
        // The operator never asks the target to commit; it keeps its data until the cleanup.
        Step::Commit(Role::Target) => {}
        Step::Commit(Role::Source) if post_copy(f) => set_condition(
            &mut s,
            f.now,
            condition::SOURCE_STOPPED,
            true,
            "ServingMemory",
            "the source containers never run again: they stay frozen to serve their memory to \
             the target, and their agent stops them once it is all served",
        ),
        Step::Commit(Role::Source) => {
            set_condition(
                &mut s,
                f.now,
                condition::SOURCE_STOPPED,
                true,
                "Stopped",
                "source containers stopped for good",
            );
        }
        Step::StageRestore => {
            if let Some(c) = s.checkpoint.as_mut() {
                for container in &mut c.containers {
                    container.image = op
                        .staged
                        .iter()
                        .find(|staged| staged.name == container.name)
                        .map(|staged| staged.image.clone());
                }
            }
            s.message = Some("creating the replacement pod on the target node".into());
        }
        Step::FinishRestore => {
            let restore_started = entered(f, Phase::Restoring);
            let frozen = entered(f, Phase::Checkpointing);
            let t = timings(&mut s);
            t.restore_ms = restore_started.map(|at| millis(f.now, at));
            t.downtime_ms = frozen.map(|at| millis(f.now, at));
            s.target_pod_uid = f.pod.as_ref().map(|p| p.uid.clone());
            if post_copy(f) {
                let msg = format!(
                    "pod {} runs on {}; the rest of its memory comes from {}",
                    f.spec.pod_name,
                    target(f),
                    source(f)
                );
                set_condition(
                    &mut s,
                    f.now,
                    condition::MEMORY_COMPLETE,
                    false,
                    "Arriving",
                    &msg,
                );
                return enter(f, s, Phase::CopyingMemory, &msg);
            }
            let msg = format!(
                "pod {} runs on {}{}",
                f.spec.pod_name,
                target(f),
                caveat(s.backend.as_deref())
            );
            return finish_with(f, s, Phase::Succeeded, None, &msg);
        }
        Step::Memory => {
            // An agent restarted since answers success from its record, without the sizes.
            let before = f.status.memory.as_ref().map_or(0, |m| m.bytes_total);
            let total = to_i64(op.bytes_total).max(before);
            let since = entered(f, Phase::CopyingMemory);
            let took = since.map(|at| millis(f.now, at));
            s.memory = Some(MemoryProgress {
                bytes_total: total,
                bytes_transferred: total,
                bytes_remaining: 0,
                bytes_per_second: took
                    .filter(|ms| *ms > 0)
                    .map_or(0, |ms| total.saturating_mul(1000) / ms),
                last_progress_time: Some(MicroTime(f.now)),
            });
            timings(&mut s).memory_ms = took;
            let msg = format!(
                "pod {} runs on {} with all its memory ({} came after it resumed)",
                f.spec.pod_name,
                target(f),
                mib(total)
            );
            set_condition(
                &mut s,
                f.now,
                condition::MEMORY_COMPLETE,
                true,
                "AllIn",
                &msg,
            );
            return finish_with(f, s, Phase::Succeeded, None, &msg);
        }
        Step::Abort(Role::Source) => {
            set_condition(
                &mut s,
                f.now,
                condition::SOURCE_RESUMED,
                true,
                "Resumed",
                "the source pod runs as before",
            );
        }
        Step::Abort(Role::Target) => return rolled_back(f, s, None),
        Step::Cleanup(Role::Source) => set_condition(
            &mut s,
            f.now,
            condition::CLEANED_SOURCE,
            true,
            "Cleaned",
            "source agent data removed",
        ),
        Step::Release => set_condition(
            &mut s,
            f.now,
            condition::TARGET_RELEASED,
            true,
            "Released",
            "the target released the pod's IP and rxe counters; the checkpoint is kept",
        ),
        Step::Cleanup(Role::Target) => set_condition(
            &mut s,
            f.now,
            condition::CLEANED_TARGET,
            true,
            "Cleaned",
            "target agent data removed",
        ),
    }
    s
}

/// Why what the target staged is not this migration's, if so: every container of the checkpoint
/// must be staged once, where the target's backend stages this migration's containers (the
/// store's `migrations/<uid>/staged/<container>` for the runtime wrapper, its `.tar` for an
/// archive; for checkpoint images, the image tagged `<uid>-<container>` and pinned by the digest
/// of the manifest derived from the archive's recorded digest and size, see
/// `agent_api::checkpoint_image`). The operator makes the replacement from these; it takes no
/// reference the target could have chosen freely.
fn foreign_staging(f: &Facts, op: &agent_api::Operation) -> Option<String> {
    let containers = f.status.checkpoint.as_ref().map(|c| &c.containers)?;
    let backend = f.status.backend.as_deref().unwrap_or_default();
    for c in containers {
        let mut staged = op.staged.iter().filter(|s| s.name == c.name);
        let (Some(s), None) = (staged.next(), staged.next()) else {
            return Some(format!(
                "the target staged container {} not exactly once",
                c.name
            ));
        };
        let tail = agent_api::layout::staged_tail(&f.uid, &c.name);
        let plain = !s.image.is_empty()
            && !s.image.contains(char::is_whitespace)
            && !s.image.split('/').any(|part| part == "..");
        let ours = plain
            && match backend {
                agent_api::backend::RUNTIME_WRAPPER => {
                    s.image.starts_with('/') && s.image.ends_with(&tail)
                }
                agent_api::backend::CRI_CHECKPOINT_ARCHIVE => {
                    s.image.starts_with('/') && s.image.ends_with(&format!("{tail}.tar"))
                }
                _ => {
                    let layer_size = u64::try_from(c.bytes).unwrap_or_default();
                    let image = checkpoint_image::Parts::new(&c.name, &c.digest, layer_size);
                    checkpoint_image::names(&s.image, &f.uid, &c.name, &image.manifest_digest())
                }
            };
        if !ours {
            return Some(format!(
                "the target staged container {} as {:?}, which is not where this migration's \
                 checkpoint is staged: it is not used",
                c.name, s.image
            ));
        }
    }
    None
}

/// The status once the source checkpointed: sizes and digests, then Transferring.
fn checkpointed(
    f: &Facts,
    mut s: PodMigrationStatus,
    op: &agent_api::Operation,
) -> PodMigrationStatus {
    let containers: Vec<ContainerCheckpoint> = op
        .archives
        .iter()
        .map(|a| ContainerCheckpoint {
            name: a.name.clone(),
            bytes: to_i64(a.bytes),
            digest: a.digest.clone(),
            image: None,
        })
        .collect();
    let bytes = containers.iter().map(|c| c.bytes).sum();
    s.checkpoint = Some(CheckpointStatus {
        bytes,
        location: None,
        containers,
    });
    s.progress = Some(Progress {
        bytes_transferred: 0,
        bytes_total: bytes,
    });
    timings(&mut s).checkpoint_ms = Some(to_i64(op.duration_ms));
    enter(
        f,
        s,
        Phase::Transferring,
        "sending the checkpoint to the target node",
    )
}

/// Records a finished transfer in `s`: progress, times, the digests taken as it was sent, where
/// the target keeps the checkpoint.
fn transferred(f: &Facts, s: &mut PodMigrationStatus, op: &agent_api::Operation) {
    let total = s.checkpoint.as_ref().map_or(0, |c| c.bytes);
    s.progress = Some(Progress {
        bytes_transferred: total,
        bytes_total: total,
    });
    let t = timings(s);
    t.transfer_ms = Some(to_i64(op.duration_ms));
    t.stream_ms = (op.stream_ms > 0).then(|| to_i64(op.stream_ms));
    // A checkpoint kept as a directory gets its digest as it is sent.
    if let Some(c) = s.checkpoint.as_mut() {
        for sent in &op.archives {
            if let Some(container) = c.containers.iter_mut().find(|c| c.name == sent.name) {
                container.digest = sent.digest.clone();
            }
        }
    }
    if !op.location.is_empty()
        && let Some(c) = s.checkpoint.as_mut()
    {
        c.location = Some(format!("{}:{}", target(f), op.location));
    }
    set_condition(
        s,
        f.now,
        condition::TRANSFERRED,
        true,
        "Verified",
        "digest verified on the target",
    );
}

fn failed(f: &Facts, call: Step, message: &str) -> (PodMigrationStatus, Duration) {
    let reason = match call {
        Step::PrepareTarget => Reason::PrepareFailed,
        Step::Checkpoint => Reason::CheckpointFailed,
        Step::Transfer => Reason::TransferFailed,
        _ => Reason::RestoreFailed,
    };
    match call {
        // A new target after the commit point: only the restore can go on.
        Step::PrepareTarget | Step::Transfer if f.status.committed => (
            retry_message(f, &format!("{call} failed, retrying: {message}")),
            RETRY,
        ),
        Step::PrepareTarget | Step::Checkpoint | Step::Transfer => (
            begin_abort(f, reason, &format!("{call} failed: {message}")),
            Duration::ZERO,
        ),
        // The target's agent says the memory cannot all come (and stopped the restored pod).
        Step::Memory => (
            memory_failed(
                f,
                Reason::PostCopyFailed,
                &format!(
                    "the memory of pod {} could not all come from {}: {message}; the restored \
                     process was stopped on {} and the pod's state is lost",
                    f.spec.pod_name,
                    source(f),
                    target(f)
                ),
            ),
            Duration::ZERO,
        ),
        // After the commit point only the restore can go on: retry until the timeout.
        Step::Commit(_) | Step::StageRestore | Step::FinishRestore => (
            retry_message(f, &format!("{call} failed, retrying: {message}")),
            RETRY,
        ),
        // The source pod must run again: keep asking.
        Step::Abort(Role::Source) => (
            retry_message(
                f,
                &format!("resuming the source failed, retrying: {message}"),
            ),
            RETRY,
        ),
        // Best effort: the target's data is garbage-collected by its agent anyway.
        Step::Abort(Role::Target) => {
            let note = format!("the target agent could not discard its data ({message})");
            (
                rolled_back(f, f.status.clone(), Some(&note)),
                Duration::ZERO,
            )
        }
        Step::Cleanup(Role::Source) => {
            let mut s = f.status.clone();
            set_condition(
                &mut s,
                f.now,
                condition::CLEANED_SOURCE,
                false,
                "CleanupFailed",
                message,
            );
            (s, Duration::ZERO)
        }
        Step::Cleanup(Role::Target) => {
            let mut s = f.status.clone();
            set_condition(
                &mut s,
                f.now,
                condition::CLEANED_TARGET,
                false,
                "CleanupFailed",
                message,
            );
            (s, Duration::ZERO)
        }
        // One attempt: the agent's garbage collection releases it after the retention time.
        Step::Release => {
            let mut s = f.status.clone();
            set_condition(
                &mut s,
                f.now,
                condition::TARGET_RELEASED,
                false,
                "ReleaseFailed",
                message,
            );
            (s, Duration::ZERO)
        }
    }
}

fn begin_abort(f: &Facts, reason: Reason, message: &str) -> PodMigrationStatus {
    let mut s = f.status.clone();
    if f.status.source_node.is_none() {
        // Nothing was started on any node: there is nothing to roll back.
        return finish(f, Phase::Failed, Some(reason), message);
    }
    set_condition(
        &mut s,
        f.now,
        condition::ABORTING,
        true,
        reason.as_str(),
        message,
    );
    s.message = Some(format!("rolling back: {message}"));
    s
}

fn rolled_back(f: &Facts, s: PodMigrationStatus, note: Option<&str>) -> PodMigrationStatus {
    let aborting = f
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::ABORTING);
    let reason = aborting.map(|c| c.reason.as_str());
    let why = aborting.map_or("", |c| c.message.as_str());
    let msg = match note {
        Some(note) => format!("{why}; the source pod runs as before; {note}"),
        None => format!("{why}; the source pod runs as before"),
    };
    finish_with(f, s, Phase::RolledBack, reason, &msg)
}

fn commit(f: &Facts) -> PodMigrationStatus {
    let mut s = f.status.clone();
    s.committed = true;
    s.commit_time = Some(Time(f.now));
    set_condition(
        &mut s,
        f.now,
        condition::COMMITTED,
        true,
        "Committed",
        "the checkpoint is on the target; the source will be removed",
    );
    enter(
        f,
        s,
        Phase::Restoring,
        "restoring the pod on the target node",
    )
}

fn retry_message(f: &Facts, message: &str) -> PodMigrationStatus {
    let mut s = f.status.clone();
    s.message = Some(message.to_string());
    s
}

fn finish(f: &Facts, phase: Phase, reason: Option<Reason>, message: &str) -> PodMigrationStatus {
    finish_with(
        f,
        f.status.clone(),
        phase,
        reason.map(Reason::as_str),
        message,
    )
}

fn finish_with(
    f: &Facts,
    mut s: PodMigrationStatus,
    phase: Phase,
    reason: Option<&str>,
    message: &str,
) -> PodMigrationStatus {
    timings(&mut s).total_ms = Some(millis(f.now, f.created));
    if phase == Phase::Failed
        && f.status.committed
        && !post_copy(f)
        && let Some(c) = s.checkpoint.as_mut()
    {
        c.location
            .get_or_insert_with(|| format!("{}:<agent store>", target(f)));
    }
    let mut s = enter(f, s, phase, message);
    if let Some(reason) = reason {
        set_condition(&mut s, f.now, condition::READY, false, reason, message);
    }
    s
}

/// Moves to `phase`: records the transition, the message, `Ready` and the generation. A
/// migration with no phase yet was Pending until now (its first write is the start, or its end).
fn enter(f: &Facts, mut s: PodMigrationStatus, phase: Phase, message: &str) -> PodMigrationStatus {
    if s.phase.is_none() && phase != Phase::Pending {
        s.phase_transitions.push(PhaseTransition {
            phase: Phase::Pending,
            time: MicroTime(f.created),
        });
    }
    if s.phase != Some(phase) {
        s.phase = Some(phase);
        s.phase_transitions.push(PhaseTransition {
            phase,
            time: MicroTime(f.now),
        });
    }
    s.message = Some(message.to_string());
    let (ready, reason) = match phase {
        Phase::Succeeded => (true, "Succeeded".to_string()),
        other => (false, format!("{other:?}")),
    };
    set_condition(&mut s, f.now, condition::READY, ready, &reason, message);
    s
}

/// Sets a condition, keeping its transition time when its status does not change.
pub fn set_condition(
    s: &mut PodMigrationStatus,
    now: Timestamp,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let generation = s.observed_generation;
    match s.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => s.conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: Time(now),
            observed_generation: generation,
        }),
    }
}

fn has(f: &Facts, type_: &str) -> bool {
    f.status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn recorded(f: &Facts, type_: &str) -> bool {
    f.status.conditions.iter().any(|c| c.type_ == type_)
}

/// The timeout counts from the start (Preparing), or from the creation while the migration has
/// not started; the time it waits in the queue for a slot (`queue.rs`) does not count.
fn timed_out(f: &Facts) -> bool {
    let queued = f
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::READY && c.reason == QUEUED);
    if queued && f.status.phase == Some(Phase::Pending) {
        return false;
    }
    let since = entered(f, Phase::Preparing).unwrap_or(f.created);
    f.now.duration_since(since) > SignedDuration::from_secs(f.spec.timeout_seconds)
}

/// How long after the checkpoint a paused source may wait for its commit before its agent
/// resumes it by itself: the rest of the migration's timeout and [`SOURCE_DEADLINE_MARGIN`]. The
/// operator gives up at the timeout; the agent decides between the commit and its deadline
/// atomically, so the margin only keeps the two from meeting at the edge.
pub fn source_deadline(f: &Facts) -> Duration {
    let since = entered(f, Phase::Preparing).unwrap_or(f.created);
    let used = f.now.duration_since(since).as_secs().max(0);
    let left = f.spec.timeout_seconds.saturating_sub(used).max(0);
    Duration::from_secs(u64::try_from(left).unwrap_or(0)) + SOURCE_DEADLINE_MARGIN
}

/// See [`source_deadline`].
pub const SOURCE_DEADLINE_MARGIN: Duration = Duration::from_secs(60);

fn entered(f: &Facts, phase: Phase) -> Option<Timestamp> {
    f.status
        .phase_transitions
        .iter()
        .rev()
        .find(|t| t.phase == phase)
        .map(|t| t.time.0)
}

fn timings(s: &mut PodMigrationStatus) -> &mut crds::Timings {
    s.timings.get_or_insert_with(Default::default)
}

/// What the status says of a backend that does not restore once (`targets::CHECKPOINT_IMAGE_CAVEAT`).
fn caveat(backend: Option<&str>) -> String {
    if backend == Some(agent_api::backend::CRI_CHECKPOINT_IMAGE) {
        format!(" ({})", crate::targets::CHECKPOINT_IMAGE_CAVEAT)
    } else {
        String::new()
    }
}

fn source(f: &Facts) -> &str {
    f.status.source_node.as_deref().unwrap_or("the source node")
}

fn target(f: &Facts) -> &str {
    f.status.target_node.as_deref().unwrap_or("the target node")
}

fn location(f: &Facts) -> String {
    f.status
        .checkpoint
        .as_ref()
        .and_then(|c| c.location.clone())
        .unwrap_or_else(|| format!("{}:<agent store>", target(f)))
}

fn millis(later: Timestamp, earlier: Timestamp) -> i64 {
    later
        .duration_since(earlier)
        .as_millis()
        .try_into()
        .unwrap_or(i64::MAX)
        .max(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Compression, NetworkSpec};

    const UID: &str = "m-1";

    /// A change to the facts of a pending migration.
    type Mutation = Box<dyn Fn(&mut Facts)>;

    fn spec() -> PodMigrationSpec {
        PodMigrationSpec {
            pod_name: "server".into(),
            target_node: None,
            strategy: Strategy::StopAndCopy,
            network: NetworkSpec::default(),
            timeout_seconds: 600,
            compression: Compression::None,
            bandwidth_limit: None,
            progress_timeout_seconds: 150,
        }
    }

    fn running_pod() -> PodFacts {
        PodFacts {
            uid: "pod-1".into(),
            node: Some("node-1".into()),
            phase: Some("Running".into()),
            ip: Some("10.1.0.5".into()),
            migratable: true,
            ..Default::default()
        }
    }

    fn new_migration() -> Facts {
        let created: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        Facts {
            uid: UID.into(),
            now: created,
            created,
            deleting: false,
            spec: spec(),
            status: PodMigrationStatus::default(),
            pod: Some(running_pod()),
            target: Some(Ok(Target {
                node: "node-2".into(),
                backend: "runtime-wrapper".into(),
            })),
            strategy: None,
            rxe: None,
            template_changed: false,
            target_gone: None,
        }
    }

    /// A migration not started yet: no phase written (a queued one is Pending).
    fn pending() -> Facts {
        new_migration()
    }

    /// Applies `action` the way the controller would, returning the facts after it.
    fn apply(mut f: Facts, action: &Action) -> Facts {
        match action {
            Action::Start(s) | Action::Write(s) | Action::Commit(s) => f.status = (**s).clone(),
            other => panic!("cannot apply {other:?} without I/O"),
        }
        f.now += SignedDuration::from_secs(1);
        f
    }

    fn answer(f: Facts, call: Step, a: Answer) -> Facts {
        let (status, _) = after(&f, call, a);
        let mut f = Facts { status, ..f };
        f.now += SignedDuration::from_secs(1);
        f
    }

    fn ok() -> Answer {
        Answer::Succeeded(agent_api::Operation::succeeded(UID))
    }

    fn checkpointed() -> Answer {
        let mut op = agent_api::Operation::succeeded(UID);
        op.duration_ms = 180;
        op.archives = vec![agent_api::v1::ContainerArchive {
            name: "app".into(),
            bytes: 4096,
            digest: "sha256:ab".into(),
        }];
        Answer::Succeeded(op)
    }

    fn transferred() -> Answer {
        let mut op = agent_api::Operation::succeeded(UID);
        (op.duration_ms, op.stream_ms) = (250, 200);
        op.archives = vec![agent_api::v1::ContainerArchive {
            name: "app".into(),
            bytes: 4096,
            digest: "sha256:sent".into(),
        }];
        Answer::Succeeded(op)
    }

    fn staged() -> Answer {
        let mut op = agent_api::Operation::succeeded(UID);
        op.staged = vec![agent_api::v1::StagedContainer {
            name: "app".into(),
            image: format!("/var/lib/kube-migros/migrations/{UID}/staged/app"),
        }];
        Answer::Succeeded(op)
    }

    fn condition<'a>(f: &'a Facts, type_: &str) -> Option<&'a Condition> {
        f.status.conditions.iter().find(|c| c.type_ == type_)
    }

    fn phases(f: &Facts) -> Vec<Phase> {
        f.status.phase_transitions.iter().map(|t| t.phase).collect()
    }

    /// Runs the happy path up to (not including) `stop`, returning the facts there.
    fn advance_to(stop: Phase) -> Facts {
        let mut f = pending();
        loop {
            if f.status.phase == Some(stop) {
                return f;
            }
            f = match next(&f) {
                a @ (Action::Start(_) | Action::Write(_) | Action::Commit(_)) => apply(f, &a),
                Action::Call(Step::Checkpoint) => answer(f, Step::Checkpoint, checkpointed()),
                Action::Call(Step::StageRestore) => answer(f, Step::StageRestore, staged()),
                Action::Call(Step::Transfer) => answer(f, Step::Transfer, transferred()),
                Action::Call(call) => answer(f, call, ok()),
                other => panic!("unexpected {other:?} before {stop:?}"),
            };
        }
    }

    fn failed_with(f: &Facts, action: &Action, reason: Reason) {
        let Action::Write(s) = action else {
            panic!("expected a failure, got {action:?}")
        };
        assert_eq!(s.phase, Some(Phase::Failed));
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason.as_str())
        );
        assert!(s.message.as_deref().is_some_and(|m| !m.is_empty()));
        assert_eq!(
            s.source_node, f.status.source_node,
            "a precondition failure records no source"
        );
    }

    #[test]
    fn a_new_migration_starts_in_its_first_write_which_records_that_it_was_pending() {
        let f = new_migration();
        let Action::Start(s) = next(&f) else {
            panic!("expected Start")
        };
        assert_eq!(
            phases(&apply(f.clone(), &Action::Start(s))),
            [Phase::Pending, Phase::Preparing]
        );
        // One that must wait is written Pending, with why.
        let queued = queued(&f, "queued: 1 of 3 waiting to start");
        assert_eq!(queued.phase, Some(Phase::Pending));
        assert_eq!(queued.phase_transitions.len(), 1);
        let ready = queued
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some(QUEUED));
        // One that cannot start fails in its first write, which says it was Pending.
        let mut gone = new_migration();
        gone.pod = None;
        let Action::Write(s) = next(&gone) else {
            panic!("expected a failure")
        };
        let failed = apply(gone, &Action::Write(s));
        assert_eq!(phases(&failed), [Phase::Pending, Phase::Failed]);
    }

    #[test]
    fn a_valid_migration_starts_by_recording_source_target_and_ip() {
        let f = pending();
        let Action::Start(s) = next(&f) else {
            panic!("expected Start")
        };
        assert_eq!(s.phase, Some(Phase::Preparing));
        assert_eq!(s.source_node.as_deref(), Some("node-1"));
        assert_eq!(s.target_node.as_deref(), Some("node-2"));
        assert_eq!(s.backend.as_deref(), Some("runtime-wrapper"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.1.0.5"));
        assert_eq!(s.source_pod_uid.as_deref(), Some("pod-1"));
        assert_eq!(s.rxe, None);
        assert_eq!(s.phase_transitions.len(), 2);
    }

    #[test]
    fn a_restore_from_checkpoint_images_says_it_restores_on_every_restart() {
        let mut f = new_migration();
        f.target = Some(Ok(Target {
            node: "node-2".into(),
            backend: agent_api::backend::CRI_CHECKPOINT_IMAGE.into(),
        }));
        let Action::Start(s) = next(&f) else {
            panic!("expected Start")
        };
        let message = s.message.clone().unwrap_or_default();
        assert!(
            message.contains(crate::targets::CHECKPOINT_IMAGE_CAVEAT),
            "{message}"
        );
        // The runtime wrapper restores once: nothing to say.
        let Action::Start(s) = next(&pending()) else {
            panic!("expected Start")
        };
        assert!(!s.message.unwrap_or_default().contains("every restart"));
    }

    #[test]
    fn every_precondition_failure_ends_failed_with_its_reason() {
        let cases: Vec<(Mutation, Reason)> = vec![
            (Box::new(|f| f.pod = None), Reason::PodNotFound),
            (
                Box::new(|f| f.pod.as_mut().unwrap().migratable = false),
                Reason::PodNotMigratable,
            ),
            (
                Box::new(|f| f.pod.as_mut().unwrap().phase = Some("Pending".into())),
                Reason::PodNotRunning,
            ),
            (
                Box::new(|f| f.pod.as_mut().unwrap().deleting = true),
                Reason::PodNotRunning,
            ),
            (
                Box::new(|f| f.pod.as_mut().unwrap().ip = None),
                Reason::PodNotRunning,
            ),
            (
                Box::new(|f| f.pod.as_mut().unwrap().unmovable = Some("hostNetwork".into())),
                Reason::PodNotMovable,
            ),
            (
                Box::new(|f| f.target = Some(Err("target node x is cordoned".into()))),
                Reason::TargetUnavailable,
            ),
        ];
        for (mutate, reason) in cases {
            let mut f = pending();
            mutate(&mut f);
            failed_with(&f, &next(&f), reason);
        }
    }

    #[test]
    fn a_strategy_the_nodes_cannot_do_or_that_is_not_built_is_refused_before_anything_started() {
        for strategy in [Strategy::PostCopy, Strategy::PreCopy] {
            let mut f = pending();
            f.spec.strategy = strategy;
            // Not judged yet: nothing is done meanwhile.
            assert_eq!(next(&f), Action::Wait(POLL));
            let lacking = "source node node-1 cannot do it: soft-dirty: no bits";
            f.strategy = Some(Err(lacking.into()));
            let action = next(&f);
            failed_with(&f, &action, Reason::StrategyUnavailable);
            let Action::Write(s) = action else {
                unreachable!()
            };
            assert_eq!(s.message.as_deref(), Some(lacking));
            assert_eq!(s.source_node, None, "nothing was started");
            // Nodes that have what it needs: PostCopy starts; PreCopy is refused all the same,
            // saying it is not built.
            f.strategy = Some(Ok(()));
            let action = next(&f);
            if strategy == Strategy::PostCopy {
                assert!(matches!(action, Action::Start(_)), "{action:?}");
                continue;
            }
            failed_with(&f, &action, Reason::StrategyUnavailable);
            let Action::Write(s) = action else {
                unreachable!()
            };
            assert!(
                s.message
                    .unwrap()
                    .contains("only with StopAndCopy and PostCopy")
            );
        }
        // StopAndCopy does not wait for a judgement.
        let f = pending();
        assert!(matches!(next(&f), Action::Start(_)));
    }

    #[test]
    fn a_pod_another_migration_holds_fails_the_migration_before_anything_started() {
        let f = pending();
        let failed = busy(&f, "earlier");
        assert_eq!(failed.source_node, None, "nothing was started");
        assert!(
            failed
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("earlier")
        );
        failed_with(&f, &Action::Write(Box::new(failed)), Reason::PodBusy);
    }

    #[test]
    fn an_rdma_pod_gets_a_block_first_and_carries_it() {
        let mut f = pending();
        f.pod.as_mut().unwrap().rdma = true;
        assert_eq!(next(&f), Action::AllocateRxe);
        let failed = allocation_failed(&f, "all 500 rxe blocks are taken");
        assert_eq!(failed.source_node, None, "nothing was started");
        failed_with(&f, &Action::Write(Box::new(failed)), Reason::RxeUnavailable);
        let block = RxeRanges {
            qpn_start: 1024,
            qpn_count: 256,
            mrn_start: 1024,
            mrn_count: 256,
        };
        f.rxe = Some(block);
        let Action::Start(s) = next(&f) else {
            panic!("expected Start")
        };
        assert_eq!(s.rxe, Some(block));
    }

    #[test]
    fn a_changed_template_rolls_back_before_the_commit_and_fails_after_it() {
        let mut f = advance_to(Phase::Transferring);
        f.template_changed = true;
        let Action::Write(s) = next(&f) else {
            panic!("expected a status write")
        };
        assert_eq!(s.phase, Some(Phase::Transferring));
        let aborting = s.conditions.iter().find(|c| c.type_ == condition::ABORTING);
        assert_eq!(aborting.map(|c| c.reason.as_str()), Some("TemplateChanged"));

        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.template_changed = true;
        let Action::Write(s) = next(&f) else {
            panic!("expected a status write")
        };
        assert_eq!(s.phase, Some(Phase::Failed));
        let ready = s.conditions.iter().find(|c| c.type_ == condition::READY);
        assert_eq!(ready.map(|c| c.reason.as_str()), Some("TemplateChanged"));
        assert!(s.message.unwrap_or_default().contains("checkpoint is kept"));
    }

    #[test]
    fn the_happy_path_visits_every_phase_and_records_timings() {
        let mut f = advance_to(Phase::Restoring);
        assert!(f.status.committed);
        assert!(f.status.commit_time.is_some());
        assert_eq!(
            condition(&f, condition::COMMITTED).map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(next(&f), Action::Call(Step::Commit(Role::Source)));
        f = answer(f, Step::Commit(Role::Source), ok());
        // The source pod object still exists: delete it, then wait while it goes.
        assert_eq!(next(&f), Action::DeleteSourcePod);
        f.pod.as_mut().unwrap().deleting = true;
        assert_eq!(next(&f), Action::Wait(POLL));
        f.pod = None;
        assert_eq!(next(&f), Action::Call(Step::StageRestore));
        f = answer(f, Step::StageRestore, staged());
        let images: Vec<_> = f
            .status
            .checkpoint
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .map(|c| c.image.clone())
            .collect();
        assert_eq!(
            images,
            vec![Some(format!(
                "/var/lib/kube-migros/migrations/{UID}/staged/app"
            ))]
        );
        assert_eq!(next(&f), Action::CreateReplacement);
        f.pod = Some(PodFacts {
            uid: "pod-2".into(),
            node: Some("node-2".into()),
            phase: Some("Pending".into()),
            created_by_migration: Some(UID.into()),
            ..running_pod()
        });
        assert_eq!(next(&f), Action::Wait(POLL));
        f.pod.as_mut().unwrap().phase = Some("Running".into());
        assert_eq!(next(&f), Action::Call(Step::FinishRestore));
        f = answer(f, Step::FinishRestore, ok());
        assert_eq!(f.status.phase, Some(Phase::Succeeded));
        assert_eq!(f.status.target_pod_uid.as_deref(), Some("pod-2"));
        assert_eq!(
            phases(&f),
            [
                Phase::Pending,
                Phase::Preparing,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::Restoring,
                Phase::Succeeded
            ]
        );
        let t = f.status.timings.unwrap();
        assert_eq!(t.checkpoint_ms, Some(180));
        assert_eq!((t.transfer_ms, t.stream_ms), (Some(250), Some(200)));
        assert_eq!(
            f.status.checkpoint.as_ref().unwrap().containers[0].digest,
            "sha256:sent"
        );
        assert!(t.downtime_ms.unwrap() > t.restore_ms.unwrap());
        assert!(t.total_ms.unwrap() >= t.downtime_ms.unwrap());
        assert_eq!(
            condition(&f, condition::READY).map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(next(&f), Action::Done);
    }

    #[test]
    fn transfer_progress_is_recorded_while_running() {
        let f = advance_to(Phase::Transferring);
        let (s, again) = after(
            &f,
            Step::Transfer,
            Answer::Running {
                bytes_done: 1000,
                bytes_total: 4096,
            },
        );
        assert_eq!(again, POLL);
        assert_eq!(
            s.progress,
            Some(Progress {
                bytes_transferred: 1000,
                bytes_total: 4096
            })
        );
        assert_eq!(s.phase, Some(Phase::Transferring));
    }

    #[test]
    fn a_source_whose_pod_left_its_rxe_block_is_refused_and_the_pod_stays() {
        let f = advance_to(Phase::Checkpointing);
        assert_eq!(next(&f), Action::Call(Step::Checkpoint));
        let mut f = answer(
            f,
            Step::Checkpoint,
            Answer::RxeOutsideBlock(
                "container app of pod ns/p got rxe numbers outside its block".into(),
            ),
        );
        assert!(!f.status.committed);
        assert_eq!(next(&f), Action::Call(Step::Abort(Role::Source)));
        f = answer(f, Step::Abort(Role::Source), ok());
        f = answer(f, Step::Abort(Role::Target), ok());
        assert_eq!(f.status.phase, Some(Phase::RolledBack));
        let ready = condition(&f, condition::READY).unwrap();
        assert_eq!(ready.reason, Reason::RxeOutsideBlock.as_str());
        let message = f.status.message.clone().unwrap_or_default();
        assert!(message.contains("outside its block"), "{message}");
        // The same answer to another step is a failure of that step.
        let f = advance_to(Phase::Transferring);
        let f = answer(f, Step::Transfer, Answer::RxeOutsideBlock("odd".into()));
        assert_eq!(
            condition(&f, condition::ABORTING).map(|c| c.reason.as_str()),
            Some(Reason::TransferFailed.as_str())
        );
    }

    #[test]
    fn a_failure_at_each_step_before_the_commit_point_rolls_back() {
        for (phase, call, reason) in [
            (Phase::Preparing, Step::PrepareTarget, Reason::PrepareFailed),
            (
                Phase::Checkpointing,
                Step::Checkpoint,
                Reason::CheckpointFailed,
            ),
            (Phase::Transferring, Step::Transfer, Reason::TransferFailed),
        ] {
            for failure in [
                Answer::Failed("disk full".into()),
                Answer::Unreachable("connection refused".into()),
            ] {
                let f = advance_to(phase);
                assert_eq!(next(&f), Action::Call(call));
                let mut f = answer(f, call, failure);
                assert!(!f.status.committed);
                assert_eq!(
                    condition(&f, condition::ABORTING).map(|c| c.reason.as_str()),
                    Some(reason.as_str())
                );
                assert_eq!(next(&f), Action::Call(Step::Abort(Role::Source)));
                // Resuming the source is retried until it works.
                let (s, again) = after(
                    &f,
                    Step::Abort(Role::Source),
                    Answer::Unreachable("down".into()),
                );
                assert_eq!(again, RETRY);
                assert_eq!(s.phase, Some(phase));
                f = answer(f, Step::Abort(Role::Source), ok());
                assert_eq!(next(&f), Action::Call(Step::Abort(Role::Target)));
                f = answer(
                    f,
                    Step::Abort(Role::Target),
                    Answer::Unreachable("gone".into()),
                );
                assert_eq!(f.status.phase, Some(Phase::RolledBack));
                let ready = condition(&f, condition::READY).unwrap();
                assert_eq!(ready.reason, reason.as_str());
                assert!(
                    f.status
                        .message
                        .as_deref()
                        .unwrap()
                        .contains("the source pod runs as before")
                );
                assert_eq!(next(&f), Action::Done);
            }
        }
    }

    #[test]
    fn a_failure_after_the_commit_point_is_retried_not_rolled_back() {
        for call in [
            Step::Commit(Role::Source),
            Step::StageRestore,
            Step::FinishRestore,
        ] {
            let f = advance_to(Phase::Restoring);
            let (s, again) = after(&f, call, Answer::Failed("runtime busy".into()));
            assert_eq!(again, RETRY);
            assert_eq!(s.phase, Some(Phase::Restoring));
            assert!(s.committed);
            assert!(!s.conditions.iter().any(|c| c.type_ == condition::ABORTING));
            assert!(s.message.unwrap().contains("retrying"));
        }
    }

    #[test]
    fn timeouts_roll_back_before_the_commit_point_and_fail_after_it() {
        let mut f = advance_to(Phase::Checkpointing);
        f.now = f.created + SignedDuration::from_secs(620);
        let Action::Write(s) = next(&f) else { panic!() };
        let aborting = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition::ABORTING)
            .unwrap();
        assert_eq!(aborting.reason, Reason::TimedOut.as_str());

        let mut f = pending();
        f.now = f.created + SignedDuration::from_secs(620);
        failed_with(&f, &next(&f), Reason::TimedOut);

        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.now = f.created + SignedDuration::from_secs(620);
        let Action::Write(s) = next(&f) else { panic!() };
        assert_eq!(s.phase, Some(Phase::Failed));
        assert!(
            s.checkpoint.as_ref().unwrap().location.is_some(),
            "a failed restore says where the checkpoint is"
        );
        // Failed past the commit point: the target releases the pod's IP and counters at once,
        // keeping the checkpoint; a failed release is not retried (the agent's retention is).
        f.status = *s;
        assert_eq!(next(&f), Action::Call(Step::Release));
        let failed = answer(f.clone(), Step::Release, Answer::Unreachable("down".into()));
        assert_eq!(next(&failed), Action::Done);
        // Not while a replacement of this migration exists (it holds the IP), unless deleted.
        let mut waiting = f.clone();
        waiting.pod = Some(PodFacts {
            created_by_migration: Some(UID.into()),
            ..Default::default()
        });
        assert_eq!(next(&waiting), Action::Done);
        waiting.deleting = true;
        assert_eq!(next(&waiting), Action::Call(Step::Release));
        f = answer(f, Step::Release, ok());
        assert_eq!(next(&f), Action::Done);
        f.deleting = true;
        assert_eq!(next(&f), Action::Done, "the checkpoint is kept");
    }

    #[test]
    fn a_source_resumed_at_its_deadline_fails_the_migration_and_is_never_restored_elsewhere() {
        let mut f = advance_to(Phase::Restoring);
        assert_eq!(next(&f), Action::Call(Step::Commit(Role::Source)));
        f = answer(
            f,
            Step::Commit(Role::Source),
            Answer::SourceResumed("resumed on this node at its deadline".into()),
        );
        assert_eq!(f.status.phase, Some(Phase::Failed));
        let ready = condition(&f, condition::READY).unwrap();
        assert_eq!(ready.reason, Reason::SourceResumed.as_str());
        assert!(has(&f, condition::SOURCE_RESUMED));
        assert!(!has(&f, condition::SOURCE_STOPPED));
        let message = f.status.message.clone().unwrap_or_default();
        assert!(message.contains("runs there as before"), "{message}");
        assert_eq!(
            f.status.checkpoint.as_ref().unwrap().location,
            None,
            "a stale checkpoint is not offered for a manual restore"
        );
        // Nothing more happens; deleted, both agents drop their data (the source's record, the
        // target's stale checkpoint).
        assert_eq!(next(&f), Action::Done);
        f.deleting = true;
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Source)));
        f = answer(f, Step::Cleanup(Role::Source), ok());
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Target)));

        // The same refusal before the commit point is a failed step like any other.
        let f = advance_to(Phase::Transferring);
        let (s, _) = after(
            &f,
            Step::Transfer,
            Answer::SourceResumed("its checkpoint is stale".into()),
        );
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::ABORTING && c.reason == "TransferFailed")
        );
    }

    #[test]
    fn a_source_is_given_the_rest_of_the_timeout_and_a_margin_to_be_committed() {
        let mut f = advance_to(Phase::Checkpointing);
        let started = entered(&f, Phase::Preparing).unwrap();
        f.now = started + SignedDuration::from_secs(100);
        assert_eq!(
            source_deadline(&f),
            Duration::from_secs(500) + SOURCE_DEADLINE_MARGIN
        );
        f.now = started + SignedDuration::from_secs(900);
        assert_eq!(source_deadline(&f), SOURCE_DEADLINE_MARGIN);
    }

    #[test]
    fn a_target_gone_past_the_commit_point_is_replaced_and_the_checkpoint_sent_again() {
        // Committed, the source stopped and its pod gone, the replacement made on node-2.
        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.pod = None;
        assert_eq!(next(&f), Action::Call(Step::StageRestore));
        f = answer(f, Step::StageRestore, staged());
        f.pod = Some(PodFacts {
            uid: "replacement-1".into(),
            node: Some("node-2".into()),
            phase: Some("Pending".into()),
            created_by_migration: Some(UID.into()),
            ..Default::default()
        });
        assert_eq!(next(&f), Action::Wait(POLL));

        // node-2 goes: the replacement bound to it goes first (forced: no kubelet is left).
        f.target_gone = Some("target node node-2 was deleted".into());
        f.target = Some(Ok(Target {
            node: "node-3".into(),
            backend: "runtime-wrapper".into(),
        }));
        assert_eq!(
            next(&f),
            Action::DeleteStrandedReplacement("replacement-1".into())
        );
        f.pod = None;
        let digest = f.status.checkpoint.as_ref().unwrap().containers[0]
            .digest
            .clone();
        let Action::Write(s) = next(&f) else { panic!() };
        f = apply(f, &Action::Write(s));
        assert_eq!(f.status.target_node.as_deref(), Some("node-3"));
        assert_eq!(f.status.phase, Some(Phase::Restoring));
        assert!(f.status.committed);
        let retargeted = condition(&f, condition::RETARGETED).unwrap();
        assert_eq!(retargeted.reason, "TargetGone");
        assert!(retargeted.message.contains("node-2 was deleted"));
        assert!(!has(&f, condition::TRANSFERRED));
        let c = f.status.checkpoint.as_ref().unwrap();
        assert!(c.containers.iter().all(|c| c.image.is_none()));
        assert_eq!(c.containers[0].digest, digest, "the digests stay");

        // Then node-3 as a target: prepared, the checkpoint sent again, staged, the pod made.
        f.target_gone = None;
        f.target = None;
        assert_eq!(next(&f), Action::Call(Step::PrepareTarget));
        // A failure there is retried: never a rollback past the commit point.
        let (s, again) = after(&f, Step::PrepareTarget, Answer::Failed("busy".into()));
        assert_eq!((s.phase, again), (Some(Phase::Restoring), RETRY));
        assert!(!has(
            &Facts {
                status: s,
                ..f.clone()
            },
            condition::ABORTING
        ));
        f = answer(f, Step::PrepareTarget, ok());
        assert_eq!(f.status.phase, Some(Phase::Restoring));
        assert_eq!(next(&f), Action::Call(Step::Transfer));
        let (s, again) = after(&f, Step::Transfer, Answer::Unreachable("reset".into()));
        assert_eq!((s.phase, again), (Some(Phase::Restoring), RETRY));
        f = answer(f, Step::Transfer, transferred());
        assert_eq!(next(&f), Action::Call(Step::StageRestore));
        f = answer(f, Step::StageRestore, staged());
        assert_eq!(next(&f), Action::CreateReplacement);
        f.pod = Some(PodFacts {
            uid: "replacement-2".into(),
            node: Some("node-3".into()),
            phase: Some("Running".into()),
            created_by_migration: Some(UID.into()),
            ..Default::default()
        });
        assert_eq!(next(&f), Action::Call(Step::FinishRestore));
        f = answer(f, Step::FinishRestore, ok());
        assert_eq!(f.status.phase, Some(Phase::Succeeded));
        assert_eq!(f.status.target_pod_uid.as_deref(), Some("replacement-2"));
        assert_eq!(f.status.former_targets, ["node-2"]);
        // Deleted, the target it left is asked once to drop what it kept, then both agents
        // clean up.
        f.deleting = true;
        let Action::CleanFormerTargets(s) = next(&f) else {
            panic!("the former target is not cleaned up")
        };
        f.status = *s;
        assert!(recorded(&f, condition::CLEANED_FORMER_TARGETS));
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Source)));
        f = answer(f, Step::Cleanup(Role::Source), ok());
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Target)));
        f = answer(f, Step::Cleanup(Role::Target), ok());
        assert_eq!(next(&f), Action::Done);
    }

    #[test]
    fn with_no_other_node_for_a_gone_target_the_migration_waits_saying_why() {
        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.pod = None;
        f.target_gone = Some("target node node-2 is out of service".into());
        f.target = Some(Err("no node can take the pod: node-3 is cordoned".into()));
        let Action::Write(s) = next(&f) else { panic!() };
        let msg = s.message.clone().unwrap();
        assert!(
            msg.contains("out of service") && msg.contains("node-3 is cordoned"),
            "{msg}"
        );
        f = apply(f, &Action::Write(s));
        assert_eq!(next(&f), Action::Wait(RETRY));
        assert_eq!(f.status.target_node.as_deref(), Some("node-2"));
        // The timeout still ends it, keeping the checkpoint.
        f.now = f.created + SignedDuration::from_secs(3600);
        let Action::Write(s) = next(&f) else { panic!() };
        assert_eq!(s.phase, Some(Phase::Failed));
    }

    #[test]
    fn past_the_commit_point_the_source_is_asked_until_it_answers_whatever_the_timeout() {
        let mut f = advance_to(Phase::Restoring);
        f.now = f.created + SignedDuration::from_secs(3600);
        f.template_changed = true;
        f.deleting = true;
        assert_eq!(next(&f), Action::Call(Step::Commit(Role::Source)));
        let (s, again) = after(
            &f,
            Step::Commit(Role::Source),
            Answer::Unreachable("node gone".into()),
        );
        assert_eq!((s.phase, again), (Some(Phase::Restoring), RETRY));
        // Once it answered, the rest follows: timed out, the migration fails keeping the
        // checkpoint (deleted, the target then lets go of the pod's IP).
        f.template_changed = false;
        f = answer(f, Step::Commit(Role::Source), ok());
        let Action::Write(s) = next(&f) else { panic!() };
        assert_eq!(s.phase, Some(Phase::Failed));
        f.status = *s;
        assert_eq!(next(&f), Action::Call(Step::Release));
    }

    #[test]
    fn the_time_in_the_queue_does_not_count_towards_the_timeout() {
        let mut f = pending();
        f.status = queued(&f, "queued: 3 of 4 waiting to start");
        f.now = f.created + SignedDuration::from_secs(3600);
        assert!(!timed_out(&f));
        // Started after 50 minutes in the queue: 600 s from then.
        let mut f = advance_to(Phase::Checkpointing);
        for t in &mut f.status.phase_transitions {
            if t.phase != Phase::Pending {
                t.time = MicroTime(f.created + SignedDuration::from_secs(3000));
            }
        }
        f.now = f.created + SignedDuration::from_secs(3500);
        assert!(!timed_out(&f));
        f.now = f.created + SignedDuration::from_secs(3601);
        assert!(timed_out(&f));
    }

    #[test]
    fn deleting_a_migration_rolls_back_before_the_commit_point_and_lets_go_after() {
        let mut f = pending();
        f.deleting = true;
        assert_eq!(next(&f), Action::Done);

        let mut f = advance_to(Phase::Transferring);
        f.deleting = true;
        let Action::Write(s) = next(&f) else { panic!() };
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::ABORTING && c.reason == "Deleted")
        );

        // Past the commit point the restore goes on: the checkpoint is the pod's only copy.
        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.deleting = true;
        assert_eq!(next(&f), Action::DeleteSourcePod);
        // ...until the timeout; then the target lets go of the pod's IP and counters, keeping the
        // checkpoint, once, and the object goes.
        f.now = f.created + SignedDuration::from_secs(3600);
        let Action::Write(s) = next(&f) else { panic!() };
        assert_eq!(s.phase, Some(Phase::Failed));
        f.status = *s;
        assert_eq!(next(&f), Action::Call(Step::Release));
        assert!(keeps_checkpoint(&f));
        f = answer(f, Step::Release, ok());
        assert!(has(&f, condition::TARGET_RELEASED));
        assert!(!recorded(&f, condition::CLEANED_TARGET));
        assert_eq!(next(&f), Action::Done);
    }

    #[test]
    fn a_deleted_final_migration_cleans_both_agents_once() {
        let mut f = advance_to(Phase::Checkpointing);
        f = answer(f, Step::Checkpoint, Answer::Failed("criu".into()));
        f = answer(f, Step::Abort(Role::Source), ok());
        f = answer(f, Step::Abort(Role::Target), ok());
        assert_eq!(f.status.phase, Some(Phase::RolledBack));
        f.deleting = true;
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Source)));
        f = answer(
            f,
            Step::Cleanup(Role::Source),
            Answer::Unreachable("down".into()),
        );
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Target)));
        f = answer(f, Step::Cleanup(Role::Target), ok());
        assert_eq!(next(&f), Action::Done);
    }

    #[test]
    fn a_staging_that_is_not_this_migrations_is_not_used() {
        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.pod = None;
        let staged_as = |backend: &str, image: &str| {
            let mut f = f.clone();
            f.status.backend = Some(backend.into());
            let mut op = agent_api::Operation::succeeded(UID);
            op.staged = vec![agent_api::v1::StagedContainer {
                name: "app".into(),
                image: image.into(),
            }];
            let (s, _) = after(&f, Step::StageRestore, Answer::Succeeded(op));
            s.checkpoint.unwrap().containers[0].image.clone()
        };
        let wrapper = agent_api::backend::RUNTIME_WRAPPER;
        let images = agent_api::backend::CRI_CHECKPOINT_IMAGE;
        let archive = agent_api::backend::CRI_CHECKPOINT_ARCHIVE;
        let ours = format!("/var/lib/kube-migros/migrations/{UID}/staged/app");
        assert_eq!(staged_as(wrapper, &ours), Some(ours.clone()));
        // Checkpoint images: only the image derived from the recorded archive, pinned by digest.
        let recorded = &f.status.checkpoint.as_ref().unwrap().containers[0];
        let layer_size = u64::try_from(recorded.bytes).unwrap();
        let image = checkpoint_image::Parts::new("app", &recorded.digest, layer_size);
        let tagged = format!("registry:5000/checkpoints:{UID}-app");
        let pinned = format!("{tagged}@{}", image.manifest_digest());
        assert_eq!(staged_as(images, &pinned), Some(pinned.clone()));
        let other_layer = checkpoint_image::Parts::new("app", "sha256:other", layer_size);
        assert_eq!(
            staged_as(archive, &format!("{ours}.tar")),
            Some(format!("{ours}.tar"))
        );
        for (backend, foreign) in [
            (
                wrapper,
                "/var/lib/kube-migros/migrations/other/staged/app".to_string(),
            ),
            (wrapper, format!("/x/../../{UID}/staged/app")),
            (wrapper, format!("/etc/x/{UID}/staged/app")),
            (wrapper, "relative/m-1/staged/app".to_string()),
            (images, "docker.io/evil/privileged:latest".to_string()),
            (images, "registry:5000/checkpoints:other-app".to_string()),
            // Unpinned: whatever the tag names when the kubelet pulls.
            (images, tagged.clone()),
            // Pinned, but not the image of the checkpoint recorded.
            (
                images,
                format!("{tagged}@{}", other_layer.manifest_digest()),
            ),
            (
                images,
                format!(
                    "registry:5000/checkpoints:other-app@{}",
                    image.manifest_digest()
                ),
            ),
            (archive, ours.clone()),
        ] {
            assert_eq!(staged_as(backend, &foreign), None, "{backend}: {foreign}");
        }
        // Past the commit point, the step is retried.
        let mut op = agent_api::Operation::succeeded(UID);
        op.staged = vec![];
        let (s, again) = after(&f, Step::StageRestore, Answer::Succeeded(op));
        assert_eq!(again, RETRY);
        assert!(s.message.unwrap().contains("not exactly once"));
    }

    #[test]
    fn a_foreign_pod_with_the_same_name_is_never_touched() {
        let mut f = advance_to(Phase::Restoring);
        f = answer(f, Step::Commit(Role::Source), ok());
        f.pod = None;
        f = answer(f, Step::StageRestore, staged());
        f.pod = Some(PodFacts {
            uid: "someone-else".into(),
            created_by_migration: None,
            ..running_pod()
        });
        let Action::Write(s) = next(&f) else { panic!() };
        assert!(s.message.unwrap().contains("not created by this migration"));
        assert_eq!(s.target_pod_uid, None);
    }

    /// A PostCopy migration run on the happy path up to the pod running on the target (Restoring
    /// done, CopyingMemory entered).
    fn post_copy_running() -> Facts {
        let mut f = pending();
        f.spec.strategy = Strategy::PostCopy;
        f.strategy = Some(Ok(()));
        loop {
            f = match next(&f) {
                a @ (Action::Start(_) | Action::Write(_) | Action::Commit(_)) => apply(f, &a),
                Action::Call(Step::Checkpoint) => answer(f, Step::Checkpoint, checkpointed()),
                Action::Call(Step::StageRestore) => answer(f, Step::StageRestore, staged()),
                Action::Call(Step::Transfer) => answer(f, Step::Transfer, transferred()),
                Action::DeleteSourcePod => {
                    f.pod = None;
                    f
                }
                Action::CreateReplacement => {
                    f.pod = Some(PodFacts {
                        uid: "pod-2".into(),
                        node: Some("node-2".into()),
                        created_by_migration: Some(UID.into()),
                        ..running_pod()
                    });
                    f
                }
                Action::Call(Step::FinishRestore) => {
                    return answer(f, Step::FinishRestore, ok());
                }
                Action::Call(call) => answer(f, call, ok()),
                other => panic!("unexpected {other:?} on the way to the restore"),
            };
        }
    }

    fn memory(done: u64, total: u64) -> Answer {
        Answer::Running {
            bytes_done: done,
            bytes_total: total,
        }
    }

    #[test]
    fn post_copy_runs_the_pod_first_then_waits_for_its_memory_before_it_succeeds() {
        let mut f = post_copy_running();
        assert_eq!(f.status.phase, Some(Phase::CopyingMemory));
        // The pause ends when the pod runs on the target, not when its memory is in.
        let t = f.status.timings.unwrap();
        assert!(t.downtime_ms.is_some() && t.restore_ms.is_some());
        assert_eq!(t.memory_ms, None);
        assert_eq!(
            condition(&f, condition::SOURCE_STOPPED).map(|c| c.reason.as_str()),
            Some("ServingMemory")
        );
        assert_eq!(
            condition(&f, condition::MEMORY_COMPLETE).map(|c| c.status.as_str()),
            Some("False")
        );
        assert_eq!(next(&f), Action::Call(Step::Memory));
        f = answer(f, Step::Memory, memory(1 << 20, 4 << 20));
        let m = f.status.memory.clone().unwrap();
        assert_eq!(
            (m.bytes_transferred, m.bytes_remaining, m.bytes_total),
            (1 << 20, 3 << 20, 4 << 20)
        );
        // One second in the phase: 1 MiB/s on average.
        assert_eq!(m.bytes_per_second, 1 << 20);
        assert!(
            f.status
                .message
                .as_deref()
                .unwrap()
                .contains("1.0 MiB of 4.0 MiB")
        );
        assert_eq!(f.status.phase, Some(Phase::CopyingMemory));
        // The overall timeout no longer ends a pod that runs and receives its memory.
        f.now += SignedDuration::from_secs(f.spec.timeout_seconds);
        f = answer(f, Step::Memory, memory(2 << 20, 4 << 20));
        assert_eq!(next(&f), Action::Call(Step::Memory));
        let mut op = agent_api::Operation::succeeded(UID);
        op.bytes_total = 4 << 20;
        op.bytes_done = 4 << 20;
        f = answer(f, Step::Memory, Answer::Succeeded(op));
        assert_eq!(f.status.phase, Some(Phase::Succeeded));
        assert_eq!(
            phases(&f),
            [
                Phase::Pending,
                Phase::Preparing,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::Restoring,
                Phase::CopyingMemory,
                Phase::Succeeded
            ]
        );
        let m = f.status.memory.clone().unwrap();
        assert_eq!((m.bytes_transferred, m.bytes_remaining), (4 << 20, 0));
        assert!(f.status.timings.unwrap().memory_ms.unwrap() > 0);
        assert_eq!(
            condition(&f, condition::MEMORY_COMPLETE).map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(next(&f), Action::Done);
    }

    #[test]
    fn post_copy_memory_that_cannot_come_fails_the_migration_and_keeps_no_checkpoint() {
        let mut f = post_copy_running();
        // Where the target keeps the archive (as a real agent's Transfer answers it).
        f.status.checkpoint.as_mut().unwrap().location = Some(format!("node-2:/m/{UID}"));
        let (s, _) = after(
            &f,
            Step::Memory,
            Answer::Failed("container app: the source closed the page stream".into()),
        );
        assert_eq!(s.phase, Some(Phase::Failed));
        let f = Facts { status: s, ..f };
        assert_eq!(
            condition(&f, condition::READY).map(|c| c.reason.as_str()),
            Some("PostCopyFailed")
        );
        let msg = f.status.message.clone().unwrap();
        assert!(msg.contains("the source closed the page stream"), "{msg}");
        assert!(msg.contains("state is lost"), "{msg}");
        assert_eq!(
            condition(&f, condition::MEMORY_COMPLETE).map(|c| c.status.as_str()),
            Some("False")
        );
        // Nothing to restore by hand: no location, no checkpoint kept.
        assert!(!keeps_checkpoint(&f));
        assert_eq!(f.status.checkpoint.as_ref().unwrap().location, None);
        // The source, frozen for page servers nobody fetches from, is stopped now (the
        // replacement holds the IP, so the target releases nothing yet).
        assert_eq!(next(&f), Action::Call(Step::Cleanup(Role::Source)));
        let f = answer(f, Step::Cleanup(Role::Source), ok());
        assert_eq!(next(&f), Action::Done);
        // A deletion releases the target and cleans it up.
        let deleted = Facts {
            deleting: true,
            ..f
        };
        assert_eq!(next(&deleted), Action::Call(Step::Release));
        let deleted = answer(deleted, Step::Release, ok());
        assert_eq!(next(&deleted), Action::Call(Step::Cleanup(Role::Target)));
    }

    #[test]
    fn a_call_that_fails_says_nothing_of_the_memory_and_is_asked_again() {
        let f = post_copy_running();
        let (s, again) = after(&f, Step::Memory, Answer::Unreachable("restarting".into()));
        assert_eq!((s.phase, again), (Some(Phase::CopyingMemory), RETRY));
    }

    #[test]
    fn post_copy_with_no_memory_arriving_for_the_progress_timeout_fails() {
        let mut f = post_copy_running();
        f = answer(f, Step::Memory, memory(100, 1000));
        // No more bytes: the time of the last progress stays.
        let last = f.status.memory.clone().unwrap().last_progress_time;
        f.now += SignedDuration::from_secs(100);
        f = answer(f, Step::Memory, memory(100, 1000));
        assert_eq!(f.status.memory.clone().unwrap().last_progress_time, last);
        assert_eq!(f.status.phase, Some(Phase::CopyingMemory));
        // Decided on an answer, never on the stored time alone (an operator back after a while
        // asks first).
        f.now += SignedDuration::from_secs(f.spec.progress_timeout_seconds);
        assert_eq!(next(&f), Action::Call(Step::Memory));
        // The memory went on meanwhile: no timeout.
        let (s, _) = after(&f, Step::Memory, memory(500, 1000));
        assert_eq!(s.phase, Some(Phase::CopyingMemory));
        // It did not: the migration fails, also when the agent cannot be asked.
        for stalled in [memory(100, 1000), Answer::Unreachable("gone".into())] {
            let (s, again) = after(&f, Step::Memory, stalled);
            assert_eq!((s.phase, again), (Some(Phase::Failed), Duration::ZERO));
            let ready = s.conditions.iter().find(|c| c.type_ == condition::READY);
            assert_eq!(ready.map(|c| c.reason.as_str()), Some("TimedOut"));
            assert!(s.message.unwrap().contains("progressTimeoutSeconds"));
        }
    }

    #[test]
    fn an_agent_back_from_a_restart_keeps_the_memory_total_it_reported() {
        let f = post_copy_running();
        let f = answer(f, Step::Memory, memory(100, 1000));
        // A restarted target agent answers success from its record, without the sizes.
        let f = answer(f, Step::Memory, ok());
        let m = f.status.memory.clone().unwrap();
        assert_eq!((m.bytes_total, m.bytes_transferred), (1000, 1000));
    }

    #[test]
    fn post_copy_never_restores_on_another_node_when_the_target_goes() {
        let mut f = advance_to(Phase::Restoring);
        f.spec.strategy = Strategy::PostCopy;
        f.target_gone = Some("target node node-2 was deleted".into());
        f.target = Some(Ok(Target {
            node: "node-3".into(),
            backend: "runtime-wrapper".into(),
        }));
        f = answer(f, Step::Commit(Role::Source), ok());
        f.pod = None;
        let action = next(&f);
        failed_with(&f, &action, Reason::PostCopyFailed);
        let mut running = post_copy_running();
        running.target_gone = Some("target node node-2 was deleted".into());
        failed_with(&running, &next(&running), Reason::PostCopyFailed);
    }

    #[test]
    fn final_phases_are_left_alone() {
        for phase in [Phase::Succeeded, Phase::Failed, Phase::RolledBack] {
            let mut f = pending();
            f.status.phase = Some(phase);
            f.now = f.created + SignedDuration::from_secs(100_000);
            assert_eq!(next(&f), Action::Done);
        }
    }
}
