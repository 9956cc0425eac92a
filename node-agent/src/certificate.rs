//! The agent's own certificate, which names its node (`<node>.kube-migros-agent`): the operator
//! dials the agent of a node by that name, and a target takes a checkpoint only from the agent of
//! the migration's source node (docs/node-agent.md, "Identity").
//!
//! Two sources:
//! - **Files** (`--tls-dir`: `ca.crt`, `tls.crt`, `tls.key`), from an admin's PKI or
//!   cert-manager. Read again every [`RELOAD_EVERY`]; a changed certificate is served from the
//!   next handshake on, without a restart.
//! - **A CertificateSigningRequest** (`--certificate-signer`, the chart's default): the agent
//!   makes a key that never leaves its memory and asks the API server for a certificate of its
//!   node; the operator approves and signs it only when the request comes from the agents'
//!   service account with a token bound to a pod on that very node. Renewed at two thirds of its
//!   lifetime.

use std::{sync::Arc, time::Duration};

use agent_api::{
    identity::AGENT_COMMON_NAME,
    tls::{self, Served, TlsFiles, TlsMaterial},
};
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How often certificate files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// How long the agent waits for its request to be signed before it tries again.
const SIGNING_WAIT: Duration = Duration::from_secs(300);

/// Where the agent's certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Files(TlsFiles),
    Request(Requester),
}

/// How the agent asks for its certificate.
#[derive(Clone)]
pub struct Requester {
    pub client: Client,
    /// `spec.signerName` of the requests (the operator signs `migros.io/agent`).
    pub signer: String,
    /// Asked lifetime; the signer may give less.
    pub lifetime: Duration,
    /// The CA certificate the operator's signer uses (`ca.crt` of `--tls-dir`).
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("signer", &self.signer)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// The agent's certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("the certificate names node {named:?}, but this agent runs on {node:?}")]
    OtherNode { named: String, node: String },
    #[error("the certificate is not signed by the CA in ca.crt (was the CA replaced?)")]
    OtherCa,
    #[error("making a key and a certificate request: {0}")]
    Key(#[from] rcgen::Error),
    #[error("CertificateSigningRequest {name}: {source}")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CertificateSigningRequest {name} was {how}: {message}")]
    Refused {
        name: String,
        how: String,
        message: String,
    },
    #[error(
        "CertificateSigningRequest {0} was not signed within {SIGNING_WAIT:?}; is the operator running?"
    )]
    NotSigned(String),
}

/// The certificate to start serving with: read, or requested and waited for.
pub async fn first(source: &Source, node: &str) -> Result<TlsMaterial, Error> {
    let material = match source {
        Source::Files(files) => files.load()?,
        Source::Request(requester) => request(requester, node).await?,
    };
    check(&material, node)?;
    Ok(material)
}

