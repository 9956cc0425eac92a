//! `kubectl migros`: the kubectl plugin of kube-migros (docs/kubectl-migros.md). It creates,
//! follows and aborts PodMigrations and drains nodes by moving their pods; the operator does the
//! moving. Install it by copying `kubectl-migros` onto the PATH (or with krew, from the manifest
//! `kubectl-migros/.krew.yaml` fills in at a release).

mod drain;
mod follow;
mod view;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use crds::{
    PodMigration, PodMigrationSpec, Strategy,
    discovery::{self, KEPT_ANNOTATION, KeptCheckpoint, LEASE_LABEL},
};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
};

use follow::{Display, End, Mode};
use view::exit;

/// Move running pods live to another node with kube-migros.
#[derive(Debug, Parser)]
#[command(name = "kubectl migros", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// What every kubectl command takes.
#[derive(Debug, Args)]
struct Global {
    /// The kubeconfig file (default: the files $KUBECONFIG lists, merged, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace (default: the context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Move a pod to another node: creates a PodMigration and, with --wait, follows it to its end.
    Move(MoveArgs),
    /// The migrations of a namespace, or of one pod, as a table; then the checkpoints kept.
    Status(StatusArgs),
    /// Abort a migration before its commit point: the pod goes on running where it was.
    Abort(AbortArgs),
    /// Cordon a node, then move its migratable pods away, one line per pod.
    Drain(drain::DrainArgs),
}

#[derive(Debug, Args)]
struct MoveArgs {
    /// The pod to move.
    pod: String,
    /// The node to move it to (default: the operator chooses).
    #[arg(long)]
    to: Option<String>,
    /// How to move it.
    #[arg(long, value_enum, default_value_t = StrategyArg::StopAndCopy)]
    strategy: StrategyArg,
    /// Limit the transfer to this many bytes per second (a quantity such as 100Mi).
    #[arg(long)]
    bandwidth_limit: Option<String>,
    /// Follow the migration until it ends (default: when the output is a terminal).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    wait: Option<bool>,
    /// Stop waiting after this long (90s, 10m, 1h); the migration goes on.
    #[arg(long, value_parser = view::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyArg {
    #[value(name = "StopAndCopy")]
    StopAndCopy,
    #[value(name = "PostCopy")]
    PostCopy,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Only the migrations of this pod.
    pod: Option<String>,
    /// The migrations of every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
}

#[derive(Debug, Args)]
struct AbortArgs {
    /// The PodMigration to abort.
    migration: String,
    /// Wait until it has rolled back (default: yes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// Stop waiting after this long.
    #[arg(long, value_parser = view::parse_duration)]
    timeout: Option<Duration>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The API server's own words (a CEL rule's message, a missing permission) rather than
            // the whole Status object.
            match e.downcast_ref::<kube::Error>() {
                Some(kube::Error::Api(status)) => eprintln!("error: {}", status.message),
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::from(exit::ERROR)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let (client, namespace) = connect(&cli.global).await?;
    match cli.command {
        Command::Move(args) => move_pod(&client, &namespace, args).await,
        Command::Status(args) => status(&client, &namespace, args).await,
        Command::Abort(args) => abort(&client, &namespace, args).await,
        Command::Drain(args) => drain::drain(&client, args).await,
    }
}

/// A client as kubectl would make it: the kubeconfig's context (or `--context`), and the
/// namespace `--namespace` names or the context's.
async fn connect(global: &Global) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        ..Default::default()
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    }
    .context("loading the kubeconfig")?;
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

async fn move_pod(client: &Client, namespace: &str, args: MoveArgs) -> anyhow::Result<u8> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get_opt(&args.pod)
        .await?
        .with_context(|| format!("pod {namespace}/{} not found", args.pod))?;
    let mut spec = PodMigrationSpec::of_pod(&args.pod);
    spec.target_node = args.to.clone();
    spec.strategy = match args.strategy {
        StrategyArg::StopAndCopy => Strategy::StopAndCopy,
        StrategyArg::PostCopy => Strategy::PostCopy,
    };
    spec.bandwidth_limit = args.bandwidth_limit.clone();
    let pm = PodMigration {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", short(&args.pod, 200))),
            namespace: Some(namespace.to_string()),
            labels: Some([(REASON_LABEL.to_string(), "kubectl-migros".to_string())].into()),
            ..Default::default()
        },
        spec,
        status: None,
    };
    let api: Api<PodMigration> = Api::namespaced(client.clone(), namespace);
    // The API server checks the spec (its CEL rules) and says what is wrong.
    let created = api.create(&PostParams::default(), &pm).await?;
    let name = created.name_any();
    let mode = Mode::detect();
    println!(
        "podmigration.migros.io/{name} created: {} on {} -> {}",
        args.pod,
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("no node"),
        args.to.as_deref().unwrap_or("a node the operator chooses")
    );
    if !args.wait.unwrap_or(mode == Mode::Bars) {
        return Ok(0);
    }
    let key = (namespace.to_string(), name);
    let mut display = Display::new(mode, &[(key.clone(), String::new())]);
    let ends = follow::follow(
        client,
        &mut display,
        std::slice::from_ref(&key),
        false,
        args.timeout,
    )
    .await?;
    Ok(end_code(ends.get(&key)))
}

/// The exit code of a followed migration's end.
fn end_code(end: Option<&End>) -> u8 {
    match end {
        Some(End::Final(outcome)) => outcome.exit_code(),
        Some(End::Waiting(_)) => exit::TIMED_OUT,
        Some(End::Gone(_)) | None => exit::ERROR,
    }
}

