//! The signer of the agents' certificates (signer name `migros.io/agent`): an agent asks for a
//! certificate of its node with a CertificateSigningRequest; the leader approves and signs it
//! only when the API server vouches that the request came from the agents' service account with
//! a token bound to a pod on that very node (`spec.username` and the
//! `authentication.kubernetes.io/node-name` extra, which the API server sets and the requester
//! cannot), and the request asks for exactly that node's name and usages. Anything else our agents
//! ask is denied with the reason; requests of other users are left alone (another installation's
//! agents may use the same signer name). So a compromised node can get a certificate of its own node only
//! (docs/node-agent.md, "Identity").

use std::time::Duration;

use agent_api::{
    identity::AGENT_COMMON_NAME,
    pki::{Ca, Leaf, Request, Usage},
    tls,
};
use futures::TryStreamExt;
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The signer name of agent certificate requests.
pub const SIGNER_NAME: &str = "migros.io/agent";
/// The extra the API server adds to a service-account user whose token is bound to a pod: the
/// pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Key usages an agent certificate may ask for; it must ask for both authentications.
const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Signs agent certificates with the CA the agents trust.
pub struct Signer {
    ca: Ca,
    /// The only user that may ask: `system:serviceaccount:<namespace>:<agents' account>`.
    username: String,
    /// Longest lifetime given; also the lifetime of a request that asks for none.
    max_lifetime: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("username", &self.username)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

/// What a request that passed [`Signer::judge`] gets.
#[derive(Debug)]
pub struct Grant {
    pub node: String,
    pub lifetime: Duration,
    request: Request,
}

impl Signer {
    pub fn new(ca: Ca, username: impl Into<String>, max_lifetime: Duration) -> Self {
        Self {
            ca,
            username: username.into(),
            max_lifetime,
        }
    }

    /// Whether `csr` may have a certificate, and of which node; the reason if not.
    pub fn judge(&self, csr: &CertificateSigningRequest) -> Result<Grant, String> {
        let spec = &csr.spec;
        let user = spec.username.as_deref().unwrap_or_default();
        if user != self.username {
            return Err(format!(
                "requested by {user:?}; only the agents' service account {:?} may ask",
                self.username
            ));
        }
        let nodes = spec
            .extra
            .as_ref()
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .cloned()
            .unwrap_or_default();
        let [node] = nodes.as_slice() else {
            return Err(format!(
                "the requester's token names {} nodes (extra {NODE_NAME_EXTRA}); an agent's token is bound to its pod, on one node",
                nodes.len()
            ));
        };
        let pem = std::str::from_utf8(&spec.request.0)
            .map_err(|_| "the request is not PEM text".to_string())?;
        let request =
            Request::from_pem(pem).map_err(|e| format!("the request does not parse: {e}"))?;
        if request.common_name().as_deref() != Some(AGENT_COMMON_NAME)
            || request.other_subject_attributes() != 0
        {
            return Err(format!(
                "the subject must be CN={AGENT_COMMON_NAME} alone, not {:?}",
                request.common_name()
            ));
        }
        let want = format!("DNS:{}", tls::agent_server_name(node));
        if request.names() != [want.clone()] {
            return Err(format!(
                "the request names {:?}; an agent on node {node} may have {want} only",
                request.names()
            ));
        }
        let usages = spec.usages.clone().unwrap_or_default();
        if let Some(extra) = usages.iter().find(|u| !USAGES.contains(&u.as_str())) {
            return Err(format!("usage {extra:?} is not an agent's"));
        }
        if !["server auth", "client auth"]
            .iter()
            .all(|u| usages.iter().any(|have| have == u))
        {
            return Err("an agent certificate needs both server auth and client auth".into());
        }
        let asked = spec
            .expiration_seconds
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(self.max_lifetime);
        Ok(Grant {
            node: node.clone(),
            lifetime: asked.min(self.max_lifetime),
            request,
        })
    }

