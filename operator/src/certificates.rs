//! The mutual-TLS material of the operator and the agents when no `--tls-dir` is given: at its first
//! start as leader the operator makes a CA, a certificate for itself and one for the agents, and
//! keeps them in two Secrets of its namespace (the agents mount only theirs). The CA key is not kept:
//! to rotate, delete both Secrets and restart the operator and the agents.

use std::collections::BTreeMap;

use agent_api::{
    identity::{AGENT_COMMON_NAME, OPERATOR_COMMON_NAME},
    pki::{Ca, Leaf, Pem, Usage},
    tls::{AGENT_SERVER_NAME, TlsMaterial},
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Secret with the operator's client certificate (`ca.crt`, `tls.crt`, `tls.key`).
pub const OPERATOR_SECRET: &str = "kube-migros-operator-tls";
/// Secret with the agents' certificate (`ca.crt`, `tls.crt`, `tls.key`), mounted by the DaemonSet.
pub const AGENT_SECRET: &str = "kube-migros-agent-tls";

/// Errors while making or reading the Secrets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Generate(#[from] agent_api::pki::Error),
    #[error("Secret {0}: {1}")]
    Kube(String, #[source] kube::Error),
    #[error(
        "Secret {0}/kube-migros-agent-tls exists without {0}/kube-migros-operator-tls; delete it to have both made again"
    )]
    Orphan(String),
    #[error("Secret {namespace}/{name} lacks {key}; delete it to have it made again")]
    Incomplete {
        namespace: String,
        name: String,
        key: String,
    },
}

/// The operator's TLS material, from its Secret, made first if there is none.
pub async fn ensure(client: &Client, namespace: &str) -> Result<TlsMaterial, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = get(&api, OPERATOR_SECRET).await? {
        return material(namespace, &secret);
    }
    let ca = Ca::new("kube-migros-ca")?;
    let operator = ca.issue(&Leaf {
        common_name: OPERATOR_COMMON_NAME,
        usage: Some(Usage::Client),
        ..Default::default()
    })?;
    let agent = ca.issue(&Leaf {
        common_name: AGENT_COMMON_NAME,
        dns_names: &[AGENT_SERVER_NAME],
        usage: Some(Usage::Both),
        ..Default::default()
    })?;
    // The agents' Secret first: once the operator's exists, both do.
    let params = PostParams::default();
    match api
        .create(&params, &tls_secret(AGENT_SECRET, &ca.pem().cert, &agent))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return Err(Error::Orphan(namespace.into())),
        Err(e) => return Err(Error::Kube(AGENT_SECRET.into(), e)),
    }
    match api
        .create(
            &params,
            &tls_secret(OPERATOR_SECRET, &ca.pem().cert, &operator),
        )
        .await
    {
        Ok(_) => Ok(TlsMaterial::from_pem(
            ca.pem().cert.clone().into(),
            operator.cert.into(),
            operator.key.into(),
        )),
        Err(e) => Err(Error::Kube(OPERATOR_SECRET.into(), e)),
    }
}

async fn get(api: &Api<Secret>, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name)
        .await
        .map_err(|e| Error::Kube(name.into(), e))
}

fn tls_secret(name: &str, ca: &str, pem: &Pem) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", ca),
        ("tls.crt", &pem.cert),
        ("tls.key", &pem.key),
    ]
    .into_iter()
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
        type_: Some("kubernetes.io/tls".into()),
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
