//! Mutual TLS between the operator and the agents, and between agents. One CA signs every
//! certificate. Each agent has its own certificate, which names its node in a DNS name
//! `<node>.kube-migros-agent` ([`agent_server_name`]): whoever dials the agent of a node verifies
//! that name, whatever address the agent was reached at, and an agent knows which node a calling
//! peer is (`identity::agent_node`). Agents require a client certificate of the same CA.
//!
//! An agent serves with [`Served`]: the certificate it presents can be replaced while it runs (a
//! renewal), without closing a connection.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::Stream;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The parent domain of the name in every agent's certificate: the agent of node `n` is
/// `n.kube-migros-agent`.
pub const AGENT_SERVER_NAME: &str = "kube-migros-agent";

/// How long a client may take to finish its TLS handshake with an agent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TLS material: {0}")]
    Invalid(String),
}

/// The DNS name in the certificate of the agent of `node`, which clients verify.
pub fn agent_server_name(node: &str) -> String {
    format!("{node}.{AGENT_SERVER_NAME}")
}

/// The node an agent certificate's DNS name stands for, if it is one ([`agent_server_name`]).
pub fn node_of_server_name(name: &str) -> Option<&str> {
    name.strip_suffix(AGENT_SERVER_NAME)?
        .strip_suffix('.')
        .filter(|node| !node.is_empty())
}

/// PEM files of one party: the CA that signs its peers, and its own certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loaded PEM material.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Files named `ca.crt`, `tls.crt` and `tls.key` in `dir`, as a Kubernetes TLS Secret with a CA
    /// mounts them.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    pub fn load(&self) -> Result<TlsMaterial, Error> {
        Ok(TlsMaterial {
            ca: read(&self.ca)?,
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        })
    }
}

