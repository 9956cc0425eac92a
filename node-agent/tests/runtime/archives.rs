//! What a target agent does with streams from a peer: bad and hostile archives refused leaving
//! nothing, a good one staged; and the node's rxe counters held by one restore at a time.

use agent_api::{
    Role, Step, StepArgs, backend,
    v1::{self, Compression},
};
use sha2::{Digest, Sha256};

use crate::{
    rxe_block, unique,
    world::{self, MAX_ARCHIVE_BYTES, Result, World, done, fails},
};

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
        // Deep enough to reach / from wherever the agent unpacks.
        add(
            &format!("{}etc/kube-migros-evil", "../".repeat(16)),
            b"owned",
        );
    }
    b.into_inner().unwrap()
}

/// A checkpoint-shaped archive whose `rootfs-diff.tar` (the container's filesystem changes) has
/// an entry that walks out of the root filesystem.
fn nested_layer_archive() -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let name = format!("{}etc/kube-migros-evil", "../".repeat(16));
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(5);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    layer.append(&h, &b"owned"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("config.dump", &b"{}"[..]),
        ("checkpoint/pages-1.img", &[3u8; 8192][..]),
        ("rootfs-diff.tar", &layer[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, data).unwrap();
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

/// What the operator names as the checkpoint of container `app`.
fn expected(digest: &str) -> Vec<v1::ContainerArchive> {
    vec![v1::ContainerArchive {
        name: "app".into(),
        bytes: 0,
        digest: digest.into(),
    }]
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

pub fn bad_archives(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let mut target = w.operator(1).await?;
        // Received into a file (checkpoint images) or unpacked as it arrives (the wrapper): the
        // same refusals, nothing left either way.
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
        let good = tar_archive(false);
        let hostile = tar_archive(true);
        let n = good.len() as u64;
        // The checkpoint comes from node 0: only its agent may send it.
        let source = w.nodes[0].name.clone();
        let peer_tls = w.certs.agent(&source);
        let mut uids = Vec::new();
        for backend in [backend::CRI_CHECKPOINT_IMAGE, backend::RUNTIME_WRAPPER] {
            let uid = unique("recv");
            done(
                &mut target,
                Step::PrepareTarget,
                &StepArgs {
                    migration_uid: uid.clone(),
                    pod: pod.clone(),
                    expected_bytes: 1 << 20,
                    rxe: None,
                    backend: backend.into(),
                    source_node: source.clone(),
                    ..Default::default()
                },
            )
            .await?;
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
            // The runtime wrapper applies the layer inside the checkpoint itself: a hostile one
            // is refused at the stream, before the commit point (the runtime of checkpoint
            // images applies its own).
            let mut cases = cases;
            if backend == backend::RUNTIME_WRAPPER {
                let nested = nested_layer_archive();
                cases.push((
                    "hostile nested layer",
                    vec![chunk(
                        &uid,
                        0,
                        &nested,
                        &digest(&nested),
                        nested.len() as u64,
                    )],
                    "not safe to apply",
                ));
            }
            // A sound archive, from the agent of a node the checkpoint does not come from: its
            // certificate is good, but it names node 2.
            cases.push((
                "from another node's agent",
                vec![chunk(&uid, 0, &good, &digest(&good), n)],
                "may not send the checkpoint",
            ));
            for (what, chunks, expect) in cases {
                let tls = if what == "from another node's agent" {
                    w.certs.agent(&w.nodes[2].name)
                } else {
                    peer_tls.clone()
                };
                let mut peer = w.client(1, Some(tls), None).await?;
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
            uids.push(uid);
        }
        let uid = uids[0].clone();
        ensure!(
            !w.written(1, "/etc/kube-migros-evil").exists()
                && !std::path::Path::new("/etc/kube-migros-evil").exists(),
            "the hostile entry was written"
        );
        // StageRestore refuses a migration without a received checkpoint.
        let stage = |want: &str| StepArgs {
            migration_uid: uid.clone(),
            pod: pod.clone(),
            rxe: None,
            expected: expected(want),
            ..Default::default()
        };
        let why = fails(&mut target, Step::StageRestore, &stage(&digest(&good))).await?;
        ensure!(why.contains("was not received"), "{why}");

        // The same agent takes a good archive (so the refusals above were about the data), in
        // zstd chunks, and stages it.
        let mut peer = w.client(1, Some(peer_tls.clone()), None).await?;
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
        // Received whole: another stream for the same migration cannot replace it. The source's
        // agent sending again (the answer to its first stream was lost) is answered what arrived
        // the first time, and none of its data is taken; the checkpoint stays.
        let other = tar_archive(true);
        let mut peer = w.client(1, Some(peer_tls), None).await?;
        let second = peer
            .raw()
            .receive(tokio_stream::iter(vec![chunk(
                &uid,
                0,
                &other,
                &digest(&other),
                other.len() as u64,
            )]))
            .await
            .map_err(|s| format!("the second stream: {}", s.message()))?
            .into_inner();
        ensure!(
            second.received_before && second.archives == ok.archives && second.bytes == n,
            "a second stream: {second:?}, the first received {ok:?}"
        );
        // Staged only with the digest the operator recorded at the checkpoint.
        let why = fails(&mut target, Step::StageRestore, &stage(&digest(b"other"))).await?;
        ensure!(why.contains("the operator expects"), "{why}");
        let staged = done(&mut target, Step::StageRestore, &stage(&digest(&good))).await?;
        ensure!(staged.staged.len() == 1, "staged {:?}", staged.staged);
        let image = &staged.staged[0].image;
        let pinned = agent_api::checkpoint_image::Parts::new("app", &digest(&good), n);
        ensure!(
            *image
                == format!(
                    "{}:{uid}-app@{}",
                    world::CHECKPOINT_REPOSITORY,
                    pinned.manifest_digest()
                ),
            "staged {image}"
        );
        let present = w.exec(1, &["crictl", "inspecti", image]);
        ensure!(
            present.is_ok(),
            "the staged image {image} is not in the runtime: {present:?}"
        );
        // The runtime wrapper's staging unpacks the same archive into the store instead.
        let unpacked = unique("recv");
        prepared_with_archive(w, &unpacked, "received").await?;
        let pages = w.written(
            1,
            &format!(
                "/var/lib/kube-migros/migrations/{unpacked}/staged/app/checkpoint/pages-1.img"
            ),
        );
        ensure!(
            std::fs::read(&pages).is_ok_and(|p| p == [3u8; 8192]),
            "the archive was not unpacked for the wrapper at {}",
            pages.display()
        );
        done(
            &mut target,
            Step::Cleanup(Role::Target),
            &StepArgs::of(&unpacked),
        )
        .await?;

        // A stream for a migration the node was never asked to prepare is refused.
        let mut peer = w
            .client(1, Some(w.certs.agent(&w.nodes[0].name)), None)
            .await?;
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
        done(
            &mut target,
            Step::Cleanup(Role::Target),
            &StepArgs::of(&uids[1]),
        )
        .await?;
        let stored = w.stored(1)?;
        ensure!(
            uids.iter().all(|u| !stored.contains(u)),
            "data left after cleanup"
        );
        Ok(())
    })
}

/// Prepares migration `uid` on node-2 for a pod with one container (the node's preferred backend,
/// the runtime wrapper) and streams a good archive to it as a peer agent would.
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
            source_node: w.nodes[0].name.clone(),
            ..Default::default()
        },
    )
    .await?;
    let good = tar_archive(false);
    let mut peer = w
        .client(1, Some(w.certs.agent(&w.nodes[0].name)), None)
        .await?;
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

