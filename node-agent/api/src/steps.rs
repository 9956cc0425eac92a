//! The step protocol: the migration steps an agent performs, which node's agent performs each, the
//! name that logs and metrics use for it, and the request that asks for it. The operator, the node
//! agent and the test agent all speak it through this module, so the three cannot drift apart.

use crate::v1;

/// Which end of a migration a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Source,
    Target,
}

impl Role {
    /// The role as the API carries it.
    pub fn to_api(self) -> v1::Role {
        match self {
            Role::Source => v1::Role::Source,
            Role::Target => v1::Role::Target,
        }
    }

    /// The role of an API request; `None` when the request names none.
    pub fn from_api(role: v1::Role) -> Option<Self> {
        match role {
            v1::Role::Source => Some(Role::Source),
            v1::Role::Target => Some(Role::Target),
            v1::Role::Unspecified => None,
        }
    }
}

/// One step of one migration on one agent (docs/architecture.md, "One migration").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// Target: reserve room, check the rxe block and the base images.
    PrepareTarget,
    /// Source: silence the pod's IP, pause its containers, checkpoint them through the CRI.
    Checkpoint,
    /// Source: stream the checkpoint to the target agent.
    Transfer,
    /// Target: rxe counters, IP reservation and block; answers what each container restores from.
    StageRestore,
    /// Target: the replacement runs; lift the IP block and announce the address.
    FinishRestore,
    /// Target, post-copy: how much of the memory left on the source has arrived (asked until it
    /// all has, or it cannot).
    Memory,
    /// Past the commit point. Source: stop the paused containers for good.
    Commit(Role),
    /// Before the commit point. Source: resume the pod as it was; target: discard.
    Abort(Role),
    /// Drop everything kept for the migration.
    Cleanup(Role),
    /// Target, failed or deleted past the commit point: release the pod's IP and counters, keep
    /// the checkpoint.
    Release,
}

impl Step {
    /// Every step, in the order of a migration.
    pub const ALL: [Step; 13] = [
        Step::PrepareTarget,
        Step::Checkpoint,
        Step::Transfer,
        Step::StageRestore,
        Step::FinishRestore,
        Step::Memory,
        Step::Commit(Role::Source),
        Step::Commit(Role::Target),
        Step::Abort(Role::Source),
        Step::Abort(Role::Target),
        Step::Cleanup(Role::Source),
        Step::Cleanup(Role::Target),
        Step::Release,
    ];

    /// The step's name in logs, messages and the `step` label of both sides' metrics.
    pub fn name(self) -> &'static str {
        match self {
            Step::PrepareTarget => "prepare_target",
            Step::Checkpoint => "checkpoint",
            Step::Transfer => "transfer",
            Step::StageRestore => "stage_restore",
            Step::FinishRestore => "finish_restore",
            Step::Memory => "memory",
            Step::Commit(Role::Source) => "commit_source",
            Step::Commit(Role::Target) => "commit_target",
            Step::Abort(Role::Source) => "abort_source",
            Step::Abort(Role::Target) => "abort_target",
            Step::Cleanup(Role::Source) => "cleanup_source",
            Step::Cleanup(Role::Target) => "cleanup_target",
            Step::Release => "release_target",
        }
    }

    /// The node whose agent performs the step.
    pub fn role(self) -> Role {
        match self {
            Step::Checkpoint | Step::Transfer => Role::Source,
            Step::PrepareTarget
            | Step::StageRestore
            | Step::FinishRestore
            | Step::Memory
            | Step::Release => Role::Target,
            Step::Commit(role) | Step::Abort(role) | Step::Cleanup(role) => role,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a step request may carry: the migration, the pod it moves and how to move it. Each
/// step's request takes the part it needs ([`StepArgs::request`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepArgs {
    pub migration_uid: String,
    pub pod: v1::PodRef,
    /// RDMA pods: the pod's rxe block.
    pub rxe: Option<v1::RxeBlock>,
    /// PrepareTarget: room to reserve for the checkpoint, in bytes.
    pub expected_bytes: u64,
    /// PrepareTarget: the restore backend the target stages with (empty: its preferred one).
    pub backend: String,
    /// PrepareTarget: the source's node (only its agent may stream the checkpoint).
    pub source_node: String,
    /// Transfer: `host:port` of the target agent, and its node (which its certificate names).
    pub target_endpoint: String,
    pub target_node: String,
    pub compression: v1::Compression,
    /// Transfer: bytes per second, 0 for unlimited.
    pub bandwidth_limit: u64,
    /// Checkpoint: the source resumes the pod by itself this many seconds later unless the
    /// migration passed its commit point first (0: the agent's default).
    pub resume_after_seconds: u64,
    /// StageRestore: the archives the checkpoint answered (names, digests, sizes), which the
    /// target must have received exactly.
    pub expected: Vec<v1::ContainerArchive>,
    /// Post-copy. Checkpoint: leave the memory to a page server; StageRestore: fetch it from
    /// this source (its node and agent endpoint).
    pub post_copy: Option<v1::PostCopySource>,
}

/// The request of one step, as the API carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum StepRequest {
    PrepareTarget(v1::PrepareTargetRequest),
    Checkpoint(v1::CheckpointRequest),
    Transfer(v1::TransferRequest),
    StageRestore(v1::StageRestoreRequest),
    FinishRestore(v1::StepRequest),
    Memory(v1::StepRequest),
    Commit(v1::StepRequest),
    Abort(v1::StepRequest),
    Cleanup(v1::StepRequest),
    Release(v1::StepRequest),
}

