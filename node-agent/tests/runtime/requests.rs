//! Who may call an agent and what it refuses: callers without a valid certificate, peers driving
//! steps, invalid requests; and the capabilities it reports.

use std::time::Duration;

use agent_api::{Role, Step, StepArgs, backend, steps::StepRequest, v1};
use node_agent::strategies;

use crate::{
    rxe_block, unique,
    world::{self, MAX_ARCHIVE_BYTES, Result, World, fails},
};

/// node-1 runs containerd 2.4 (the runtime wrapper only), node-2 Debian's containerd 2.1 (also
/// checkpoint images); both report what they can and why not the rest.
pub fn capabilities(w: &World) -> Result<()> {
    w.rt.block_on(async {
        for (i, version, backends) in [
            (
                0,
                sandbox::containerd::CONTAINERD.1,
                vec![backend::RUNTIME_WRAPPER, backend::CRI_CHECKPOINT_ARCHIVE],
            ),
            (
                1,
                "2.1.",
                vec![
                    backend::RUNTIME_WRAPPER,
                    backend::CRI_CHECKPOINT_IMAGE,
                    backend::CRI_CHECKPOINT_ARCHIVE,
                ],
            ),
        ] {
            let caps = w
                .operator(i)
                .await?
                .capabilities()
                .await
                .map_err(|s| s.to_string())?;
            let node = &w.nodes[i].name;
            ensure!(caps.node_name == *node, "node name {:?}", caps.node_name);
            ensure!(
                caps.runtime_name == "containerd" && caps.runtime_version.starts_with(version),
                "{node}: runtime {} {}",
                caps.runtime_name,
                caps.runtime_version
            );
            ensure!(
                caps.criu_version.starts_with('4'),
                "CRIU version {:?}",
                caps.criu_version
            );
            ensure!(caps.rxe_present, "the rxe counter files are not seen");
            ensure!(caps.free_bytes > 1 << 30, "free bytes {}", caps.free_bytes);
            // The wrapper first (the node's containerd has its handler); checkpoint images only
            // where containerd still restores from them, and the reason where not.
            let image_note = caps.notes.iter().any(|n| n.contains("removed in 2.4"));
            ensure!(
                caps.restore_backends == backends && image_note == (i == 0),
                "{node}: backends {:?}, notes {:?}",
                caps.restore_backends,
                caps.notes
            );
            // These kernels have userfaultfd but no soft-dirty bits; fs.pipe-max-size is the
            // host's, read here as the agent reads it.
            let strategy = |name: &str| {
                caps.strategies
                    .iter()
                    .find(|s| s.name == name)
                    .cloned()
                    .ok_or_else(|| format!("{node}: no {name} in {:?}", caps.strategies))
            };
            // The agents run in the node's PID namespace (as with the chart's hostPID), so they
            // try soft-dirty on a page of their own, and find none.
            let pre = strategy(strategies::PRE_COPY)?;
            ensure!(
                !pre.met
                    && pre.missing.contains("soft-dirty")
                    && !pre.missing.contains("cannot tell"),
                "{node}: PreCopy {pre:?}"
            );
            // The agents were allowed to raise fs.pipe-max-size (--raise-pipe-max-size).
            let post = strategy(strategies::POST_COPY)?;
            let pipe =
                std::fs::read_to_string("/proc/sys/fs/pipe-max-size").map_err(|e| e.to_string())?;
            ensure!(
                strategies::pipe_room(&pipe).is_ok() && post.met && post.missing.is_empty(),
                "{node}: PostCopy {post:?} with fs.pipe-max-size {}",
                pipe.trim()
            );
        }
        // The soft-dirty check on this kernel (which has none), from a process with its own /proc.
        let here = strategies::requirements(true).await;
        let pre = here.iter().find(|s| s.name == strategies::PRE_COPY);
        ensure!(
            pre.is_some_and(|p| !p.met && p.missing.contains("no soft-dirty bits")),
            "PreCopy here: {pre:?}"
        );
        Ok(())
    })
}

pub fn refusals(w: &World) -> Result<()> {
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
        let mut stranger = w
            .client(0, Some(w.certs.stranger(&w.nodes[0].name)), None)
            .await?;
        let denied = stranger.capabilities().await;
        ensure!(
            denied
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
            "a stranger: {denied:?}"
        );
        // A peer agent may stream checkpoints but not drive steps.
        let mut peer = w
            .client(0, Some(w.certs.agent(&w.nodes[1].name)), None)
            .await?;
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
        // Whoever answers at an address must be the agent of the node the caller means: node 0's
        // agent, dialled as node 1's, presents a certificate of another node and is not trusted.
        let mistaken = w
            .certs
            .operator()
            .endpoint(&w.endpoint(0).to_string(), &w.nodes[1].name)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await;
        ensure!(mistaken.is_err(), "node 0's agent was taken for node 1's");
        Ok(())
    })
}

/// The CA that signed the agents' certificates: a client with it trusts the agent, so a failure
/// is the agent refusing the client, never the client distrusting the agent.
fn ca_pem(w: &World) -> String {
    let path = w.certs.operator_dir().join("ca.crt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the CA at {}: {e}", path.display()))
}

pub fn invalid_requests(w: &World) -> Result<()> {
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
                source_node: w.nodes[1].name.clone(),
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
                source_node: w.nodes[1].name.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(why.contains("limit"), "{why}");
        ensure!(!w.stored(1)?.contains(&uid), "a refused prepare left data");
        // Checkpointing a pod that does not run here fails and leaves nothing behind, whether
        // the request names runtime IDs or not (the pod's sandbox is what finds them).
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
        ensure!(
            why.contains("no running container app of pod agent-test/p"),
            "{why}"
        );
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
            !w.stored(0)?.contains(&uid),
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
        ensure!(
            role.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
            "a step without a role: {role:?}"
        );
        Ok(())
    })
}

/// `e2e/bench/raw-recipe.sh`, the baseline of the benchmarks, still works on these nodes.
pub fn raw_recipe(w: &World) -> Result<()> {
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