/// Streams that never name their migration hold none of the node's receive slots: with more of
/// them open (from another node's agent) than the node has slots, the source's stream is still
/// taken rather than told to try again later.
pub fn quiet_streams_take_no_slot(w: &World) -> Result<()> {
    w.rt.block_on(async {
        let mut quiet = Vec::new();
        for _ in 0..=node_agent::api::MAX_RECEIVING {
            let mut peer = w
                .client(1, Some(w.certs.agent(&w.nodes[2].name)), None)
                .await?;
            let (tx, rx) = tokio::sync::mpsc::channel::<v1::ReceiveChunk>(1);
            let call = tokio::spawn(async move {
                peer.raw()
                    .receive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            quiet.push((tx, call));
        }
        // The agent serves each call as its headers arrive; nothing it does is visible from
        // here until the call ends, so the quiet streams get a moment to be served first.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // Before this rule, the source's stream waited for a slot and was told to try again.
        let uid = unique("quiet");
        prepared_with_archive(w, &uid, "quiet").await?;
        for (tx, call) in quiet {
            ensure!(
                !call.is_finished(),
                "a quiet stream ended before its sender did"
            );
            drop(tx);
            let answer = call.await.map_err(|e| e.to_string())?;
            ensure!(
                answer
                    .as_ref()
                    .is_err_and(|s| s.message().contains("no data")),
                "a stream that carried nothing: {answer:?}"
            );
        }
        Ok(())
    })
}

pub fn rxe_lock(w: &World) -> Result<()> {
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
            expected: expected(&digest(&tar_archive(false))),
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
        // The second restore fails past its commit point: the target releases what it holds for
        // the pod (the counters, here) and keeps the checkpoint for a manual restore.
        done(&mut target, Step::Release, &StepArgs::of(&second)).await?;
        ensure!(
            w.stored(1)?.contains(&second),
            "the kept checkpoint was removed"
        );
        let third = unique("rxe-c");
        let pod_c = prepared_with_archive(w, &third, "rxe-c").await?;
        done(
            &mut target,
            Step::StageRestore,
            &stage(&third, &pod_c, rxe_block()),
        )
        .await
        .map_err(|e| format!("the released counters were still held: {e}"))?;
        for uid in [&first, &second, &third] {
            done(&mut target, Step::Cleanup(Role::Target), &StepArgs::of(uid)).await?;
        }
        Ok(())
    })
}
