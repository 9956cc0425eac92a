//! `e2e`: the command that builds and runs the kube-migros sandbox (`cargo run -p e2e -- --help`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use sandbox::{Dirs, controlplane::ControlPlane, k8s, release};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The kube-migros sandbox: a real Kubernetes cluster on one Linux machine"
)]
struct Cli {
    /// Cache of built binaries, kept across runs.
    #[arg(long, global = true, env = "KUBE_MIGROS_CACHE", default_value = sandbox::DEFAULT_CACHE_DIR)]
    cache_dir: std::path::PathBuf,
    /// Home of the running sandbox (certificates, etcd data, logs, pid files).
    #[arg(long, global = true, env = "KUBE_MIGROS_STATE", default_value = sandbox::DEFAULT_STATE_DIR)]
    state_dir: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up the sandbox cluster, run kube-migros and live-migrate the demo workload twice,
    /// printing a timeline of each move.
    Demo,
    /// Build the Kubernetes binaries and Helm into the cache (done by `up` when needed).
    Build,
    /// Build the operator and node-agent images, push them to the sandbox registry and install
    /// (or upgrade) the Helm chart into the running sandbox cluster.
    Install,
    /// `helm uninstall` kube-migros from the sandbox cluster.
    Uninstall,
    /// Measure migrations, the raw recipe, transfer limits and the control plane at scale on the
    /// sandbox cluster; write docs/benchmarks.{md,json,svg} (the images are release builds).
    Bench {
        /// Touched memory of the demo workload, one figure per size.
        #[arg(long, value_delimiter = ',', default_value = "16Mi,256Mi,1Gi")]
        sizes: Vec<String>,
        /// Runs per figure (the median and the spread are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Numbers of PodMigrations for the control-plane benchmark.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        scale: Vec<usize>,
        /// Parts to skip: raw (the raw recipe, the CRIU floor, the transfer limits), migration,
        /// scale.
        #[arg(long, value_delimiter = ',')]
        skip: Vec<String>,
        /// Name of this run in docs/benchmarks.json (runs of other names stay, for before/after).
        #[arg(long, default_value = "current")]
        label: String,
        /// Where the documents go.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))]
        out_dir: std::path::PathBuf,
        /// Measure nothing: write the documents again from the JSON.
        #[arg(long)]
        report_only: bool,
        /// What this run measures that others do not (e.g. the change it follows).
        #[arg(long, default_value = "")]
        note: String,
        /// The restore backend the migrations use: runtime-wrapper (the agents offer it first)
        /// or cri-checkpoint-image (the chart installed without the runtime wrapper).
        #[arg(long, default_value = "runtime-wrapper")]
        backend: String,
    },
    /// The fault matrix: migrations on the sandbox cluster (the chart installed) while agents and
    /// the operator's leader are killed at each step, the nodes' link is cut, the target's store
    /// fills up, the target node goes or the PodMigration is deleted; writes
    /// docs/reliability.{md,json}.
    Faults {
        /// Runs per scenario.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the scenarios whose names contain one of these (e.g. `leader,delete@`).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where the documents go.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))]
        out_dir: std::path::PathBuf,
        /// Print the outcomes only; write no document (e.g. for a partial run).
        #[arg(long)]
        no_write: bool,
    },
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
    /// Show what runs: control plane components, each node's containerd and kubelet, Node Ready.
    Status,
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
            let helm = sandbox::helm::ensure(&dirs.cache).context("building Helm")?;
            println!("Helm {} in {}", sandbox::helm::HELM.1, helm.display());
        }
        Command::Install => {
            // Installing needs the running sandbox (its registry and API server): say so rather
            // than fail on what a stopped sandbox left behind.
            if !ControlPlane::new(&dirs).is_ready().await {
                anyhow::bail!(
                    "the sandbox cluster is not running: bring it up first \
                     (`cargo run -p e2e -- cluster up`, or `cargo run -p e2e -- demo`, which also installs)"
                );
            }
            let env = ControlPlane::new(&dirs).env();
            let registry = sandbox::registry::Registry::new(&dirs);
            let images = release::ensure_images(&dirs, &registry)?;
            let client = env.client().await?;
            sandbox::install::apply_chart_crds(&client).await?;
            let timeout = std::time::Duration::from_secs(300);
            print!(
                "{}",
                release::install_rolled_out(&dirs, &env, &images, &registry, &[], timeout).await?
            );
            eprintln!("kube-migros {} is rolled out", images.tag);
        }
        Command::Bench {
            sizes,
            runs,
            scale,
            skip,
            label,
            out_dir,
            report_only,
            note,
            backend,
        } => {
            let options = bench::Options {
                sizes,
                runs,
                scale,
                skip,
                out_dir,
                label,
                report_only,
                note,
                backend,
            };
            if cfg!(debug_assertions) && !options.report_only {
                // The test agents and the stand-in kubelet share the two cores with what is
                // measured; unoptimised, they take a third of a core from the API server.
                eprintln!(
                    "e2e: warning: a debug build measures its own harness too; run the benchmarks \
                     with `cargo run --release -p e2e -- bench`"
                );
            }
            bench::run(&dirs, &options).await?;
        }
        Command::Faults {
            runs,
            only,
            out_dir,
            no_write,
        } => {
            let outcomes =
                bench::faults::run(&dirs, runs, &only, (!no_write).then_some(out_dir)).await?;
            let violated = outcomes.iter().filter(|o| o.violated()).count();
            eprintln!("faults: {} runs, {violated} violated", outcomes.len());
            if violated > 0 {
                std::process::exit(1);
            }
        }
        Command::Uninstall => {
            release::uninstall(&dirs, &ControlPlane::new(&dirs).env())?;
            eprintln!("kube-migros uninstalled");
        }
        Command::ControlPlane { action } => {
            control_plane(&ControlPlane::new(&dirs), action).await?
        }
        Command::Demo => bench::demo::run(&dirs).await?,
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
    match action {
        ClusterAction::Up => {
            let started = std::time::Instant::now();
            let cluster = sandbox::cluster::up(dirs).await?;
            eprintln!(
                "cluster ready: {} nodes ({:.1}s)",
                cluster.nodes.len(),
                started.elapsed().as_secs_f64()
            );
            print!("{}", cluster.env.shell_exports());
        }
        ClusterAction::Down => {
            sandbox::cluster::down(dirs).await?;
            eprintln!("cluster stopped, its state removed");
        }
        ClusterAction::Status => {
            let ready = sandbox::cluster::status(dirs).await?;
            if !ready {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

fn node(dirs: &Dirs, action: NodeAction) -> anyhow::Result<()> {
    let nodes = sandbox::nodes::Nodes::new(dirs);
    match action {
        NodeAction::Up { names } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let wanted = sandbox::nodes::Nodes::named(&names)?;
            let started = std::time::Instant::now();
            nodes.up(&wanted).context("starting the nodes")?;
            for node in &wanted {
                eprintln!("node {} ready at {}", node.name, node.ip());
            }
            eprintln!("({:.1}s)", started.elapsed().as_secs_f64());
        }
        NodeAction::Down => {
            sandbox::registry::Registry::new(dirs)
                .down()
                .context("stopping the registry")?;
            nodes.down().context("stopping the nodes")?;
            eprintln!("nodes and registry stopped, their state removed");
        }
        NodeAction::Images => {
            let registry = sandbox::registry::Registry::new(dirs);
            registry.up().context("starting the registry")?;
            for (name, reference) in
                sandbox::images::ensure(dirs, &registry).context("building the images")?
            {
                println!("{name}\t{reference}");
            }
        }
    }
    Ok(())
}
