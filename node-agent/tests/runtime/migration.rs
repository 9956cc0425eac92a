//! A whole migration through the real agents (checkpoint, transfer, restore with a TCP peer), with
//! each restore backend, and an abort that resumes the source.

use std::time::Duration;

use agent_api::{Role, Step, StepArgs, backend, v1::Compression};

use crate::{
    rxe_block, unique,
    world::{self, PodOptions, Result, World, done, fails, status, until},
};

const STREAM_PORT: u16 = 9000;

/// The workload's arguments: it notes its id in a file of its own filesystem and logs each status
/// request.
const SERVE: [&str; 8] = [
    "serve",
    "--status",
    ":8080",
    "--listen",
    ":9000",
    "--note",
    "/note",
    "--verbose",
];

/// Checkpoint on node-1, transfer to node-2, restore there from checkpoint images (a CRI restore),
/// with a peer on node-3 streaming to the pod all along.
pub fn migrate(w: &World) -> Result<()> {
    // Into node-2, the node of Debian's containerd 2.1 (2.4 no longer restores this way).
    migrate_by(w, backend::CRI_CHECKPOINT_IMAGE, Via::Cri, (0, 1, 2))
}

/// The same, restored by the runtime wrapper: the replacement pod runs under its handler with the
/// workload's own image, is restored at its first start, and a restart of it starts fresh. The
/// source checkpoints the task through containerd, without the CRI's archive, as it does when
/// the operator names the wrapper as the target's backend.
pub fn migrate_with_the_wrapper(w: &World) -> Result<()> {
    // Between two nodes of containerd 2.4 (node-1, node-3).
    migrate_by(w, backend::RUNTIME_WRAPPER, Via::Task, (0, 2, 1))
}

/// The wrapper restores a checkpoint the CRI took too (a source that does not know the target's
/// backend, or an agent run with `--checkpoint-via cri`).
pub fn migrate_with_the_wrapper_from_a_cri_checkpoint(w: &World) -> Result<()> {
    // From containerd 2.1 (node-2) into containerd 2.4 (node-3).
    migrate_by(w, backend::RUNTIME_WRAPPER, Via::Cri, (1, 2, 0))
}

/// How the source is asked to checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Without naming the target's backend: through the CRI.
    Cri,
    /// Naming the target's backend (the wrapper): the task straight through containerd.
    Task,
}

