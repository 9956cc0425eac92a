//! The node agent on real nodes: containerd 2.1, runc and CRIU 4 in sandbox nodes on one bridge,
//! the real agent binary in each node, the demo workload as the pod. The tests play the operator
//! (and, for the archive checks, a peer agent) over mutual TLS, and the kubelet through crictl.
//! The one thing not real is the rxe device: its counters are files in a per-node directory.
//!
//! One setup for all cases (the nodes are shared), so the cases run one after another.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support

mod world;

use std::{sync::Arc, time::Duration};

use agent_api::{
    Role, Step, StepArgs,
    steps::StepRequest,
    v1::{self, Compression},
};
use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};
use world::{MAX_ARCHIVE_BYTES, Result, World, done, fails, status, until};

/// One case of the suite.
type Case = fn(&World) -> Result<()>;

const STREAM_PORT: u16 = 9000;

fn main() {
    let mut args = Arguments::from_args();
    // The cases share three nodes; they run one at a time.
    args.test_threads = Some(1);
    let cases: Vec<(&str, Case)> = vec![
        ("capabilities_report_the_real_runtime_and_rxe", capabilities),
        (
            "a_migration_through_the_agents_keeps_state_ip_and_the_peers_tcp_connection",
            migrate,
        ),
        ("abort_resumes_the_paused_source_and_it_continues", abort),
        (
            "corrupted_truncated_oversized_and_hostile_archives_are_rejected_leaving_nothing_staged",
            bad_archives,
        ),
        ("callers_without_a_valid_certificate_are_refused", refusals),
        ("one_restore_at_a_time_holds_the_rxe_counters", rxe_lock),
        (
            "invalid_requests_fail_with_a_reason_and_change_nothing",
            invalid_requests,
        ),
        (
            "the_raw_baseline_recipe_migrates_the_demo_without_the_agents",
            raw_recipe,
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

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{:06x}", nanos & 0xff_ffff)
}

fn capabilities(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let caps = w
            .operator(0)
            .await?
            .capabilities()
            .await
            .map_err(|s| s.to_string())?;
        ensure!(caps.node_name == "node-1", "node name {:?}", caps.node_name);
        ensure!(
            caps.runtime_name == "containerd",
            "runtime {:?}",
            caps.runtime_name
        );
        ensure!(
            caps.runtime_version
                .trim_start_matches('v')
                .starts_with("2.1."),
            "runtime version {:?}",
            caps.runtime_version
        );
        ensure!(
            caps.criu_version.starts_with('4'),
            "CRIU version {:?}",
            caps.criu_version
        );
        ensure!(caps.rxe_present, "the rxe counter files are not seen");
        ensure!(caps.free_bytes > 1 << 30, "free bytes {}", caps.free_bytes);
        ensure!(
            caps.restore_backends == ["cri-checkpoint-image"],
            "backends {:?}",
            caps.restore_backends
        );
        Ok(())
    })
}

fn rxe_block() -> v1::RxeBlock {
    v1::RxeBlock {
        qpn_start: 1280,
        qpn_count: 256,
        mrn_start: 1536,
        mrn_count: 256,
    }
}

