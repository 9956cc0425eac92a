//! The kube-migros operator process: flags, health and metrics endpoints, leader election, and the
//! PodMigration controller plus rxe block maintenance while leading; stops cleanly on SIGTERM.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agent_api::tls::TlsFiles;
use anyhow::Context as _;
use clap::Parser;
use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use operator::{
    admission::Policy,
    agents::Agents,
    certificates,
    claims::Claims,
    controller::{self, Backends, Context},
    leader::{Elector, Timing},
    metrics::Metrics,
    queue, rxe_blocks, server, signer,
    webhook::{self, Webhooks},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Command-line arguments of the operator.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "kube-migros operator: live migration of (RDMA) pods between nodes"
)]
struct Args {
    /// Namespace of the operator: its leader Lease and the agents' Leases live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-migros")]
    namespace: String,
    /// Only reconcile PodMigrations (and keep rxe blocks) of this namespace; all when empty.
    #[arg(long, env = "KUBE_MIGROS_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// This replica's name in the leader election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kube-migros-operator")]
    lease_name: String,
    /// Seconds a leader's Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds a leader may fail to renew before it stops acting (default: two thirds of the
    /// Lease); shorter than the Lease, so that it stops before another replica can take over.
    #[arg(long)]
    lease_renew_deadline_seconds: Option<f64>,
    /// Seconds between renewals (and between attempts of a standby).
    #[arg(long, default_value_t = 2)]
    lease_retry_seconds: u64,
    /// Address of /live, /ready and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Directory with ca.crt, tls.crt and tls.key for mutual TLS with the agents. Without it the
    /// operator keeps a CA and the certificates in Secrets of its namespace, making them if missing.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Directory with the CA's tls.crt and tls.key: the operator signs the agents' certificate
    /// requests (signer migros.io/agent) with it. Without --tls-dir the CA comes from the
    /// operator's Secrets; with --tls-dir and without this, no request is signed (the agents'
    /// certificates come from elsewhere).
    #[arg(long)]
    signer_ca_dir: Option<PathBuf>,
    /// The only user whose certificate requests are signed: the agents' service account
    /// (default: system:serviceaccount:<namespace>:kube-migros-agent).
    #[arg(long)]
    agent_username: Option<String>,
    /// Longest lifetime of an agent certificate, in seconds.
    #[arg(long, default_value_t = 7 * 86400, value_parser = clap::value_parser!(u64).range(600..))]
    agent_certificate_max_seconds: u64,
    /// First QPN of the rxe blocks.
    #[arg(long, default_value_t = rxe_blocks::Ranges::default().qpn_base)]
    rxe_qpn_base: u32,
    /// QPNs per block.
    #[arg(long, default_value_t = rxe_blocks::Ranges::default().qpn_per_block)]
    rxe_qpns_per_block: u32,
    /// First MRN of the rxe blocks.
    #[arg(long, default_value_t = rxe_blocks::Ranges::default().mrn_base)]
    rxe_mrn_base: u32,
    /// MRNs per block.
    #[arg(long, default_value_t = rxe_blocks::Ranges::default().mrn_per_block)]
    rxe_mrns_per_block: u32,
    /// Number of blocks.
    #[arg(long, default_value_t = rxe_blocks::Ranges::default().blocks)]
    rxe_blocks: u32,
    /// Blocks one namespace's RDMA pods may hold at most (0: no cap).
    #[arg(long, default_value_t = 0)]
    rxe_blocks_per_namespace: u32,
    /// The RuntimeClass of replacement pods the runtime wrapper restores (its handler runs
    /// `migros-runc` on the nodes).
    #[arg(long, env = "KUBE_MIGROS_RUNTIME_CLASS", default_value = "kube-migros")]
    runtime_class: String,
    /// Also restore from checkpoint OCI images (containerd before 2.4, a registry) where the runtime
    /// wrapper cannot: the replacement's image is then the checkpoint, so every restart of one of
    /// its containers restores the checkpoint again instead of starting fresh. Off by default.
    #[arg(long, env = "KUBE_MIGROS_ALLOW_CHECKPOINT_IMAGES")]
    allow_checkpoint_images: bool,
    /// Address of the admission webhooks (HTTPS): pod creation and evictions (docs/drain.md).
    #[arg(long, default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Directory with the webhooks' serving certificate (tls.crt, tls.key); the webhooks are off
    /// without it.
    #[arg(long, env = "KUBE_MIGROS_WEBHOOK_TLS_DIR")]
    webhook_tls_dir: Option<PathBuf>,
    /// Namespaces whose every pod is migratable (evictions included), besides the pods labelled
    /// `migros.io/migratable: "true"` (comma-separated; never the operator's own namespace).
    #[arg(long, env = "KUBE_MIGROS_MIGRATABLE_NAMESPACES", value_delimiter = ',')]
    migratable_namespaces: Vec<String>,
    /// Migrations tried for the evictions of one pod before an eviction is refused (the pod keeps
    /// running and `kubectl drain` reports the error).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    eviction_attempts: u32,
    /// Migrations in flight leaving one node, at most; more wait in Pending (reason Queued).
    #[arg(long, default_value_t = queue::Limits::default().per_source, value_parser = at_least_one)]
    max_leaving_per_node: usize,
    /// Migrations in flight arriving on one node, at most.
    #[arg(long, default_value_t = queue::Limits::default().per_target, value_parser = at_least_one)]
    max_arriving_per_node: usize,
    /// Migrations in flight in the cluster, at most.
    #[arg(long, default_value_t = queue::Limits::default().cluster, value_parser = at_least_one)]
    max_in_flight: usize,
    /// Seconds between rxe block allocation/release sweeps.
    #[arg(long, default_value_t = 10)]
    rxe_sweep_seconds: u64,
}

