//! The agent's Prometheus metrics (served on `/metrics`): steps by result and duration, bytes
//! checkpointed and transferred, and staged migrations on the node.

use std::{borrow::Cow, sync::atomic::AtomicU64, time::Duration};

use agent_api::Step;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RxeStartLabels {
    how: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

/// All metrics of the agent, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    steps: Family<StepLabels, Histogram>,
    bytes: Family<DirectionLabels, Counter>,
    migrations: Gauge,
    resumed: Counter,
    collected: Counter,
    evicted: Counter,
    kept_bytes: Gauge,
    rxe_starts: Family<RxeStartLabels, Counter>,
    store_free: Gauge,
    store_capacity: Gauge,
    longest_pause: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_registry(Registry::with_prefix("migros_agent"))
    }
}

impl Metrics {
    /// The metrics of the agent of `node`, every series labelled `node` with it (the label the
    /// chart's alerts and dashboard group by, whatever the scrape configuration adds).
    pub fn for_node(node: &str) -> Self {
        let labels = [(Cow::Borrowed("node"), Cow::Owned(node.to_string()))];
        Self::with_registry(Registry::with_prefix_and_labels(
            "migros_agent",
            labels.into_iter(),
        ))
    }

    fn with_registry(mut registry: Registry) -> Self {
        let steps = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0])
        });
        registry.register(
            "step_duration_seconds",
            "Migration steps run by this agent, by step and result",
            steps.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "bytes",
            "Checkpoint bytes written by the runtime, sent to and received from peers",
            bytes.clone(),
        );
        let migrations = Gauge::default();
        registry.register(
            "stored_migrations",
            "Migrations with data in this node's checkpoint store",
            migrations.clone(),
        );
        let resumed = Counter::default();
        registry.register(
            "sources_resumed_at_deadline",
            "Paused sources this agent resumed by itself because no commit came before their deadline",
            resumed.clone(),
        );
        let collected = Counter::default();
        registry.register(
            "migrations_collected",
            "Migrations whose data garbage collection removed after undoing what they held",
            collected.clone(),
        );
        let evicted = Counter::default();
        registry.register(
            "checkpoints_evicted",
            "Kept checkpoints of ended migrations removed, oldest first, to keep this node within its byte budget",
            evicted.clone(),
        );
        let kept_bytes = Gauge::default();
        registry.register(
            "kept_checkpoint_bytes",
            "Bytes of the checkpoints this node keeps past their migration's commit point (or received whole)",
            kept_bytes.clone(),
        );
        let rxe_starts = Family::<RxeStartLabels, Counter>::default();
        registry.register(
            "rxe_starts",
            "Container starts of RDMA pods by who set the rxe counters (plugin, restore) and whether the numbers stayed in the pod's block (inside, outside)",
            rxe_starts.clone(),
        );
        let store_free = Gauge::default();
        registry.register(
            "store_free_bytes",
            "Free bytes on the file system of this node's checkpoint store",
            store_free.clone(),
        );
        let store_capacity = Gauge::default();
        registry.register(
            "store_capacity_bytes",
            "Size of the file system of this node's checkpoint store",
            store_capacity.clone(),
        );
        let longest_pause = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "longest_pause_seconds",
            "How long the longest-paused source pod on this node has been frozen for its migration (0: none is)",
            longest_pause.clone(),
        );
        Self {
            store_free,
            store_capacity,
            longest_pause,
            registry,
            steps,
            bytes,
            migrations,
            resumed,
            collected,
            evicted,
            kept_bytes,
            rxe_starts,
        }
    }
}

impl Metrics {
    /// The node's state as a scrape sees it: the checkpoint store's free and total bytes, and the
    /// longest pause of a source frozen here.
    pub fn observe_node(&self, free: u64, capacity: u64, longest_pause: Duration) {
        self.store_free.set(i64::try_from(free).unwrap_or(i64::MAX));
        self.store_capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        self.longest_pause.set(longest_pause.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// A step ended; the `step` label is the step's name, as the operator's metrics name it.
    pub fn step(&self, step: Step, ok: bool, took: Duration) {
        let labels = StepLabels {
            step: step.name().into(),
            result: if ok { "succeeded" } else { "failed" }.into(),
        };
        self.steps
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// `direction`: `checkpointed`, `sent` or `received`.
    pub fn bytes(&self, direction: &str, n: u64) {
        self.bytes
            .get_or_create(&DirectionLabels {
                direction: direction.into(),
            })
            .inc_by(n);
    }

    pub fn resumed_at_deadline(&self) {
        self.resumed.inc();
    }

    pub fn collected(&self) {
        self.collected.inc();
    }

    /// A container start of an RDMA pod was recorded; `inside`: verified inside its block.
    pub fn rxe_start(&self, how: crate::rxe_starts::How, inside: bool) {
        self.rxe_starts
            .get_or_create(&RxeStartLabels {
                how: match how {
                    crate::rxe_starts::How::Plugin => "plugin",
                    crate::rxe_starts::How::Restore => "restore",
                }
                .into(),
                result: if inside { "inside" } else { "outside" }.into(),
            })
            .inc();
    }

    pub fn evicted(&self) {
        self.evicted.inc();
    }

    /// The bytes of the checkpoints kept on the node, as the last collection found them.
    pub fn kept(&self, bytes: u64) {
        self.kept_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn stored(&self, n: usize) {
        self.migrations.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
