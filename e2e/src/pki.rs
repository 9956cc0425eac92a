//! The sandbox cluster's certificates: a cluster CA, an etcd CA and a front-proxy CA, the serving and
//! client certificates each control-plane component needs, and the service-account signing key.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors while creating or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create certificate {name}: {source}")]
    Generate { name: String, source: rcgen::Error },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// A certificate authority whose certificate and key are files in the PKI directory.
pub struct Ca {
    name: &'static str,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both serving and client authentication (etcd peers, kubelets).
    Both,
}

/// One leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct Leaf<'a> {
    /// File stem: `<stem>.crt` and `<stem>.key`.
    pub stem: &'a str,
    /// Subject common name (the user name for client certificates).
    pub common_name: &'a str,
    /// Subject organisations (the groups for client certificates).
    pub organisations: &'a [&'a str],
    /// DNS names and IP addresses of a serving certificate.
    pub dns_names: &'a [&'a str],
    pub ips: &'a [IpAddr],
    pub usage: Usage,
}

impl Ca {
    /// Creates a new self-signed CA and writes `<name>.crt` and `<name>.key` into `dir`.
    pub fn create(dir: &Path, name: &'static str) -> Result<Self> {
        let gen_err = |source| Error::Generate {
            name: name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("kube-migros-sandbox-{name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        write(&dir.join(format!("{name}.crt")), &cert.pem())?;
        write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
        Ok(Self {
            name,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA created earlier by [`Ca::create`].
    pub fn load(dir: &Path, name: &'static str) -> Result<Self> {
        let gen_err = |source| Error::Generate {
            name: name.to_string(),
            source,
        };
        let cert = read(&dir.join(format!("{name}.crt")))?;
        let key = KeyPair::from_pem(&read(&dir.join(format!("{name}.key")))?).map_err(gen_err)?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(gen_err)?;
        Ok(Self { name, issuer })
    }

    /// Issues a leaf certificate and writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn issue(&self, dir: &Path, leaf: &Leaf<'_>) -> Result<()> {
        let gen_err = |source| Error::Generate {
            name: leaf.stem.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        for org in leaf.organisations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        for dns in leaf.dns_names {
            let name = (*dns).try_into().map_err(gen_err)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(leaf.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match leaf.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Both => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        };
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        write(&dir.join(format!("{}.crt", leaf.stem)), &cert.pem())?;
        write_private(
            &dir.join(format!("{}.key", leaf.stem)),
            &key.serialize_pem(),
        )
    }
}

/// Writes a new service-account signing key pair: `sa.key` (private) and `sa.pub`.
pub fn create_service_account_key(dir: &Path) -> Result<()> {
    let key = KeyPair::generate().map_err(|source| Error::Generate {
        name: "service-account key".into(),
        source,
    })?;
    write_private(&dir.join("sa.key"), &key.serialize_pem())?;
    write(&dir.join("sa.pub"), &key.public_key_pem())
}

/// Reads a PEM (or any text) file of the PKI directory.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_leaf_is_signed_by_a_reloaded_ca() {
        let dir = tempfile::tempdir().unwrap();
        Ca::create(dir.path(), "ca").unwrap();
        let ca = Ca::load(dir.path(), "ca").unwrap();
        let leaf = Leaf {
            stem: "server",
            common_name: "server",
            organisations: &[],
            dns_names: &["localhost"],
            ips: &["127.0.0.1".parse().unwrap()],
            usage: Usage::Server,
        };
        ca.issue(dir.path(), &leaf).unwrap();
        let cert = read(&dir.path().join("server.crt")).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let key_mode = std::fs::metadata(dir.path().join("server.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
    }
}