/// Checkpoint on node-1, transfer to node-2, restore there through the CRI from what the agent
/// staged, with a peer on node-3 streaming to the pod all along.
fn migrate(w: &World) -> Result<()> {
    let name = unique("app");
    let uid = unique("mig");
    let image = w.demo_image.clone();
    let source = w.run_pod(
        0,
        &name,
        &image,
        &["serve", "--status", ":8080", "--listen", ":9000"],
    )?;
    let ip = source.ip;
    let peer_name = unique("peer");
    let peer = w.run_pod(
        2,
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

        let mut target = w.operator(1).await?;
        let mut src = w.operator(0).await?;
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
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            checkpoint.archives.len() == 1,
            "archives {:?}",
            checkpoint.archives
        );
        let archive = &checkpoint.archives[0];
        ensure!(
            archive.bytes > 100_000 && archive.digest.starts_with("sha256:"),
            "archive {archive:?}"
        );
        eprintln!(
            "checkpoint: {} bytes in {} ms",
            archive.bytes, checkpoint.duration_ms
        );

        // The source stays paused after the checkpoint: its task is PAUSED, it uses no CPU, and
        // the pod IP is silenced on node-1.
        ensure!(
            w.task_state(0, &source.container_id) == "PAUSED",
            "source task is {}",
            w.task_state(0, &source.container_id)
        );
        let cpu = w.cpu_ns(0, &source.container_id)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu_later = w.cpu_ns(0, &source.container_id)?;
        ensure!(
            cpu == cpu_later,
            "the paused source used CPU: {cpu} -> {cpu_later} ns"
        );
        ensure!(
            w.blocked(0).contains(&ip),
            "node-1 does not block {ip}: {:?}",
            w.blocked(0)
        );
        ensure!(status(ip).await.is_err(), "the paused source still answers");

        let transfer = done(
            &mut src,
            Step::Transfer,
            &StepArgs {
                migration_uid: uid.clone(),
                target_endpoint: w.endpoint(1).to_string(),
                compression: Compression::Zstd,
                bandwidth_limit: 0,
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            transfer.bytes_done == archive.bytes,
            "transfer {transfer:?}"
        );
        eprintln!(
            "transfer: {} ({} ms)",
            transfer.message, transfer.duration_ms
        );

        // The commit point: the source is killed for good, and its sandbox removed (the
        // kubelet's part when the pod object is deleted), which frees the IP on node-1.
        done(&mut src, Step::Commit(Role::Source), &StepArgs::of(&uid)).await?;
        let state = w.task_state(0, &source.container_id);
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
                ..Default::default()
            },
        )
        .await?;
        ensure!(staged.staged.len() == 1, "staged {:?}", staged.staged);
        let staged_image = staged.staged[0].image.clone();
        // A checkpoint image in the registry, already pulled into node-2's runtime.
        ensure!(
            staged_image.starts_with(&format!("{}:{uid}-app", world::CHECKPOINT_REPOSITORY)),
            "staged image {staged_image}"
        );
        let present = w.exec(1, &["crictl", "inspecti", &staged_image]);
        ensure!(
            present.is_ok(),
            "the checkpoint image is not in node-2's runtime: {present:?}"
        );
        // The counters hold the pod's block when the restore starts, and the IP is blocked on
        // the target until the restored sockets exist.
        ensure!(
            w.rxe_file(1, "last_qpn") == "1280",
            "last_qpn {}",
            w.rxe_file(1, "last_qpn")
        );
        ensure!(
            w.rxe_file(1, "last_mrn") == "1536",
            "last_mrn {}",
            w.rxe_file(1, "last_mrn")
        );
        ensure!(w.blocked(1).contains(&ip), "node-2 does not block {ip}");

        let restore_started = std::time::Instant::now();
        let restored = w.run_pod(1, &name, &staged_image, &[])?;
        let restore_ms = restore_started.elapsed().as_millis();
        ensure!(
            restored.ip == ip,
            "restored with IP {}, not {ip}",
            restored.ip
        );
        done(&mut target, Step::FinishRestore, &StepArgs::of(&uid)).await?;
        ensure!(!w.blocked(1).contains(&ip), "node-2 still blocks {ip}");
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
            streaming.num("gaps") == 0,
            "records lost or repeated: {streaming:?}"
        );
        let peer_status = status(peer.ip).await?;
        ensure!(peer_status.num("counter") > 0, "peer {peer_status:?}");
        eprintln!(
            "peer's stream: same connection, longest pause {} ms, counter {} -> {}",
            streaming.get("maxgap_ms"),
            before.num("counter"),
            streaming.num("counter")
        );

        for (client, role) in [(&mut src, Role::Source), (&mut target, Role::Target)] {
            done(client, Step::Cleanup(role), &StepArgs::of(&uid)).await?;
        }
        ensure!(
            !w.stored(0).contains(&uid) && !w.stored(1).contains(&uid),
            "data left after cleanup"
        );
        ensure!(
            !w.blocked(0).contains(&ip),
            "node-1 still blocks {ip} after cleanup"
        );
        w.remove_pod(&restored)?;
        Ok(())
    });
    if result.is_err() {
        // Leave nothing paused or blocked behind a failed case.
        w.rt.block_on(async {
            for (i, role) in [(0, Role::Source), (1, Role::Target)] {
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
            w.agent_log(0),
            w.agent_log(1)
        )
    })
}

