//! The kube-migros node agent process: flags, then the agent API over mutual TLS, the HTTP
//! endpoints, garbage collection and (when given a namespace) the agent's Lease, all stopped in
//! order on SIGTERM or SIGINT.

use std::{net::SocketAddr, ops::Range, path::PathBuf, sync::Arc, time::Duration};

use agent_api::{
    client::MAX_MESSAGE_BYTES,
    tls::{self, Served, TlsFiles},
    v1::agent_server::AgentServer,
};
use anyhow::Context;
use clap::Parser;
use crds::discovery::KeptCheckpoint;
use kube::runtime::events::{Recorder, Reporter};
use node_agent::{
    admin,
    agent::{Agent, CheckpointVia, Parts, Settings},
    api::Service,
    archive::Limits,
    certificate::{self, Requester},
    device_plugin, gc,
    lease::AgentLease,
    metrics::Metrics,
    netblock::NetBlock,
    oci,
    restore::{CriCheckpointArchive, CriCheckpointImage, RestoreBackend, RuntimeWrapper},
    retention::Budget,
    runtime::Runtime,
    rxe_counters::{Counters, Holds},
    rxe_starts::Starts,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Calls one connection may have in flight at once (the operator's polls of many migrations,
/// or a peer's stream, fit well within it).
const MAX_CALLS_PER_CONNECTION: usize = 64;

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
    /// Directory with ca.crt, tls.crt and tls.key: the agent's certificate (CN kube-migros-agent,
    /// DNS name <node>.kube-migros-agent), read again when it changes. With
    /// --certificate-signer only ca.crt is read.
    #[arg(long, default_value = "/etc/kube-migros/tls")]
    tls_dir: PathBuf,
    /// Request the agent's certificate through a CertificateSigningRequest with this signer name
    /// (the operator signs `migros.io/agent`) instead of reading tls.crt and tls.key; the key is
    /// made in memory and never leaves it.
    #[arg(long)]
    certificate_signer: Option<String>,
    /// Lifetime asked for a requested certificate; it is renewed at two thirds of it.
    #[arg(long, default_value_t = 86400, value_parser = clap::value_parser!(u64).range(600..))]
    certificate_seconds: u64,
    /// Unix socket of containerd (CRI and Tasks API).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    runtime_endpoint: PathBuf,
    /// containerd namespace of the CRI's containers.
    #[arg(long, default_value = "k8s.io")]
    containerd_namespace: String,
    /// The checkpoint store: per-migration records, archives and staged images.
    #[arg(long, default_value = "/var/lib/kube-migros")]
    store_dir: PathBuf,
    /// Refuse to start unless the store is on a file system of its own, not the node's root disk
    /// (seen at /proc/1/root: the agent runs in the node's PID namespace).
    #[arg(long)]
    store_own_filesystem: bool,
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
    /// Serve the kubelet's device plugin for rxe (--rxe-resource): advertise the devices and set
    /// each RDMA pod's rxe block before its containers start (docs/node-agent.md#device-plugin).
    #[arg(long)]
    device_plugin: bool,
    /// The kubelet's device plugin directory (its registration socket and the plugins').
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    device_plugin_dir: PathBuf,
    /// The kubelet's pod resources socket (which pod holds which devices).
    #[arg(long, default_value = "/var/lib/kubelet/pod-resources/kubelet.sock")]
    pod_resources_socket: PathBuf,
    /// The extended resource the device plugin advertises.
    #[arg(long, default_value = "rdma/rxe")]
    rxe_resource: String,
    /// Devices the plugin advertises: RDMA pods that may run on the node at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    rxe_devices: u32,
    /// Where the node's /dev/infiniband is seen (its device nodes are handed to RDMA containers);
    /// through PID 1's root, since the agent's pod has its own /dev.
    #[arg(long, default_value = "/proc/1/root/dev/infiniband")]
    infiniband_dir: PathBuf,
    /// The rxe device named in RDMA containers' environment (default: the first rxe device in
    /// /sys/class/infiniband, none when there is none).
    #[arg(long)]
    rdma_device: Option<String>,
    /// Simulated rxe counters only (a --rxe-dir of plain files, on machines without RDMA): mount
    /// that directory into RDMA containers at this path, as the kernel's /proc/sys/net/rdma_rxe is
    /// seen in every container (test workloads take their numbers from it).
    #[arg(long)]
    rxe_counters_mount: Option<PathBuf>,
    /// Seconds a container start waits for its pod's rxe block to be allocated (with
    /// --rxe-start-lock-seconds within the 30 s the kubelet gives the plugin; it tries the start
    /// again later).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10))]
    rxe_block_wait_seconds: u64,
    /// Seconds a container start waits for the rxe counters while another start or restore holds
    /// them.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=15))]
    rxe_start_lock_seconds: u64,
    /// Seconds the counters stay held for a container that does not run.
    #[arg(long, default_value_t = 30)]
    rxe_start_wait_seconds: u64,
    /// Milliseconds the counters stay held after a container runs, for the queue pairs and memory
    /// regions its application makes as it starts.
    #[arg(long, default_value_t = 2000)]
    rxe_settle_ms: u64,
    /// The nft binary (network blocks of pod IPs).
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
    /// Largest checkpoint archive accepted from a peer, in bytes (also the unpacked size limit).
    #[arg(long, default_value_t = 16 << 30)]
    max_archive_bytes: u64,
    /// Seconds one container's checkpoint may take.
    #[arg(long, default_value_t = 300)]
    checkpoint_timeout_seconds: u64,
    /// How the source checkpoints: `auto` takes the task straight through containerd when the
    /// target restores with the runtime wrapper (no archive packed by the runtime), `cri` always
    /// the CRI's CheckpointContainer.
    #[arg(long, value_enum, default_value_t = CheckpointVia::Auto)]
    checkpoint_via: CheckpointVia,
    /// The kubelet's root directory: a migrated pod's emptyDir volumes are read from its `pods/`.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Seconds a killed source container may take to end before its commit fails (and is retried).
    #[arg(long, default_value_t = 30)]
    stop_timeout_seconds: u64,
    /// Seconds after its checkpoint at which a paused source resumes by itself unless its
    /// migration passed the commit point, when the operator names no deadline (it names the
    /// migration's timeout plus a margin).
    #[arg(long, default_value_t = 900)]
    source_deadline_seconds: u64,
    /// Attempts of a transfer whose stream breaks (a refusal by the target is not retried).
    #[arg(long, default_value_t = 3)]
    transfer_attempts: u32,
    /// Milliseconds a step may take and still answer its result; longer steps answer RUNNING and
    /// are polled.
    #[arg(long, default_value_t = 2000)]
    quick_answer_ms: u64,
    /// Data of migrations untouched for this many seconds is removed (past the commit point: see
    /// --retention-seconds).
    #[arg(long, default_value_t = 86_400)]
    gc_after_seconds: u64,
    /// Data of migrations past their commit point (a kept checkpoint) is removed after this many
    /// seconds untouched.
    #[arg(long, default_value_t = 7 * 86_400)]
    retention_seconds: u64,
    /// At most this many bytes (a quantity: `20Gi`) of kept checkpoints of ended migrations on
    /// the node; past it the oldest go first, those whose pod runs anyway before those that are
    /// its only copy (docs/node-agent.md#kept-checkpoints). The agent lists PodMigrations to know
    /// which ended, so it needs the API server (--lease-namespace). Unset: no budget.
    #[arg(long, value_parser = parse_bytes, requires = "lease_namespace")]
    retention_budget: Option<u64>,
    /// An address the agent never blocks, whatever it is asked (besides the node's own, the API
    /// server's as the agent reaches it and the in-cluster service's); repeatable.
    #[arg(long)]
    protect_address: Vec<std::net::Ipv4Addr>,
    /// An uplink interface of the node (where peers' traffic arrives); repeatable. Segments of
    /// established TCP connections to a blocked pod IP that arrive on it are answered with an
    /// ICMP host-unreachable, so that the peers keep retrying often and resume soon after the
    /// move (docs/node-agent.md#blocking-a-pod-ip). None: they are dropped silently.
    #[arg(long)]
    answer_device: Vec<String>,
    /// Raise the node's `fs.pipe-max-size` to the 4 MiB that CRIU's lazy pages need (PostCopy)
    /// when it is lower. A node-wide sysctl: off unless the admin allows it.
    #[arg(long)]
    raise_pipe_max_size: bool,
    /// Seconds between garbage collections of the checkpoint store (retention time, byte budget,
    /// the kept list on the Lease); at least 1.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    gc_interval_seconds: u64,
    /// The runtime handler (RuntimeClass handler) whose runtime is `migros-runc`: offers the
    /// runtime-wrapper backend (restore when the kubelet starts the replacement; any containerd
    /// 2.x), preferred over the others, while the runtime reports that handler.
    #[arg(long, env = "RUNTIME_HANDLER")]
    runtime_handler: Option<String>,
    /// Also stage checkpoints as checkpoint OCI images pushed to this repository
    /// (`host[:port]/path`), which the kubelet of containerd 2.1-2.3 or CRI-O restores from (every
    /// restart of the container restores the checkpoint again). Last comes the archive's path (for
    /// CRI clients that create containers themselves).
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
    /// Seconds the agent's Lease stays valid without renewal (renewed at a third of it).
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    crds::quantity::bytes(s)
        .ok_or_else(|| format!("{s:?} is not a whole number of bytes (such as 20Gi)"))
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

impl Args {
    fn settings(&self) -> Settings {
        Settings {
            node_name: self.node_name.clone(),
            store: self.store_dir.clone(),
            reservations: self.ipam_reservations.clone(),
            limits: Limits {
                max_bytes: self.max_archive_bytes,
                ..Limits::default()
            },
            checkpoint_timeout: Duration::from_secs(self.checkpoint_timeout_seconds),
            quick_answer: Duration::from_millis(self.quick_answer_ms),
            transfer_attempts: self.transfer_attempts,
            stop_timeout: Duration::from_secs(self.stop_timeout_seconds),
            source_deadline: Duration::from_secs(self.source_deadline_seconds),
            checkpoint_via: self.checkpoint_via,
            kubelet_dir: self.kubelet_dir.clone(),
        }
    }

    /// The restore backends, the preferred one first.
    fn backends(&self, runtime: &Runtime) -> anyhow::Result<Vec<Box<dyn RestoreBackend>>> {
        let mut backends: Vec<Box<dyn RestoreBackend>> = Vec::new();
        if let Some(handler) = &self.runtime_handler {
            backends.push(Box::new(RuntimeWrapper {
                handler: handler.clone(),
            }));
        }
        if let Some(repository) = &self.checkpoint_registry {
            let ca = match &self.registry_ca {
                Some(path) => Some(
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                ),
                None => None,
            };
            let registry = oci::Registry::new(repository, ca.as_deref())?;
            backends.push(Box::new(CriCheckpointImage {
                registry,
                runtime: runtime.clone(),
            }));
        }
        backends.push(Box::new(CriCheckpointArchive));
        Ok(backends)
    }

    fn device_plugin(&self) -> device_plugin::Settings {
        device_plugin::Settings {
            dir: self.device_plugin_dir.clone(),
            pod_resources: self.pod_resources_socket.clone(),
            resource: self.rxe_resource.clone(),
            devices: self.rxe_devices,
            infiniband_dir: self.infiniband_dir.clone(),
            rdma_device: self.rdma_device.clone(),
            counters_mount: self.rxe_counters_mount.clone(),
            block_wait: Duration::from_secs(self.rxe_block_wait_seconds),
            lock_wait: Duration::from_secs(self.rxe_start_lock_seconds),
            start_wait: Duration::from_secs(self.rxe_start_wait_seconds),
            settle: Duration::from_millis(self.rxe_settle_ms),
        }
    }

    fn lease(&self, kept: watch::Receiver<Vec<KeptCheckpoint>>) -> Option<AgentLease> {
        Some(AgentLease {
            kept,
            namespace: self.lease_namespace.clone()?,
            node: self.node_name.clone(),
            endpoint: self
                .advertise
                .clone()
                .unwrap_or_else(|| self.listen.to_string()),
            lease: Duration::from_secs(self.lease_seconds),
            pod: self.pod_name.clone().zip(self.pod_uid.clone()),
        })
    }
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
    let identity = match &args.certificate_signer {
        None => certificate::Source::Files(TlsFiles::in_dir(&args.tls_dir)),
        Some(signer) => certificate::Source::Request(Requester {
            client: kube::Client::try_default()
                .await
                .context("connecting to the API server to request the agent's certificate")?,
            signer: signer.clone(),
            lifetime: Duration::from_secs(args.certificate_seconds),
            ca: tls::read(&args.tls_dir.join("ca.crt"))?,
        }),
    };
    let tls = Served::new(
        certificate::first(&identity, &args.node_name)
            .await
            .with_context(|| {
                format!(
                    "the agent's certificate (TLS directory {})",
                    args.tls_dir.display()
                )
            })?,
    )?;
    if args.store_own_filesystem {
        node_agent::store::Store::new(&args.store_dir)
            .check_own_filesystem(std::path::Path::new("/proc/1/root"))?;
    }
    if args.raise_pipe_max_size {
        match node_agent::strategies::raise_pipe_max_size() {
            Ok(Some(before)) => info!(
                before,
                after = node_agent::strategies::LAZY_PAGES_PIPE_BYTES,
                "raised fs.pipe-max-size for post-copy"
            ),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot raise fs.pipe-max-size: post-copy stays unavailable")
            }
        }
    }
    let runtime = Runtime::new(&args.runtime_endpoint, &args.containerd_namespace)?;
    let (net, missing) = NetBlock::new(args.nft.clone())
        .protecting(control_plane(&args.protect_address).await)
        .answering_on(&args.answer_device);
    info!(protected = ?net.protected(), "addresses never blocked besides the node's own");
    if !missing.is_empty() {
        warn!(
            ?missing,
            "no such interfaces here: segments arriving there are not answered"
        );
    }
    let net = match net.ensure().await {
        Ok(()) => net,
        // A kernel without netdev reject must not cost the blocks themselves.
        Err(e) if !net.answer_devices().is_empty() => {
            warn!(error = %e, "cannot answer on the uplinks: segments to blocked pod IPs are dropped silently");
            let (plain, _) = net.answering_on(&[]);
            if let Err(e) = plain.ensure().await {
                warn!(error = %e, "cannot set up the network block table; pod IPs cannot be silenced");
            }
            plain
        }
        Err(e) => {
            warn!(error = %e, "cannot set up the network block table; pod IPs cannot be silenced");
            net
        }
    };
    info!(devices = ?net.answer_devices(), "segments to blocked pod IPs are answered on");
    let counters = Counters::new(
        &args.rxe_dir,
        args.rxe_qpn_range.clone(),
        args.rxe_mrn_range.clone(),
    );
    let holds = Holds::new(
        counters,
        Duration::from_secs(args.rxe_wait_seconds),
        Duration::from_secs(args.rxe_hold_seconds),
    );
    let rxe_starts = Starts::load(&args.store_dir.join("rxe-starts.json"));
    let metrics = Arc::new(Metrics::for_node(&args.node_name));
    let plugin = if args.device_plugin {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the API server for the device plugin (it reads rxe blocks)")?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "kube-migros-agent".into(),
                instance: Some(args.node_name.clone()),
            },
        );
        Some(device_plugin::Plugin::new(
            args.device_plugin(),
            holds.clone(),
            runtime.clone(),
            client,
            recorder,
            rxe_starts.clone(),
            metrics.clone(),
        ))
    } else {
        None
    };
    let parts = Parts {
        backends: args.backends(&runtime)?,
        runtime,
        rxe: holds,
        rxe_starts,
        net,
        tls: tls.clone(),
        metrics,
    };
    let agent = Agent::new(args.settings(), parts);
    info!(
        node = %args.node_name,
        listen = %args.listen,
        store = %args.store_dir.display(),
        rxe = %args.rxe_dir.display(),
        "node agent starting"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    tokio::spawn(certificate::keep(
        identity,
        args.node_name.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let http = admin::serve(args.http_addr, agent.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let http = tokio::spawn(http);
    let (publish, kept) = watch::channel(Vec::new());
    let lease = args.lease(kept);
    let client = match &lease {
        Some(_) => Some(
            kube::Client::try_default()
                .await
                .context("connecting to the API server to announce the agent")?,
        ),
        None => None,
    };
    let budget = args
        .retention_budget
        .zip(client.clone())
        .map(|(bytes, client)| {
            info!(
                bytes,
                "kept checkpoints of ended migrations stay within a byte budget"
            );
            Budget::new(bytes, client)
        });
    // Garbage collection first: paused sources past their deadline are resumed whatever the API
    // server does.
    let gc = tokio::spawn(gc::run(
        agent.clone(),
        Duration::from_secs(args.gc_interval_seconds),
        gc::Retention {
            after: Duration::from_secs(args.gc_after_seconds),
            kept_for: Duration::from_secs(args.retention_seconds),
            budget,
            publish,
        },
        shutdown.clone(),
    ));
    let lease = match lease.zip(client) {
        Some((lease, client)) => {
            lease.renew(&client).await.context("announcing the agent")?;
            let keeper = tokio::spawn({
                let (lease, client) = (lease.clone(), client.clone());
                async move { lease.keep(client).await }
            });
            Some((lease, client, keeper))
        }
        None => None,
    };
    let plugin = plugin.map(|plugin| tokio::spawn(plugin.run(shutdown.clone())));

    tonic::transport::Server::builder()
        // Checkpoint streams are bulk data: HTTP/2 windows far larger than the 64 KiB default.
        .initial_stream_window_size(agent_api::client::STREAM_WINDOW)
        .initial_connection_window_size(agent_api::client::CONNECTION_WINDOW)
        // Bounds on what one caller may hold: calls at once per connection, streams per
        // connection, and connections whose peer went silent are closed.
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_CALLS_PER_CONNECTION as u32))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            AgentServer::new(Service::new(agent)).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tls::incoming(listener, tls.server_config()?),
            shutdown.clone().cancelled_owned(),
        )
        .await
        .context("serving the agent API")?;
    // The API stopped (on a signal, or with an error that ends the process): stop the rest.
    shutdown.cancel();
    if let Some((lease, client, keeper)) = lease {
        keeper.abort();
        if let Err(e) = lease.withdraw(&client).await {
            warn!(error = %e, "could not delete the agent Lease");
        }
    }
    let (http, _) = tokio::join!(http, gc);
    if let Some(plugin) = plugin {
        let _ = plugin.await;
    }
    if let Ok(Err(e)) = http {
        warn!(error = %e, "the HTTP endpoints failed");
    }
    info!("stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        },
        _ => {
            warn!("cannot listen for SIGTERM/SIGINT; the agent stops only when killed");
            return;
        }
    }
    shutdown.cancel();
}

/// The control plane's addresses as this agent sees them: the API server of its Kubernetes
/// configuration (resolved when named), the in-cluster service address, and `extra`.
async fn control_plane(extra: &[std::net::Ipv4Addr]) -> Vec<std::net::Ipv4Addr> {
    let mut hosts: Vec<String> = Vec::new();
    if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
        hosts.push(host);
    }
    if let Ok(config) = kube::Config::infer().await
        && let Some(host) = config.cluster_url.host()
    {
        hosts.push(host.trim_matches(['[', ']']).to_string());
    }
    let mut addresses = extra.to_vec();
    for host in hosts {
        match host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => {
                if let Ok(found) = tokio::net::lookup_host((host.as_str(), 443)).await {
                    addresses.extend(found.filter_map(|a| match a.ip() {
                        std::net::IpAddr::V4(ip) => Some(ip),
                        std::net::IpAddr::V6(_) => None,
                    }));
                }
            }
        }
    }
    addresses
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
