//! Who is calling an agent, read from the client certificate that mutual TLS verified. The
//! operator may call every step; a peer agent may only stream a checkpoint (`Receive`).

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Common name of the operator's client certificate.
pub const OPERATOR_COMMON_NAME: &str = "kube-migros-operator";
/// Common name of every agent's certificate (it serves and calls peers with the same one).
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
    fn a_request_without_certificates_is_unauthenticated() {
        let status = caller(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
