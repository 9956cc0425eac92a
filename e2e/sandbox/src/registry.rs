//! The sandbox's image registry: the distribution registry on the node bridge (10.88.0.1:5000) with
//! TLS from a registry CA that every node trusts (containerd's CRI restore path pulls the base image
//! by digest and only speaks plain HTTP to localhost, hence TLS). Images and the CA live in the cache,
//! so they survive restarts; the serving certificate is made at each start.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_api::pki::{Ca, Leaf, Pem, Usage};

use crate::error::io_at;
use crate::{
    Dirs,
    bridge::{self, BRIDGE_IP},
    error::CommandFailed,
    pki,
    process::Daemon,
    tools,
};

/// Where the registry listens (on the host side of the node bridge).
pub const ADDRESS: &str = "10.88.0.1:5000";
/// The port of [`ADDRESS`], whose host is the bridge address.
const PORT: u16 = 5000;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tools(#[from] crate::gobuild::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Certificate(#[from] agent_api::pki::Error),
    #[error(transparent)]
    Bridge(#[from] CommandFailed),
    #[error(transparent)]
    Process(#[from] crate::process::Error),
    #[error("the registry did not listen on {ADDRESS} within 30s; last lines of {log}:\n{tail}")]
    NotReady { log: PathBuf, tail: String },
}

/// The registry's files.
#[derive(Debug, Clone)]
pub struct Registry {
    dirs: Dirs,
    cache: PathBuf,
    state: PathBuf,
}

impl Registry {
    pub fn new(dirs: &Dirs) -> Self {
        Self {
            dirs: dirs.clone(),
            cache: dirs.cache.join("registry"),
            state: dirs.state.join("registry"),
        }
    }

    /// The registry CA (made once, kept in the cache), PEM.
    pub fn ca(&self) -> Result<Pem, Error> {
        let (cert, key) = (self.cache.join("ca.crt"), self.cache.join("ca.key"));
        if let (Ok(cert), Ok(key)) = (pki::read(&cert), pki::read(&key)) {
            return Ok(Pem { cert, key });
        }
        std::fs::create_dir_all(&self.cache)
            .map_err(io_at(&self.cache))
            .map_err(pki::Error::from)?;
        let ca = Ca::new("kube-migros-sandbox-registry-ca")?;
        pki::write_pem(&self.cache, "ca", ca.pem())?;
        Ok(ca.pem().clone())
    }

    /// Starts the registry unless it already runs.
    pub fn up(&self) -> Result<(), Error> {
        let bin = tools::ensure(&self.dirs.cache)?;
        bridge::ensure_bridge()?;
        let daemon = self.daemon(&bin);
        if daemon.running_pid().is_some() && listening() {
            return Ok(());
        }
        if let Some(pid) = daemon.running_pid() {
            crate::process::stop(pid, "registry", Duration::from_secs(5))?;
        }
        let ca = Ca::from_pem(self.ca()?)?;
        let serving = ca.issue(&Leaf {
            common_name: "kube-migros-sandbox-registry",
            ips: &[IpAddr::V4(BRIDGE_IP)],
            usage: Some(Usage::Server),
            ..Default::default()
        })?;
        std::fs::create_dir_all(&self.state)
            .map_err(io_at(&self.state))
            .map_err(pki::Error::from)?;
        pki::write_pem(&self.state, "tls", &serving)?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: {ADDRESS}\n  tls:\n    certificate: {dir}/tls.crt\n    key: {dir}/tls.key\n",
            data = self.cache.join("data").display(),
            dir = self.state.display(),
        );
        pki::write(&self.state.join("config.yml"), &config, 0o644)?;
        daemon.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if listening() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::NotReady {
            log: daemon.log_file(),
            tail: daemon.log_tail(10),
        })
    }

    /// Stops the registry (its images stay in the cache).
    pub fn down(&self) -> Result<(), Error> {
        let bin = self.dirs.cache.join("tools/bin");
        if let Some(pid) = self.daemon(&bin).running_pid() {
            crate::process::stop(pid, "registry", Duration::from_secs(5))?;
        }
        Ok(())
    }

    fn daemon(&self, bin: &Path) -> Daemon {
        Daemon {
            name: "registry".into(),
            binary: bin.join("registry"),
            args: vec![
                "serve".into(),
                self.state.join("config.yml").display().to_string(),
            ],
            run_dir: self.state.clone(),
            log_dir: self.state.clone(),
        }
    }
}

fn listening() -> bool {
    let addr = SocketAddr::new(IpAddr::V4(BRIDGE_IP), PORT);
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
