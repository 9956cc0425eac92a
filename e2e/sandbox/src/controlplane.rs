//! The sandbox's Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler on loopback, with TLS everywhere, started, checked and torn down as one unit.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::ServiceAccount};
use kube::{Api, Client, config::KubeConfigOptions};

use agent_api::pki::{Ca, Leaf, Usage};

use crate::error::{IoError, io_at};
use crate::{
    Dirs, k8s, pki,
    process::{self, Daemon},
};

/// Ports on 127.0.0.1; chosen away from the defaults so a host that runs Kubernetes itself can
/// still host the sandbox.
pub const APISERVER_PORT: u16 = 16443;
pub const ETCD_CLIENT_PORT: u16 = 12379;
pub const ETCD_PEER_PORT: u16 = 12380;
pub const ETCD_METRICS_PORT: u16 = 12381;
pub const CONTROLLER_MANAGER_PORT: u16 = 10357;
pub const SCHEDULER_PORT: u16 = 10359;
/// Cluster IP range of Services; the first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Components in start order; `down` stops them in reverse.
pub const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] k8s::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("port {port} on 127.0.0.1 is used by another program; stop it or free the port")]
    PortInUse { port: u16 },
    #[error(
        "{component} did not become ready within {seconds}s: {reason}\nlast lines of {log}:\n{tail}"
    )]
    NotReady {
        component: String,
        seconds: u64,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot talk to the API server with {kubeconfig}: {source}")]
    Client {
        kubeconfig: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Kubeconfig(#[from] serde_yaml_ng::Error),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a user or a test needs to reach a running control plane.
#[derive(Debug, Clone)]
pub struct Env {
    /// Admin kubeconfig (user `kube-migros-admin`, group `system:masters`).
    pub kubeconfig: PathBuf,
    /// Directory of the Kubernetes binaries, kubectl included.
    pub bin_dir: PathBuf,
    /// API server URL.
    pub server: String,
}

impl Env {
    /// A client authenticated as the sandbox admin.
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// A client of the admin impersonating `user` with `extra` user information (as the API
    /// server sets it for a service-account token bound to a pod: its node in
    /// `authentication.kubernetes.io/node-name`), for tests of what such a user may do.
    pub async fn client_as(&self, user: &str, extra: &[(&str, &str)]) -> Result<Client> {
        let wrap = |e: Box<dyn std::error::Error + Send + Sync>| Error::Client {
            kubeconfig: self.kubeconfig.clone(),
            source: e,
        };
        let file =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).map_err(|e| wrap(e.into()))?;
        let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(|e| wrap(e.into()))?;
        config.auth_info.impersonate = Some(user.into());
        config.auth_info.impersonate_user_extra = Some(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect(),
        );
        Client::try_from(config).map_err(|e| wrap(e.into()))
    }

    /// `kubectl` of the sandbox's Kubernetes version.
    pub fn kubectl(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    /// Shell lines that point `kubectl` at the sandbox.
    pub fn shell_exports(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport PATH={}:$PATH\n",
            self.kubeconfig.display(),
            self.bin_dir.display()
        )
    }
}

/// The control plane's files (certificates, etcd data, logs, pids) under the state directory.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    cache_dir: PathBuf,
}

impl ControlPlane {
    pub fn new(dirs: &Dirs) -> Self {
        Self {
            dir: dirs.state.join("control-plane"),
            bin_dir: k8s::bin_dir(&dirs.cache),
            cache_dir: dirs.cache.clone(),
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn pki_file(&self, name: &str) -> String {
        self.pki().join(name).display().to_string()
    }

    pub fn env(&self) -> Env {
        Env {
            kubeconfig: self.dir.join("admin.kubeconfig"),
            bin_dir: self.bin_dir.clone(),
            server: format!("https://127.0.0.1:{APISERVER_PORT}"),
        }
    }

    /// A kubeconfig for the kubelet of node `name` (user `system:node:<name>`, group
    /// `system:nodes`, as the Node authorizer and NodeRestriction expect), pointing at the API
    /// server's bridge address, which the nodes reach. The control plane must be up.
    pub fn kubelet_kubeconfig(&self, name: &str) -> Result<String> {
        let server = format!("https://{}:{APISERVER_PORT}", crate::bridge::BRIDGE_IP);
        self.user_kubeconfig(&format!("system:node:{name}"), &["system:nodes"], &server)
    }

    /// A kubeconfig for `user` in `groups` with a client certificate of the cluster CA, for the
    /// API server at `server`.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str], server: &str) -> Result<String> {
        let ca_pem = agent_api::pki::Pem {
            cert: pki::read(&self.pki().join("ca.crt"))?,
            key: pki::read(&self.pki().join("ca.key"))?,
        };
        let ca = Ca::from_pem(ca_pem).map_err(pki::Error::from)?;
        let leaf = ca
            .issue(&Leaf {
                common_name: user,
                organisations: groups,
                usage: Some(Usage::Client),
                ..Default::default()
            })
            .map_err(pki::Error::from)?;
        kubeconfig_yaml(server, &ca.pem().cert, user, &leaf.cert, &leaf.key)
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_cert(&self) -> Result<String> {
        Ok(pki::read(&self.pki().join("ca.crt"))?)
    }

    /// Builds what is missing, then starts the control plane unless it already runs and is ready.
    /// Anything left over from an earlier run that is not healthy is torn down first. Several
    /// processes may call this at once; a file lock makes one of them do the work.
    pub async fn up(&self) -> Result<Env> {
        let cache = self.cache_dir.clone();
        tokio::task::spawn_blocking(move || k8s::ensure_built(&cache)).await??;
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        let lock_path = parent.join(".control-plane.lock");
        let lock = File::create(&lock_path).map_err(io_at(&lock_path))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await?
            .map_err(io_at(&lock_path))?;
        let result = self.up_locked().await;
        drop(lock);
        result
    }

    async fn up_locked(&self) -> Result<Env> {
        if self.is_ready().await {
            return Ok(self.env());
        }
        self.down()?;
        for port in [
            APISERVER_PORT,
            ETCD_CLIENT_PORT,
            ETCD_PEER_PORT,
            ETCD_METRICS_PORT,
            CONTROLLER_MANAGER_PORT,
            SCHEDULER_PORT,
        ] {
            TcpListener::bind((LOOPBACK, port)).map_err(|_| Error::PortInUse { port })?;
        }
        self.write_pki()?;
        self.write_kubeconfigs()?;
        pki::write(&self.dir.join("recipe"), &self.recipe(), 0o644)?;
        let [etcd, apiserver, controller_manager, scheduler] = self.daemons();
        etcd.spawn()?;
        apiserver.spawn()?;
        let client = self
            .wait_for_apiserver(&apiserver, Duration::from_secs(180))
            .await?;
        controller_manager.spawn()?;
        scheduler.spawn()?;
        self.wait_for_lease(&client, &controller_manager).await?;
        self.wait_for_lease(&client, &scheduler).await?;
        self.wait_for_default_service_account(&client, &controller_manager)
            .await?;
        Ok(self.env())
    }

    /// True when every component runs from our binaries and the API server reports ready.
    pub async fn is_ready(&self) -> bool {
        if self.daemons().iter().any(|d| d.running_pid().is_none()) {
            return false;
        }
        // Started with other arguments (an older version of this code): not ours to keep.
        let recipe = std::fs::read_to_string(self.dir.join("recipe")).unwrap_or_default();
        if recipe != self.recipe() {
            return false;
        }
        match client_from(&self.env().kubeconfig).await {
            Ok(client) => readyz(&client).await.is_ok(),
            Err(_) => false,
        }
    }

    /// One line per component: running (pid) or stopped.
    pub fn status(&self) -> Vec<(String, Option<i32>)> {
        self.daemons()
            .iter()
            .map(|d| (d.name.clone(), d.running_pid()))
            .collect()
    }

    /// Stops every control-plane process (by pid file, and any other process running one of the
    /// sandbox's Kubernetes binaries) and removes the state. Idempotent.
    pub fn down(&self) -> Result<()> {
        for daemon in self.daemons().iter().rev() {
            if let Some(pid) = daemon.running_pid() {
                process::stop(pid, &daemon.name, Duration::from_secs(10))?;
            }
        }
        let k8s_cache = self.cache_dir.join("k8s");
        for pid in process::processes_running_from(&k8s_cache) {
            let name = process::exe_of(pid)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            process::stop(pid, &name, Duration::from_secs(10))?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(&self.dir)(e).into()),
            _ => Ok(()),
        }
    }

    /// A fingerprint of how the components are started.
    fn recipe(&self) -> String {
        let all: Vec<String> = self.daemons().iter().flat_map(|d| d.args.clone()).collect();
        format!("{:08x}", crate::rootfs::fnv1a(&all.join("\0")))
    }

    fn daemons(&self) -> [Daemon; 4] {
        COMPONENTS.map(|name| Daemon {
            name: name.to_string(),
            binary: self.bin_dir.join(name),
            args: self.args(name),
            run_dir: self.dir.join("run"),
            log_dir: self.dir.join("logs"),
        })
    }

    /// The flags of `component` (`--name=value`).
    fn args(&self, component: &str) -> Vec<String> {
        let flags = match component {
            "etcd" => self.etcd_flags(),
            "kube-apiserver" => self.apiserver_flags(),
            "kube-controller-manager" => self.controller_manager_flags(),
            "kube-scheduler" => self.scheduler_flags(),
            _ => Vec::new(),
        };
        flags
            .into_iter()
            .map(|(k, v)| format!("--{k}={v}"))
            .collect()
    }

    fn kubeconfig_file(&self, name: &str) -> String {
        self.dir
            .join(format!("{name}.kubeconfig"))
            .display()
            .to_string()
    }

    fn etcd_flags(&self) -> Vec<(&'static str, String)> {
        let etcd_url = |port: u16| format!("https://127.0.0.1:{port}");
        vec![
            ("name", "sandbox".into()),
            ("data-dir", self.dir.join("etcd").display().to_string()),
            ("listen-client-urls", etcd_url(ETCD_CLIENT_PORT)),
            ("advertise-client-urls", etcd_url(ETCD_CLIENT_PORT)),
            ("listen-peer-urls", etcd_url(ETCD_PEER_PORT)),
            ("initial-advertise-peer-urls", etcd_url(ETCD_PEER_PORT)),
            (
                "initial-cluster",
                format!("sandbox={}", etcd_url(ETCD_PEER_PORT)),
            ),
            (
                "listen-metrics-urls",
                format!("http://127.0.0.1:{ETCD_METRICS_PORT}"),
            ),
            ("cert-file", self.pki_file("etcd-server.crt")),
            ("key-file", self.pki_file("etcd-server.key")),
            ("trusted-ca-file", self.pki_file("etcd-ca.crt")),
            ("client-cert-auth", "true".into()),
            ("peer-cert-file", self.pki_file("etcd-server.crt")),
            ("peer-key-file", self.pki_file("etcd-server.key")),
            ("peer-trusted-ca-file", self.pki_file("etcd-ca.crt")),
            ("peer-client-cert-auth", "true".into()),
            // The sandbox is thrown away after use; fsync on every write only slows tests.
            ("unsafe-no-fsync", "true".into()),
        ]
    }

    fn apiserver_flags(&self) -> Vec<(&'static str, String)> {
        let etcd_url = format!("https://127.0.0.1:{ETCD_CLIENT_PORT}");
        vec![
            ("etcd-servers", etcd_url),
            ("etcd-cafile", self.pki_file("etcd-ca.crt")),
            ("etcd-certfile", self.pki_file("apiserver-etcd-client.crt")),
            ("etcd-keyfile", self.pki_file("apiserver-etcd-client.key")),
            // All addresses: the host's clients use 127.0.0.1, the kubelets in the sandbox
            // nodes the bridge address (TLS and client certificates as everywhere).
            ("bind-address", "0.0.0.0".into()),
            ("advertise-address", LOOPBACK.to_string()),
            ("secure-port", APISERVER_PORT.to_string()),
            ("cert-dir", self.pki().display().to_string()),
            ("tls-cert-file", self.pki_file("apiserver.crt")),
            ("tls-private-key-file", self.pki_file("apiserver.key")),
            ("client-ca-file", self.pki_file("ca.crt")),
            ("authorization-mode", "Node,RBAC".into()),
            // On top of the default set (NamespaceLifecycle, ServiceAccount, PodSecurity,
            // ResourceQuota, the admission webhooks and policies, ...), as kubeadm does.
            ("enable-admission-plugins", "NodeRestriction".into()),
            ("allow-privileged", "true".into()),
            ("enable-bootstrap-token-auth", "true".into()),
            ("service-cluster-ip-range", SERVICE_CIDR.into()),
            // There is no kube-proxy: the API server reaches a webhook's Service (the operator's
            // admission webhooks) at its endpoints rather than at its cluster IP.
            ("enable-aggregator-routing", "true".into()),
            (
                "service-account-issuer",
                "https://kubernetes.default.svc.cluster.local".into(),
            ),
            ("service-account-key-file", self.pki_file("sa.pub")),
            ("service-account-signing-key-file", self.pki_file("sa.key")),
            (
                "kubelet-client-certificate",
                self.pki_file("apiserver-kubelet-client.crt"),
            ),
            (
                "kubelet-client-key",
                self.pki_file("apiserver-kubelet-client.key"),
            ),
            (
                "kubelet-preferred-address-types",
                "InternalIP,Hostname".into(),
            ),
            (
                "proxy-client-cert-file",
                self.pki_file("front-proxy-client.crt"),
            ),
            (
                "proxy-client-key-file",
                self.pki_file("front-proxy-client.key"),
            ),
            (
                "requestheader-client-ca-file",
                self.pki_file("front-proxy-ca.crt"),
            ),
            ("requestheader-allowed-names", "front-proxy-client".into()),
            ("requestheader-username-headers", "X-Remote-User".into()),
            ("requestheader-group-headers", "X-Remote-Group".into()),
            (
                "requestheader-extra-headers-prefix",
                "X-Remote-Extra-".into(),
            ),
            // A loopback address cannot be the endpoint of the `kubernetes` Service; the nodes
            // reach the API server by its URL in their kubeconfigs.
            ("endpoint-reconciler-type", "none".into()),
            ("profiling", "false".into()),
        ]
    }

    fn controller_manager_flags(&self) -> Vec<(&'static str, String)> {
        vec![
            ("kubeconfig", self.kubeconfig_file("controller-manager")),
            (
                "authentication-kubeconfig",
                self.kubeconfig_file("controller-manager"),
            ),
            (
                "authorization-kubeconfig",
                self.kubeconfig_file("controller-manager"),
            ),
            ("bind-address", LOOPBACK.to_string()),
            ("secure-port", CONTROLLER_MANAGER_PORT.to_string()),
            ("cert-dir", self.pki().display().to_string()),
            ("client-ca-file", self.pki_file("ca.crt")),
            (
                "requestheader-client-ca-file",
                self.pki_file("front-proxy-ca.crt"),
            ),
            ("cluster-signing-cert-file", self.pki_file("ca.crt")),
            ("cluster-signing-key-file", self.pki_file("ca.key")),
            ("root-ca-file", self.pki_file("ca.crt")),
            ("service-account-private-key-file", self.pki_file("sa.key")),
            ("use-service-account-credentials", "true".into()),
            ("controllers", "*,bootstrapsigner,tokencleaner".into()),
            ("service-cluster-ip-range", SERVICE_CIDR.into()),
            ("leader-elect", "true".into()),
            ("profiling", "false".into()),
        ]
    }

    fn scheduler_flags(&self) -> Vec<(&'static str, String)> {
        vec![
            ("kubeconfig", self.kubeconfig_file("scheduler")),
            (
                "authentication-kubeconfig",
                self.kubeconfig_file("scheduler"),
            ),
            (
                "authorization-kubeconfig",
                self.kubeconfig_file("scheduler"),
            ),
            ("bind-address", LOOPBACK.to_string()),
            ("secure-port", SCHEDULER_PORT.to_string()),
            ("cert-dir", self.pki().display().to_string()),
            ("leader-elect", "true".into()),
            ("profiling", "false".into()),
        ]
    }

    fn write_pki(&self) -> Result<()> {
        let dir = self.pki();
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let ca = Ca::new("kube-migros-sandbox-ca").map_err(pki::Error::from)?;
        let etcd_ca = Ca::new("kube-migros-sandbox-etcd-ca").map_err(pki::Error::from)?;
        let front_proxy_ca =
            Ca::new("kube-migros-sandbox-front-proxy-ca").map_err(pki::Error::from)?;
        let masters: &[&str] = &["system:masters"];
        let loopback = [LOOPBACK];
        let client = |common_name, organisations| Leaf {
            common_name,
            organisations,
            usage: Some(Usage::Client),
            ..Default::default()
        };
        let apiserver_names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let issued: Vec<(&str, &Ca, Leaf<'_>)> = vec![
            (
                "etcd-server",
                &etcd_ca,
                Leaf {
                    common_name: "etcd-sandbox",
                    dns_names: &["localhost"],
                    ips: &loopback,
                    usage: Some(Usage::Both),
                    ..Default::default()
                },
            ),
            (
                "apiserver-etcd-client",
                &etcd_ca,
                client("kube-apiserver-etcd-client", &[]),
            ),
            (
                "apiserver",
                &ca,
                Leaf {
                    common_name: "kube-apiserver",
                    dns_names: &apiserver_names,
                    ips: &[
                        LOOPBACK,
                        KUBERNETES_SERVICE_IP,
                        IpAddr::V4(crate::bridge::BRIDGE_IP),
                    ],
                    usage: Some(Usage::Server),
                    ..Default::default()
                },
            ),
            (
                "apiserver-kubelet-client",
                &ca,
                client("kube-apiserver-kubelet-client", masters),
            ),
            ("admin", &ca, client("kube-migros-admin", masters)),
            (
                "controller-manager",
                &ca,
                client("system:kube-controller-manager", &[]),
            ),
            ("scheduler", &ca, client("system:kube-scheduler", &[])),
            (
                "front-proxy-client",
                &front_proxy_ca,
                client("front-proxy-client", &[]),
            ),
        ];
        for (stem, issuer, leaf) in issued {
            let pem = issuer.issue(&leaf).map_err(pki::Error::from)?;
            pki::write_pem(&dir, stem, &pem)?;
        }
        for (stem, authority) in [
            ("ca", &ca),
            ("etcd-ca", &etcd_ca),
            ("front-proxy-ca", &front_proxy_ca),
        ] {
            pki::write_pem(&dir, stem, authority.pem())?;
        }
        let (private, public) = agent_api::pki::signing_key().map_err(pki::Error::from)?;
        pki::write(&dir.join("sa.key"), &private, 0o600)?;
        pki::write(&dir.join("sa.pub"), &public, 0o644)?;
        Ok(())
    }

    fn write_kubeconfigs(&self) -> Result<()> {
        let ca = pki::read(&self.pki().join("ca.crt"))?;
        let server = self.env().server;
        for (name, user) in [
            ("admin", "kube-migros-admin"),
            ("controller-manager", "system:kube-controller-manager"),
            ("scheduler", "system:kube-scheduler"),
        ] {
            let cert = pki::read(&self.pki().join(format!("{name}.crt")))?;
            let key = pki::read(&self.pki().join(format!("{name}.key")))?;
            let yaml = kubeconfig_yaml(&server, &ca, user, &cert, &key)?;
            pki::write(&self.dir.join(format!("{name}.kubeconfig")), &yaml, 0o600)?;
        }
        Ok(())
    }

    async fn wait_for_apiserver(&self, apiserver: &Daemon, timeout: Duration) -> Result<Client> {
        let client = client_from(&self.env().kubeconfig).await?;
        wait_until(timeout, || readyz(&client))
            .await
            .map_err(|reason| not_ready(apiserver, timeout, reason))?;
        Ok(client)
    }

    /// With leader election on, a component that holds its Lease has started its controllers.
    async fn wait_for_lease(&self, client: &Client, daemon: &Daemon) -> Result<()> {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
        let timeout = Duration::from_secs(120);
        wait_until(timeout, || async {
            let lease = leases
                .get_opt(&daemon.name)
                .await
                .map_err(|e| e.to_string())?;
            let holder = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity);
            match holder {
                Some(h) if !h.is_empty() => Ok(()),
                _ => Err(format!("Lease kube-system/{} is not held", daemon.name)),
            }
        })
        .await
        .map_err(|reason| not_ready(daemon, timeout, reason))
    }

    /// Pods cannot be created in a namespace before its `default` ServiceAccount exists.
    async fn wait_for_default_service_account(&self, client: &Client, kcm: &Daemon) -> Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let timeout = Duration::from_secs(60);
        wait_until(timeout, || async {
            match accounts
                .get_opt("default")
                .await
                .map_err(|e| e.to_string())?
            {
                Some(_) => Ok(()),
                None => Err("ServiceAccount default/default does not exist yet".to_string()),
            }
        })
        .await
        .map_err(|reason| not_ready(kcm, timeout, reason))
    }
}

