//! One migration per pod, claimed atomically. Before a PodMigration leaves Pending it claims its
//! pod: a Lease in the operator's namespace named after the pod (`pod.<namespace>.<name>`), whose
//! holder is the migration's UID. Creating it is the claim, so the API server's name uniqueness
//! decides between two migrations of one pod however close in time they start; the second finds
//! the Lease and fails with `PodBusy`. A claim is given back when its migration ends (a final
//! phase, or its deletion); one whose migration is gone or final (an operator that stopped in
//! between) is taken over with the Lease's resourceVersion as precondition, so that of two
//! migrations taking over at once only one wins. See docs/operator.md.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use crds::PodMigration;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions},
};
use sha2::{Digest, Sha256};

/// Label of claim Leases.
pub const CLAIM_LABEL: &str = "migros.io/pod-claim";
/// Annotation of a claim Lease: the migration that holds it, `<namespace>/<name>`.
pub const MIGRATION_ANNOTATION: &str = "migros.io/migration";
/// Annotation of a claim Lease: the pod it claims, `<namespace>/<name>`.
pub const POD_ANNOTATION: &str = "migros.io/pod";

/// The outcome of [`Claims::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The migration holds its pod.
    Held,
    /// Another active migration holds the pod: its name (same namespace).
    Busy(String),
    /// Another operator changed the claim meanwhile, or its holder is going away (being deleted
    /// before it started): decide again shortly.
    Contended,
}

/// The claim Leases of the operator's namespace.
#[derive(Clone)]
pub struct Claims {
    leases: Api<Lease>,
    client: Client,
    /// The claims this operator took, by migration UID, as created: given back without reading
    /// them again.
    held: Arc<Mutex<HashMap<String, Lease>>>,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims").finish_non_exhaustive()
    }
}

