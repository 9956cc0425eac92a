//! `e2e`: the command that builds and runs the kube-migros sandbox (`cargo run -p e2e -- --help`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use e2e::{
    Dirs,
    controlplane::{ControlPlane, Env},
    install, k8s,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams},
};

/// Namespace the demo works in.
const DEMO_NAMESPACE: &str = "kube-migros-demo";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The kube-migros sandbox: a real Kubernetes cluster on one Linux machine"
)]
struct Cli {
    /// Cache of built binaries, kept across runs.
    #[arg(long, global = true, env = "KUBE_MIGROS_CACHE", default_value = e2e::DEFAULT_CACHE_DIR)]
    cache_dir: std::path::PathBuf,
    /// Home of the running sandbox (certificates, etcd data, logs, pid files).
    #[arg(long, global = true, env = "KUBE_MIGROS_STATE", default_value = e2e::DEFAULT_STATE_DIR)]
    state_dir: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up the sandbox, install kube-migros and show a PodMigration being accepted and
    /// validated by the real API server.
    Demo,
    /// Build the Kubernetes binaries of the sandbox into the cache (done by `up` when needed).
    Build,
    /// The Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.
    ControlPlane {
        #[command(subcommand)]
        action: ControlPlaneAction,
    },
    /// The sandbox cluster: the control plane, three nodes with kubelets, the registry.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Node runtimes: network namespaces on a bridge, each running containerd, runc and CRIU.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
}

#[derive(Subcommand, Debug)]
enum NodeAction {
    /// Start these nodes (making the rootfs when needed); running ones are left alone.
    Up {
        #[arg(default_values = ["node-1", "node-2", "node-3"])]
        names: Vec<String>,
    },
    /// Stop every node, delete their namespaces, the bridge and their state.
    Down,
    /// Start the image registry and push the test images built from this repository.
    Images,
}

#[derive(Subcommand, Debug)]
enum ClusterAction {
    /// Start what does not run (building what is missing) and wait until every node is Ready.
    Up,
    /// Stop the nodes, the registry and the control plane; delete their state.
    Down,
}

#[derive(Subcommand, Debug)]
enum ControlPlaneAction {
    /// Start it (building what is missing); does nothing when it already runs and is ready.
    Up,
    /// Stop every process of it and delete its state.
    Down,
    /// Print shell exports for kubectl (`eval "$(cargo run -q -p e2e -- control-plane env)"`).
    Env,
    /// Show which components run.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dirs = Dirs {
        cache: cli.cache_dir,
        state: cli.state_dir,
    };
    match cli.command {
        Command::Build => {
            let bin = k8s::ensure_built(&dirs.cache).context("building Kubernetes")?;
            println!(
                "Kubernetes {} binaries in {}",
                k8s::K8S_VERSION,
                bin.display()
            );
        }
        Command::ControlPlane { action } => {
            control_plane(&ControlPlane::new(&dirs), action).await?
        }
        Command::Demo => demo(&ControlPlane::new(&dirs)).await?,
        Command::Node { action } => node(&dirs, action)?,
        Command::Cluster { action } => cluster(&dirs, action).await?,
    }
    Ok(())
}

