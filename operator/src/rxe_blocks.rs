//! rxe ID blocks: every RDMA pod owns a cluster-unique block of queue-pair and memory-region
//! numbers, recorded as an `RxeBlock` object named after the block's index. Creating that object is
//! the allocation, so the API server's name uniqueness makes it atomic between any number of
//! allocators. See docs/rxe-blocks.md for the design and its alternatives.

use std::collections::{BTreeMap, BTreeSet};

use crds::{
    PodReference, RXE_POD_NAME_LABEL, RXE_POD_NAMESPACE_LABEL, RxeBlock, RxeBlockSpec, RxeRanges,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions},
};

/// Smallest queue-pair number rxe hands out (lower numbers are reserved by the driver).
pub const MIN_QPN: u32 = 16;
/// Smallest memory-region number rxe hands out.
pub const MIN_MRN: u32 = 1;
/// Upper bound (exclusive) of rxe's QP and MR indices.
pub const MAX_INDEX: u32 = 0x2_0000;

/// How the QPN and MRN spaces are cut into blocks (operator flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges {
    pub qpn_base: u32,
    pub qpn_per_block: u32,
    pub mrn_base: u32,
    pub mrn_per_block: u32,
    pub blocks: u32,
}

impl Default for Ranges {
    fn default() -> Self {
        Self {
            qpn_base: 1024,
            qpn_per_block: 256,
            mrn_base: 1024,
            mrn_per_block: 256,
            blocks: 500,
        }
    }
}

/// Errors of block allocation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid rxe ranges: {0}")]
    InvalidRanges(String),
    #[error("all {0} rxe blocks are taken; raise --rxe-blocks or shrink the blocks")]
    Exhausted(u32),
    #[error(
        "namespace {namespace} holds its {cap} rxe blocks (--rxe-blocks-per-namespace): one of its RDMA pods must go first"
    )]
    NamespaceFull { namespace: String, cap: u32 },
    #[error("allocating an rxe block kept racing with other allocations; retrying")]
    Contended,
    #[error("rxe block API: {0}")]
    Kube(#[from] kube::Error),
}

impl Ranges {
    /// Checks that every block lies inside rxe's index space and blocks are not empty.
    pub fn validate(&self) -> Result<(), Error> {
        let end = |base: u32, per: u32| u64::from(base) + u64::from(per) * u64::from(self.blocks);
        if self.blocks == 0 || self.qpn_per_block == 0 || self.mrn_per_block == 0 {
            return Err(Error::InvalidRanges(
                "blocks and block sizes must be positive".into(),
            ));
        }
        if self.qpn_base < MIN_QPN || end(self.qpn_base, self.qpn_per_block) > u64::from(MAX_INDEX)
        {
            return Err(Error::InvalidRanges(format!(
                "QPNs {}..{} leave rxe's range {MIN_QPN}..{MAX_INDEX}",
                self.qpn_base,
                end(self.qpn_base, self.qpn_per_block)
            )));
        }
        if self.mrn_base < MIN_MRN || end(self.mrn_base, self.mrn_per_block) > u64::from(MAX_INDEX)
        {
            return Err(Error::InvalidRanges(format!(
                "MRNs {}..{} leave rxe's range {MIN_MRN}..{MAX_INDEX}",
                self.mrn_base,
                end(self.mrn_base, self.mrn_per_block)
            )));
        }
        Ok(())
    }

    /// The numbers of block `index` (which must be below `blocks`).
    pub fn block(&self, index: u32) -> RxeRanges {
        RxeRanges {
            qpn_start: self.qpn_base + index * self.qpn_per_block,
            qpn_count: self.qpn_per_block,
            mrn_start: self.mrn_base + index * self.mrn_per_block,
            mrn_count: self.mrn_per_block,
        }
    }

    /// The lowest index not in `taken`.
    pub fn lowest_free(&self, taken: &BTreeSet<u32>) -> Option<u32> {
        (0..self.blocks).find(|i| !taken.contains(i))
    }
}

