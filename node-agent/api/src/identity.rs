//! Who is calling an agent, read from the client certificate that mutual TLS verified. The
//! operator may call every step; a peer agent may only stream a checkpoint (`Receive`), and only
//! the agent of the migration's source node (its certificate names its node, [`agent_node`]).

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Common name of the operator's client certificate.
pub const OPERATOR_COMMON_NAME: &str = "kube-migros-operator";
/// Common name of every agent's certificate (it serves and calls peers with the same one); its
/// node is in its DNS name (`crate::tls::agent_server_name`).
pub const AGENT_COMMON_NAME: &str = "kube-migros-agent";

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Operator,
    Agent,
}

/// The caller of `request`, or `Unauthenticated` when it presented no certificate the CA signed
/// for the operator or an agent.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let common_name = common_name(leaf.as_ref())
        .ok_or_else(|| Status::unauthenticated("the client certificate has no common name"))?;
    caller_from_common_name(&common_name).ok_or_else(|| {
        Status::permission_denied(format!(
            "{common_name:?} is neither the operator nor an agent"
        ))
    })
}

/// Fails with `PermissionDenied` unless the caller is one of `allowed`.
pub fn require<T>(request: &Request<T>, allowed: &[Caller]) -> Result<Caller, Status> {
    let who = caller(request)?;
    if allowed.contains(&who) {
        Ok(who)
    } else {
        Err(Status::permission_denied(format!(
            "{who:?} may not call this method"
        )))
    }
}

/// The node of the calling agent: the one its certificate names. `PermissionDenied` for a
/// certificate that is not an agent's or names no single node.
pub fn agent_node<T>(request: &Request<T>) -> Result<String, Status> {
    if caller(request)? != Caller::Agent {
        return Err(Status::permission_denied("the caller is not an agent"));
    }
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    certs
        .first()
        .and_then(|leaf| node_of(leaf.as_ref()))
        .ok_or_else(|| Status::permission_denied("the agent's certificate names no node"))
}

/// The node an agent certificate (DER) names: its one DNS name `<node>.kube-migros-agent`. None
/// when it has none, or more than one (a certificate stands for one node).
pub fn node_of(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    let mut nodes = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => crate::tls::node_of_server_name(dns),
            _ => None,
        });
    let node = nodes.next()?;
    nodes.next().is_none().then(|| node.to_string())
}

fn caller_from_common_name(common_name: &str) -> Option<Caller> {
    match common_name {
        OPERATOR_COMMON_NAME => Some(Caller::Operator),
        AGENT_COMMON_NAME => Some(Caller::Agent),
        _ => None,
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_two_known_identities_are_callers() {
        assert_eq!(
            caller_from_common_name(OPERATOR_COMMON_NAME),
            Some(Caller::Operator)
        );
        assert_eq!(
            caller_from_common_name(AGENT_COMMON_NAME),
            Some(Caller::Agent)
        );
        assert_eq!(caller_from_common_name("kube-migros-agent-evil"), None);
        assert_eq!(caller_from_common_name(""), None);
    }

    #[test]
    fn an_agent_certificate_names_exactly_one_node() {
        let ca = crate::pki::Ca::new("test-ca").unwrap();
        let der = |dns_names: &[&str]| {
            let pem = ca
                .issue(&crate::pki::Leaf {
                    common_name: AGENT_COMMON_NAME,
                    dns_names,
                    ..Default::default()
                })
                .unwrap();
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            CertificateDer::from_pem_slice(pem.cert.as_bytes())
                .unwrap()
                .to_vec()
        };
        assert_eq!(
            node_of(&der(&["node-1.kube-migros-agent"])),
            Some("node-1".into())
        );
        assert_eq!(node_of(&der(&["kube-migros-agent"])), None);
        assert_eq!(
            node_of(&der(&[
                "node-1.kube-migros-agent",
                "node-2.kube-migros-agent"
            ])),
            None
        );
        assert_eq!(node_of(&der(&["node-1.example.com"])), None);
    }

    #[test]
    fn a_request_without_certificates_is_unauthenticated() {
        let status = caller(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