    /// The certificate (PEM) of `grant`: CN kube-migros-agent, the node's name only.
    pub fn sign(&self, grant: &Grant) -> Result<String, agent_api::pki::Error> {
        let name = tls::agent_server_name(&grant.node);
        self.ca.sign(
            &grant.request,
            &Leaf {
                common_name: AGENT_COMMON_NAME,
                dns_names: &[&name],
                usage: Some(Usage::Both),
                ..Default::default()
            },
            grant.lifetime,
        )
    }
}

/// Approves and signs, or denies, the agents' requests until `stop`.
pub async fn run(client: Client, signer: Signer, stop: CancellationToken) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let requests = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects();
    let mut requests = std::pin::pin!(requests);
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = requests.try_next() => next,
        };
        match next {
            Ok(Some(csr)) => {
                if let Err(e) = handle(&api, &signer, &csr).await {
                    warn!(csr = %csr.name_any(), error = %e, "cannot answer a certificate request");
                }
            }
            Ok(None) => return,
            Err(e) => warn!(error = %e, "watching certificate requests"),
        }
    }
}

/// One request: nothing if it was answered already.
async fn handle(
    api: &Api<CertificateSigningRequest>,
    signer: &Signer,
    csr: &CertificateSigningRequest,
) -> Result<(), kube::Error> {
    let name = csr.name_any();
    let status = csr.status.clone().unwrap_or_default();
    if status.certificate.as_ref().is_some_and(|c| !c.0.is_empty()) {
        return Ok(());
    }
    let conditions = status.conditions.unwrap_or_default();
    let holds = |kind: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    if holds("Denied") || holds("Failed") {
        return Ok(());
    }
    // Another user's request is not ours to answer (another installation's agents may use the same
    // signer name): left for its own signer.
    if csr.spec.username.as_deref() != Some(signer.username.as_str()) {
        debug!(csr = %name, user = ?csr.spec.username, "not a request of our agents; left alone");
        return Ok(());
    }
    let grant = match signer.judge(csr) {
        Ok(grant) => grant,
        Err(why) => {
            warn!(csr = %name, reason = %why, "agent certificate request denied");
            // Approved by someone else: it still gets no certificate of ours.
            let (kind, subresource) = if holds("Approved") {
                ("Failed", "status")
            } else {
                ("Denied", "approval")
            };
            let patch = conditions_patch(&conditions, kind, "NotAnAgentOfThisNode", &why);
            return if subresource == "approval" {
                api.patch_approval(&name, &PatchParams::default(), &patch)
                    .await
                    .map(drop)
            } else {
                api.patch_status(&name, &PatchParams::default(), &patch)
                    .await
                    .map(drop)
            };
        }
    };
    if holds("Approved") {
        // The watch may show our own approval before our certificate: read the request again
        // rather than sign it twice.
        let fresh = api.get(&name).await?;
        if fresh
            .status
            .and_then(|s| s.certificate)
            .is_some_and(|c| !c.0.is_empty())
        {
            return Ok(());
        }
    } else {
        let message = format!("the agent of node {} asks for its own name", grant.node);
        let patch = conditions_patch(&conditions, "Approved", "AgentOfThisNode", &message);
        api.patch_approval(&name, &PatchParams::default(), &patch)
            .await?;
    }
    let certificate = match signer.sign(&grant) {
        Ok(pem) => pem,
        Err(e) => {
            warn!(csr = %name, error = %e, "cannot sign an agent certificate");
            return Ok(());
        }
    };
    let patch = Patch::Merge(serde_json::json!({
        "status": { "certificate": ByteString(certificate.into_bytes()) }
    }));
    api.patch_status(&name, &PatchParams::default(), &patch)
        .await?;
    info!(csr = %name, node = %grant.node, lifetime_s = grant.lifetime.as_secs(), "agent certificate issued");
    Ok(())
}

