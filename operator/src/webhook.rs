//! The operator's admission webhooks over HTTPS (every replica serves them, leading or not):
//! `POST /pods` checks pod creation, `POST /evictions` answers evictions (the decisions are in
//! `admission.rs`; the configuration, failure policies and what a drain sees are in docs/drain.md).

use std::{path::Path, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use crds::{PodMigration, PodMigrationSpec};
use futures::StreamExt;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use k8s_openapi::api::core::v1::{Node, Pod};
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
        let now = k8s_openapi::jiff::Timestamp::now();
        if admission::candidates(&pod, &cached, now).is_empty() {
            debug!(pod = %pod.name_any(), migrations = cached.len(), "a pod of a controller: none of its migrations in flight");
            return Verdict::Allow;
        }
        // A migration of this controller's pods is in flight: decide on the namespace's
        // migrations as the API server has them now (the watch may not have the commit yet).
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), &ns);
        let fresh = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => return unavailable(&format!("listing PodMigrations: {e}")),
        };
        let verdict = admission::pod_create(&pod, &fresh, now);
        if verdict == Verdict::Allow {
            debug!(pod = %pod.name_any(), "a pod of a controller: none of its migrations restores it");
        }
        verdict
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
        let claims = movable::claims(&self.client, &pod).await?;
        let mut names: Vec<String> = migrations
            .iter()
            .filter_map(|pm| pm.status.as_ref()?.source_node.clone())
            .chain(pod.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        names.sort();
        names.dedup();
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let mut draining = std::collections::BTreeMap::new();
        for node in names {
            if let Some(n) = nodes_api.get_opt(&node).await? {
                draining.insert(node, being_drained(&n));
            }
        }
        let decision = admission::eviction(&admission::Eviction {
            pod: &pod,
            migratable: self.policy.migratable(&pod),
            unmovable: movable::why_not(&pod, &claims),
            migrations: &migrations,
            draining: &draining,
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

/// Whether `node` is being drained: cordoned, or tainted NoSchedule or NoExecute (as cluster
/// autoscalers mark a node they remove).
fn being_drained(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.unschedulable).unwrap_or(false)
        || spec.and_then(|s| s.taints.as_ref()).is_some_and(|t| {
            t.iter()
                .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        })
}

/// The PodMigration an eviction of `pod` creates.
fn drain_migration(pod: &Pod, name: &str) -> PodMigration {
    let mut pm = PodMigration::new(name, PodMigrationSpec::of_pod(&pod.name_any()));
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

/// Connections served at once, at most.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to finish its TLS handshake, and to send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    // The API server keeps a few connections; a client that never finishes holds none for long.
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "too many webhook connections; closing one");
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}