/// The bytes of `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl TlsMaterial {
    /// From PEM bytes already in memory.
    pub fn from_pem(ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> Self {
        Self { ca, cert, key }
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> &[u8] {
        &self.ca
    }

    /// The certificate (PEM).
    pub fn cert(&self) -> &[u8] {
        &self.cert
    }

    /// The node this material's certificate names ([`agent_server_name`]); an error unless it names
    /// exactly one.
    pub fn node(&self) -> Result<String, Error> {
        let der = CertificateDer::pem_slice_iter(&self.cert)
            .next()
            .ok_or_else(|| Error::Invalid("no certificate in tls.crt".into()))?
            .map_err(|e| Error::Invalid(format!("tls.crt: {e}")))?;
        crate::identity::node_of(der.as_ref()).ok_or_else(|| {
            Error::Invalid(format!(
                "the certificate names no node: it needs exactly one DNS name <node>.{AGENT_SERVER_NAME}"
            ))
        })
    }

    /// A client of the agent of `node` (the operator, or an agent sending to a peer): the agent
    /// must present a certificate naming that node.
    pub fn client_for(&self, node: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(agent_server_name(node))
    }

    /// The agent of `node` at `host:port`, dialled with [`TlsMaterial::client_for`]; connect it
    /// lazily or at once.
    pub fn endpoint(
        &self,
        host_port: &str,
        node: &str,
    ) -> Result<Endpoint, tonic::transport::Error> {
        Endpoint::from_shared(format!("https://{host_port}"))?
            .initial_stream_window_size(crate::client::STREAM_WINDOW)
            .initial_connection_window_size(crate::client::CONNECTION_WINDOW)
            .tls_config(self.client_for(node))
    }

    fn certified_key(&self) -> Result<Arc<CertifiedKey>, Error> {
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(format!("tls.crt: {e}")))?;
        if chain.is_empty() {
            return Err(Error::Invalid("no certificate in tls.crt".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| Error::Invalid(format!("tls.key: {e}")))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| Error::Invalid(format!("tls.key: {e}")))?;
        let certified = CertifiedKey::new(chain, key);
        certified
            .keys_match()
            .map_err(|e| Error::Invalid(format!("tls.key does not belong to tls.crt: {e}")))?;
        Ok(Arc::new(certified))
    }
}

/// What an agent serves with: the CA its clients must come from, fixed for the process, and its
/// own certificate, which [`Served::replace`] swaps while connections go on.
#[derive(Debug)]
pub struct Served {
    current: RwLock<(TlsMaterial, Arc<CertifiedKey>)>,
}

impl Served {
    pub fn new(material: TlsMaterial) -> Result<Arc<Self>, Error> {
        let key = material.certified_key()?;
        Ok(Arc::new(Self {
            current: RwLock::new((material, key)),
        }))
    }

    /// The material in use: also what the agent dials its peers with.
    pub fn material(&self) -> TlsMaterial {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Serves `material` from now on (new handshakes; connections made keep theirs). Refused,
    /// keeping the one in use, if it does not parse, names another node or has another CA.
    /// `Ok(false)`: it is the one in use.
    pub fn replace(&self, material: TlsMaterial) -> Result<bool, Error> {
        let old = self.material();
        if old == material {
            return Ok(false);
        }
        if old.ca != material.ca {
            return Err(Error::Invalid(
                "the new certificate comes with another CA; restart the agent to change CAs".into(),
            ));
        }
        // An agent's certificate names its node; its successor must name the same one, not
        // another and not none.
        if let Ok(was) = old.node() {
            match material.node() {
                Ok(is) if is == was => {}
                Ok(is) => {
                    return Err(Error::Invalid(format!(
                        "the new certificate names node {is}, not {was}"
                    )));
                }
                Err(e) => {
                    return Err(Error::Invalid(format!(
                        "the new certificate names no node, the one in use names {was}: {e}"
                    )));
                }
            }
        }
        let key = material.certified_key()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (material, key);
        Ok(true)
    }

    /// The rustls configuration of the server: client certificates required, signed by the CA;
    /// the certificate presented is the current one at each handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, Error> {
        let material = self.material();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&material.ca) {
            let cert = cert.map_err(|e| Error::Invalid(format!("ca.crt: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Invalid(format!("ca.crt: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| Error::Invalid(format!("ca.crt: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for Served {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .clone(),
        )
    }
}

/// The TLS connections accepted on `listener`, for tonic's `serve_with_incoming`: each handshake
/// runs on its own task (a client that never finishes one holds up no other) and is given
/// [`HANDSHAKE_TIMEOUT`]; failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> impl Stream<Item = Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, sender) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_name_stands_for_its_node_only() {
        assert_eq!(agent_server_name("node-1"), "node-1.kube-migros-agent");
        assert_eq!(
            node_of_server_name("node-1.kube-migros-agent"),
            Some("node-1")
        );
        assert_eq!(node_of_server_name("a.b.kube-migros-agent"), Some("a.b"));
        assert_eq!(node_of_server_name("kube-migros-agent"), None);
        assert_eq!(node_of_server_name(".kube-migros-agent"), None);
        assert_eq!(node_of_server_name("node-1kube-migros-agent"), None);
        assert_eq!(node_of_server_name("node-1.kube-migros-agent.evil"), None);
    }

    /// Material of `ca` for a certificate with these DNS names.
    fn material(ca: &crate::pki::Ca, names: &[&str]) -> TlsMaterial {
        let pem = ca
            .issue(&crate::pki::Leaf {
                common_name: AGENT_SERVER_NAME,
                dns_names: names,
                usage: Some(crate::pki::Usage::Both),
                ..Default::default()
            })
            .unwrap();
        TlsMaterial::from_pem(
            ca.pem().cert.clone().into_bytes(),
            pem.cert.into_bytes(),
            pem.key.into_bytes(),
        )
    }

    #[test]
    fn a_served_certificate_is_replaced_only_by_one_of_the_same_node_and_ca() {
        let ca = crate::pki::Ca::new("kube-migros test CA").unwrap();
        let own = agent_server_name("node-1");
        let served = Served::new(material(&ca, &[&own])).unwrap();
        assert!(!served.replace(served.material()).unwrap());

        let renewed = material(&ca, &[&own]);
        assert!(served.replace(renewed.clone()).unwrap());
        assert!(served.material() == renewed);

        let other = agent_server_name("node-2");
        let err = served.replace(material(&ca, &[&other])).unwrap_err();
        assert!(
            err.to_string().contains("names node node-2, not node-1"),
            "{err}"
        );
        let err = served.replace(material(&ca, &["elsewhere"])).unwrap_err();
        assert!(err.to_string().contains("names no node"), "{err}");
        let foreign = crate::pki::Ca::new("another CA").unwrap();
        let err = served.replace(material(&foreign, &[&own])).unwrap_err();
        assert!(err.to_string().contains("another CA"), "{err}");
        // What was refused left the renewed certificate in use.
        assert!(served.material() == renewed);
    }
}