fn not_ready(daemon: &Daemon, timeout: Duration, reason: String) -> Error {
    let reason = match daemon.running_pid() {
        Some(_) => reason,
        None => format!("the process exited ({reason})"),
    };
    Error::NotReady {
        component: daemon.name.clone(),
        seconds: timeout.as_secs(),
        reason,
        log: daemon.log_file(),
        tail: daemon.log_tail(15),
    }
}

/// Polls `check` every 250 ms until it succeeds or `timeout` passes, returning its last error.
/// Start-up has nothing to watch before the API server answers, hence polling here.
async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn readyz(client: &Client) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await {
        Ok(Ok(body)) if body.trim() == "ok" => Ok(()),
        Ok(Ok(body)) => Err(body),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("/readyz timed out".into()),
    }
}

/// A client for the API server named in `kubeconfig`.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let wrap = |e: Box<dyn std::error::Error + Send + Sync>| Error::Client {
        kubeconfig: kubeconfig.to_path_buf(),
        source: e,
    };
    let config = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| wrap(e.into()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| wrap(e.into()))?;
    Client::try_from(config).map_err(|e| wrap(e.into()))
}

/// A kubeconfig with embedded credentials, so it can be copied elsewhere and still work.
fn kubeconfig_yaml(server: &str, ca: &str, user: &str, cert: &str, key: &str) -> Result<String> {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kube-migros-sandbox", "cluster": {
            "server": server,
            "certificate-authority-data": STANDARD.encode(ca),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": STANDARD.encode(cert),
            "client-key-data": STANDARD.encode(key),
        }}],
        "contexts": [{"name": "kube-migros-sandbox", "context": {
            "cluster": "kube-migros-sandbox",
            "user": user,
        }}],
        "current-context": "kube-migros-sandbox",
    });
    Ok(serde_yaml_ng::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_component_gets_its_flags() {
        let dirs = Dirs {
            cache: "/cache".into(),
            state: "/state".into(),
        };
        let cp = ControlPlane::new(&dirs);
        for component in COMPONENTS {
            let args = cp.args(component);
            assert!(!args.is_empty(), "{component} has no flags");
            assert!(args.iter().all(|a| a.starts_with("--") && a.contains('=')));
        }
        let apiserver = cp.args("kube-apiserver").join(" ");
        assert!(apiserver.contains("--authorization-mode=Node,RBAC"));
        assert!(apiserver.contains(&format!("--secure-port={APISERVER_PORT}")));
    }

    #[test]
    fn kubeconfig_embeds_credentials() {
        let yaml = kubeconfig_yaml("https://127.0.0.1:1", "CA", "me", "CERT", "KEY").unwrap();
        let config: kube::config::Kubeconfig = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(
            config.current_context.as_deref(),
            Some("kube-migros-sandbox")
        );
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:1"));
        assert!(cluster.certificate_authority_data.is_some());
    }
}
