//! The node agent on real nodes: containerd 2.1, runc and CRIU 4 in sandbox nodes on one bridge,
//! the real agent binary in each node, the demo workload as the pod. The tests play the operator
//! (and, for the archive checks, a peer agent) over mutual TLS, and the kubelet through crictl.
//! The one thing not real is the rxe device: its counters are files in a per-node directory.
//!
//! One setup for all cases (the nodes are shared), so the cases run one after another.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support

#[macro_use]
mod world;
mod archives;
mod migration;
mod post_copy;
mod requests;

use std::sync::Arc;

use agent_api::v1;
use libtest_mimic::{Arguments, Failed, Trial};
use world::{Result, World};

/// One case of the suite.
type Case = fn(&World) -> Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    // The cases share three nodes; they run one at a time.
    args.test_threads = Some(1);
    let cases: Vec<(&str, Case)> = vec![
        (
            "capabilities_report_the_real_runtime_and_rxe",
            requests::capabilities,
        ),
        (
            "a_migration_through_the_agents_keeps_state_ip_and_the_peers_tcp_connection",
            migration::migrate,
        ),
        (
            "the_runtime_wrapper_restores_the_replacement_once_keeping_state_ip_files_and_the_peer",
            migration::migrate_with_the_wrapper,
        ),
        (
            "the_runtime_wrapper_restores_a_checkpoint_the_cri_took",
            migration::migrate_with_the_wrapper_from_a_cri_checkpoint,
        ),
        (
            "a_plain_pod_runs_under_the_wrapper_as_under_runc_and_a_restore_it_cannot_do_fails",
            migration::plain_pods_under_the_wrapper,
        ),
        (
            "post_copy_restores_at_once_and_every_page_comes_from_the_source",
            post_copy::post_copy,
        ),
        (
            "a_source_agent_that_dies_during_post_copy_takes_the_restored_pod_with_it",
            post_copy::source_agent_dies_during_post_copy,
        ),
        (
            "a_source_agent_restarted_before_the_commit_gives_the_pod_back_on_abort",
            post_copy::source_agent_restarted_before_the_commit,
        ),
        (
            "post_copy_cleanup_stops_a_committed_source_nobody_fetches_from",
            post_copy::cleanup_stops_a_committed_source_nobody_fetches_from,
        ),
        (
            "abort_resumes_the_paused_source_and_it_continues",
            migration::abort,
        ),
        (
            "a_source_left_alone_resumes_at_its_deadline_and_refuses_a_late_commit",
            migration::deadline,
        ),
        (
            "corrupted_truncated_oversized_and_hostile_archives_are_rejected_leaving_nothing_staged",
            archives::bad_archives,
        ),
        (
            "callers_without_a_valid_certificate_are_refused",
            requests::refusals,
        ),
        (
            "streams_that_name_no_migration_hold_no_receive_slot",
            archives::quiet_streams_take_no_slot,
        ),
        (
            "one_restore_at_a_time_holds_the_rxe_counters",
            archives::rxe_lock,
        ),
        (
            "invalid_requests_fail_with_a_reason_and_change_nothing",
            requests::invalid_requests,
        ),
        (
            "the_raw_baseline_recipe_migrates_the_demo_without_the_agents",
            requests::raw_recipe,
        ),
    ];
    let wanted = cases
        .iter()
        .any(|(name, _)| args.filter.as_deref().is_none_or(|f| name.contains(f)) && !args.list);
    let started = std::time::Instant::now();
    let world = if wanted {
        match World::up().inspect(|_| {
            eprintln!(
                "nodes and agents up in {:.1} s",
                started.elapsed().as_secs_f64()
            )
        }) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                eprintln!("setting up the nodes and agents failed: {e}");
                std::process::exit(101);
            }
        }
    } else {
        None
    };
    let trials = cases
        .into_iter()
        .map(|(name, case)| {
            let world = world.clone();
            Trial::test(name, move || {
                let world = world.ok_or_else(|| Failed::from("no world"))?;
                let started = std::time::Instant::now();
                let result = case(&world).map_err(Failed::from);
                eprint!("({:.1} s) ", started.elapsed().as_secs_f64());
                result
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(world) = world.and_then(|w| Arc::try_unwrap(w).ok())
        && let Err(e) = world.down()
    {
        eprintln!("tearing down: {e}");
        std::process::exit(101);
    }
    conclusion.exit();
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{:06x}", nanos & 0xff_ffff)
}

pub fn rxe_block() -> v1::RxeBlock {
    v1::RxeBlock {
        qpn_start: 1280,
        qpn_count: 256,
        mrn_start: 1536,
        mrn_count: 256,
    }
}