/// The name of the claim Lease of pod `namespace/pod`: readable while it fits a Lease name (a
/// namespace has no dots, so `pod.<namespace>.<name>` names one pod), else a digest of both.
pub fn lease_name(namespace: &str, pod: &str) -> String {
    let name = format!("pod.{namespace}.{pod}");
    if name.len() <= 253 {
        return name;
    }
    let digest = Sha256::digest(format!("{namespace}/{pod}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("pod.{hex}")
}

impl Claims {
    /// Claims in `namespace` (the operator's).
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            leases: Api::namespaced(client.clone(), namespace),
            client,
            held: Arc::default(),
        }
    }

    /// Claims the pod of `pm` for it, unless another active migration holds it.
    pub async fn acquire(&self, pm: &PodMigration) -> Result<Claim, kube::Error> {
        let ns = pm.namespace().unwrap_or_default();
        let uid = pm.uid().unwrap_or_default();
        let name = lease_name(&ns, &pm.spec.pod_name);
        let lease = self.lease(&name, pm);
        match self.leases.create(&PostParams::default(), &lease).await {
            Ok(created) => return Ok(self.took(&uid, created)),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
        let Some(existing) = self.leases.get_opt(&name).await? else {
            return Ok(Claim::Contended); // given back meanwhile
        };
        let holder = holder(&existing);
        if holder == uid {
            return Ok(self.took(&uid, existing));
        }
        match self.holder_state(&existing, &holder).await? {
            Holder::Active(other) => return Ok(Claim::Busy(other)),
            Holder::Leaving => return Ok(Claim::Contended),
            Holder::Gone => {}
        }
        // The holder is gone or done: take the claim over, unless someone else does first.
        let mut taken = lease;
        taken.metadata.resource_version = existing.resource_version();
        match self
            .leases
            .replace(&name, &PostParams::default(), &taken)
            .await
        {
            Ok(replaced) => Ok(self.took(&uid, replaced)),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(Claim::Contended),
            Err(e) => Err(e),
        }
    }

    fn took(&self, uid: &str, lease: Lease) -> Claim {
        if let Ok(mut held) = self.held.lock() {
            held.insert(uid.to_string(), lease);
        }
        Claim::Held
    }

    /// Gives the claim of `pm`'s pod back, if `pm` holds it: the Lease as this operator took it
    /// is deleted if unchanged; one taken by an earlier operator is read first.
    pub async fn release(&self, pm: &PodMigration) -> Result<(), kube::Error> {
        let took = self
            .held
            .lock()
            .ok()
            .and_then(|mut held| held.remove(&pm.uid().unwrap_or_default()));
        if let Some(lease) = took {
            return self.delete_unchanged(&lease).await;
        }
        let ns = pm.namespace().unwrap_or_default();
        let name = lease_name(&ns, &pm.spec.pod_name);
        let Some(existing) = self.leases.get_opt(&name).await? else {
            return Ok(());
        };
        if holder(&existing) != pm.uid().unwrap_or_default() {
            return Ok(());
        }
        self.delete_unchanged(&existing).await
    }

    /// Gives back the claims this operator took for migrations that are gone (UIDs not in
    /// `alive`): deleted before they started, so no last reconcile gave them back.
    pub async fn release_gone(&self, alive: &std::collections::BTreeSet<String>) {
        let gone: Vec<Lease> = self
            .held
            .lock()
            .map(|mut held| {
                let gone: Vec<String> = held
                    .keys()
                    .filter(|u| !alive.contains(*u))
                    .cloned()
                    .collect();
                gone.iter().filter_map(|u| held.remove(u)).collect()
            })
            .unwrap_or_default();
        for lease in gone {
            if let Err(e) = self.delete_unchanged(&lease).await {
                tracing::warn!(lease = %lease.name_any(), error = %e, "could not give back a claim");
            }
        }
    }

    /// Deletes `lease` as it was read: one taken over or gone meanwhile is not ours to delete.
    async fn delete_unchanged(&self, lease: &Lease) -> Result<(), kube::Error> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.resource_version(),
                uid: lease.uid(),
            }),
            ..DeleteParams::default()
        };
        match self.leases.delete(&lease.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn lease(&self, name: &str, pm: &PodMigration) -> Lease {
        let ns = pm.namespace().unwrap_or_default();
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(CLAIM_LABEL.into(), "true".into())])),
                annotations: Some(BTreeMap::from([
                    (
                        MIGRATION_ANNOTATION.into(),
                        format!("{ns}/{}", pm.name_any()),
                    ),
                    (POD_ANNOTATION.into(), format!("{ns}/{}", pm.spec.pod_name)),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: pm.uid(),
                acquire_time: Some(MicroTime(Timestamp::now())),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Whether the migration holding `lease` (UID `holder`) still holds its pod.
    async fn holder_state(&self, lease: &Lease, holder: &str) -> Result<Holder, kube::Error> {
        let named = lease
            .annotations()
            .get(MIGRATION_ANNOTATION)
            .and_then(|m| m.split_once('/'));
        let Some((ns, name)) = named else {
            return Ok(Holder::Gone);
        };
        let api: Api<PodMigration> = Api::namespaced(self.client.clone(), ns);
        let Some(pm) = api.get_opt(name).await? else {
            return Ok(Holder::Gone);
        };
        let phase = pm.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
        Ok(if pm.uid().as_deref() != Some(holder) || phase.is_final() {
            Holder::Gone
        } else if phase == crds::Phase::Pending && pm.metadata.deletion_timestamp.is_some() {
            // Deleted before it started: it gives the claim back as it goes.
            Holder::Leaving
        } else {
            Holder::Active(name.to_string())
        })
    }

    /// Run when the operator starts leading (`api`: the migrations it reconciles). Claims the
    /// pods of migrations already past Pending that hold no claim (started under an operator
    /// without claims, before an upgrade), so that no second migration of such a pod starts; and
    /// deletes the claims whose holder is final or gone (its give-back failed, or its namespace
    /// went while no operator ran), which would otherwise stay until the pod's next migration.
    pub async fn tidy(&self, api: &Api<PodMigration>) -> Result<(), kube::Error> {
        for pm in api.list(&Default::default()).await?.items {
            let phase = pm.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
            if phase == crds::Phase::Pending || phase.is_final() {
                continue;
            }
            if let Claim::Busy(other) = self.acquire(&pm).await? {
                tracing::warn!(migration = %pm.name_any(), holder = %other, "two migrations of one pod were in flight before claims");
            }
        }
        let claims = self
            .leases
            .list(&ListParams::default().labels(&format!("{CLAIM_LABEL}=true")))
            .await?;
        for lease in claims.items {
            if matches!(
                self.holder_state(&lease, &holder(&lease)).await?,
                Holder::Gone
            ) {
                self.delete_unchanged(&lease).await?;
            }
        }
        Ok(())
    }
}

/// What became of a claim's holder.
enum Holder {
    /// It still holds the pod: its name.
    Active(String),
    /// Deleted before it started: it gives the claim back.
    Leaving,
    /// Gone, final, or another migration of the same name.
    Gone,
}

fn holder(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_named_after_its_pod_and_fits_a_lease_name() {
        assert_eq!(lease_name("shop", "db-0"), "pod.shop.db-0");
        let long = "p".repeat(253);
        let name = lease_name("shop", &long);
        assert!(name.len() <= 253, "{name}");
        assert_ne!(name, lease_name("shop2", &long));
        assert_eq!(name, lease_name("shop", &long));
    }
}