impl StepArgs {
    /// The arguments of a step that needs nothing but the migration (commit, abort, cleanup,
    /// finish).
    pub fn of(migration_uid: impl Into<String>) -> Self {
        Self {
            migration_uid: migration_uid.into(),
            ..Default::default()
        }
    }

    /// The request that asks for `step` with these arguments.
    pub fn request(&self, step: Step) -> StepRequest {
        let uid = self.migration_uid.clone();
        let plain = |role: Role| v1::StepRequest {
            migration_uid: uid.clone(),
            role: role.to_api().into(),
        };
        match step {
            Step::PrepareTarget => StepRequest::PrepareTarget(v1::PrepareTargetRequest {
                migration_uid: uid.clone(),
                pod: Some(self.pod.clone()),
                expected_bytes: self.expected_bytes,
                rxe: self.rxe,
                backend: self.backend.clone(),
                source_node: self.source_node.clone(),
            }),
            Step::Checkpoint => StepRequest::Checkpoint(v1::CheckpointRequest {
                migration_uid: uid.clone(),
                pod: Some(self.pod.clone()),
                backend: self.backend.clone(),
                resume_after_seconds: self.resume_after_seconds,
                post_copy: self.post_copy.is_some(),
            }),
            Step::Transfer => StepRequest::Transfer(v1::TransferRequest {
                migration_uid: uid.clone(),
                target_endpoint: self.target_endpoint.clone(),
                compression: self.compression.into(),
                bandwidth_limit: self.bandwidth_limit,
                target_node: self.target_node.clone(),
            }),
            Step::StageRestore => StepRequest::StageRestore(v1::StageRestoreRequest {
                migration_uid: uid.clone(),
                pod: Some(self.pod.clone()),
                rxe: self.rxe,
                expected: self.expected.clone(),
                post_copy: self.post_copy.clone(),
            }),
            Step::FinishRestore => StepRequest::FinishRestore(plain(Role::Target)),
            Step::Memory => StepRequest::Memory(plain(Role::Target)),
            Step::Commit(role) => StepRequest::Commit(plain(role)),
            Step::Abort(role) => StepRequest::Abort(plain(role)),
            Step::Cleanup(role) => StepRequest::Cleanup(plain(role)),
            Step::Release => StepRequest::Release(plain(Role::Target)),
        }
    }
}

impl StepRequest {
    /// The migration the request is about.
    pub fn migration_uid(&self) -> &str {
        match self {
            StepRequest::PrepareTarget(r) => &r.migration_uid,
            StepRequest::Checkpoint(r) => &r.migration_uid,
            StepRequest::Transfer(r) => &r.migration_uid,
            StepRequest::StageRestore(r) => &r.migration_uid,
            StepRequest::FinishRestore(r)
            | StepRequest::Memory(r)
            | StepRequest::Commit(r)
            | StepRequest::Abort(r)
            | StepRequest::Cleanup(r)
            | StepRequest::Release(r) => &r.migration_uid,
        }
    }

    /// The step the request asks for; `None` for a role-carrying request that names no role.
    pub fn step(&self) -> Option<Step> {
        let role = |r: &v1::StepRequest| Role::from_api(r.role());
        Some(match self {
            StepRequest::PrepareTarget(_) => Step::PrepareTarget,
            StepRequest::Checkpoint(_) => Step::Checkpoint,
            StepRequest::Transfer(_) => Step::Transfer,
            StepRequest::StageRestore(_) => Step::StageRestore,
            StepRequest::FinishRestore(_) => Step::FinishRestore,
            StepRequest::Memory(_) => Step::Memory,
            StepRequest::Commit(r) => Step::Commit(role(r)?),
            StepRequest::Abort(r) => Step::Abort(role(r)?),
            StepRequest::Cleanup(r) => Step::Cleanup(role(r)?),
            StepRequest::Release(_) => Step::Release,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_its_own_name_and_its_request_names_it_back() {
        let args = StepArgs {
            migration_uid: "m-1".into(),
            ..Default::default()
        };
        let mut names = std::collections::BTreeSet::new();
        for step in Step::ALL {
            assert!(names.insert(step.name()), "{step:?} shares its name");
            let request = args.request(step);
            assert_eq!(request.step(), Some(step), "{step:?}");
            assert_eq!(request.migration_uid(), "m-1");
        }
    }

    #[test]
    fn steps_run_on_the_node_of_their_role() {
        assert_eq!(Step::Checkpoint.role(), Role::Source);
        assert_eq!(Step::Transfer.role(), Role::Source);
        assert_eq!(Step::PrepareTarget.role(), Role::Target);
        assert_eq!(Step::FinishRestore.role(), Role::Target);
        assert_eq!(Step::Abort(Role::Source).role(), Role::Source);
        assert_eq!(Step::Cleanup(Role::Target).role(), Role::Target);
    }

    #[test]
    fn a_role_request_without_a_role_names_no_step() {
        let request = StepRequest::Commit(v1::StepRequest {
            migration_uid: "m".into(),
            role: v1::Role::Unspecified.into(),
        });
        assert_eq!(request.step(), None);
    }
}