async fn status(client: &Client, namespace: &str, args: StatusArgs) -> anyhow::Result<u8> {
    let api: Api<PodMigration> = if args.all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    };
    let mut pms: Vec<PodMigration> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|pm| args.pod.as_ref().is_none_or(|p| pm.spec.pod_name == *p))
        .collect();
    pms.sort_by_key(|pm| {
        (
            pm.metadata.creation_timestamp.as_ref().map(|t| t.0),
            pm.name_any(),
        )
    });
    if pms.is_empty() {
        let whose = match (&args.pod, args.all_namespaces) {
            (Some(pod), true) => format!("of a pod {pod} in any namespace"),
            (Some(pod), false) => format!("of pod {pod} in namespace {namespace}"),
            (None, true) => "in any namespace".to_string(),
            (None, false) => format!("in namespace {namespace}"),
        };
        println!("No migrations {whose}.");
        return Ok(0);
    }
    let now = Timestamp::now();
    let rows: Vec<view::Row> = pms.iter().map(|pm| view::Row::of(pm, now)).collect();
    print!("{}", view::table(&rows, args.all_namespaces));
    match kept_on_nodes(client).await {
        Ok(kept) => {
            // With one pod named, or one namespace, only its checkpoints; those of a deleted
            // migration are shown as well (after a failed restore, a pod's only copy).
            let mine = |k: &KeptCheckpoint| {
                (args.all_namespaces || k.namespace == namespace)
                    && args.pod.as_ref().is_none_or(|p| k.pod == *p)
            };
            let kept: Vec<KeptCheckpoint> = kept.into_iter().filter(mine).collect();
            if let Some(table) = view::kept_checkpoints(&kept, &pms, args.all_namespaces, now) {
                println!(
                    "\nCheckpoints the agents keep (until the PodMigration is deleted, its retention \
                     time passes, or the node's byte budget takes it):"
                );
                print!("{table}");
            }
        }
        Err(e) => eprintln!("warning: the kept checkpoints are not listed: {e:#}"),
    }
    Ok(0)
}

/// What every agent reports it keeps, from the annotation of its Lease (any namespace: the
/// release's is not known here).
async fn kept_on_nodes(client: &Client) -> anyhow::Result<Vec<KeptCheckpoint>> {
    let leases: Api<Lease> = Api::all(client.clone());
    let list = leases
        .list(&ListParams::default().labels(LEASE_LABEL))
        .await
        .context("reading the agents' Leases")?;
    let mut kept = Vec::new();
    for lease in list.items {
        match discovery::kept_of(lease.annotations()) {
            Ok(list) => kept.extend(list),
            Err(e) => eprintln!(
                "warning: Lease {}/{}: {KEPT_ANNOTATION} unreadable: {e}",
                lease.namespace().unwrap_or_default(),
                lease.name_any()
            ),
        }
    }
    Ok(kept)
}

async fn abort(client: &Client, namespace: &str, args: AbortArgs) -> anyhow::Result<u8> {
    let api: Api<PodMigration> = Api::namespaced(client.clone(), namespace);
    // Deleting a migration before its commit point rolls it back (docs/operator.md); the
    // finalizer keeps it until the source runs again. The deletion holds only for the object as
    // read (its UID and resourceVersion): one that passed its commit point in between is read
    // again and refused.
    let pm = loop {
        let pm = api
            .get_opt(&args.migration)
            .await?
            .with_context(|| format!("podmigration {namespace}/{} not found", args.migration))?;
        let status = pm.status.clone().unwrap_or_default();
        if let Some(phase) = status.phase.filter(|p| p.is_final()) {
            bail!(
                "{} already ended {phase:?}: nothing to abort (`kubectl delete podmigration {}` \
                 removes it)",
                args.migration,
                args.migration
            );
        }
        if status.committed {
            bail!(
                "{} is past its commit point: the source pod is gone and its checkpoint is the \
                 only copy, so the restore goes on and cannot be aborted",
                args.migration
            );
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pm.metadata.uid.clone(),
                resource_version: pm.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        match api.delete(&args.migration, &params).await {
            Ok(_) => break pm,
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    };
    println!("podmigration.migros.io/{} aborting", args.migration);
    if !args.wait {
        return Ok(0);
    }
    let key = (namespace.to_string(), args.migration.clone());
    let mut display = Display::new(Mode::detect(), &[(key.clone(), String::new())]);
    let ends = follow::follow(
        client,
        &mut display,
        std::slice::from_ref(&key),
        true,
        args.timeout,
    )
    .await?;
    Ok(match ends.get(&key) {
        // It rolled back (or ended before it started): the pod runs where it was.
        Some(End::Gone(Some(crds::Phase::RolledBack | crds::Phase::Pending)) | End::Gone(None)) => {
            println!("aborted: {} runs as before", pm.spec.pod_name);
            0
        }
        // It passed its commit point before the deletion reached it; the restore went on.
        Some(End::Gone(Some(crds::Phase::Succeeded))) => {
            println!(
                "not aborted: {} had passed its commit point and was moved",
                args.migration
            );
            exit::FAILED
        }
        Some(End::Gone(Some(phase))) => {
            println!("ended {phase:?}");
            exit::FAILED
        }
        other => end_code(other),
    })
}

pub use crds::REASON_LABEL;

/// `name` cut to at most `max` bytes (at a character boundary) for a generated name's prefix,
/// without a trailing `.` or `-` (a name must end with an alphanumeric character).
pub fn short(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['.', '-'])
}
