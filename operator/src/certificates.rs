//! The mutual-TLS material of the operator and the agents when no `--tls-dir` is given: at its first
//! start as leader the operator makes a CA and a certificate for itself, and keeps them in Secrets
//! of its namespace: the CA with its key (read by the operator only: it signs the agents'
//! certificate requests, `crate::signer`), its own certificate, and the CA certificate alone for
//! the agents, which request certificates of their own nodes. To rotate the CA, delete the three
//! Secrets and restart the operator and the agents.

use std::collections::BTreeMap;

use agent_api::{
    identity::OPERATOR_COMMON_NAME,
    pki::{Ca, Leaf, Pem, Usage},
    tls::TlsMaterial,
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Secret with the operator's client certificate (`ca.crt`, `tls.crt`, `tls.key`).
pub const OPERATOR_SECRET: &str = "kube-migros-operator-tls";
/// Secret with the CA certificate alone (`ca.crt`), mounted by the agents.
pub const AGENT_SECRET: &str = "kube-migros-agent-ca";
/// Secret with the CA's certificate and key (`tls.crt`, `tls.key`): the signer of the agents'
/// certificates.
pub const CA_SECRET: &str = "kube-migros-ca";

/// Errors while making or reading the Secrets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Generate(#[from] agent_api::pki::Error),
    #[error("Secret {0}: {1}")]
    Kube(String, #[source] kube::Error),
    #[error(
        "Secrets of {0} from an earlier start are incomplete or of an older layout (kube-migros-ca, kube-migros-operator-tls, kube-migros-agent-ca; an older operator made kube-migros-agent-tls instead of the first and last); delete them to have all three made again"
    )]
    Orphan(String),
    #[error("Secret {namespace}/{name} lacks {key}; delete it to have it made again")]
    Incomplete {
        namespace: String,
        name: String,
        key: String,
    },
}

/// The operator's TLS material and the CA that signs the agents' certificates, from their
/// Secrets, made first if there are none.
pub async fn ensure(client: &Client, namespace: &str) -> Result<(TlsMaterial, Ca), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = get(&api, OPERATOR_SECRET).await? {
        let ca = get(&api, CA_SECRET)
            .await?
            .ok_or_else(|| Error::Orphan(namespace.into()))?;
        let field = |key: &str| {
            ca.data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .ok_or_else(|| Error::Incomplete {
                    namespace: namespace.into(),
                    name: CA_SECRET.into(),
                    key: key.into(),
                })
        };
        let ca = Ca::from_pem(Pem {
            cert: field("tls.crt")?,
            key: field("tls.key")?,
        })?;
        return Ok((material(namespace, &secret)?, ca));
    }
    let ca = Ca::new("kube-migros-ca")?;
    let operator = ca.issue(&Leaf {
        common_name: OPERATOR_COMMON_NAME,
        usage: Some(Usage::Client),
        ..Default::default()
    })?;
    // The operator's Secret last: once it exists, all three do.
    let ca_pem = ca.pem().cert.clone();
    let secrets = [
        secret(
            CA_SECRET,
            &[("tls.crt", &ca_pem), ("tls.key", &ca.pem().key)],
        ),
        secret(AGENT_SECRET, &[("ca.crt", &ca_pem)]),
        secret(
            OPERATOR_SECRET,
            &[
                ("ca.crt", &ca_pem),
                ("tls.crt", &operator.cert),
                ("tls.key", &operator.key),
            ],
        ),
    ];
    let params = PostParams::default();
    for s in &secrets {
        let name = s.metadata.name.clone().unwrap_or_default();
        match api.create(&params, s).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 && name != OPERATOR_SECRET => {
                return Err(Error::Orphan(namespace.into()));
            }
            Err(e) => return Err(Error::Kube(name, e)),
        }
    }
    let material = TlsMaterial::from_pem(
        ca_pem.into_bytes(),
        operator.cert.into_bytes(),
        operator.key.into_bytes(),
    );
    Ok((material, ca))
}

async fn get(api: &Api<Secret>, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name)
        .await
        .map_err(|e| Error::Kube(name.into(), e))
}

fn secret(name: &str, entries: &[(&str, &str)]) -> Secret {
    let data: BTreeMap<String, ByteString> = entries
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "kube-migros".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// The TLS material in a Secret made by [`ensure`] (or by the Helm chart, which uses the same keys).
pub fn material(namespace: &str, secret: &Secret) -> Result<TlsMaterial, Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let data = secret.data.clone().unwrap_or_default();
    let field = |key: &str| {
        data.get(key)
            .map(|v| v.0.clone())
            .ok_or_else(|| Error::Incomplete {
                namespace: namespace.into(),
                name: name.clone(),
                key: key.into(),
            })
    };
    Ok(TlsMaterial::from_pem(
        field("ca.crt")?,
        field("tls.crt")?,
        field("tls.key")?,
    ))
}