/// Moves the workload from node `from` to node `to` with `backend`, the peer on `peer_node`.
fn migrate_by(
    w: &World,
    backend: &str,
    via: Via,
    (from, to, peer_node): (usize, usize, usize),
) -> Result<()> {
    let name = unique("app");
    let uid = unique("mig");
    let image = w.demo_image.clone();
    let source = w.run_pod(from, &name, &image, &SERVE)?;
    let ip = source.ip;
    let peer_name = unique("peer");
    let peer = w.run_pod(
        peer_node,
        &peer_name,
        &image,
        &[
            "stream",
            "--to",
            &format!("{ip}:{STREAM_PORT}"),
            "--status",
            ":8080",
        ],
    )?;
    let result = w.rt.block_on(async {
        // The workload runs and receives the peer's stream.
        let before = until(
            "the workload to count and receive",
            Duration::from_secs(30),
            || async {
                status(ip)
                    .await
                    .ok()
                    .filter(|s| s.num("counter") >= 50 && s.num("received") > 0)
            },
        )
        .await?;
        ensure!(before.num("conns") == 1, "conns before: {before:?}");

        let answered_before = w.answered(from)?;
        let mut target = w.operator(to).await?;
        let mut src = w.operator(from).await?;
        // As the operator sends it: no runtime IDs; the agent finds the container by the pod.
        let mut pod = source.pod_ref(&image);
        pod.containers[0].container_id.clear();
        done(
            &mut target,
            Step::PrepareTarget,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                expected_bytes: 64 << 20,
                rxe: Some(rxe_block()),
                backend: backend.into(),
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
                backend: match via {
                    Via::Task => backend.into(),
                    Via::Cri => String::new(),
                },
                ..Default::default()
            },
        )
        .await?;
        let log = w.agent_log(from);
        let took = log
            .lines()
            .rev()
            .find(|l| l.contains("checkpointed"))
            .unwrap_or_default();
        let want = format!("via={via:?}");
        ensure!(took.contains(&want), "not checkpointed {want}: {took}");
        ensure!(
            checkpoint.archives.len() == 1,
            "archives {:?}",
            checkpoint.archives
        );
        let archive = &checkpoint.archives[0];
        // A task checkpoint stays a directory; its digest is taken as it is sent.
        let digested = match via {
            Via::Cri => archive.digest.starts_with("sha256:"),
            Via::Task => archive.digest.is_empty(),
        };
        ensure!(archive.bytes > 100_000 && digested, "archive {archive:?}");
        eprintln!(
            "checkpoint: {} bytes in {} ms",
            archive.bytes, checkpoint.duration_ms
        );

        // The source stays paused after the checkpoint: its task is PAUSED, it uses no CPU, and
        // the pod IP is silenced on node-1.
        ensure!(
            w.task_state(from, &source.container_id) == "PAUSED",
            "source task is {}",
            w.task_state(from, &source.container_id)
        );
        let cpu = w.cpu_ns(from, &source.container_id)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu_later = w.cpu_ns(from, &source.container_id)?;
        ensure!(
            cpu == cpu_later,
            "the paused source used CPU: {cpu} -> {cpu_later} ns"
        );
        ensure!(
            w.blocked(from)?.contains(&ip),
            "the source does not block {ip}: {:?}",
            w.blocked(from)?
        );
        ensure!(status(ip).await.is_err(), "the paused source still answers");
        // The peer's segments to the silenced pod are answered host-unreachable (its TCP then
        // keeps retrying often instead of backing off), not acknowledged.
        let answered = w.answered(from)?;
        ensure!(
            answered > answered_before,
            "node {from} answered none of the peer's segments while blocking {ip} \
             ({answered_before} -> {answered})"
        );

        let transfer = done(
            &mut src,
            Step::Transfer,
            &StepArgs {
                migration_uid: uid.clone(),
                target_endpoint: w.endpoint(to).to_string(),
                target_node: w.nodes[to].name.clone(),
                compression: Compression::Zstd,
                bandwidth_limit: 0,
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            transfer.bytes_done == archive.bytes
                && transfer.archives.len() == 1
                && transfer.archives[0].digest.starts_with("sha256:"),
            "transfer {transfer:?}"
        );
        eprintln!(
            "transfer: {} ({} ms)",
            transfer.message, transfer.duration_ms
        );

        // The commit point: the source is killed for good, and its sandbox removed (the
        // kubelet's part when the pod object is deleted), which frees the IP on node-1.
        done(&mut src, Step::Commit(Role::Source), &StepArgs::of(&uid)).await?;
        let state = w.task_state(from, &source.container_id);
        ensure!(
            state == "STOPPED" || state == "GONE",
            "source task after commit: {state}"
        );
        w.remove_pod(&source)?;

        let staged = done(
            &mut target,
            Step::StageRestore,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                rxe: Some(rxe_block()),
                // As the operator records it: the digests the transfer answered.
                expected: transfer.archives.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(staged.staged.len() == 1, "staged {:?}", staged.staged);
        let staged_ref = staged.staged[0].image.clone();
        check_staged(w, to, backend, &uid, &transfer.archives[0], &staged_ref)?;
        // The counters hold the pod's block when the restore starts, and the IP is blocked on
        // the target until the restored sockets exist.
        ensure!(
            w.rxe_file(to, "last_qpn") == "1280",
            "last_qpn {}",
            w.rxe_file(to, "last_qpn")
        );
        ensure!(
            w.rxe_file(to, "last_mrn") == "1536",
            "last_mrn {}",
            w.rxe_file(to, "last_mrn")
        );
        ensure!(
            w.blocked(to)?.contains(&ip),
            "the target does not block {ip}"
        );

        let restore_started = std::time::Instant::now();
        let restored = if backend == backend::RUNTIME_WRAPPER {
            // The kubelet's replacement: the workload's image under the wrapper's handler.
            w.run_pod_with(to, &name, &image, &SERVE, &PodOptions::restore_of(&uid))?
        } else {
            w.run_pod(to, &name, &staged_ref, &[])?
        };
        let restore_ms = restore_started.elapsed().as_millis();
        ensure!(
            restored.ip == ip,
            "restored with IP {}, not {ip}",
            restored.ip
        );
        // The target lifts the block itself once the runtime runs the restored container,
        // before the operator (here: this test) asks.
        until(
            "the target to lift the block of the running pod",
            Duration::from_secs(5),
            || async { w.blocked(to).ok().filter(|b| !b.contains(&ip)).map(drop) },
        )
        .await?;
        done(&mut target, Step::FinishRestore, &StepArgs::of(&uid)).await?;
        ensure!(
            !w.blocked(to)?.contains(&ip),
            "the target still blocks {ip}"
        );
        eprintln!("restore (sandbox + create + start): {restore_ms} ms");

        // The restored process continues: same id, counter and received bytes from the
        // checkpoint on, the peer's same connection, no skipped or repeated record.
        let after = until(
            "the restored workload to answer",
            Duration::from_secs(20),
            || async { status(ip).await.ok() },
        )
        .await?;
        ensure!(
            after.get("id") == before.get("id"),
            "a new process: {before:?} -> {after:?}"
        );
        ensure!(
            after.num("counter") >= before.num("counter"),
            "counter went back: {before:?} -> {after:?}"
        );
        ensure!(
            after.num("received") >= before.num("received"),
            "received went back: {after:?}"
        );
        let streaming = until(
            "the peer's stream to continue",
            Duration::from_secs(30),
            || async {
                status(ip)
                    .await
                    .ok()
                    .filter(|s| s.num("received") > after.num("received") + 64 * 50)
            },
        )
        .await?;
        ensure!(
            streaming.num("conns") == 1,
            "the peer reconnected: {streaming:?}"
        );
        ensure!(
            streaming.exact("gaps")? == 0,
            "records lost or repeated: {streaming:?}"
        );
        // The peer is the judge: every record it sent is answered, in order, on one connection.
        let sent = status(peer.ip).await?.num("counter");
        let peer_status = until(
            "the peer's records to be answered",
            Duration::from_secs(30),
            || async {
                status(peer.ip)
                    .await
                    .ok()
                    .filter(|s| s.num("answered") >= sent)
            },
        )
        .await?;
        ensure!(
            peer_status.exact("gaps")? == 0,
            "answers lost or out of order at the peer: {peer_status:?}"
        );
        eprintln!(
            "peer: same connection, longest gap between answers {} ms (round trip {} ms); \
             the workload's clock saw {} ms; counter {} -> {}",
            peer_status.get("maxgap_ms"),
            peer_status.get("maxrtt_ms"),
            streaming.get("maxgap_ms"),
            before.num("counter"),
            streaming.num("counter")
        );

        for (client, role) in [(&mut src, Role::Source), (&mut target, Role::Target)] {
            done(client, Step::Cleanup(role), &StepArgs::of(&uid)).await?;
        }
        ensure!(
            !w.stored(from)?.contains(&uid) && !w.stored(to)?.contains(&uid),
            "data left after cleanup"
        );
        ensure!(
            !w.blocked(from)?.contains(&ip),
            "the source still blocks {ip} after cleanup"
        );
        if backend == backend::RUNTIME_WRAPPER {
            restored_once(w, to, &restored, &image, before.get("id")).await?;
        }
        w.remove_pod(&restored)?;
        Ok(())
    });
    if result.is_err() {
        // Leave nothing paused or blocked behind a failed case.
        w.rt.block_on(async {
            for (i, role) in [(from, Role::Source), (to, Role::Target)] {
                if let Ok(mut c) = w.operator(i).await {
                    let _ = c.step(Step::Abort(role), &StepArgs::of(&uid)).await;
                    let _ = c.step(Step::Cleanup(role), &StepArgs::of(&uid)).await;
                }
            }
        });
    }
    let _ = w.remove_pod(&peer);
    let _ = w.remove_pod(&source);
    result.map_err(|e| {
        format!(
            "{e}\nsource agent:\n{}\ntarget agent:\n{}",
            w.agent_log(from),
            w.agent_log(to)
        )
    })
}

/// What the target staged for the restore: a checkpoint image in the registry, already in node-2's
/// runtime and named by the digest the operator derives from the recorded archive; or, for the
/// wrapper, the unpacked checkpoint in the agent's store.
fn check_staged(
    w: &World,
    to: usize,
    backend: &str,
    uid: &str,
    archive: &agent_api::v1::ContainerArchive,
    staged: &str,
) -> Result<()> {
    if backend == backend::RUNTIME_WRAPPER {
        let images = w.written(to, &format!("{staged}/checkpoint/inventory.img"));
        ensure!(
            staged.ends_with(&format!("migrations/{uid}/staged/app")) && images.is_file(),
            "no unpacked checkpoint at {staged}"
        );
        return Ok(());
    }
    let image = agent_api::checkpoint_image::Parts::new("app", &archive.digest, archive.bytes);
    ensure!(
        staged
            == format!(
                "{}:{uid}-app@{}",
                world::CHECKPOINT_REPOSITORY,
                image.manifest_digest()
            ),
        "staged image {staged}, not the one of archive {archive:?}"
    );
    let present = w.exec(to, &["crictl", "inspecti", staged]);
    ensure!(
        present.is_ok(),
        "the checkpoint image is not in node-2's runtime: {present:?}"
    );
    Ok(())
}

/// A container restored by the wrapper is an ordinary container (its file written before the move
/// is there, `exec` and logs work), and it is restored once: after it is stopped, the container the
/// kubelet starts in its place is a fresh start of the image.
async fn restored_once(
    w: &World,
    node: usize,
    restored: &world::Pod,
    image: &str,
    source_id: &str,
) -> Result<()> {
    let note = w.exec(
        node,
        &[
            "crictl",
            "exec",
            &restored.container_id,
            "/demo",
            "cat",
            "/note",
        ],
    )?;
    ensure!(
        note.trim() == source_id,
        "the file the workload wrote before the move reads {note:?}, not {source_id:?}"
    );
    let logs = w.exec(node, &["crictl", "logs", &restored.container_id])?;
    ensure!(
        logs.contains(&format!("demo: status id={source_id}")),
        "the restored process does not log into the container's log: {logs:?}"
    );
    w.exec(node, &["crictl", "stop", &restored.container_id])?;
    let restarted =
        w.start_container(node, &restored.name, &restored.sandbox_id, image, &SERVE, 1)?;
    let fresh = until(
        "the restarted workload",
        Duration::from_secs(30),
        || async { status(restored.ip).await.ok() },
    )
    .await?;
    ensure!(
        fresh.get("id") != source_id && fresh.num("counter") < 1000,
        "the restart restored the checkpoint again: {fresh:?}"
    );
    let note = w.exec(
        node,
        &["crictl", "exec", &restarted, "/demo", "cat", "/note"],
    )?;
    ensure!(
        fresh.get("id") == note.trim(),
        "the fresh start's note is {note:?}"
    );
    Ok(())
}

/// A pod of the wrapper's handler that is not a restore runs exactly as under runc: it serves,
/// logs, `exec` works, and stopping it ends it with the exit code runc gives; a pod marked as the
/// restore of a migration this node has no checkpoint of fails its create with the reason and
/// never runs a fresh process in its place.
pub fn plain_pods_under_the_wrapper(w: &World) -> Result<()> {
    let image = w.demo_image.clone();
    let wrapper = PodOptions {
        handler: Some(world::RUNTIME_HANDLER.into()),
        ..PodOptions::default()
    };
    // node-1 runs containerd 2.4.
    let wrapped = w.run_pod_with(0, &unique("plain"), &image, &SERVE, &wrapper)?;
    let reference = w.run_pod(0, &unique("runc"), &image, &SERVE)?;
    let ids = w.rt.block_on(async {
        let mut ids = Vec::new();
        for pod in [&wrapped, &reference] {
            let serving = until("the workload to serve", Duration::from_secs(30), || async {
                status(pod.ip).await.ok()
            })
            .await?;
            ids.push(serving.get("id").to_string());
        }
        Ok::<_, String>(ids)
    })?;
    let note = w.exec(
        0,
        &[
            "crictl",
            "exec",
            &wrapped.container_id,
            "/demo",
            "cat",
            "/note",
        ],
    )?;
    ensure!(
        note.trim() == ids[0],
        "exec under the wrapper read {note:?}"
    );
    let logs = w.exec(0, &["crictl", "logs", &wrapped.container_id])?;
    ensure!(
        logs.contains(&format!("demo: status id={}", ids[0])),
        "no log under the wrapper: {logs:?}"
    );
    let mut exits = Vec::new();
    for pod in [&wrapped, &reference] {
        w.exec(0, &["crictl", "stop", &pod.container_id])?;
        let inspect = w.exec(0, &["crictl", "inspect", &pod.container_id])?;
        let v: serde_json::Value = serde_json::from_str(&inspect).map_err(|e| e.to_string())?;
        let state = v["status"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(state == "CONTAINER_EXITED", "{}: {state}", pod.name);
        exits.push(v["status"]["exitCode"].clone());
    }
    ensure!(
        exits[0] == exits[1],
        "stopped under the wrapper with {}, under runc with {}",
        exits[0],
        exits[1]
    );
    // A restore of a migration this node does not have.
    let bogus = unique("bogus");
    let refused = w.run_pod_with(
        0,
        &bogus,
        &image,
        &SERVE,
        &PodOptions {
            handler: Some(world::RUNTIME_HANDLER.into()),
            ..PodOptions::restore_of(&unique("mig"))
        },
    );
    let why = match refused {
        Ok(pod) => {
            return Err(format!(
                "pod {} ran instead of failing its restore",
                pod.name
            ));
        }
        Err(why) => why,
    };
    ensure!(
        why.contains("migros-runc") && why.contains("no record"),
        "the create failed without the wrapper's reason: {why}"
    );
    for pod in [&wrapped, &reference] {
        w.remove_pod(pod)?;
    }
    Ok(())
}

/// The demo workload serving its status on node-1, a migration UID for it, and its image.
fn counting_pod(w: &World, prefix: &str) -> Result<(world::Pod, String, String)> {
    let image = w.demo_image.clone();
    let pod = w.run_pod(0, &unique(prefix), &image, &["serve", "--status", ":8080"])?;
    Ok((pod, unique("mig"), image))
}

/// The pod's status once it counted to 20.
async fn counting(pod: &world::Pod) -> Result<world::Status> {
    until("the workload to count", Duration::from_secs(30), || async {
        status(pod.ip).await.ok().filter(|s| s.num("counter") >= 20)
    })
    .await
}

/// The same process answers again and goes on counting from where it was at `before`.
async fn counts_on(pod: &world::Pod, before: &world::Status) -> Result<()> {
    let after = until(
        "the resumed workload to answer and count on",
        Duration::from_secs(20),
        || async {
            status(pod.ip)
                .await
                .ok()
                .filter(|s| s.num("counter") > before.num("counter") + 20)
        },
    )
    .await?;
    ensure!(after.get("id") == before.get("id"), "a new process");
    Ok(())
}

/// After a case on a pod of node-1: a failed case gives the pod back (the source's abort); the
/// pod goes either way; a failure carries the agent's log.
fn finish(w: &World, pod: &world::Pod, uid: &str, result: Result<()>) -> Result<()> {
    if result.is_err() {
        w.rt.block_on(async {
            if let Ok(mut c) = w.operator(0).await {
                let _ = c.step(Step::Abort(Role::Source), &StepArgs::of(uid)).await;
            }
        });
    }
    let _ = w.remove_pod(pod);
    result.map_err(|e| format!("{e}\nagent:\n{}", w.agent_log(0)))
}

pub fn abort(w: &World) -> Result<()> {
    let (pod, uid, image) = counting_pod(w, "abort")?;
    let result = w.rt.block_on(async {
        let before = counting(&pod).await?;
        let mut src = w.operator(0).await?;
        let mut target = w.operator(1).await?;
        let pod_ref = pod.pod_ref(&image);
        done(
            &mut target,
            Step::PrepareTarget,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod_ref.clone(),
                expected_bytes: 1 << 20,
                rxe: None,
                source_node: w.nodes[0].name.clone(),
                ..Default::default()
            },
        )
        .await?;
        done(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod_ref.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(w.task_state(0, &pod.container_id) == "PAUSED", "not paused");
        // While this migration holds the pod, another one's checkpoint of it is refused, and
        // its undo does not resume what the first one paused.
        let other = unique("mig");
        let why = fails(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: other.clone(),
                pod: pod_ref.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            why.contains(&format!("held on this node by migration {uid}")),
            "{why}"
        );
        done(&mut src, Step::Abort(Role::Source), &StepArgs::of(&other)).await?;
        ensure!(
            w.task_state(0, &pod.container_id) == "PAUSED",
            "another migration's refusal resumed the pod"
        );
        ensure!(
            !w.stored(0)?.contains(&other),
            "a refused checkpoint left data"
        );
        // A target that cannot be reached: the transfer is retried, then fails with the reason,
        // and the source stays paused, ready for the abort.
        let why = fails(
            &mut src,
            Step::Transfer,
            &StepArgs {
                migration_uid: uid.clone(),
                target_endpoint: format!("{}:1", w.nodes[2].ip()),
                target_node: w.nodes[2].name.clone(),
                compression: Compression::None,
                bandwidth_limit: 0,
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            why.contains("failed 3 times") && why.contains("connecting to the target agent"),
            "{why}"
        );
        ensure!(
            w.task_state(0, &pod.container_id) == "PAUSED",
            "not paused after the failed transfer"
        );
        for (client, role) in [(&mut src, Role::Source), (&mut target, Role::Target)] {
            done(client, Step::Abort(role), &StepArgs::of(&uid)).await?;
        }
        ensure!(
            w.task_state(0, &pod.container_id) == "RUNNING",
            "not resumed"
        );
        ensure!(
            !w.blocked(0)?.contains(&pod.ip),
            "still blocked after abort"
        );
        counts_on(&pod, &before).await?;
        ensure!(
            !w.stored(0)?.contains(&uid) && !w.stored(1)?.contains(&uid),
            "data left after abort"
        );
        // Asking again is harmless.
        done(&mut src, Step::Abort(Role::Source), &StepArgs::of(&uid)).await?;
        ensure!(
            w.task_state(0, &pod.container_id) == "RUNNING",
            "a second abort changed the source"
        );
        Ok(())
    });
    finish(w, &pod, &uid, result)
}

/// A source whose operator went away: checkpointed with a short deadline and then left alone, the
/// agent resumes the pod by itself (the same process counts on, reachable), refuses the commit
/// that comes too late (saying why) and the transfer of the stale checkpoint.
pub fn deadline(w: &World) -> Result<()> {
    let (pod, uid, image) = counting_pod(w, "deadline")?;
    let result = w.rt.block_on(async {
        let before = counting(&pod).await?;
        let mut src = w.operator(0).await?;
        // A request naming the pod with another container's ID is refused, touching nothing.
        let mut foreign = pod.pod_ref(&image);
        foreign.containers[0].container_id = "0123456789abcdef".into();
        let why = fails(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: foreign,
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("is not container app of pod"), "{why}");
        ensure!(
            w.task_state(0, &pod.container_id) == "RUNNING",
            "a refused checkpoint touched the pod"
        );
        done(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.pod_ref(&image),
                resume_after_seconds: 3,
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            w.task_state(0, &pod.container_id) == "PAUSED",
            "not paused after the checkpoint: {}",
            w.task_state(0, &pod.container_id)
        );
        ensure!(w.blocked(0)?.contains(&pod.ip), "not blocked");
        // No operator asks anything now: the agent's own deadline resumes the pod and lifts its
        // block (in that order: both are waited for).
        until(
            "the agent to resume and unblock the source at its deadline",
            Duration::from_secs(30),
            || async {
                let running = w.task_state(0, &pod.container_id) == "RUNNING";
                let blocked = w.blocked(0).map(|b| b.contains(&pod.ip));
                (running && blocked == Ok(false)).then_some(())
            },
        )
        .await?;
        counts_on(&pod, &before).await?;
        // Too late: the commit is refused and says why; the pod is not stopped.
        let commit = src
            .step(Step::Commit(Role::Source), &StepArgs::of(&uid))
            .await
            .map_err(|s| format!("commit: {}", s.message()))?;
        ensure!(
            commit.state() == agent_api::v1::State::Failed
                && commit.source_resumed
                && commit
                    .message
                    .contains("resumed on this node at its deadline"),
            "a commit after the deadline: {commit:?}"
        );
        ensure!(
            w.task_state(0, &pod.container_id) == "RUNNING",
            "the refused commit stopped the pod"
        );
        let why = fails(
            &mut src,
            Step::Transfer,
            &StepArgs {
                migration_uid: uid.clone(),
                target_endpoint: w.endpoint(1).to_string(),
                target_node: w.nodes[1].name.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("checkpoint is stale"), "{why}");
        // The operator's rollback and cleanup, when it comes back, are harmless.
        done(&mut src, Step::Abort(Role::Source), &StepArgs::of(&uid)).await?;
        ensure!(
            w.task_state(0, &pod.container_id) == "RUNNING",
            "the abort changed the resumed pod"
        );
        ensure!(!w.stored(0)?.contains(&uid), "data left after the abort");
        Ok(())
    });
    finish(w, &pod, &uid, result)
}
