//! Finding and calling the node agents. Each agent announces itself with a Lease named
//! `kube-migros-agent-<node>` in the operator's namespace (renewed while it lives, annotated with its
//! gRPC endpoint); the operator watches those Leases into a cache, dials an agent over mutual TLS,
//! keeps one channel per endpoint and asks for steps with the typed client of `agent_api`.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use agent_api::{Step, StepArgs, client::Client as AgentClient, tls::TlsMaterial, v1};
use crds::discovery::{ENDPOINT_ANNOTATION, LEASE_LABEL, LEASE_PREFIX};
use futures::StreamExt;
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tonic::transport::Channel;

use crate::statemachine::Answer;

/// How long one agent call may take; steps that take longer answer RUNNING and are polled.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The agents of the cluster, as the operator reaches them.
pub struct Agents {
    leases: Api<Lease>,
    /// The agents' Leases as watched (asked directly only until the first listing is in).
    cache: Store<Lease>,
    watch: tokio::task::JoinHandle<()>,
    tls: TlsMaterial,
    /// One channel per (node, endpoint): the node is the name the agent's certificate must carry.
    channels: Mutex<BTreeMap<(String, String), Channel>>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents").finish_non_exhaustive()
    }
}

impl Agents {
    /// Agents announce themselves in `namespace` (the operator's own).
    pub fn new(client: Client, namespace: &str, tls: TlsMaterial) -> Self {
        let leases: Api<Lease> = Api::namespaced(client, namespace);
        let (cache, writer) = reflector::store();
        let events = reflector::reflector(
            writer,
            watcher(
                leases.clone(),
                watcher::Config::default().labels(LEASE_LABEL),
            ),
        )
        .default_backoff();
        let watch = tokio::spawn(events.for_each(|_| futures::future::ready(())));
        Self {
            leases,
            cache,
            watch,
            tls,
            channels: Mutex::default(),
        }
    }

    /// The cache, once its first listing is in (a moment after the start).
    async fn cached(&self) -> Option<&Store<Lease>> {
        tokio::time::timeout(Duration::from_secs(2), self.cache.wait_until_ready())
            .await
            .is_ok_and(|ready| ready.is_ok())
            .then_some(&self.cache)
    }

    /// Nodes with a live agent, and the agent's endpoint.
    pub async fn live(&self) -> Result<BTreeMap<String, String>, kube::Error> {
        let now = Timestamp::now();
        if let Some(cache) = self.cached().await {
            return Ok(cache
                .state()
                .iter()
                .filter_map(|lease| live_endpoint(lease, now))
                .collect());
        }
        let leases = self
            .leases
            .list(&ListParams::default().labels(LEASE_LABEL))
            .await?;
        Ok(leases
            .items
            .iter()
            .filter_map(|lease| live_endpoint(lease, now))
            .collect())
    }

    /// The endpoint of the agent on `node`, or why there is none.
    pub async fn endpoint(&self, node: &str) -> Result<String, String> {
        let name = format!("{LEASE_PREFIX}{node}");
        let lease = match self.cached().await {
            Some(cache) => {
                let key = ObjectRef::new(&name).within(self.leases.namespace().unwrap_or_default());
                cache.get(&key).map(|l| (*l).clone())
            }
            None => self
                .leases
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading Lease {name}: {e}"))?,
        };
        let lease = lease.ok_or_else(|| format!("no kube-migros agent runs on node {node}"))?;
        live_endpoint(&lease, Timestamp::now())
            .map(|(_, endpoint)| endpoint)
            .ok_or_else(|| {
                format!("the kube-migros agent on node {node} stopped renewing its Lease")
            })
    }

    /// What the agent of `node`, at `endpoint`, reports about its node.
    pub async fn capabilities(
        &self,
        node: &str,
        endpoint: &str,
    ) -> Result<v1::NodeCapabilities, String> {
        let mut client = self.client(node, endpoint)?;
        match tokio::time::timeout(CALL_TIMEOUT, client.capabilities()).await {
            Ok(Ok(capabilities)) => Ok(capabilities),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
        }
    }

