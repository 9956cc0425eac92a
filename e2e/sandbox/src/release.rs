//! kube-migros as users install it: the operator and node-agent images built from this workspace
//! (static binaries, the agent with `nft` beside it) and pushed to the sandbox registry, and the Helm
//! chart `charts/kube-migros` installed into the sandbox cluster with them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::{Api, api::ListParams};

use sha2::{Digest, Sha256};

use crate::error::{IoError, io_at};
use crate::{Dirs, agents, controlplane::Env, gobuild, helm, images, registry, rootfs};

/// Release name and namespace of the sandbox's install.
pub const RELEASE: &str = "kube-migros";
pub const NAMESPACE: &str = "kube-migros";
/// The byte budget of each sandbox node's kept checkpoints (chart value `agent.retentionBudget`).
pub const SANDBOX_RETENTION_BUDGET: &str = "128Mi";
/// The rxe counter files of the sandbox nodes (no RDMA device: plain files, see docs/sandbox.md).
pub const SANDBOX_RXE_DIR: &str = "/opt/kube-migros/rxe";

/// Errors while building the images or running Helm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Images(#[from] images::Error),
    #[error(transparent)]
    Build(#[from] gobuild::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Rootfs(#[from] rootfs::Error),
    #[error("`cargo build` of the images failed:\n{0}")]
    Cargo(String),
    #[error("`ldd {0}` in the node rootfs printed no libraries:\n{1}")]
    Ldd(String, String),
    #[error("`helm {args}` failed:\n{output}")]
    Helm { args: String, output: String },
    #[error("kube-migros did not roll out: {0}")]
    RollOut(String),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The pushed images: `<registry>/kube-migros/{operator,node-agent}:<tag>`, one tag for both.
#[derive(Debug, Clone)]
pub struct Images {
    pub repository: String,
    pub tag: String,
}

/// The images and their binaries: (image, package, binaries). The agent's image also carries the
/// runtime wrapper, which its DaemonSet installs on the nodes.
const IMAGES: &[(&str, &str, &[&str])] = &[
    ("operator", "operator", &["operator"]),
    ("node-agent", "node-agent", &["node-agent", "migros-runc"]),
];

/// Builds the operator and the agent as static executables (glibc, `crt-static`, release profile)
/// into a target directory in the cache, so that a fresh checkout reuses the compiled dependencies.
pub fn build_static(dirs: &Dirs) -> Result<PathBuf, Error> {
    let target_dir = dirs.cache.join("image-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::repo_root())
        .args(["build", "--release", "--locked", "--target", TARGET])
        // With an explicit --target these flags reach only the target's crates, not build
        // scripts or proc macros (which must stay dynamic).
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir);
    for (_, package, bins) in IMAGES {
        cmd.args(["-p", package]);
        for bin in *bins {
            cmd.args(["--bin", bin]);
        }
    }
    eprintln!("e2e: building the operator and node-agent images' static binaries (release)");
    let out = cmd
        .output()
        .map_err(|e| Error::Cargo(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(Error::Cargo(String::from_utf8_lossy(&out.stderr).into()));
    }
    Ok(target_dir.join(TARGET).join("release"))
}

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds both images and pushes what the registry lacks.
pub fn ensure_images(dirs: &Dirs, registry: &registry::Registry) -> Result<Images, Error> {
    let built = build_static(dirs)?;
    let publisher = images::Publisher::new(dirs, registry)?;
    let mut roots = Vec::new();
    let mut digest = Sha256::new();
    for (image, _, bins) in IMAGES {
        let root = publisher.work.join(image).join("rootfs");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(io_at(&root))?;
        for bin in *bins {
            let target = root.join(bin);
            std::fs::copy(built.join(bin), &target).map_err(io_at(&target))?;
            gobuild::run(Command::new("strip").arg(&target))?;
        }
        if *image == "node-agent" {
            for tool in AGENT_TOOLS {
                add_from_rootfs(dirs, &root, tool)?;
            }
        }
        digest_tree(&root, &root, &mut digest)?;
        roots.push((*image, root));
    }
    let tag = images::hex(&digest.finalize())[..16].to_string();
    for (bin, root) in &roots {
        publisher.publish(bin, root, &tag)?;
    }
    Ok(Images {
        repository: format!("{}/kube-migros", registry::ADDRESS),
        tag,
    })
}

/// The node rootfs's tools the agent's image carries: `nft` (the agent drives nftables through it)
/// and `nsenter` (post-copy runs the node's own runc and CRIU in the node's namespaces).
const AGENT_TOOLS: [&str; 2] = ["/usr/sbin/nft", "/usr/bin/nsenter"];

/// Copies `tool` and the shared libraries it loads (as `ldd` in the node rootfs lists them) from
/// the node rootfs into `root`.
fn add_from_rootfs(dirs: &Dirs, root: &Path, tool: &str) -> Result<(), Error> {
    let rootfs = rootfs::ensure(&dirs.cache)?;
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args(["ldd", tool])
        .output()
        .map_err(io_at(&rootfs))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let libraries = ldd_paths(&text);
    if !out.status.success() || libraries.is_empty() {
        return Err(Error::Ldd(
            tool.to_string(),
            format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        ));
    }
    for path in std::iter::once(tool).chain(libraries.iter().map(String::as_str)) {
        let relative = path.trim_start_matches('/');
        let source = rootfs.join(relative);
        // Resolve links inside the rootfs (absolute targets would point at the host's files).
        let source = resolve_in(&rootfs, &source);
        let target = root.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        std::fs::copy(&source, &target).map_err(io_at(&source))?;
    }
    Ok(())
}

/// Follows symbolic links of `path` with `root` as `/`.
fn resolve_in(root: &Path, path: &Path) -> PathBuf {
    let mut current = path.to_path_buf();
    for _ in 0..16 {
        // Directories on the way may be links too (`/lib` -> `usr/lib`).
        let relative = current.strip_prefix(root).unwrap_or(&current).to_path_buf();
        let mut resolved = root.to_path_buf();
        for part in relative.components() {
            resolved.push(part);
            if let Ok(link) = std::fs::read_link(&resolved) {
                resolved.pop();
                resolved = if link.is_absolute() {
                    root.join(link.strip_prefix("/").unwrap_or(&link))
                } else {
                    resolved.join(link)
                };
            }
        }
        if resolved == current {
            return resolved;
        }
        current = resolved;
    }
    current
}

/// The absolute library paths in `ldd` output (`libx.so => /path (0x..)` and `/lib64/ld-... (0x..)`).
fn ldd_paths(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// Adds every file of `dir` (name and content, in order) to `digest`.
fn digest_tree(base: &Path, dir: &Path, digest: &mut Sha256) -> Result<(), Error> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_at(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            digest_tree(base, &path, digest)?;
        } else {
            let name = path.strip_prefix(base).unwrap_or(&path);
            digest.update(name.to_string_lossy().as_bytes());
            digest.update(std::fs::read(&path).map_err(io_at(&path))?);
        }
    }
    Ok(())
}

/// The chart in this checkout.
pub fn chart_dir() -> PathBuf {
    crate::repo_root().join("charts/kube-migros")
}

/// `helm template` of the chart in this checkout as release `kube-migros` in its namespace, with
/// `sets` (typed, `--set`): the manifests a user's install would apply, without a cluster.
pub fn render(dirs: &Dirs, sets: &[(&str, &str)]) -> Result<String, Error> {
    let bin = helm::ensure(&dirs.cache)?;
    let chart = chart_dir().display().to_string();
    let mut args: Vec<String> = ["template", RELEASE, &chart, "--namespace", NAMESPACE]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (key, value) in sets {
        args.push("--set".into());
        args.push(format!("{key}={value}"));
    }
    let out = helm_command(dirs, bin)
        .args(&args)
        .output()
        .map_err(|e| Error::Helm {
            args: args.join(" "),
            output: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Helm {
            args: args.join(" "),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Helm with its cache, configuration and data under the sandbox's state.
fn helm_command(dirs: &Dirs, bin: PathBuf) -> Command {
    let mut command = Command::new(bin);
    command
        .env("HELM_CACHE_HOME", dirs.state.join("helm/cache"))
        .env("HELM_CONFIG_HOME", dirs.state.join("helm/config"))
        .env("HELM_DATA_HOME", dirs.state.join("helm/data"));
    command
}

/// Runs Helm with the sandbox's kubeconfig.
pub fn helm(dirs: &Dirs, env: &Env, args: &[&str]) -> Result<String, Error> {
    let bin = helm::ensure(&dirs.cache)?;
    let out = helm_command(dirs, bin)
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .map_err(|e| Error::Helm {
            args: args.join(" "),
            output: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::Helm {
            args: args.join(" "),
            output: text,
        });
    }
    Ok(text)
}

/// `helm upgrade --install` of the chart into the sandbox with `images`, waiting until the operator
/// Deployment and the agent DaemonSet are ready. `extra` pairs come last, typed (`--set`).
pub fn install(
    dirs: &Dirs,
    env: &Env,
    images: &Images,
    registry: &registry::Registry,
    extra: &[(&str, &str)],
) -> Result<String, Error> {
    let ca = dirs.state.join("helm/registry-ca.crt");
    std::fs::create_dir_all(dirs.state.join("helm")).map_err(io_at(&ca))?;
    std::fs::write(&ca, registry.ca()?.cert).map_err(io_at(&ca))?;
    let (host, port) = env
        .server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .unwrap_or(("", ""));
    // Pods reach the API server at the host bridge address (there is no kube-proxy).
    let host = if host == "127.0.0.1" || host == "localhost" {
        crate::bridge::BRIDGE_IP.to_string()
    } else {
        host.to_string()
    };
    let chart = chart_dir().display().to_string();
    let selector = format!(
        "agent.nodeSelector.{}",
        crate::kubelets::SANDBOX_NODE_LABEL.replace('.', "\\.")
    );
    let sets = vec![
        ("image.repository", images.repository.clone()),
        ("image.tag", images.tag.clone()),
        ("apiServer.host", host),
        ("apiServer.port", port.to_string()),
        ("agent.rxeDir", SANDBOX_RXE_DIR.to_string()),
        // The simulated counters, seen in RDMA containers as the kernel's would be.
        (
            "agent.devicePlugin.countersMount",
            agents::RXE_COUNTERS_MOUNT.to_string(),
        ),
        (
            "agent.checkpointRegistry",
            agents::CHECKPOINT_REPOSITORY.to_string(),
        ),
        ("agent.port", agents::AGENT_PORT.to_string()),
        // The nodes' uplink to each other (a port of their pod bridge).
        ("agent.answerDevices", "{eth0}".to_string()),
        // The nodes share the host's disk: at most 128 MiB of kept checkpoints each, and what
        // the agents keep is collected and published within seconds.
        (
            "agent.retentionBudget",
            SANDBOX_RETENTION_BUDGET.to_string(),
        ),
        ("agent.gcIntervalSeconds", "5".to_string()),
        // Only the nodes with kubelets (test suites add Node objects without any).
        (selector.as_str(), "true".to_string()),
    ];
    let mut args: Vec<String> = [
        "upgrade",
        "--install",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Helm applies --set-string after --set: a value `extra` names replaces the sandbox's.
    for (key, value) in sets
        .into_iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
    {
        args.push("--set-string".into());
        args.push(format!("{key}={value}"));
    }
    // Typed (`--set`): a boolean must stay one, the string "false" is true to a template's `if`.
    for (key, value) in extra {
        args.push("--set".into());
        args.push(format!("{key}={value}"));
    }
    args.push("--set-file".into());
    args.push(format!("agent.registryCA={}", ca.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match helm(dirs, env, &args) {
        // An interrupted install or upgrade (a killed run) leaves the release pending, which
        // blocks every later one: start it over.
        Err(Error::Helm { output, .. }) if output.contains("another operation") => {
            eprintln!("e2e: the release was left pending by an interrupted run; reinstalling");
            uninstall(dirs, env)?;
            helm(dirs, env, &args)
        }
        other => other,
    }
}

/// [`install`], then [`wait_rolled_out`] within `timeout`: Helm's output, or an error that shows what
/// the release's pods were doing.
pub async fn install_rolled_out(
    dirs: &Dirs,
    env: &Env,
    images: &Images,
    registry: &registry::Registry,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<String, Error> {
    let client = env
        .client()
        .await
        .map_err(|e| Error::RollOut(format!("no client for the sandbox: {e}")))?;
    let output = match install(dirs, env, images, registry, extra) {
        Ok(output) => output,
        Err(Error::Helm { args, output }) => {
            return Err(Error::Helm {
                args,
                output: format!("{output}\n{}", diagnose(&client).await),
            });
        }
        Err(e) => return Err(e),
    };
    wait_rolled_out(&client, timeout).await?;
    Ok(output)
}

/// Waits until the operator Deployment and the agent DaemonSet run their current template on every
/// replica and node, all ready (Helm's `--wait` can return before a rollout has started).
pub async fn wait_rolled_out(client: &kube::Client, timeout: Duration) -> Result<(), Error> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let operator = deployments.get(&format!("{RELEASE}-operator")).await;
        let agent = daemonsets.get(&format!("{RELEASE}-agent")).await;
        let last = match (operator, agent) {
            (Ok(operator), Ok(agent)) => {
                let (d, a) = (deployment_done(&operator), daemonset_done(&agent));
                let devices = match (&d, &a) {
                    (None, None) => devices_missing(client, &agent).await,
                    _ => None,
                };
                if d.is_none() && a.is_none() && devices.is_none() {
                    return Ok(());
                }
                [d, a, devices]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            (Err(e), _) | (_, Err(e)) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(Error::RollOut(format!(
                "{last}\n{}",
                diagnose(client).await
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// With the agents' device plugin on (`--device-plugin` in the DaemonSet), `None` once every node an
/// agent runs on reports `rdma/rxe` allocatable (the new agents registered with their kubelets; a
/// migration to a node before that is refused for want of the device), else the nodes still without.
async fn devices_missing(client: &kube::Client, agent: &DaemonSet) -> Option<String> {
    let plugin = agent
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|pod| {
            pod.containers
                .iter()
                .flat_map(|c| c.args.iter().flatten())
                .any(|a| a == "--device-plugin")
        });
    if !plugin {
        return None;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let selector = agent_selector(agent);
    let pods = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(pods) => pods,
        Err(e) => return Some(format!("agent pods: {e}")),
    };
    let mut missing = Vec::new();
    for node in pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
    {
        if !crate::kubelets::rxe_allocatable(client, &node)
            .await
            .is_ok_and(|n| n > 0)
        {
            missing.push(node);
        }
    }
    missing.sort();
    (!missing.is_empty()).then(|| {
        format!(
            "no {} allocatable yet on {} (the agents' device plugin registers)",
            crate::kubelets::RXE_RESOURCE,
            missing.join(", ")
        )
    })
}

/// The label selector of a DaemonSet's pods.
fn agent_selector(agent: &DaemonSet) -> String {
    agent
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// What the release's pods are doing, for an install or rollout that does not finish: each pod's
/// node, phase, readiness and waiting or terminated reasons, then the namespace's latest Warning
/// events.
pub async fn diagnose(client: &kube::Client) -> String {
    use std::fmt::Write;
    let mut out = String::from("kube-migros pods:\n");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    match pods.list(&ListParams::default()).await {
        Ok(pods) if pods.items.is_empty() => out.push_str("  (none)\n"),
        Ok(pods) => {
            for pod in &pods {
                let status = pod.status.clone().unwrap_or_default();
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let _ = write!(
                    out,
                    "  {} on {}: {}",
                    pod.metadata.name.as_deref().unwrap_or("?"),
                    node.as_deref().unwrap_or("no node"),
                    status.phase.as_deref().unwrap_or("?")
                );
                for c in status.conditions.iter().flatten() {
                    if c.status != "True" {
                        let _ = write!(
                            out,
                            ", {} {}{}",
                            c.type_,
                            c.reason.as_deref().unwrap_or("False"),
                            c.message
                                .as_deref()
                                .map(|m| format!(" ({m})"))
                                .unwrap_or_default()
                        );
                    }
                }
                for c in status.container_statuses.iter().flatten() {
                    let state = c.state.clone().unwrap_or_default();
                    if let Some(w) = state.waiting {
                        let _ = write!(
                            out,
                            ", {} waiting: {} {}",
                            c.name,
                            w.reason.unwrap_or_default(),
                            w.message.unwrap_or_default()
                        );
                    }
                    if let Some(t) = c.last_state.clone().and_then(|s| s.terminated) {
                        let _ = write!(
                            out,
                            ", {} last ended: {} (exit {}) {}",
                            c.name,
                            t.reason.unwrap_or_default(),
                            t.exit_code,
                            t.message.unwrap_or_default()
                        );
                    }
                    if !c.ready {
                        let _ =
                            write!(out, ", {} not ready ({} restarts)", c.name, c.restart_count);
                    }
                }
                out.push('\n');
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  cannot list: {e}");
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    if let Ok(events) = events
        .list(&ListParams::default().fields("type=Warning"))
        .await
    {
        let mut events = events.items;
        events.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
        out.push_str("warning events:\n");
        for e in events.iter().rev().take(15).rev() {
            let _ = writeln!(
                out,
                "  {}/{}: {} {} (x{})",
                e.involved_object.kind.as_deref().unwrap_or("?"),
                e.involved_object.name.as_deref().unwrap_or("?"),
                e.reason.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or(""),
                e.count.unwrap_or(1)
            );
        }
    }
    out
}

/// `None` when the Deployment's rollout is complete, else what it waits for.
fn deployment_done(d: &Deployment) -> Option<String> {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let current = status.observed_generation >= d.metadata.generation;
    let done = current
        && status.updated_replicas.unwrap_or(0) == want
        && status.ready_replicas.unwrap_or(0) == want
        && status.replicas.unwrap_or(0) == want;
    (!done).then(|| {
        format!(
            "operator: {} of {want} replicas updated and ready",
            status
                .ready_replicas
                .unwrap_or(0)
                .min(status.updated_replicas.unwrap_or(0))
        )
    })
}

/// `None` when the DaemonSet's rollout is complete, else what it waits for.
fn daemonset_done(d: &DaemonSet) -> Option<String> {
    let status = d.status.clone().unwrap_or_default();
    let want = status.desired_number_scheduled;
    let current = status.observed_generation >= d.metadata.generation;
    let done = current
        && want > 0
        && status.updated_number_scheduled.unwrap_or(0) == want
        && status.number_ready == want
        && status.number_available.unwrap_or(0) == want;
    (!done).then(|| {
        format!(
            "agents: {} of {want} nodes updated and ready",
            status
                .number_ready
                .min(status.updated_number_scheduled.unwrap_or(0))
        )
    })
}

/// The name of the chart's RuntimeClass (`runtimeWrapper.runtimeClass`), named as its handler.
pub const RUNTIME_CLASS: &str = crate::agents::RUNTIME_HANDLER;

/// The RuntimeClass of the runtime-wrapper backend (the chart's `runtimeWrapper.runtimeClass`),
/// for tests that run kube-migros without the chart: created as the chart's release would own it,
/// so that a later `helm install` adopts it instead of failing on it.
pub async fn ensure_runtime_class(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::node::v1::RuntimeClass;
    let class: RuntimeClass = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": RUNTIME_CLASS,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": NAMESPACE,
            },
        },
        "handler": crate::agents::RUNTIME_HANDLER,
    }))
    .map_err(kube::Error::SerdeError)?;
    match Api::<RuntimeClass>::all(client.clone())
        .create(&Default::default(), &class)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Force-deletes pods of the release namespace that are stuck terminating (bound to Node objects
/// without a kubelet, as an interrupted run can leave them) and waits until they are gone.
pub async fn clear_stuck_pods(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stuck: Vec<String> = pods
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| p.metadata.name)
            .collect();
        if stuck.is_empty() || tokio::time::Instant::now() > deadline {
            return Ok(());
        }
        for name in stuck {
            let _ = pods
                .delete(&name, &kube::api::DeleteParams::default().grace_period(0))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `helm uninstall --wait` of the sandbox's release; nothing to do when it is not installed.
pub fn uninstall(dirs: &Dirs, env: &Env) -> Result<(), Error> {
    helm(
        dirs,
        env,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--ignore-not-found",
            // The Deployment and DaemonSet go only after their pods: an operator still shutting
            // down would act on what runs next.
            "--cascade",
            "foreground",
            "--wait",
            "--timeout",
            "3m",
        ],
    )?;
    Ok(())
}

/// Uninstalls the sandbox's release when it is installed: tests that run the agent as a process
/// in each node need the agent's ports and nftables table to themselves. Without a built Helm
/// nothing was installed with it, and there is nothing to do.
pub fn retire(dirs: &Dirs) -> Result<(), Error> {
    if helm::cached(&dirs.cache).is_none() {
        return Ok(());
    }
    let env = crate::controlplane::ControlPlane::new(dirs).env();
    // Best effort: when Helm cannot reach the cluster, no release of it runs agents either.
    if installed(dirs, &env).unwrap_or(false) {
        eprintln!(
            "e2e: uninstalling the kube-migros Helm release, which would take the place of what runs next"
        );
        uninstall(dirs, &env)?;
    }
    Ok(())
}

/// Whether the release is installed (agents of the chart run on the nodes), in any state; an
/// error when Helm cannot tell (no cluster, no rights), never "not installed".
pub fn installed(dirs: &Dirs, env: &Env) -> Result<bool, Error> {
    let filter = format!("^{RELEASE}$");
    let out = helm(
        dirs,
        env,
        &[
            "list",
            "--all",
            "--short",
            "--namespace",
            NAMESPACE,
            "--filter",
            &filter,
        ],
    )?;
    Ok(out.lines().any(|l| l.trim() == RELEASE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibnftables.so.1 => /lib/x86_64-linux-gnu/libnftables.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(text),
            [
                "/lib/x86_64-linux-gnu/libnftables.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/x")).unwrap();
        std::fs::write(root.join("usr/lib/x/libz.so.1.3"), "z").unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("libz.so.1.3", root.join("usr/lib/x/libz.so.1")).unwrap();
        std::fs::create_dir_all(root.join("lib64-real")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/x/libz.so.1", root.join("lib64-real/abs")).unwrap();
        assert_eq!(
            resolve_in(root, &root.join("lib/x/libz.so.1")),
            root.join("usr/lib/x/libz.so.1.3")
        );
        assert_eq!(
            resolve_in(root, &root.join("lib64-real/abs")),
            root.join("usr/lib/x/libz.so.1.3")
        );
    }
}
