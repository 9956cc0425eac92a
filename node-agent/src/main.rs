//! The kube-migros node agent: serves the agent API over mutual TLS, exposes `/live`, `/ready` and
//! `/metrics`, collects old checkpoint data, and (when given a namespace) announces itself to the
//! operator with a Lease.

use std::{net::SocketAddr, ops::Range, path::PathBuf, sync::Arc, time::Duration};

use agent_api::{tls::TlsFiles, v1::agent_server::AgentServer};
use anyhow::Context;
use axum::{Router, extract::State, routing::get};
use clap::Parser;
use node_agent::{
    announce::Announcement,
    archive::Limits,
    metrics::Metrics,
    netblock::NetBlock,
    oci,
    runtime::Runtime,
    rxe,
    service::{Agent, Config, CriCheckpointArchive, CriCheckpointImage, RestoreBackend},
};
use tracing::{info, warn};

/// Command-line arguments of the node agent.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "kube-migros node agent: checkpoint, transfer and restore on one node"
)]
struct Args {
    /// Name of this node.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Address the agent API listens on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// host:port under which the operator and peers reach the API (announced in the Lease).
    #[arg(long, env = "AGENT_ENDPOINT")]
    advertise: Option<String>,
    /// Directory with ca.crt, tls.crt and tls.key (certificate CN kube-migros-agent).
    #[arg(long, default_value = "/etc/kube-migros/tls")]
    tls_dir: PathBuf,
    /// Unix socket of containerd (CRI and Tasks API).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    runtime_endpoint: PathBuf,
    /// containerd namespace of the CRI's containers.
    #[arg(long, default_value = "k8s.io")]
    containerd_namespace: String,
    /// The checkpoint store: per-migration records, archives and staged images.
    #[arg(long, default_value = "/var/lib/kube-migros")]
    store_dir: PathBuf,
    /// Where IP reservations for moved pods are written (read by the migros-ipam CNI plugin).
    #[arg(long, default_value = "/var/lib/kube-migros/ipam")]
    ipam_reservations: PathBuf,
    /// Directory of rxe's last_qpn and last_mrn (a plain directory in tests: no RDMA here).
    #[arg(long, default_value = "/proc/sys/net/rdma_rxe")]
    rxe_dir: PathBuf,
    /// QPNs that rxe blocks may use, START-END (end exclusive); matches the operator's ranges.
    #[arg(long, default_value = "1024-129024", value_parser = parse_range)]
    rxe_qpn_range: Range<u32>,
    /// MRNs that rxe blocks may use, START-END (end exclusive).
    #[arg(long, default_value = "1024-129024", value_parser = parse_range)]
    rxe_mrn_range: Range<u32>,
    /// Seconds a restore waits for the node's rxe counters while another restore holds them.
    #[arg(long, default_value_t = 60)]
    rxe_wait_seconds: u64,
    /// Seconds after which a restore that never finished lets go of the rxe counters.
    #[arg(long, default_value_t = 300)]
    rxe_hold_seconds: u64,
    /// The nft binary (network blocks of pod IPs).
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
    /// Largest checkpoint archive accepted from a peer, in bytes (also the unpacked size limit).
    #[arg(long, default_value_t = 16 << 30)]
    max_archive_bytes: u64,
    /// Seconds one container's checkpoint may take.
    #[arg(long, default_value_t = 300)]
    checkpoint_timeout_seconds: u64,
    /// Data of migrations untouched for this many seconds is removed (kept after a commit).
    #[arg(long, default_value_t = 86_400)]
    gc_after_seconds: u64,
    /// Stage checkpoints as checkpoint OCI images pushed to this repository (`host[:port]/path`),
    /// which the kubelet can start; without it the runtime gets the archive's path (CRI clients
    /// that create containers themselves).
    #[arg(long, env = "CHECKPOINT_REGISTRY")]
    checkpoint_registry: Option<String>,
    /// PEM bundle to trust for the checkpoint registry (else no TLS roots are trusted).
    #[arg(long)]
    registry_ca: Option<PathBuf>,
    /// Address of /live, /ready and /metrics.
    #[arg(long, default_value = "0.0.0.0:9465")]
    http_addr: SocketAddr,
    /// The agent's pod, when it runs as one: owner of its Lease (with --pod-uid).
    #[arg(long, env = "POD_NAME", requires = "pod_uid")]
    pod_name: Option<String>,
    /// UID of the agent's pod (the downward API's metadata.uid).
    #[arg(long, env = "POD_UID", requires = "pod_name")]
    pod_uid: Option<String>,
    /// Announce the agent with a Lease in this namespace (the operator's); off when unset.
    #[arg(long, env = "LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
}

fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not START-END"))?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?,
        b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?,
    );
    if a >= b {
        return Err(format!("{s:?} is empty"));
    }
    Ok(a..b)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only on a terminal: container logs are files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tls = TlsFiles::in_dir(&args.tls_dir)
        .load()
        .with_context(|| format!("loading TLS material from {}", args.tls_dir.display()))?;
    let runtime = Runtime::new(&args.runtime_endpoint, &args.containerd_namespace)?;
    let net = NetBlock::new(args.nft.clone());
    if let Err(e) = net.ensure().await {
        warn!(error = %e, "cannot set up the network block table; pod IPs cannot be silenced");
    }
    let counters = rxe::Counters::new(&args.rxe_dir, args.rxe_qpn_range, args.rxe_mrn_range);
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        node_name: args.node_name.clone(),
        store: args.store_dir.clone(),
        reservations: args.ipam_reservations.clone(),
        limits: Limits {
            max_bytes: args.max_archive_bytes,
            ..Limits::default()
        },
        checkpoint_timeout: Duration::from_secs(args.checkpoint_timeout_seconds),
        rxe_wait: Duration::from_secs(args.rxe_wait_seconds),
        rxe_hold_max: Duration::from_secs(args.rxe_hold_seconds),
        quick: Duration::from_secs(2),
        transfer_attempts: 3,
    };
    let backend: Box<dyn RestoreBackend> = match &args.checkpoint_registry {
        Some(repository) => {
            let ca = match &args.registry_ca {
                Some(path) => Some(
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                ),
                None => None,
            };
            let registry = oci::Registry::new(repository, ca.as_deref())
                .map_err(|e| anyhow::anyhow!("--checkpoint-registry: {e}"))?;
            Box::new(CriCheckpointImage {
                registry,
                runtime: runtime.clone(),
            })
        }
        None => Box::new(CriCheckpointArchive),
    };
    let agent = Agent::new(
        config,
        runtime,
        counters,
        net,
        backend,
        tls.clone(),
        metrics.clone(),
    );
    info!(
        node = %args.node_name,
        listen = %args.listen,
        store = %args.store_dir.display(),
        rxe = %args.rxe_dir.display(),
        "node agent starting"
    );

    let gc_agent = agent.clone();
    let gc_metrics = metrics.clone();
    let gc_after = Duration::from_secs(args.gc_after_seconds);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let a = gc_agent.clone();
            match a.store().collect(gc_after, |uid| gc_agent.active(uid)) {
                Ok(removed) if !removed.is_empty() => {
                    info!(?removed, "removed old checkpoint data")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "garbage collection failed"),
            }
            gc_metrics.stored(gc_agent.store().list().map(|l| l.len()).unwrap_or(0));
        }
    });

    let announced = match args.lease_namespace.clone() {
        Some(namespace) => {
            let endpoint = args
                .advertise
                .clone()
                .unwrap_or_else(|| args.listen.to_string());
            let client = kube::Client::try_default()
                .await
                .context("connecting to the API server to announce the agent")?;
            let announcement = Arc::new(Announcement {
                namespace,
                node: args.node_name.clone(),
                endpoint,
                lease: Duration::from_secs(15),
                pod: args.pod_name.clone().zip(args.pod_uid.clone()),
            });
            announcement
                .renew(&client)
                .await
                .context("announcing the agent")?;
            let keeper = {
                let (announcement, client) = (announcement.clone(), client.clone());
                tokio::spawn(async move { announcement.keep(client).await })
            };
            Some((announcement, client, keeper))
        }
        None => None,
    };

    let http = Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.encode() }),
        )
        .with_state(metrics);
    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, http).await {
            warn!(error = %e, "HTTP endpoints stopped");
        }
    });

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("stopping");
    };
    tonic::transport::Server::builder()
        .tls_config(tls.server())
        .context("server TLS configuration")?
        .add_service(AgentServer::new(agent).max_decoding_message_size(16 << 20))
        .serve_with_shutdown(args.listen, shutdown)
        .await
        .context("serving the agent API")?;
    if let Some((announcement, client, keeper)) = announced {
        keeper.abort();
        if let Err(e) = announcement.withdraw(&client).await {
            warn!(error = %e, "could not delete the agent Lease");
        }
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_reject_empty_or_malformed_input() {
        assert_eq!(parse_range("1024-2048"), Ok(1024..2048));
        assert!(parse_range("2048-1024").is_err());
        assert!(parse_range("5-5").is_err());
        assert!(parse_range("1024").is_err());
        assert!(parse_range("a-b").is_err());
    }
}