async fn control_plane(cp: &ControlPlane, action: ControlPlaneAction) -> anyhow::Result<()> {
    match action {
        ControlPlaneAction::Up => {
            let started = std::time::Instant::now();
            let env = cp.up().await.context("starting the control plane")?;
            eprintln!(
                "control plane {} ready at {} ({:.1}s)",
                k8s::K8S_VERSION,
                env.server,
                started.elapsed().as_secs_f64()
            );
            print!("{}", env.shell_exports());
        }
        ControlPlaneAction::Down => {
            cp.down().context("stopping the control plane")?;
            eprintln!("control plane stopped and its state removed");
        }
        ControlPlaneAction::Env => print!("{}", cp.env().shell_exports()),
        ControlPlaneAction::Status => {
            for (name, pid) in cp.status() {
                match pid {
                    Some(pid) => println!("{name:<24} running (pid {pid})"),
                    None => println!("{name:<24} stopped"),
                }
            }
            let ready = cp.is_ready().await;
            println!(
                "{:<24} {}",
                "api server",
                if ready { "ready" } else { "not ready" }
            );
            if !ready {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn cluster(dirs: &Dirs, action: ClusterAction) -> anyhow::Result<()> {
    let cp = ControlPlane::new(dirs);
    let nodes = e2e::nodes::Nodes::new(dirs);
    match action {
        ClusterAction::Up => {
            let started = std::time::Instant::now();
            let env = cp.up().await.context("starting the control plane")?;
            let wanted = e2e::nodes::Nodes::named(&["node-1", "node-2", "node-3"])?;
            nodes.up(&wanted).context("starting the nodes")?;
            let registry = e2e::registry::Registry::new(dirs);
            registry.up().context("starting the registry")?;
            e2e::images::ensure(dirs, &registry).context("building the images")?;
            let kubelets = e2e::kubelets::Kubelets::new(dirs);
            for node in &wanted {
                kubelets.start(node).context("starting a kubelet")?;
            }
            let client = env.client().await?;
            if let Err(why) =
                e2e::kubelets::wait_ready(&client, &wanted, std::time::Duration::from_secs(120))
                    .await
            {
                for node in &wanted {
                    eprintln!(
                        "--- kubelet of {}:\n{}",
                        node.name,
                        kubelets.log_tail(node, 15)
                    );
                }
                anyhow::bail!(why);
            }
            for node in &wanted {
                e2e::kubelets::advertise_rxe(&client, node, 16).await?;
            }
            eprintln!(
                "cluster ready: {} nodes ({:.1}s)",
                wanted.len(),
                started.elapsed().as_secs_f64()
            );
            print!("{}", env.shell_exports());
        }
        ClusterAction::Down => {
            e2e::registry::Registry::new(dirs)
                .down()
                .context("stopping the registry")?;
            nodes.down().context("stopping the nodes")?;
            cp.down().context("stopping the control plane")?;
            eprintln!("cluster stopped, its state removed");
        }
    }
    Ok(())
}

fn node(dirs: &Dirs, action: NodeAction) -> anyhow::Result<()> {
    let nodes = e2e::nodes::Nodes::new(dirs);
    match action {
        NodeAction::Up { names } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let wanted = e2e::nodes::Nodes::named(&names)?;
            let started = std::time::Instant::now();
            nodes.up(&wanted).context("starting the nodes")?;
            for node in &wanted {
                eprintln!("node {} ready at {}", node.name, node.ip());
            }
            eprintln!("({:.1}s)", started.elapsed().as_secs_f64());
        }
        NodeAction::Down => {
            e2e::registry::Registry::new(dirs)
                .down()
                .context("stopping the registry")?;
            nodes.down().context("stopping the nodes")?;
            eprintln!("nodes and registry stopped, their state removed");
        }
        NodeAction::Images => {
            let registry = e2e::registry::Registry::new(dirs);
            registry.up().context("starting the registry")?;
            for (name, reference) in
                e2e::images::ensure(dirs, &registry).context("building the images")?
            {
                println!("{name}\t{reference}");
            }
        }
    }
    Ok(())
}

async fn demo(cp: &ControlPlane) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    eprintln!(
        "==> starting the sandbox control plane (Kubernetes {})",
        k8s::K8S_VERSION
    );
    let env = cp.up().await.context("starting the control plane")?;
    eprintln!("    ready after {:.1}s", started.elapsed().as_secs_f64());
    let client = env.client().await?;

    eprintln!("==> installing the PodMigration CRD from charts/kube-migros/crds");
    install::apply_chart_crds(&client).await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(DEMO_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client)
        .patch(
            DEMO_NAMESPACE,
            &PatchParams::apply(install::FIELD_MANAGER),
            &Patch::Apply(&ns),
        )
        .await
        .with_context(|| format!("creating namespace {DEMO_NAMESPACE}"))?;

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/podmigration.yaml");
    eprintln!("==> kubectl apply -f examples/podmigration.yaml");
    kubectl(&env, &["apply", "-n", DEMO_NAMESPACE, "-f", example], true)?;
    eprintln!("==> kubectl get pm");
    kubectl(&env, &["get", "pm", "-n", DEMO_NAMESPACE], true)?;

    eprintln!("==> a PodMigration with a bad spec is rejected by the API server itself:");
    let bad = r#"{"apiVersion":"migros.io/v1alpha1","kind":"PodMigration","metadata":{"name":"bad"},"spec":{"podName":"My_Pod","timeoutSeconds":5}}"#;
    let path = std::env::temp_dir().join("kube-migros-demo-bad.json");
    std::fs::write(&path, bad)?;
    let path = path.display().to_string();
    kubectl(
        &env,
        &[
            "create",
            "--dry-run=server",
            "-n",
            DEMO_NAMESPACE,
            "-f",
            &path,
        ],
        false,
    )?;

    eprintln!(
        "\nNo operator runs in the sandbox yet: it needs node agents and kubelets, which later\n\
         milestones add (see the README's status), so the PodMigration stays as it is.\n\
         Try kubectl yourself:\n\n{}",
        env.shell_exports()
    );
    Ok(())
}

/// Runs the sandbox's kubectl, showing its output; fails when `must_succeed` and it fails.
fn kubectl(env: &Env, args: &[&str], must_succeed: bool) -> anyhow::Result<()> {
    let status = std::process::Command::new(env.kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(args)
        .status()
        .with_context(|| format!("running {}", env.kubectl().display()))?;
    if must_succeed && !status.success() {
        anyhow::bail!("kubectl {} failed ({status})", args.join(" "));
    }
    Ok(())
}
