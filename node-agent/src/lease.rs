//! The agent's Lease: how an agent tells the operator it lives and where. A Lease
//! `kube-migros-agent-<node>` in the operator's namespace, annotated with the agent's gRPC endpoint
//! and the checkpoints it keeps (`kubectl migros status` lists them), renewed while the agent runs.
//! The operator treats a node whose Lease expired as having no agent. An agent that stops deletes its
//! Lease; one that runs as a pod also names the pod as the Lease's owner, so that the garbage
//! collector removes the Lease of an agent that was killed (e.g. by `helm uninstall`).

use std::{collections::BTreeMap, time::Duration};

use crds::discovery::{
    ENDPOINT_ANNOTATION, KEPT_ANNOTATION, KeptCheckpoint, LEASE_LABEL, LEASE_PREFIX,
};
use tokio::sync::watch;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
};

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "kube-migros-agent";

/// An agent's Lease, as the agent keeps it.
#[derive(Debug, Clone)]
pub struct AgentLease {
    pub namespace: String,
    pub node: String,
    pub endpoint: String,
    /// How long the Lease is valid after each renewal; renewed at a third of it.
    pub lease: Duration,
    /// The agent's pod (name, UID) when it runs as one, in the same namespace as the Lease.
    pub pod: Option<(String, String)>,
    /// The checkpoints the agent keeps (garbage collection sends them); written anew when they
    /// change.
    pub kept: watch::Receiver<Vec<KeptCheckpoint>>,
}

impl AgentLease {
    /// Writes (or renews) the Lease once.
    pub async fn renew(&self, client: &Client) -> Result<(), kube::Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let name = self.lease_name();
        let owner = self.pod.as_ref().map(|(pod, uid)| OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod.clone(),
            uid: uid.clone(),
            ..Default::default()
        });
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                owner_references: owner.map(|o| vec![o]),
                labels: Some(BTreeMap::from([(
                    LEASE_LABEL.to_string(),
                    "true".to_string(),
                )])),
                annotations: Some(self.annotations()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.lease.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
        Ok(())
    }

    /// The endpoint, and the kept checkpoints when there are any (the annotation goes with the
    /// last of them: the field is this manager's).
    fn annotations(&self) -> BTreeMap<String, String> {
        let mut annotations =
            BTreeMap::from([(ENDPOINT_ANNOTATION.to_string(), self.endpoint.clone())]);
        let kept = self.kept.borrow();
        if !kept.is_empty() {
            annotations.insert(
                KEPT_ANNOTATION.to_string(),
                serde_json::to_string(&*kept).unwrap_or_default(),
            );
        }
        annotations
    }

    fn lease_name(&self) -> String {
        format!("{LEASE_PREFIX}{}", self.node)
    }

    /// Deletes the Lease (the agent stops); a Lease already gone is fine.
    pub async fn withdraw(&self, client: &Client) -> Result<(), kube::Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        match api
            .delete(&self.lease_name(), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renews the Lease until the future is dropped, at a third of its duration and whenever
    /// the kept checkpoints change; errors are logged and retried.
    pub async fn keep(&self, client: Client) {
        let every = self.lease / 3;
        let mut kept = self.kept.clone();
        loop {
            if let Err(e) = self.renew(&client).await {
                tracing::warn!(node = %self.node, error = %e, "could not renew the agent Lease");
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                changed = kept.changed() => {
                    if changed.is_err() {
                        // Nobody publishes any more: renew on time only.
                        tokio::time::sleep(every).await;
                    }
                }
            }
        }
    }
}
