//! Post-copy through the real agents: the source dumps the pod without its memory and serves the
//! pages; the target restores it at once under the runtime wrapper with a lazy-pages daemon that
//! fetches them through the two agents (mutual TLS); and when the source's agent dies midway, the
//! restored pod is killed rather than left running with memory missing.

use std::time::Duration;

use agent_api::{Role, Step, StepArgs, backend, v1};

use crate::{
    unique,
    world::{self, PodOptions, Result, World, done, status, until},
};

/// The workload: 256 MiB of touched memory it can check page by page on :8081.
const SERVE: [&str; 10] = [
    "serve",
    "--status",
    ":8080",
    "--listen",
    ":9000",
    "--touch",
    "256Mi",
    "--verify",
    ":8081",
    "--verbose",
];
const TOUCHED: u64 = 256 << 20;

/// What the workload's check of its memory answers.
async fn verify(ip: std::net::Ipv4Addr) -> Result<String> {
    testkit::workload::verify_memory(ip).await
}

/// The target agent's account of the memory still on the source.
async fn memory(w: &World, i: usize, uid: &str) -> Result<v1::Operation> {
    let mut agent = w.operator(i).await?;
    agent
        .raw()
        .memory(v1::StepRequest {
            migration_uid: uid.into(),
            role: agent_api::Role::Target.to_api().into(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| s.message().to_string())
}

/// One post-copy move of a fresh workload from node `from` to node `to`, up to the restored pod
/// running; answers the pods, the migration and the workload's status before the move.
struct Moved {
    source: world::Pod,
    restored: world::Pod,
    uid: String,
    before: world::Status,
    checkpoint: v1::Operation,
}

async fn move_lazily(w: &World, (from, to): (usize, usize), bandwidth_limit: u64) -> Result<Moved> {
    let name = unique("lazy");
    let uid = unique("mig");
    let image = w.demo_image.clone();
    let source = w.run_pod(from, &name, &image, &SERVE)?;
    let ip = source.ip;
    let before = until("the workload to count", Duration::from_secs(30), || async {
        status(ip).await.ok().filter(|s| s.num("counter") >= 20)
    })
    .await?;
    let checked = verify(ip).await?;
    ensure!(
        checked.starts_with("memok=true"),
        "before the move: {checked}"
    );
    let mut target = w.operator(to).await?;
    let mut src = w.operator(from).await?;
    let mut pod = source.pod_ref(&image);
    pod.containers[0].container_id.clear();
    let post_copy = Some(v1::PostCopySource {
        node: w.nodes[from].name.clone(),
        endpoint: w.endpoint(from).to_string(),
    });
    done(
        &mut target,
        Step::PrepareTarget,
        &StepArgs {
            migration_uid: uid.clone(),
            pod: pod.clone(),
            expected_bytes: 64 << 20,
            backend: backend::RUNTIME_WRAPPER.into(),
            source_node: w.nodes[from].name.clone(),
            ..Default::default()
        },
    )
    .await?;
    let checkpoint = done(
        &mut src,
        Step::Checkpoint,
        &StepArgs {
            migration_uid: uid.clone(),
            pod: pod.clone(),
            backend: backend::RUNTIME_WRAPPER.into(),
            post_copy: post_copy.clone(),
            ..Default::default()
        },
    )
    .await?;
    let transfer = done(
        &mut src,
        Step::Transfer,
        &StepArgs {
            migration_uid: uid.clone(),
            target_endpoint: w.endpoint(to).to_string(),
            target_node: w.nodes[to].name.clone(),
            compression: v1::Compression::Zstd,
            bandwidth_limit,
            ..Default::default()
        },
    )
    .await?;
    // The commit point: the source is not stopped, its page server holds it frozen.
    done(&mut src, Step::Commit(Role::Source), &StepArgs::of(&uid)).await?;
    ensure!(
        w.task_state(from, &source.container_id) == "PAUSED",
        "the source after the commit is {}, not held paused by its page server",
        w.task_state(from, &source.container_id)
    );

    done(
        &mut target,
        Step::StageRestore,
        &StepArgs {
            migration_uid: uid.clone(),
            pod: pod.clone(),
            expected: transfer.archives.clone(),
            post_copy,
            ..Default::default()
        },
    )
    .await?;
    let started = std::time::Instant::now();
    let restored = w.run_pod_with(to, &name, &image, &SERVE, &PodOptions::restore_of(&uid))?;
    ensure!(restored.ip == ip, "restored with {}, not {ip}", restored.ip);
    eprintln!(
        "post-copy: checkpoint {} bytes in {} ms; restore (sandbox + create + start) {} ms",
        checkpoint.bytes_total,
        checkpoint.duration_ms,
        started.elapsed().as_millis()
    );
    Ok(Moved {
        source,
        restored,
        uid,
        before,
        checkpoint,
    })
}

/// The workload moves with its memory left behind: the checkpoint is a fraction of it, the
/// restored process answers before its pages are all in, and once they are, every page holds what
/// was written; the source is stopped only then.
pub fn post_copy(w: &World) -> Result<()> {
    let (from, to) = (0, 2);
    w.rt.block_on(async {
        let m = move_lazily(w, (from, to), 0).await?;
        let ip = m.restored.ip;
        let result = async {
            ensure!(
                m.checkpoint.bytes_total < TOUCHED / 8,
                "the checkpoint carries the memory: {} bytes",
                m.checkpoint.bytes_total
            );
            let after = until(
                "the restored workload to answer",
                Duration::from_secs(20),
                || async { status(ip).await.ok() },
            )
            .await?;
            ensure!(
                after.get("id") == m.before.get("id"),
                "a new process: {after:?}"
            );
            ensure!(
                after.num("counter") >= m.before.num("counter"),
                "the counter went back: {:?} -> {after:?}",
                m.before
            );
            let all_in = until("all memory to be in", Duration::from_secs(60), || async {
                memory(w, to, &m.uid)
                    .await
                    .ok()
                    .filter(|op| op.state != v1::State::Running as i32)
            })
            .await?;
            ensure!(
                all_in.state == v1::State::Succeeded as i32,
                "memory: {all_in:?}"
            );
            ensure!(
                all_in.bytes_total >= TOUCHED && all_in.bytes_done >= all_in.bytes_total,
                "memory counted {} of {} bytes, {TOUCHED} touched",
                all_in.bytes_done,
                all_in.bytes_total
            );
            let checked = verify(ip).await?;
            ensure!(
                checked.starts_with("memok=true"),
                "after the move: {checked}"
            );
            let later = status(ip).await?;
            ensure!(
                later.num("counter") > after.num("counter")
                    && later.get("id") == m.before.get("id"),
                "not counting on: {after:?} -> {later:?}"
            );
            // Every page served: the source's page server ended, and the agent says so and stops
            // the pod.
            until(
                "the source's page server to end",
                Duration::from_secs(30),
                || async {
                    w.agent_log(from)
                        .lines()
                        .any(|l| l.contains("every page was served") && l.contains(&m.uid))
                        .then_some(())
                },
            )
            .await?;
            stopped(w, from, &m.source).await?;
            Ok(())
        }
        .await;
        finish(w, (from, to), &m, result).await
    })
}

/// The source's agent dies while pages stream (paced slowly): the target kills the restored pod
/// instead of letting it run with pages missing, reports why, and nothing hangs.
pub fn source_agent_dies_during_post_copy(w: &World) -> Result<()> {
    let (from, to) = (0, 2);
    w.rt.block_on(async {
        // 256 MiB at 16 MiB/s: some fifteen seconds of streaming.
        let m = move_lazily(w, (from, to), 16 << 20).await?;
        let ip = m.restored.ip;
        let result = async {
            until(
                "the restored workload to answer",
                Duration::from_secs(20),
                || async { status(ip).await.ok() },
            )
            .await?;
            let streaming = memory(w, to, &m.uid).await?;
            ensure!(
                streaming.state == v1::State::Running as i32 && streaming.bytes_done < TOUCHED,
                "the pages are not streaming: {streaming:?}"
            );
            w.restart_agent(from).await?;
            let failed = until(
                "the memory to be given up",
                Duration::from_secs(30),
                || async {
                    memory(w, to, &m.uid)
                        .await
                        .ok()
                        .filter(|op| op.state != v1::State::Running as i32)
                },
            )
            .await?;
            ensure!(
                failed.state == v1::State::Failed as i32 && !failed.message.is_empty(),
                "memory after the source agent died: {failed:?}"
            );
            eprintln!("memory given up: {}", failed.message);
            let state = w.task_state(to, &m.restored.container_id);
            ensure!(
                state == "STOPPED" || state == "GONE",
                "the restored container is {state} with its memory incomplete"
            );
            ensure!(status(ip).await.is_err(), "the restored pod still answers");
            // Past its commit point the source never runs again: the restarted agent stops it.
            stopped(w, from, &m.source).await?;
            Ok(())
        }
        .await;
        finish(w, (from, to), &m, result).await
    })
}

/// The source's agent restarts between the lazy checkpoint and the commit (its page server, held
/// by no agent now, still holds the pod): an abort gives the pod back, whole and running, and
/// leaves no CRIU of the migration behind.
pub fn source_agent_restarted_before_the_commit(w: &World) -> Result<()> {
    let from = 0;
    lazily_checkpointed(w, from, async |pod, uid, before, _| {
        ensure!(
            criu_of(uid) > 0,
            "no page server of {uid} runs after the lazy checkpoint"
        );
        w.restart_agent(from).await?;
        let mut src = w.operator(from).await?;
        done(&mut src, Step::Abort(Role::Source), &StepArgs::of(uid)).await?;
        ensure!(
            criu_of(uid) == 0,
            "a page server of {uid} is left after the abort"
        );
        let after = until("the pod to run again", Duration::from_secs(20), || async {
            status(pod.ip)
                .await
                .ok()
                .filter(|s| s.num("counter") > before.num("counter") + 5)
        })
        .await?;
        ensure!(
            after.get("id") == before.get("id"),
            "a new process: {after:?}"
        );
        let checked = verify(pod.ip).await?;
        ensure!(
            checked.starts_with("memok=true"),
            "after the abort: {checked}"
        );
        Ok(())
    })
}

/// A committed post-copy source whose memory no target will fetch (the migration failed, its
/// target gone): the cleanup ends its page servers and stops it at once, not at their deadline.
pub fn cleanup_stops_a_committed_source_nobody_fetches_from(w: &World) -> Result<()> {
    let from = 0;
    lazily_checkpointed(w, from, async |pod, uid, _, mut src| {
        done(&mut src, Step::Commit(Role::Source), &StepArgs::of(uid)).await?;
        ensure!(
            criu_of(uid) > 0 && w.task_state(from, &pod.container_id) == "PAUSED",
            "the committed source is not held by its page server"
        );
        done(&mut src, Step::Cleanup(Role::Source), &StepArgs::of(uid)).await?;
        ensure!(
            criu_of(uid) == 0,
            "a page server of {uid} is left after the cleanup"
        );
        stopped(w, from, pod).await?;
        ensure!(status(pod.ip).await.is_err(), "the source still answers");
        Ok(())
    })
}

/// Runs a fresh workload on node `from`, checkpoints it lazily for a new migration (no target
/// prepared: the page server waits) once it counts, and hands `check` the pod, the migration,
/// the workload's status before the checkpoint and the source agent's client; the pod goes
/// afterwards, and a failure carries the source agent's log.
fn lazily_checkpointed(
    w: &World,
    from: usize,
    check: impl AsyncFnOnce(&world::Pod, &str, world::Status, agent_api::client::Client) -> Result<()>,
) -> Result<()> {
    w.rt.block_on(async {
        let uid = unique("mig");
        let pod = w.run_pod(from, &unique("lazy"), &w.demo_image, &SERVE)?;
        let result = async {
            let (before, src) = checkpoint_lazily(w, from, &pod, &uid).await?;
            check(&pod, &uid, before, src).await
        }
        .await;
        let _ = w.remove_pod(&pod);
        result.map_err(|e| format!("{e}\nsource agent:\n{}", w.agent_log(from)))
    })
}

/// Once the workload `pod` on node `from` counts: its lazy checkpoint for migration `uid`.
/// Answers the workload's status before it and the source agent's client.
async fn checkpoint_lazily(
    w: &World,
    from: usize,
    pod: &world::Pod,
    uid: &str,
) -> Result<(world::Status, agent_api::client::Client)> {
    let before = until("the workload to count", Duration::from_secs(30), || async {
        status(pod.ip).await.ok().filter(|s| s.num("counter") >= 20)
    })
    .await?;
    let mut pod_ref = pod.pod_ref(&w.demo_image);
    pod_ref.containers[0].container_id.clear();
    let mut src = w.operator(from).await?;
    done(
        &mut src,
        Step::Checkpoint,
        &StepArgs {
            migration_uid: uid.into(),
            pod: pod_ref,
            backend: backend::RUNTIME_WRAPPER.into(),
            post_copy: Some(v1::PostCopySource::default()),
            ..Default::default()
        },
    )
    .await?;
    Ok((before, src))
}

/// How many processes (of any node: the host sees them all) are lazy CRIU ends of migration
/// `uid`.
fn criu_of(uid: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|l| l.contains("lazy-pages") && l.contains(&format!("/{uid}/")))
        .count()
}

/// Waits for the container of `pod` on node `i` to be stopped or gone.
async fn stopped(w: &World, i: usize, pod: &world::Pod) -> Result<()> {
    until(
        "the source to be stopped",
        Duration::from_secs(30),
        || async {
            let state = w.task_state(i, &pod.container_id);
            (state == "STOPPED" || state == "GONE").then_some(())
        },
    )
    .await
    .map(drop)
}

async fn finish(
    w: &World,
    (from, to): (usize, usize),
    m: &Moved,
    result: Result<()>,
) -> Result<()> {
    for (i, role) in [(from, Role::Source), (to, Role::Target)] {
        if let Ok(mut c) = w.operator(i).await {
            let _ = c.step(Step::Cleanup(role), &StepArgs::of(&m.uid)).await;
        }
    }
    let _ = w.remove_pod(&m.restored);
    let _ = w.remove_pod(&m.source);
    result.map_err(|e| {
        format!(
            "{e}\nsource agent:\n{}\ntarget agent:\n{}",
            w.agent_log(from),
            w.agent_log(to)
        )
    })
}