/// Keeps `served` current until `shutdown`: files read again when they change, a requested
/// certificate renewed at two thirds of its lifetime (and retried every minute on failure). What
/// cannot be had keeps the one in use and is logged.
pub async fn keep(source: Source, node: String, served: Arc<Served>, shutdown: CancellationToken) {
    loop {
        let wait = match &source {
            Source::Files(_) => RELOAD_EVERY,
            Source::Request(_) => renew_in(&served.material()),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let next = match &source {
            Source::Files(files) => files.load().map_err(Error::from),
            Source::Request(requester) => request(requester, &node).await,
        };
        let replaced = next
            .and_then(|m| check(&m, &node).map(|()| m))
            .and_then(|m| served.replace(m).map_err(Error::from));
        match replaced {
            Ok(true) => info!(node = %node, "serving a new certificate"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "cannot renew the agent's certificate; keeping the one in use");
                if matches!(source, Source::Request(_)) {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
            }
        }
    }
}

/// The material must name this agent's node and no other, and be signed by the CA its peers and
/// the operator trust (a certificate of a replaced CA would be refused by all of them).
fn check(material: &TlsMaterial, node: &str) -> Result<(), Error> {
    let named = material.node()?;
    if named != node {
        return Err(Error::OtherNode {
            named,
            node: node.into(),
        });
    }
    let first = |pem: &[u8]| -> Option<Vec<u8>> {
        Some(
            x509_parser::pem::Pem::iter_from_buffer(pem)
                .next()?
                .ok()?
                .contents,
        )
    };
    let (Some(leaf), Some(ca)) = (first(material.cert()), first(material.ca())) else {
        return Err(Error::OtherCa);
    };
    let signed = X509Certificate::from_der(&leaf)
        .ok()
        .zip(X509Certificate::from_der(&ca).ok())
        .is_some_and(|((_, leaf), (_, ca))| leaf.verify_signature(Some(ca.public_key())).is_ok());
    if !signed {
        return Err(Error::OtherCa);
    }
    Ok(())
}

/// When to renew: at two thirds of the certificate's lifetime, at least a minute from now.
fn renew_in(material: &TlsMaterial) -> Duration {
    let Some((not_before, not_after)) = validity(material) else {
        return Duration::from_secs(60);
    };
    let renew_at = not_before + (not_after - not_before) * 2 / 3;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Duration::from_secs(renew_at.saturating_sub(now).max(60) as u64)
}

/// `(not_before, not_after)` of the material's certificate, in Unix seconds.
fn validity(material: &TlsMaterial) -> Option<(i64, i64)> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(material.cert())
        .next()?
        .ok()?;
    let (_, cert) = X509Certificate::from_der(&pem.contents).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Asks for a certificate of `node` with a new key, and waits until it is signed.
pub async fn request(requester: &Requester, node: &str) -> Result<TlsMaterial, Error> {
    let Requester {
        client,
        signer,
        lifetime,
        ca,
    } = requester;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![tls::agent_server_name(node)])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, AGENT_COMMON_NAME);
    let csr = params.serialize_request(&key)?.pem()?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("kube-migros-agent-".into()),
            annotations: Some([("migros.io/node".to_string(), node.to_string())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr.into_bytes()),
            signer_name: signer.clone(),
            usages: Some(
                [
                    "digital signature",
                    "key encipherment",
                    "server auth",
                    "client auth",
                ]
                .map(String::from)
                .to_vec(),
            ),
            expiration_seconds: Some(lifetime.as_secs().min(i32::MAX as u64) as i32),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .map_err(|source| Error::Kube {
            name: "kube-migros-agent-*".into(),
            source,
        })?;
    let name = created.metadata.name.unwrap_or_default();
    info!(csr = %name, signer = %signer, "certificate requested");
    let deadline = tokio::time::Instant::now() + SIGNING_WAIT;
    loop {
        let got = match api.get(&name).await {
            Ok(got) => got,
            // The API server away for a moment: asked again until the deadline.
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(csr = %name, error = %e, "reading the certificate request");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(source) => {
                return Err(Error::Kube {
                    name: name.clone(),
                    source,
                });
            }
        };
        let status = got.status.unwrap_or_default();
        if let Some(refusal) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(Error::Refused {
                name,
                how: refusal.type_.to_lowercase(),
                message: refusal.message.clone().unwrap_or_default(),
            });
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            info!(csr = %name, "certificate issued");
            return Ok(TlsMaterial::from_pem(
                ca.clone(),
                cert.0,
                key.serialize_pem().into_bytes(),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotSigned(name));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agent_api::pki::{Ca, Leaf, Usage};

    fn material(ca: &Ca, signer: &Ca, name: &str) -> TlsMaterial {
        let leaf = signer
            .issue(&Leaf {
                common_name: AGENT_COMMON_NAME,
                dns_names: &[name],
                usage: Some(Usage::Both),
                ..Default::default()
            })
            .unwrap();
        TlsMaterial::from_pem(
            ca.pem().cert.clone().into_bytes(),
            leaf.cert.into_bytes(),
            leaf.key.into_bytes(),
        )
    }

    #[test]
    fn an_agent_takes_only_a_certificate_of_its_node_from_its_ca() {
        let (ca, replaced) = (Ca::new("ca").unwrap(), Ca::new("ca").unwrap());
        check(&material(&ca, &ca, "node-1.kube-migros-agent"), "node-1").unwrap();
        assert!(matches!(
            check(&material(&ca, &ca, "node-2.kube-migros-agent"), "node-1"),
            Err(Error::OtherNode { .. })
        ));
        assert!(matches!(
            check(
                &material(&ca, &replaced, "node-1.kube-migros-agent"),
                "node-1"
            ),
            Err(Error::OtherCa)
        ));
    }
}
