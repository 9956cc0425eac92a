//! The operator's admission webhooks over HTTPS (every replica serves them, leading or not):
//! `POST /pods` checks pod creation, `POST /evictions` answers evictions (the decisions are in
//! `admission.rs`; the configuration, failure policies and what a drain sees are in docs/drain.md).

use std::{path::Path, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use crds::{PodMigration, PodMigrationSpec};
use futures::StreamExt;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::{WatchStreamExt, reflector, watcher},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    admission::{self, EVICTED_POD_UID_ANNOTATION, EvictionVerdict, Policy, Verdict},
    movable,
};

/// What the webhooks read.
#[derive(Clone)]
pub struct Webhooks {
    client: Client,
    /// Every PodMigration, as watched: which ones a pod creation must look at.
    migrations: reflector::Store<PodMigration>,
    policy: Policy,
    /// Migrations tried per pod for evictions before an eviction is refused.
    attempts: u32,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Starts watching the PodMigrations (of `namespace`, or all); the watch runs until the
    /// process ends.
    pub fn new(client: Client, namespace: Option<&str>, policy: Policy, attempts: u32) -> Self {
        let api: Api<PodMigration> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (migrations, writer) = reflector::store();
        let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| futures::future::ready(()));
        tokio::spawn(events);
        Self {
            client,
            migrations,
            policy,
            attempts,
        }
    }

    async fn pod_created(&self, req: &AdmissionRequest<DynamicObject>) -> Verdict {
        let Some(pod) = req
            .object
            .as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .and_then(|v| serde_json::from_value::<Pod>(v).ok())
        else {
            return Verdict::Allow;
        };
        if req.operation != Operation::Create || admission::controller_of(&pod).is_none() {
            return Verdict::Allow;
        }
        let ns = req.namespace.clone().unwrap_or_default();
        let mut pod = pod;
        pod.metadata.namespace.get_or_insert(ns.clone());
        if tokio::time::timeout(Duration::from_secs(2), self.migrations.wait_until_ready())
            .await
            .is_err()
        {
            return unavailable("the PodMigrations are not read yet");
        }
        let cached = self.migrations.state();
        let cached: Vec<&PodMigration> = cached.iter().map(AsRef::as_ref).collect();
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), &ns);
        let mut fresh = Vec::new();
        for pm in admission::candidates(&pod, &cached) {
            if admission::restoring(pm) {
                fresh.push(pm.clone());
                continue;
            }
            // The cache may not have the commit yet: read it from the API server.
            match api.get_opt(&pm.name_any()).await {
                Ok(Some(pm)) => fresh.push(pm),
                Ok(None) => {}
                Err(e) => return unavailable(&format!("reading PodMigration: {e}")),
            }
        }
        admission::pod_create(&pod, &fresh)
    }

    async fn evicted(&self, req: &AdmissionRequest<DynamicObject>) -> Verdict {
        let ns = req.namespace.clone().unwrap_or_default();
        match self.decide_eviction(&ns, &req.name, req.dry_run).await {
            Ok(verdict) => verdict,
            Err(e) => {
                warn!(pod = %format!("{ns}/{}", req.name), error = %e, "cannot answer an eviction");
                Verdict::Deny {
                    code: 500,
                    reason: "InternalError",
                    message: format!(
                        "kube-migros could not decide whether to migrate the pod: {e}"
                    ),
                }
            }
        }
    }

    async fn decide_eviction(&self, ns: &str, name: &str, dry_run: bool) -> kube::Result<Verdict> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let Some(pod) = pods.get_opt(name).await? else {
            return Ok(Verdict::Allow);
        };
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), ns);
        let migrations = api
            .list(&ListParams::default().fields(&format!("spec.podName={name}")))
            .await?
            .items;
        let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let mut claims = Vec::new();
        for claim in movable::claim_names(&pod) {
            claims.extend(claims_api.get_opt(&claim).await?);
        }
        let mut names: Vec<String> = migrations
            .iter()
            .filter_map(|pm| pm.status.as_ref()?.source_node.clone())
            .chain(pod.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        names.sort();
        names.dedup();
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let mut cordoned = std::collections::BTreeMap::new();
        for node in names {
            let unschedulable = nodes_api
                .get_opt(&node)
                .await?
                .map(|n| n.spec.and_then(|s| s.unschedulable).unwrap_or(false));
            cordoned.insert(node, unschedulable);
        }
        let cordoned = cordoned
            .into_iter()
            .filter_map(|(node, unschedulable)| Some((node, unschedulable?)))
            .collect();
        let decision = admission::eviction(&admission::Eviction {
            pod: &pod,
            migratable: self.policy.migratable(&pod),
            unmovable: movable::why_not(&pod, &claims),
            migrations: &migrations,
            cordoned: &cordoned,
            attempts: self.attempts,
        });
        if let EvictionVerdict::Migrate {
            name: pm_name,
            attempt,
        } = &decision
            && !dry_run
        {
            let pm = drain_migration(&pod, pm_name);
            match api.create(&PostParams::default(), &pm).await {
                Ok(_) => {
                    info!(pod = %format!("{ns}/{name}"), migration = %pm_name, attempt, "eviction: migrating the pod")
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        debug!(pod = %format!("{ns}/{name}"), ?decision, "eviction answered");
        Ok(decision.verdict())
    }
}

/// The PodMigration an eviction of `pod` creates.
fn drain_migration(pod: &Pod, name: &str) -> PodMigration {
    let mut pm = PodMigration::new(
        name,
        PodMigrationSpec {
            pod_name: pod.name_any(),
            target_node: None,
            strategy: Default::default(),
            network: Default::default(),
            timeout_seconds: crds::DEFAULT_TIMEOUT_SECONDS,
            compression: Default::default(),
            bandwidth_limit: None,
        },
    );
    pm.metadata.namespace = pod.namespace();
    pm.metadata.labels = Some(
        [(
            admission::REASON_LABEL.to_string(),
            admission::REASON_EVICTION.to_string(),
        )]
        .into(),
    );
    pm.metadata.annotations = Some(
        [(
            EVICTED_POD_UID_ANNOTATION.to_string(),
            pod.uid().unwrap_or_default(),
        )]
        .into(),
    );
    pm
}

fn unavailable(why: &str) -> Verdict {
    Verdict::Deny {
        code: 503,
        reason: "ServiceUnavailable",
        message: format!("kube-migros cannot check this pod now ({why}); try again"),
    }
}

fn respond(
    req: &AdmissionRequest<DynamicObject>,
    verdict: Verdict,
) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::from(req);
    if let Verdict::Deny {
        code,
        reason,
        message,
    } = verdict
    {
        response = response.deny(message);
        response.result.code = code;
        response.result.reason = reason.to_string();
    }
    response.into_review()
}

type Review = Json<AdmissionReview<DynamicObject>>;

async fn pods(State(hooks): State<Arc<Webhooks>>, Json(review): Review) -> Review {
    Json(match review.try_into() {
        Ok(req) => {
            let verdict = hooks.pod_created(&req).await;
            if let Verdict::Deny { message, .. } = &verdict {
                info!(namespace = ?req.namespace, %message, "refused a pod");
            }
            respond(&req, verdict)
        }
        Err(e) => AdmissionResponse::invalid(e.to_string()).into_review(),
    })
}

async fn evictions(State(hooks): State<Arc<Webhooks>>, Json(review): Review) -> Review {
    Json(match review.try_into() {
        Ok(req) => {
            let verdict = hooks.evicted(&req).await;
            respond(&req, verdict)
        }
        Err(e) => AdmissionResponse::invalid(e.to_string()).into_review(),
    })
}

/// Errors of the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate {path}: {source}")]
    Pem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("webhook listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The server's TLS configuration from `dir`/tls.crt and `dir`/tls.key.
pub fn tls_config(dir: &Path) -> Result<rustls::ServerConfig, Error> {
    let pem = |name: &str| {
        let path = dir.join(name);
        (path.display().to_string(), path)
    };
    let (crt_name, crt) = pem("tls.crt");
    let certs = CertificateDer::pem_file_iter(&crt)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::Pem {
            path: crt_name,
            source,
        })?;
    let (key_name, key) = pem("tls.key");
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|source| Error::Pem {
        path: key_name,
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(config)
}

/// Serves the webhooks on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    hooks: Webhooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/pods", post(pods))
        .route("/evictions", post(evictions))
        .with_state(Arc::new(hooks));
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(e) => {
                    debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}