/// Allocates, finds and releases blocks through the API server.
#[derive(Clone)]
pub struct Allocator {
    api: Api<RxeBlock>,
    ranges: Ranges,
    /// Blocks one namespace may hold at most (`None`: all of them).
    per_namespace: Option<u32>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

/// Attempts before an allocation reports contention (each attempt loses only to another allocation).
const ATTEMPTS: usize = 64;

impl Allocator {
    pub fn new(client: Client, ranges: Ranges) -> Self {
        Self {
            api: Api::all(client),
            ranges,
            per_namespace: None,
        }
    }

    /// Lets one namespace hold at most `cap` blocks (0: no cap), so that no tenant takes them all.
    pub fn with_namespace_cap(mut self, cap: u32) -> Self {
        self.per_namespace = (cap > 0).then_some(cap);
        self
    }

    /// The block of pod `namespace/name`, allocating one if it has none. Idempotent.
    pub async fn ensure(&self, namespace: &str, name: &str) -> Result<RxeRanges, Error> {
        if let Some(block) = self.find(namespace, name).await? {
            return Ok(block.spec.ranges());
        }
        for _ in 0..ATTEMPTS {
            let blocks = self.api.list_metadata(&ListParams::default()).await?.items;
            self.check_cap(namespace, &blocks)?;
            let taken: BTreeSet<u32> = blocks.iter().filter_map(index_of).collect();
            let index = self
                .ranges
                .lowest_free(&taken)
                .ok_or(Error::Exhausted(self.ranges.blocks))?;
            let block = self.object(index, namespace, name);
            match self.api.create(&PostParams::default(), &block).await {
                Ok(created) => {
                    // Allocations of one namespace that raced may have passed the cap together:
                    // the blocks created first keep their place, and a later one that finds the
                    // cap taken by earlier ones gives its own back (every allocation sees those
                    // created before it, so they all agree).
                    if self.per_namespace.is_some() {
                        let over = match self.api.list_metadata(&ListParams::default()).await {
                            Ok(list) => {
                                let mine = created_at(&created.metadata);
                                let earlier: Vec<_> = list
                                    .items
                                    .into_iter()
                                    .filter(|b| match (created_at(&b.metadata), mine) {
                                        (Some(theirs), Some(mine)) => theirs < mine,
                                        // An order it cannot read: counted, to stay under the cap.
                                        _ => b.metadata.uid != created.metadata.uid,
                                    })
                                    .collect();
                                self.check_cap(namespace, &earlier).err()
                            }
                            // Unsure whether it fits: given back, like one over the cap.
                            Err(e) => Some(e.into()),
                        };
                        if let Some(why) = over {
                            self.delete(&created).await?;
                            // The pod may have a block of its own meanwhile (the sweep and a
                            // migration allocating for it at once): that one is its block.
                            if let Some(block) = self.find(namespace, name).await? {
                                return Ok(block.spec.ranges());
                            }
                            return Err(why);
                        }
                    }
                    return self.settle(namespace, name).await;
                }
                // Another allocation took this index first: look again.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contended)
    }

    /// Fails when `namespace` holds its cap of `blocks` already.
    fn check_cap(
        &self,
        namespace: &str,
        blocks: &[kube::core::PartialObjectMeta<RxeBlock>],
    ) -> Result<(), Error> {
        let Some(cap) = self.per_namespace else {
            return Ok(());
        };
        let held = blocks
            .iter()
            .filter(|b| {
                b.labels().get(RXE_POD_NAMESPACE_LABEL).map(String::as_str) == Some(namespace)
            })
            .count();
        if u32::try_from(held).unwrap_or(u32::MAX) >= cap {
            return Err(Error::NamespaceFull {
                namespace: namespace.into(),
                cap,
            });
        }
        Ok(())
    }

    /// The pod's block, if it has one.
    pub async fn find(&self, namespace: &str, name: &str) -> Result<Option<RxeBlock>, Error> {
        Ok(self.owned(namespace, name).await?.into_iter().next())
    }

    /// The blocks of a pod, lowest index first (more than one only after a race).
    async fn owned(&self, namespace: &str, name: &str) -> Result<Vec<RxeBlock>, Error> {
        let selector = crds::owner_selector(namespace, name);
        let listed = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        Ok(crds::owned_by(listed, namespace, name))
    }

    /// Two allocations for the same pod that raced both succeed; keep the lowest index, free the
    /// others.
    async fn settle(&self, namespace: &str, name: &str) -> Result<RxeRanges, Error> {
        let mut owned = self.owned(namespace, name).await?.into_iter();
        let keep = owned.next().ok_or(Error::Contended)?;
        for extra in owned {
            self.delete(&extra).await?;
        }
        Ok(keep.spec.ranges())
    }

    /// Every block, by owner.
    pub async fn all(&self) -> Result<BTreeMap<(String, String), Vec<RxeBlock>>, Error> {
        let mut by_owner: BTreeMap<(String, String), Vec<RxeBlock>> = BTreeMap::new();
        for block in self.api.list(&ListParams::default()).await?.items {
            let owner = (
                block.spec.pod.namespace.clone(),
                block.spec.pod.name.clone(),
            );
            by_owner.entry(owner).or_default().push(block);
        }
        Ok(by_owner)
    }

    /// Deletes a block, only if it is still the object that was read.
    pub async fn delete(&self, block: &RxeBlock) -> Result<(), Error> {
        let preconditions = Preconditions {
            uid: block.uid(),
            resource_version: None,
        };
        match self
            .api
            .delete(
                &block.name_any(),
                &DeleteParams::default().preconditions(preconditions),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn object(&self, index: u32, namespace: &str, name: &str) -> RxeBlock {
        let ranges = self.ranges.block(index);
        let labels = [
            (RXE_POD_NAMESPACE_LABEL.to_string(), namespace.to_string()),
            (RXE_POD_NAME_LABEL.to_string(), crds::pod_label_value(name)),
        ];
        RxeBlock {
            metadata: ObjectMeta {
                name: Some(RxeBlockSpec::object_name(index)),
                labels: Some(labels.into()),
                ..Default::default()
            },
            spec: RxeBlockSpec {
                index,
                qpn_start: ranges.qpn_start,
                qpn_count: ranges.qpn_count,
                mrn_start: ranges.mrn_start,
                mrn_count: ranges.mrn_count,
                pod: PodReference {
                    namespace: namespace.into(),
                    name: name.into(),
                },
            },
        }
    }
}

/// Keeps blocks in step with the RDMA pods of `namespace` (all when `None`): every pod labelled
/// `migros.io/rdma: "true"` gets a block, and a block whose pod is gone, with no active migration
/// of that pod, is released. It sweeps every `interval` and as soon as an RDMA pod comes or goes
/// (a watch): a new pod's containers wait for its block before they start (the agents' device
/// plugin), and a block released is one another pod may be waiting for. Runs until `shutdown` is
/// cancelled.
pub async fn maintain(
    allocator: Allocator,
    client: Client,
    namespace: Option<String>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    // Metadata only: the watch needs no more than that a pod came or went.
    let pods: Api<kube::core::PartialObjectMeta<Pod>> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("{}=true", crds::RDMA_LABEL);
    let changes =
        watcher::watcher(pods, watcher::Config::default().labels(&selector)).default_backoff();
    let mut changes = std::pin::pin!(changes);
    // The RDMA pods seen: an update of one (its status) needs no sweep; a new one or a deletion
    // does.
    let mut seen = BTreeSet::new();
    loop {
        if let Err(e) = sweep(&allocator, &client, namespace.as_deref()).await {
            tracing::warn!(error = %e, "rxe block maintenance failed; retrying");
        }
        let next_sweep = tokio::time::sleep(interval);
        tokio::pin!(next_sweep);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut next_sweep => break,
                Some(event) = changes.next() => {
                    if !came_or_went(event, &mut seen) {
                        continue;
                    }
                    // Pods that come together are looked after by one sweep, within a second.
                    let gather = tokio::time::sleep(std::time::Duration::from_secs(1));
                    tokio::pin!(gather);
                    loop {
                        tokio::select! {
                            () = &mut gather => break,
                            more = tokio::time::timeout(std::time::Duration::from_millis(200), changes.next()) => match more {
                                Ok(Some(event)) => { came_or_went(event, &mut seen); }
                                _ => break,
                            },
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Whether a watch event is an RDMA pod that appeared or went (updating `seen`).
fn came_or_went(
    event: Result<
        kube::runtime::watcher::Event<kube::core::PartialObjectMeta<Pod>>,
        kube::runtime::watcher::Error,
    >,
    seen: &mut BTreeSet<(String, String)>,
) -> bool {
    use kube::runtime::watcher::Event;
    let key = |pod: &kube::core::PartialObjectMeta<Pod>| {
        (pod.namespace().unwrap_or_default(), pod.name_any())
    };
    match event {
        Ok(Event::Apply(pod)) => seen.insert(key(&pod)),
        // A (re)listing: the sweep that follows any change covers those pods.
        Ok(Event::InitApply(pod)) => {
            seen.insert(key(&pod));
            false
        }
        Ok(Event::Delete(pod)) => {
            seen.remove(&key(&pod));
            true
        }
        Ok(Event::Init | Event::InitDone) | Err(_) => false,
    }
}

async fn sweep(
    allocator: &Allocator,
    client: &Client,
    namespace: Option<&str>,
) -> Result<(), Error> {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let rdma = pods
        .list_metadata(&ListParams::default().labels(&format!("{}=true", crds::RDMA_LABEL)))
        .await?;
    for pod in &rdma.items {
        if pod.metadata.deletion_timestamp.is_none() {
            let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
            match allocator.ensure(&ns, &name).await {
                Ok(_) => {}
                // This pod waits; the others are still looked after.
                Err(e @ (Error::Exhausted(_) | Error::NamespaceFull { .. })) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "no rxe block for an RDMA pod");
                }
                Err(e) => return Err(e),
            }
        }
    }
    for ((ns, name), blocks) in allocator.all().await? {
        if namespace.is_some_and(|watched| watched != ns) {
            continue;
        }
        let pod_exists = Api::<Pod>::namespaced(client.clone(), &ns)
            .get_metadata_opt(&name)
            .await?
            .is_some();
        if pod_exists || migration_active(client, &ns, &name).await? {
            continue;
        }
        for block in blocks {
            tracing::info!(block = %block.name_any(), pod = %format!("{ns}/{name}"), "releasing the rxe block of a pod that is gone");
            allocator.delete(&block).await?;
        }
    }
    Ok(())
}

/// Whether a migration of pod `ns/name` is under way (its pod may be absent for a moment).
async fn migration_active(client: &Client, ns: &str, name: &str) -> Result<bool, Error> {
    let api: Api<crds::PodMigration> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().fields(&format!("spec.podName={name}")))
        .await?;
    Ok(list.items.iter().any(|m| {
        !m.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(crds::Phase::is_final)
    }))
}

/// The order in which blocks were created: their resourceVersion at creation, which etcd makes
/// an increasing number (a block is never updated, so its resourceVersion stays that one).
fn created_at(meta: &kube::core::ObjectMeta) -> Option<u64> {
    meta.resource_version.as_deref()?.parse().ok()
}

fn index_of(meta: &kube::core::PartialObjectMeta<RxeBlock>) -> Option<u32> {
    meta.metadata
        .name
        .as_deref()?
        .strip_prefix("block-")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_disjoint_and_inside_the_ranges() {
        let ranges = Ranges::default();
        ranges.validate().unwrap();
        let last = ranges.block(ranges.blocks - 1);
        assert!(last.qpn_start + last.qpn_count <= MAX_INDEX);
        for i in 0..ranges.blocks - 1 {
            let (a, b) = (ranges.block(i), ranges.block(i + 1));
            assert_eq!(a.qpn_start + a.qpn_count, b.qpn_start);
            assert_eq!(a.mrn_start + a.mrn_count, b.mrn_start);
        }
    }

    #[test]
    fn ranges_outside_rxe_are_refused() {
        let too_many = Ranges {
            blocks: 1000,
            ..Ranges::default()
        };
        assert!(too_many.validate().is_err());
        let reserved_qpn = Ranges {
            qpn_base: 2,
            ..Ranges::default()
        };
        assert!(reserved_qpn.validate().is_err());
        let empty = Ranges {
            qpn_per_block: 0,
            ..Ranges::default()
        };
        assert!(empty.validate().is_err());
    }

    #[test]
    fn the_lowest_free_index_fills_holes_first() {
        let ranges = Ranges {
            blocks: 4,
            ..Ranges::default()
        };
        assert_eq!(ranges.lowest_free(&[0, 1, 3].into()), Some(2));
        assert_eq!(ranges.lowest_free(&[].into()), Some(0));
        assert_eq!(ranges.lowest_free(&[0, 1, 2, 3].into()), None);
    }
}
