//! Certificates for mutual TLS, made with rcgen: a CA, and leaf certificates it signs for servers,
//! clients or both. Everything stays PEM text in memory; callers decide where it goes (files of the
//! sandbox, or Secrets the operator creates).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot create certificate {name}: {source}")]
pub struct Error {
    name: String,
    source: rcgen::Error,
}

fn err(name: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error {
        name: name.to_string(),
        source,
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both serving and client authentication (etcd peers, node agents).
    Both,
}

/// One leaf certificate to issue.
#[derive(Debug, Clone, Default)]
pub struct Leaf<'a> {
    /// Subject common name (the user name of a client certificate).
    pub common_name: &'a str,
    /// Subject organisations (the groups of a client certificate).
    pub organisations: &'a [&'a str],
    /// DNS names and IP addresses of a serving certificate.
    pub dns_names: &'a [&'a str],
    pub ips: &'a [IpAddr],
    pub usage: Option<Usage>,
}

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(err(common_name))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(err(common_name))?;
        let pem = Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A CA made earlier, from its PEM certificate and key.
    pub fn from_pem(pem: Pem) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&pem.key).map_err(err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert, key).map_err(err("CA certificate"))?;
        Ok(Self { issuer, pem })
    }

    /// The CA's certificate and key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// Issues a leaf certificate with a new key.
    pub fn issue(&self, leaf: &Leaf<'_>) -> Result<Pem, Error> {
        let name = leaf.common_name;
        let key = KeyPair::generate().map_err(err(name))?;
        let params = leaf_params(leaf)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err(name))?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Signs `leaf` over the key of `request` (whose own names are not used), valid from five
    /// minutes ago (clocks differ) for `lifetime`: answers the certificate (PEM).
    pub fn sign(
        &self,
        request: &Request,
        leaf: &Leaf<'_>,
        lifetime: std::time::Duration,
    ) -> Result<String, Error> {
        let name = leaf.common_name;
        let mut params = leaf_params(leaf)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        // At most ten years: a duration the calendar arithmetic cannot overflow on.
        params.not_after =
            now + time::Duration::seconds(lifetime.as_secs().min(315_360_000) as i64);
        let cert = params
            .signed_by(&request.0.public_key, &self.issuer)
            .map_err(err(name))?;
        Ok(cert.pem())
    }
}

/// A PKCS#10 certificate request whose signature checked out (its sender holds the key).
pub struct Request(rcgen::CertificateSigningRequestParams);

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("common_name", &self.common_name())
            .field("names", &self.names())
            .finish()
    }
}

impl Request {
    /// Parses a PEM request and checks its signature.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        rcgen::CertificateSigningRequestParams::from_pem(pem)
            .map(Self)
            .map_err(err("certificate request"))
    }

    /// The subject's common name, if it has one.
    pub fn common_name(&self) -> Option<String> {
        match self.0.params.distinguished_name.get(&DnType::CommonName)? {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    /// The subject's other attributes (organisations, ...): how many.
    pub fn other_subject_attributes(&self) -> usize {
        self.0
            .params
            .distinguished_name
            .iter()
            .filter(|(t, _)| **t != DnType::CommonName)
            .count()
    }

    /// The subject alternative names, as text: `DNS:name`, `IP:address`, `URI:...`, `email:...`.
    pub fn names(&self) -> Vec<String> {
        self.0
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::URI(u) => format!("URI:{}", u.as_str()),
                SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
                other => format!("{other:?}"),
            })
            .collect()
    }
}

/// The parameters of a leaf certificate (its names and usages).
fn leaf_params(leaf: &Leaf<'_>) -> Result<CertificateParams, Error> {
    let name = leaf.common_name;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    for org in leaf.organisations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *org);
    }
    for dns in leaf.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName((*dns).try_into().map_err(err(name))?));
    }
    params
        .subject_alt_names
        .extend(leaf.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match leaf.usage.unwrap_or(Usage::Client) {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Both => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    Ok(params)
}

/// A new key pair for signing (service-account tokens): (private key PEM, public key PEM).
pub fn signing_key() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(err("signing key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use x509_parser::pem::parse_x509_pem;

    /// Whether the certificate `leaf` (PEM) carries a signature of the CA certificate `ca` (PEM).
    fn signed_by(leaf: &str, ca: &str) -> bool {
        let (_, leaf) = parse_x509_pem(leaf.as_bytes()).unwrap();
        let (_, ca) = parse_x509_pem(ca.as_bytes()).unwrap();
        let (leaf, ca) = (leaf.parse_x509().unwrap(), ca.parse_x509().unwrap());
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// The CA the Helm chart makes (`genCAWithKey` with an Ed25519 key, PKCS#8): the operator
    /// signs the agents' certificates with it. (An RSA key as `genCA` makes, PKCS#1, is one ring
    /// cannot load.)
    #[test]
    fn the_charts_ca_signs_agent_certificates() {
        let ca = Ca::from_pem(Pem {
            cert: include_str!("../testdata/helm-ca.crt").into(),
            key: include_str!("../testdata/helm-ca.key").into(),
        })
        .unwrap();
        let leaf = ca
            .issue(&Leaf {
                common_name: "kube-migros-agent",
                dns_names: &["node-1.kube-migros-agent"],
                usage: Some(Usage::Both),
                ..Default::default()
            })
            .unwrap();
        assert!(signed_by(
            &leaf.cert,
            include_str!("../testdata/helm-ca.crt")
        ));
    }

    #[test]
    fn a_reloaded_ca_signs_the_certificates_it_issues() {
        let ca = Ca::new("test-ca").unwrap();
        let again = Ca::from_pem(ca.pem().clone()).unwrap();
        let leaf = again
            .issue(&Leaf {
                common_name: "server",
                dns_names: &["localhost"],
                usage: Some(Usage::Server),
                ..Default::default()
            })
            .unwrap();
        assert!(
            signed_by(&leaf.cert, &ca.pem().cert),
            "not signed by the CA"
        );
        let other = Ca::new("test-ca").unwrap();
        assert!(
            !signed_by(&leaf.cert, &other.pem().cert),
            "another CA of the same name verifies it"
        );
        // The key is the leaf's own: its public half is the certificate's.
        let key = rcgen::KeyPair::from_pem(&leaf.key).unwrap();
        let (_, parsed) = parse_x509_pem(leaf.cert.as_bytes()).unwrap();
        let parsed = parsed.parse_x509().unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert_eq!(
            parsed
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "server"
        );
        assert!(!parsed.is_ca() && parse_ca(&ca.pem().cert));
    }

    fn parse_ca(pem: &str) -> bool {
        let (_, ca) = parse_x509_pem(pem.as_bytes()).unwrap();
        ca.parse_x509().unwrap().is_ca()
    }
}