impl Args {
    fn policy(&self) -> Policy {
        Policy {
            namespaces: self
                .migratable_namespaces
                .iter()
                .map(|ns| ns.trim().to_string())
                // The operator's own pods never move by policy.
                .filter(|ns| !ns.is_empty() && *ns != self.namespace)
                .collect(),
        }
    }

    fn limits(&self) -> queue::Limits {
        queue::Limits {
            per_source: self.max_leaving_per_node,
            per_target: self.max_arriving_per_node,
            cluster: self.max_in_flight,
        }
    }

    fn ranges(&self) -> rxe_blocks::Ranges {
        rxe_blocks::Ranges {
            qpn_base: self.rxe_qpn_base,
            qpn_per_block: self.rxe_qpns_per_block,
            mrn_base: self.rxe_mrn_base,
            mrn_per_block: self.rxe_mrns_per_block,
            blocks: self.rxe_blocks,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,tower=warn,hyper=warn".into()),
        )
        // Colours only on a terminal: container logs are files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    args.ranges().validate()?;
    let metrics = Arc::new(Metrics::default());
    let client = counted_client(&metrics).await?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));

    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let health = server::Health {
        ready: Arc::new(AtomicBool::new(false)),
        leader: Arc::new(AtomicBool::new(false)),
        metrics: metrics.clone(),
    };
    let http = tokio::spawn(server::serve(
        args.http_addr,
        health.clone(),
        shutdown.clone().cancelled_owned(),
    ));

    client
        .apiserver_version()
        .await
        .context("the API server does not answer")?;
    if let Some(dir) = &args.webhook_tls_dir {
        let tls = webhook::tls_config(dir)?;
        let listener = tokio::net::TcpListener::bind(args.webhook_addr)
            .await
            .with_context(|| format!("listening on {}", args.webhook_addr))?;
        let hooks = Webhooks::new(
            client.clone(),
            args.watch_namespace.as_deref(),
            args.policy(),
            args.eviction_attempts,
        );
        info!(addr = %args.webhook_addr, "serving the admission webhooks");
        tokio::spawn(webhook::serve(
            listener,
            tls,
            hooks,
            shutdown.clone().cancelled_owned(),
        ));
    }
    health.ready.store(true, Ordering::Relaxed);
    let mut timing = Timing::new(
        Duration::from_secs(args.lease_duration_seconds),
        Duration::from_secs(args.lease_retry_seconds),
    );
    if let Some(deadline) = args.lease_renew_deadline_seconds {
        timing.renew_deadline = Duration::try_from_secs_f64(deadline)
            .map_err(|e| anyhow::anyhow!("--lease-renew-deadline-seconds {deadline}: {e}"))?;
    }
    anyhow::ensure!(
        timing.fenced(),
        "the renew deadline ({:?}) must be shorter than the Lease ({:?}) and longer than the retry period ({:?})",
        timing.renew_deadline,
        timing.lease,
        timing.retry
    );
    let elector = Elector::new(
        client.clone(),
        &args.namespace,
        &args.lease_name,
        &identity,
        timing,
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown.cancelled() => {
            info!("stopped while standing by");
            return Ok(());
        }
    }
    health.leader.store(true, Ordering::Relaxed);
    let lost_leadership = lead(&args, client, &identity, &elector, metrics, &shutdown).await?;
    if lost_leadership {
        error!("lost the leader Lease; exiting so that a fresh process stands for election");
        std::process::exit(1);
    }
    elector.release().await;
    shutdown.cancel();
    let _ = http.await;
    info!("stopped");
    Ok(())
}