    /// Asks the agent of `node`, at `endpoint`, for `step` of the migration in `args`.
    pub async fn call(&self, node: &str, endpoint: &str, step: Step, args: &StepArgs) -> Answer {
        let mut client = match self.client(node, endpoint) {
            Ok(client) => client,
            Err(e) => return Answer::Unreachable(e),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.step(step, args)).await {
            Ok(Ok(op)) => answer(op),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                Answer::Unreachable(status.message().to_string())
            }
            // Memory is a question: only its answer FAILED says the memory cannot come; a call
            // that fails says nothing of it and is asked again.
            Ok(Err(status)) if step == Step::Memory => {
                Answer::Unreachable(format!("{}: {}", status.code(), status.message()))
            }
            Ok(Err(status)) => Answer::Failed(format!("{}: {}", status.code(), status.message())),
            Err(_) => Answer::Unreachable(format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
        }
    }

    /// A client of the agent of `node`: whatever answers at `endpoint` must present a certificate
    /// naming that node.
    fn client(&self, node: &str, endpoint: &str) -> Result<AgentClient, String> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| "agent channel cache poisoned".to_string())?;
        let key = (node.to_string(), endpoint.to_string());
        if let Some(channel) = channels.get(&key) {
            return Ok(AgentClient::new(channel.clone()));
        }
        let channel = self
            .tls
            .endpoint(endpoint, node)
            .map_err(|e| format!("agent endpoint {endpoint}: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(AgentClient::new(channel))
    }
}

fn answer(op: v1::Operation) -> Answer {
    match op.state() {
        v1::State::Succeeded => Answer::Succeeded(op),
        v1::State::Running => Answer::Running {
            bytes_done: op.bytes_done,
            bytes_total: op.bytes_total,
        },
        v1::State::Failed if op.source_resumed => Answer::SourceResumed(op.message),
        v1::State::Failed if op.rxe_outside_block => Answer::RxeOutsideBlock(op.message),
        v1::State::Failed => Answer::Failed(op.message),
        v1::State::Unspecified => {
            Answer::Failed(format!("the agent answered no state: {}", op.message))
        }
    }
}

/// `(node, endpoint)` of a Lease that its agent renewed within its duration.
fn live_endpoint(lease: &Lease, now: Timestamp) -> Option<(String, String)> {
    let node = lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(LEASE_PREFIX)?
        .to_string();
    let endpoint = lease
        .metadata
        .annotations
        .as_ref()?
        .get(ENDPOINT_ANNOTATION)?
        .clone();
    let spec = lease.spec.as_ref()?;
    // The agent holds its node's Lease (an admission policy keeps agents off other nodes' Leases).
    if spec.holder_identity.as_deref() != Some(node.as_str()) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expires = renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(duration))
        .ok()?;
    (expires > now).then_some((node, endpoint))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };
    use kube::api::ObjectMeta;

    fn lease(node: &str, renewed_secs_ago: i64) -> Lease {
        let renewed =
            Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
        Lease {
            metadata: ObjectMeta {
                name: Some(format!("{LEASE_PREFIX}{node}")),
                annotations: Some(
                    [(ENDPOINT_ANNOTATION.to_string(), "10.0.0.1:7443".to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(10),
                holder_identity: Some(node.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_fresh_lease_names_a_live_agent_and_a_stale_one_does_not() {
        let now = Timestamp::now();
        assert_eq!(
            live_endpoint(&lease("node-1", 2), now),
            Some(("node-1".into(), "10.0.0.1:7443".into()))
        );
        assert_eq!(live_endpoint(&lease("node-1", 30), now), None);
    }

    #[test]
    fn a_lease_held_for_another_node_names_no_agent() {
        let mut held = lease("node-1", 2);
        held.spec.as_mut().unwrap().holder_identity = Some("node-2".into());
        assert_eq!(live_endpoint(&held, Timestamp::now()), None);
        held.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(live_endpoint(&held, Timestamp::now()), None);
    }
}
