//! The live demo (`cargo run -p e2e -- demo`): brings up the sandbox cluster, installs kube-migros
//! with its Helm chart (images built from this workspace: the operator Deployment and the node-agent
//! DaemonSet), starts the demo workload with a peer streaming to it over TCP from another node, and moves it node-1 -> node-2
//! -> node-3 by `kubectl apply` of PodMigrations, printing a timeline of each move and the
//! workload's state, IP and peer connection before and after.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crds::{Phase, PodMigration};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use sandbox::{Dirs, cluster, controlplane::Env, install, registry::Registry, release};
use testkit::workload::{self, State, node_of, num};

/// The demo's namespace (made anew by every run).
pub const NAMESPACE: &str = "kube-migros-demo";

fn say(line: impl AsRef<str>) {
    eprintln!("{}", line.as_ref());
}

fn show(s: &State) -> String {
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    format!(
        "process {} counter {} received {} B on {} connection(s), records lost or repeated: {}",
        get("id"),
        get("counter"),
        get("received"),
        get("conns"),
        get("gaps")
    )
}

async fn running_pod(pods: &Api<Pod>, name: &str, not_uid: Option<String>) -> anyhow::Result<Pod> {
    workload::until(
        &format!("pod {name} to run"),
        Duration::from_secs(120),
        || workload::running(pods, name, not_uid.as_deref()),
    )
    .await
}

fn pod_ip(pod: &Pod) -> anyhow::Result<Ipv4Addr> {
    workload::ip_of(pod).context("the pod has no IP")
}