/// Reconciles while this replica leads: the controller and the rxe block maintenance, until
/// `shutdown` or until the Lease is lost (answers true then).
async fn lead(
    args: &Args,
    client: Client,
    identity: &str,
    elector: &Elector,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let (tls, ca) = match &args.tls_dir {
        Some(dir) => {
            let tls = TlsFiles::in_dir(dir)
                .load()
                .context("loading the agent TLS material")?;
            let ca = match &args.signer_ca_dir {
                Some(dir) => {
                    let read = |name: &str| {
                        std::fs::read_to_string(dir.join(name))
                            .with_context(|| format!("reading {}", dir.join(name).display()))
                    };
                    let pem = agent_api::pki::Pem {
                        cert: read("tls.crt")?,
                        key: read("tls.key")?,
                    };
                    Some(agent_api::pki::Ca::from_pem(pem).context("the signer's CA")?)
                }
                None => None,
            };
            (tls, ca)
        }
        None => {
            let (tls, ca) = certificates::ensure(&client, &args.namespace)
                .await
                .context("the agent TLS Secrets")?;
            (tls, Some(ca))
        }
    };
    let lost = CancellationToken::new();
    let holder = {
        let (elector, lost) = (elector.clone(), lost.clone());
        tokio::spawn(async move {
            elector.hold().await;
            lost.cancel();
        })
    };
    let stop = CancellationToken::new();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: controller::FIELD_MANAGER.into(),
            instance: Some(identity.to_string()),
        },
    );
    let allocator = rxe_blocks::Allocator::new(client.clone(), args.ranges())
        .with_namespace_cap(args.rxe_blocks_per_namespace);
    let agents = Agents::new(client.clone(), &args.namespace, tls);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            agents,
            allocator.clone(),
            metrics,
            recorder,
            Backends {
                runtime_class: args.runtime_class.clone(),
                checkpoint_images: args.allow_checkpoint_images,
            },
            Claims::new(client.clone(), &args.namespace),
        )
        .with_policy(args.policy())
        .with_limits(args.limits()),
    );
    let signer = ca.map(|ca| {
        let username = args.agent_username.clone().unwrap_or_else(|| {
            format!("system:serviceaccount:{}:kube-migros-agent", args.namespace)
        });
        info!(%username, "signing the agents' certificate requests");
        tokio::spawn(signer::run(
            client.clone(),
            signer::Signer::new(
                ca,
                username,
                Duration::from_secs(args.agent_certificate_max_seconds),
            ),
            stop.clone(),
        ))
    });
    let sweeper = tokio::spawn(rxe_blocks::maintain(
        allocator,
        client,
        args.watch_namespace.clone(),
        Duration::from_secs(args.rxe_sweep_seconds),
        stop.clone(),
    ));
    let controller = tokio::spawn(controller::run(
        ctx,
        args.watch_namespace.clone(),
        stop.clone().cancelled_owned(),
    ));
    let lost_leadership = tokio::select! {
        () = shutdown.cancelled() => false,
        () = lost.cancelled() => true,
    };
    if lost_leadership {
        // Not a step more: the caller exits at once, before another replica may start (the
        // renew deadline is shorter than the Lease); nothing in flight is waited for.
        return Ok(true);
    }
    stop.cancel();
    let _ = tokio::join!(controller, sweeper);
    if let Some(signer) = signer {
        let _ = signer.await;
    }
    holder.abort();
    Ok(lost_leadership)
}

/// A client of the API server whose every request is counted in `metrics`.
async fn counted_client(metrics: &Arc<Metrics>) -> anyhow::Result<Client> {
    let config = kube::Config::infer()
        .await
        .context("finding the API server's configuration")?;
    let metrics = metrics.clone();
    let count =
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            metrics.api_request(request.method(), request.uri());
            request
        });
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("connecting to the API server")?
        .with_layer(&count)
        .build())
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

/// A limit of migrations: 0 would queue every migration for ever.
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{value:?} is not a whole number of at least 1")),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "operator".into(), |h| h.trim().to_string())
}