/// A merge patch of the status conditions: those there, and `kind` added.
fn conditions_patch(
    conditions: &[CertificateSigningRequestCondition],
    kind: &str,
    reason: &str,
    message: &str,
) -> Patch<serde_json::Value> {
    let now = Time(Timestamp::now());
    let mut all = conditions.to_vec();
    all.push(CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    });
    Patch::Merge(serde_json::json!({ "status": { "conditions": all } }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;

    const AGENTS: &str = "system:serviceaccount:kube-migros:kube-migros-agent";

    fn signer() -> Signer {
        Signer::new(
            Ca::new("test-ca").unwrap(),
            AGENTS,
            Duration::from_secs(86400),
        )
    }

    /// A request as the API server stores it: `names` asked by `user` whose token is bound to a
    /// pod on `node`.
    fn csr(user: &str, node: Option<&str>, cn: &str, names: &[&str]) -> CertificateSigningRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: SIGNER_NAME.into(),
                username: Some(user.into()),
                extra: node.map(|n| [(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])].into()),
                usages: Some(USAGES.map(String::from).to_vec()),
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_agent_of_a_node_gets_a_certificate_of_that_node() {
        let signer = signer();
        let grant = signer
            .judge(&csr(
                AGENTS,
                Some("node-1"),
                AGENT_COMMON_NAME,
                &["node-1.kube-migros-agent"],
            ))
            .unwrap();
        assert_eq!(grant.node, "node-1");
        assert_eq!(grant.lifetime, Duration::from_secs(3600));
        let pem = signer.sign(&grant).unwrap();
        let material = agent_api::tls::TlsMaterial::from_pem(vec![], pem.into_bytes(), vec![]);
        assert_eq!(material.node().unwrap(), "node-1");
    }

    #[test]
    fn anything_else_is_denied_with_the_reason() {
        let signer = signer();
        let name = ["node-1.kube-migros-agent"];
        let cases = [
            (
                "another node's name",
                csr(AGENTS, Some("node-2"), AGENT_COMMON_NAME, &name),
                "may have DNS:node-2.kube-migros-agent only",
            ),
            (
                "a token not bound to a pod",
                csr(AGENTS, None, AGENT_COMMON_NAME, &name),
                "names 0 nodes",
            ),
            (
                "another user",
                csr(
                    "system:serviceaccount:default:default",
                    Some("node-1"),
                    AGENT_COMMON_NAME,
                    &name,
                ),
                "only the agents' service account",
            ),
            (
                "the operator's name",
                csr(AGENTS, Some("node-1"), "kube-migros-operator", &name),
                "CN=kube-migros-agent",
            ),
            (
                "a second name",
                csr(
                    AGENTS,
                    Some("node-1"),
                    AGENT_COMMON_NAME,
                    &["node-1.kube-migros-agent", "node-2.kube-migros-agent"],
                ),
                "may have DNS:node-1.kube-migros-agent only",
            ),
        ];
        for (what, request, reason) in cases {
            let why = signer.judge(&request).map(|g| g.node).unwrap_err();
            assert!(why.contains(reason), "{what}: {why}");
        }
        let mut signing = csr(AGENTS, Some("node-1"), AGENT_COMMON_NAME, &name);
        signing.spec.usages = Some(vec!["client auth".into(), "cert sign".into()]);
        assert!(signer.judge(&signing).is_err(), "a CA usage");
        // One character of the signature changed (inside its last integer): the request still
        // parses, but its signature no longer matches the key it names.
        let mut forged = csr(AGENTS, Some("node-1"), AGENT_COMMON_NAME, &name);
        let mut pem = String::from_utf8(forged.spec.request.0.clone()).unwrap();
        let end = pem.find("-----END").unwrap();
        let at = pem[..end].trim_end().len() - 12;
        let was = pem.as_bytes()[at];
        let now = if was == b'A' { "B" } else { "A" };
        pem.replace_range(at..at + 1, now);
        forged.spec.request = ByteString(pem.into_bytes());
        let why = signer.judge(&forged).map(|g| g.node).unwrap_err();
        assert!(why.contains("does not parse"), "a tampered request: {why}");
    }

    #[test]
    fn the_lifetime_is_capped() {
        let signer = signer();
        let mut long = csr(
            AGENTS,
            Some("node-1"),
            AGENT_COMMON_NAME,
            &["node-1.kube-migros-agent"],
        );
        long.spec.expiration_seconds = Some(10 * 86400);
        assert_eq!(
            signer.judge(&long).unwrap().lifetime,
            Duration::from_secs(86400)
        );
    }
}