fn kubectl(env: &Env, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env.kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(args)
        .status()
        .with_context(|| format!("running {}", env.kubectl().display()))?;
    if !status.success() {
        bail!("kubectl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs the demo.
pub async fn run(dirs: &Dirs) -> anyhow::Result<()> {
    let started = Instant::now();
    say(
        "==> the sandbox cluster: Kubernetes control plane, three nodes (kubelet, containerd, runc, CRIU), registry",
    );
    say(
        "    (the first run builds Kubernetes and the node image: several minutes; later runs take seconds)",
    );
    let cluster = cluster::up(dirs).await?;
    let env = cluster.env.clone();
    let client = env.client().await?;
    say(format!(
        "    ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    install::apply_chart_crds(&client).await?;
    workload::fresh_namespace(&client, NAMESPACE).await?;
    install_release(dirs, &cluster, &client).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let demo = cluster.images.get("demo").context("no demo image")?;
    say(
        "==> the workload: the demo program on node-1 (an RDMA pod: it asks for an rdma/rxe device),",
    );
    say("    and a peer on node-3 streaming numbered records to it over one TCP connection");
    let (mut current, mut before) =
        workload::start_with_peer(&pods, demo, ("app", "peer"), Some("16Mi")).await?;
    let ip = pod_ip(&current)?;
    say(format!(
        "    app runs on node-1 with IP {ip}: {}",
        show(&before)
    ));
    let log_dir = dirs.state.join("demo");
    std::fs::create_dir_all(&log_dir)?;
    let pms: Api<PodMigration> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, target) in [("move-1", "node-2"), ("move-2", "node-3")] {
        let from = node_of(&current);
        let manifest = workload::migration_manifest(
            NAMESPACE,
            name,
            "app",
            Some(target),
            "  compression: Zstd\n",
        );
        let path: PathBuf = log_dir.join(format!("{name}.yaml"));
        say(format!(
            "\n==> kubectl apply -f {}   (app: {from} -> {target})",
            path.display()
        ));
        eprint!("{}", workload::kubectl_apply(&env, &path, &manifest)?);
        let status = follow(&pms, name).await?.status.unwrap_or_default();
        if status.phase != Some(Phase::Succeeded) {
            show_logs(&env);
            bail!(
                "{name} ended {:?}: {}",
                status.phase,
                status.message.unwrap_or_default()
            );
        }
        kubectl(&env, &["get", "pm", name, "-n", NAMESPACE, "-o", "wide"])?;
        let moved = running_pod(&pods, "app", current.metadata.uid.clone()).await?;
        let received = num(&before, "received");
        let after = workload::until(
            "the peer's stream to go on",
            Duration::from_secs(60),
            || async move {
                workload::state(ip)
                    .await
                    .filter(|s| num(s, "received") > received + 64 * 20)
            },
        )
        .await?;
        let peer = workload::peer_judgement(&pods, "peer").await?;
        report_move(&status, (&from, ip, &before), (&moved, &after), &peer)?;
        current = moved;
        before = after;
    }

    say(format!(
        "\nDone in {:.0} s. The cluster and kube-migros stay up:\n\
         eval \"$(cargo run -q -p e2e -- control-plane env)\"; kubectl get pm,pods -n {NAMESPACE} -o wide\n\
         kubectl get pods -n {} -o wide          # the operator replicas and the agents\n\
         cargo run -p e2e -- cluster down     # stops everything and removes its state",
        started.elapsed().as_secs_f64(),
        release::NAMESPACE
    ));
    Ok(())
}

/// Builds the images, installs the chart and waits until every agent announced itself.
async fn install_release(
    dirs: &Dirs,
    cluster: &cluster::Cluster,
    client: &kube::Client,
) -> anyhow::Result<()> {
    say("==> kube-migros: images of the operator and the node agent built from this checkout,");
    say("    pushed to the sandbox registry, installed with Helm (charts/kube-migros)");
    let registry = Registry::new(dirs);
    let images = release::ensure_images(dirs, &registry)?;
    let installing = Instant::now();
    release::install_rolled_out(
        dirs,
        &cluster.env,
        &images,
        &registry,
        &[],
        Duration::from_secs(300),
    )
    .await?;
    workload::until(
        "the agents to announce themselves",
        Duration::from_secs(60),
        || async {
            workload::agents_announced(client, release::NAMESPACE, cluster.nodes.len())
                .await
                .then_some(())
        },
    )
    .await?;
    say(format!(
        "    helm upgrade --install {} charts/kube-migros -n {}: 2 operator replicas, {} agents ready ({:.1} s)",
        release::RELEASE,
        release::NAMESPACE,
        cluster.nodes.len(),
        installing.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Prints each phase of PodMigration `name` as it is entered; answers it once final.
async fn follow(pms: &Api<PodMigration>, name: &str) -> anyhow::Result<PodMigration> {
    let applied = Instant::now();
    let mut seen: Option<Phase> = None;
    loop {
        let pm = pms.get(name).await?;
        let status = pm.status.clone().unwrap_or_default();
        if status.phase != seen {
            seen = status.phase;
            let progress = status
                .progress
                .map(|p| format!(" ({} of {} bytes)", p.bytes_transferred, p.bytes_total))
                .unwrap_or_default();
            say(format!(
                "    +{:>6.2} s  {:<13} {}{progress}",
                applied.elapsed().as_secs_f64(),
                seen.map(|p| format!("{p:?}")).unwrap_or_default(),
                status.message.clone().unwrap_or_default()
            ));
        }
        if seen.is_some_and(|p| p.is_final()) {
            return Ok(pm);
        }
        if applied.elapsed() > Duration::from_secs(300) {
            bail!("{name} did not end within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last log lines of the operator and the agents, after a migration that did not succeed.
fn show_logs(env: &Env) {
    for component in ["operator", "agent"] {
        say(format!("--- logs of the {component} pods:"));
        let selector = format!("app.kubernetes.io/component={component}");
        let _ = kubectl(
            env,
            &[
                "logs",
                "-n",
                release::NAMESPACE,
                "-l",
                &selector,
                "--prefix",
                "--tail",
                "20",
            ],
        );
    }
}

/// What one move did: its timings, and the workload before and after.
fn report_move(
    status: &crds::PodMigrationStatus,
    (from, ip, before): (&str, Ipv4Addr, &State),
    (moved, after): (&Pod, &State),
    peer: &workload::PeerJudgement,
) -> anyhow::Result<()> {
    let t = status.timings.unwrap_or_default();
    let ms = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    say(format!(
        "    timings: checkpoint {}, transfer {}, restore {}; downtime {}; checkpoint {} bytes",
        ms(t.checkpoint_ms),
        ms(t.transfer_ms),
        ms(t.restore_ms),
        ms(t.downtime_ms),
        status
            .checkpoint
            .as_ref()
            .map(|c| c.bytes)
            .unwrap_or_default()
    ));
    say(format!("    before: on {from}, IP {ip}, {}", show(before)));
    let moved_ip = pod_ip(moved)?;
    say(format!(
        "    after:  on {}, IP {moved_ip}, {}",
        node_of(moved),
        show(after)
    ));
    let yes = |same: bool| if same { "yes" } else { "NO" };
    let pause = peer
        .pauses_ms
        .last()
        .map_or_else(|| "none".into(), |ms| format!("{ms} ms"));
    say(format!(
        "    same process: {}; IP kept: {}; the peer's pause (on its own clock): {pause}; \
         its records answered in order: {}",
        yes(after.get("id") == before.get("id")),
        yes(moved_ip == ip),
        yes(peer.gaps == 0)
    ));
    Ok(())
}