fn abort(w: &World) -> Result<()> {
    let name = unique("abort");
    let uid = unique("mig");
    let image = w.demo_image.clone();
    let pod = w.run_pod(0, &name, &image, &["serve", "--status", ":8080"])?;
    let result = w.rt.block_on(async {
        let before = until("the workload to count", Duration::from_secs(30), || async {
            status(pod.ip).await.ok().filter(|s| s.num("counter") >= 20)
        })
        .await?;
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
        // A target that cannot be reached: the transfer is retried, then fails with the reason,
        // and the source stays paused, ready for the abort.
        let why = fails(
            &mut src,
            Step::Transfer,
            &StepArgs {
                migration_uid: uid.clone(),
                target_endpoint: format!("{}:1", w.nodes[2].ip()),
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
        ensure!(!w.blocked(0).contains(&pod.ip), "still blocked after abort");
        // The same process goes on counting from where it was.
        let after = until(
            "the resumed workload to count on",
            Duration::from_secs(20),
            || async {
                status(pod.ip)
                    .await
                    .ok()
                    .filter(|s| s.num("counter") > before.num("counter") + 20)
            },
        )
        .await?;
        ensure!(
            after.get("id") == before.get("id"),
            "a new process after abort"
        );
        ensure!(
            !w.stored(0).contains(&uid) && !w.stored(1).contains(&uid),
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
    if result.is_err() {
        w.rt.block_on(async {
            if let Ok(mut c) = w.operator(0).await {
                let _ = c.step(Step::Abort(Role::Source), &StepArgs::of(&uid)).await;
            }
        });
    }
    let _ = w.remove_pod(&pod);
    result.map_err(|e| format!("{e}\nagent:\n{}", w.agent_log(0)))
}

/// A small archive shaped like a CRI checkpoint, or with a hostile entry.
fn tar_archive(hostile: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Raw name bytes: tar's own setter refuses `..`, a hostile peer's tool does not.
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("config.dump", b"{}");
    add("checkpoint/pages-1.img", &[3u8; 8192]);
    if hostile {
        add("../../../../etc/kube-migros-evil", b"owned");
    }
    b.into_inner().unwrap()
}

fn digest(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn chunk(uid: &str, offset: u64, data: &[u8], digest: &str, total: u64) -> v1::ReceiveChunk {
    v1::ReceiveChunk {
        migration_uid: uid.into(),
        container: "app".into(),
        offset,
        data: data.to_vec(),
        digest: digest.into(),
        total_bytes: total,
        compression: Compression::None.into(),
    }
}

fn bad_archives(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let uid = unique("recv");
        let mut target = w.operator(1).await?;
        let pod = v1::PodRef {
            namespace: world::NAMESPACE.into(),
            name: "received".into(),
            uid: "uid-received".into(),
            pod_ip: String::new(),
            containers: vec![v1::ContainerRef {
                name: "app".into(),
                container_id: String::new(),
                image: String::new(),
            }],
        };
        done(
            &mut target,
            Step::PrepareTarget,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                expected_bytes: 1 << 20,
                rxe: None,
                ..Default::default()
            },
        )
        .await?;
        let good = tar_archive(false);
        let hostile = tar_archive(true);
        let n = good.len() as u64;
        let cases: Vec<(&str, Vec<v1::ReceiveChunk>, &str)> = vec![
            (
                "corrupted",
                vec![chunk(&uid, 0, &[0u8; 512], "", n), {
                    let mut rest = good[512..].to_vec();
                    rest[100] ^= 0xff;
                    chunk(&uid, 512, &rest, &digest(&good), n)
                }],
                "corrupted",
            ),
            (
                "truncated",
                vec![chunk(&uid, 0, &good[..4096], "", n)],
                "truncated",
            ),
            (
                "oversized (announced)",
                vec![chunk(&uid, 0, &good[..4096], "", MAX_ARCHIVE_BYTES + 1)],
                "more than this node's limit",
            ),
            (
                "oversized (more than announced)",
                vec![chunk(&uid, 0, &good, &digest(&good), n - 1000)],
                "more than the",
            ),
            (
                "hostile",
                vec![chunk(
                    &uid,
                    0,
                    &hostile,
                    &digest(&hostile),
                    hostile.len() as u64,
                )],
                "leaves the archive's directory",
            ),
        ];
        let peer_tls = w.certs.agent();
        for (what, chunks, expect) in cases {
            let mut peer = w.client(1, Some(peer_tls.clone()), None).await?;
            let answer = peer.raw().receive(tokio_stream::iter(chunks)).await;
            let message = match answer {
                Ok(r) => {
                    return Err(format!(
                        "the {what} archive was accepted: {:?}",
                        r.into_inner()
                    ));
                }
                Err(status) => status.message().to_string(),
            };
            ensure!(
                message.contains(expect),
                "{what}: {message:?} does not say {expect:?}"
            );
            for sub in ["incoming", "staged"] {
                let dir = w.written(1, &format!("/var/lib/kube-migros/migrations/{uid}/{sub}"));
                let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
                ensure!(
                    left == 0,
                    "{what}: {left} entries left in {}",
                    dir.display()
                );
            }
        }
        ensure!(
            !w.written(1, "/etc/kube-migros-evil").exists()
                && !std::path::Path::new("/etc/kube-migros-evil").exists(),
            "the hostile entry was written"
        );
        // StageRestore refuses a migration without a received checkpoint.
        let why = fails(
            &mut target,
            Step::StageRestore,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                rxe: None,
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("was not received"), "{why}");

        // The same agent takes a good archive (so the refusals above were about the data), in
        // zstd chunks, and stages it.
        let mut peer = w.client(1, Some(peer_tls), None).await?;
        let mut z = chunk(
            &uid,
            0,
            &zstd::bulk::compress(&good, 1).unwrap(),
            &digest(&good),
            n,
        );
        z.compression = Compression::Zstd.into();
        let ok = peer
            .raw()
            .receive(tokio_stream::iter(vec![z]))
            .await
            .map_err(|s| format!("the good archive was refused: {}", s.message()))?
            .into_inner();
        ensure!(ok.bytes == n && ok.archives.len() == 1, "received {ok:?}");
        let image = format!("{}:{uid}-app", world::CHECKPOINT_REPOSITORY);
        let present = w.exec(1, &["crictl", "inspecti", &image]);
        ensure!(
            present.is_ok(),
            "the staged image {image} is not in the runtime: {present:?}"
        );

        // A stream for a migration the node was never asked to prepare is refused.
        let mut peer = w.client(1, Some(w.certs.agent()), None).await?;
        let stray = peer
            .raw()
            .receive(tokio_stream::iter(vec![chunk(
                "never-prepared",
                0,
                &good,
                &digest(&good),
                n,
            )]))
            .await;
        ensure!(
            stray
                .as_ref()
                .is_err_and(|s| s.message().contains("was not prepared")),
            "stray stream: {stray:?}"
        );
        done(
            &mut target,
            Step::Cleanup(Role::Target),
            &StepArgs::of(&uid),
        )
        .await?;
        ensure!(!w.stored(1).contains(&uid), "data left after cleanup");
        Ok(())
    })
}

fn refusals(w: &World) -> Result<()> {
    w.rt.block_on(async {
        // No client certificate at all: the TLS handshake or the first call fails.
        let no_cert = match w.client(0, None, Some(&ca_pem(w))).await {
            Ok(mut c) => c.capabilities().await.err().map(|s| s.to_string()),
            Err(e) => Some(e),
        };
        ensure!(
            no_cert.is_some(),
            "a client without a certificate was served"
        );
        // A certificate of another CA.
        let other = agent_api::pki::Ca::new("another-ca").map_err(|e| e.to_string())?;
        let leaf = other
            .issue(&agent_api::pki::Leaf {
                common_name: agent_api::identity::OPERATOR_COMMON_NAME,
                usage: Some(agent_api::pki::Usage::Client),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        let foreign = agent_api::tls::TlsMaterial::from_pem(
            ca_pem(w).into_bytes(),
            leaf.cert.into_bytes(),
            leaf.key.into_bytes(),
        );
        let other_ca = match w.client(0, Some(foreign), None).await {
            Ok(mut c) => c.capabilities().await.err().map(|s| s.to_string()),
            Err(e) => Some(e),
        };
        ensure!(
            other_ca.is_some(),
            "a certificate of another CA was accepted"
        );
        // The right CA but neither the operator nor an agent.
        let mut stranger = w.client(0, Some(w.certs.stranger()), None).await?;
        let denied = stranger.capabilities().await;
        ensure!(
            denied
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
            "a stranger: {denied:?}"
        );
        // A peer agent may stream checkpoints but not drive steps.
        let mut peer = w.client(0, Some(w.certs.agent()), None).await?;
        let denied = peer
            .step(Step::Abort(Role::Source), &StepArgs::of("some-migration"))
            .await;
        ensure!(
            denied
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
            "a peer driving a step: {denied:?}"
        );
        // The operator is served.
        w.operator(0)
            .await?
            .capabilities()
            .await
            .map_err(|s| format!("the operator was refused: {s}"))?;
        Ok(())
    })
}

fn ca_pem(w: &World) -> String {
    std::fs::read_to_string(w.certs.operator_dir().join("ca.crt")).unwrap_or_default()
}

fn invalid_requests(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let mut target = w.operator(1).await?;
        let uid = unique("bad");
        let pod = v1::PodRef {
            namespace: world::NAMESPACE.into(),
            name: "p".into(),
            uid: "u".into(),
            pod_ip: String::new(),
            containers: vec![v1::ContainerRef {
                name: "app".into(),
                container_id: "containerd://0123".into(),
                image: String::new(),
            }],
        };
        // An rxe block outside the node's ranges.
        let mut block = rxe_block();
        block.qpn_start = 16;
        let why = fails(
            &mut target,
            Step::PrepareTarget,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                expected_bytes: 1,
                rxe: Some(block),
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("outside this node's ranges"), "{why}");
        // A checkpoint larger than the node takes.
        let why = fails(
            &mut target,
            Step::PrepareTarget,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                expected_bytes: MAX_ARCHIVE_BYTES * 2,
                rxe: None,
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("limit"), "{why}");
        ensure!(!w.stored(1).contains(&uid), "a refused prepare left data");
        // Checkpointing a container that does not exist fails and leaves nothing behind.
        let mut src = w.operator(0).await?;
        let why = fails(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: pod.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("0123"), "{why}");
        // Without runtime IDs the agent looks for the pod's containers, and says so when none run.
        let mut unknown = pod.clone();
        unknown.containers[0].container_id.clear();
        let why = fails(
            &mut src,
            Step::Checkpoint,
            &StepArgs {
                migration_uid: uid.clone(),
                pod: unknown.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            why.contains("no running container app of pod agent-test/p"),
            "{why}"
        );
        ensure!(
            !w.stored(0).contains(&uid),
            "a refused checkpoint left data"
        );
        // Malformed requests are refused before anything runs.
        let bad = src
            .step(
                Step::Checkpoint,
                &StepArgs {
                    migration_uid: "../etc".into(),
                    pod: pod.clone(),
                    ..Default::default()
                },
            )
            .await;
        ensure!(
            bad.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
            "{bad:?}"
        );
        let role = src
            .send(StepRequest::Abort(v1::StepRequest {
                migration_uid: uid.clone(),
                role: v1::Role::Unspecified.into(),
            }))
            .await;
        ensure!(role.is_err(), "a step without a role was taken");
        Ok(())
    })
}

/// Prepares migration `uid` on node-2 for a pod with one container and streams a good archive
/// to it as a peer agent would.
async fn prepared_with_archive(w: &World, uid: &str, name: &str) -> Result<v1::PodRef> {
    let pod = v1::PodRef {
        namespace: world::NAMESPACE.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        pod_ip: String::new(),
        containers: vec![v1::ContainerRef {
            name: "app".into(),
            container_id: String::new(),
            image: String::new(),
        }],
    };
    let mut target = w.operator(1).await?;
    done(
        &mut target,
        Step::PrepareTarget,
        &StepArgs {
            migration_uid: uid.to_string(),
            pod: pod.clone(),
            expected_bytes: 1 << 20,
            rxe: Some(rxe_block()),
            ..Default::default()
        },
    )
    .await?;
    let good = tar_archive(false);
    let mut peer = w.client(1, Some(w.certs.agent()), None).await?;
    peer.raw()
        .receive(tokio_stream::iter(vec![chunk(
            uid,
            0,
            &good,
            &digest(&good),
            good.len() as u64,
        )]))
        .await
        .map_err(|s| format!("receiving: {}", s.message()))?;
    Ok(pod)
}

fn rxe_lock(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let (first, second) = (unique("rxe-a"), unique("rxe-b"));
        let pod_a = prepared_with_archive(w, &first, "rxe-a").await?;
        let pod_b = prepared_with_archive(w, &second, "rxe-b").await?;
        let mut target = w.operator(1).await?;
        let block_b = v1::RxeBlock {
            qpn_start: 2048,
            qpn_count: 256,
            mrn_start: 2304,
            mrn_count: 256,
        };
        let stage = |uid: &str, pod: &v1::PodRef, block: v1::RxeBlock| StepArgs {
            migration_uid: uid.into(),
            pod: pod.clone(),
            rxe: Some(block),
            ..Default::default()
        };
        done(
            &mut target,
            Step::StageRestore,
            &stage(&first, &pod_a, rxe_block()),
        )
        .await?;
        ensure!(
            w.rxe_file(1, "last_qpn") == "1280",
            "last_qpn {}",
            w.rxe_file(1, "last_qpn")
        );
        // While the first pod has not started, the second restore cannot take the counters.
        let why = fails(
            &mut target,
            Step::StageRestore,
            &stage(&second, &pod_b, block_b),
        )
        .await?;
        ensure!(why.contains(&format!("held by migration {first}")), "{why}");
        ensure!(
            w.rxe_file(1, "last_qpn") == "1280",
            "the refused restore wrote the counters"
        );
        done(&mut target, Step::FinishRestore, &StepArgs::of(&first)).await?;
        done(
            &mut target,
            Step::StageRestore,
            &stage(&second, &pod_b, block_b),
        )
        .await?;
        ensure!(
            w.rxe_file(1, "last_qpn") == "2048",
            "last_qpn {}",
            w.rxe_file(1, "last_qpn")
        );
        ensure!(
            w.rxe_file(1, "last_mrn") == "2304",
            "last_mrn {}",
            w.rxe_file(1, "last_mrn")
        );
        for uid in [&first, &second] {
            done(&mut target, Step::Cleanup(Role::Target), &StepArgs::of(uid)).await?;
        }
        Ok(())
    })
}

/// `e2e/bench/raw-recipe.sh`, the baseline of the benchmarks, still works on these nodes.
fn raw_recipe(w: &World) -> Result<()> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/bench/raw-recipe.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["node-1", "node-2", &w.demo_image])
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the raw recipe failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
            .to_string()
    };
    let number = |key: &str| value(key).parse::<u64>().unwrap_or(0);
    ensure!(
        !value("source_id").is_empty() && value("source_id") == value("target_id"),
        "the target does not run the restored process:\n{text}"
    );
    ensure!(
        number("target_counter") >= number("source_counter") && number("archive_bytes") > 0,
        "{text}"
    );
    for key in ["checkpoint_ms", "copy_ms", "scp_ms", "restore_ms"] {
        ensure!(!value(key).is_empty(), "no {key}:\n{text}");
    }
    eprint!("{} ", text.split_whitespace().collect::<Vec<_>>().join(" "));
    Ok(())
}
