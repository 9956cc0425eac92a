//! The operator's Prometheus metrics (served on `/metrics`): migrations by result, phase
//! durations, downtime, agent calls, reconcile errors by kind, and active migrations.

use std::time::Duration;

use crds::{Phase, PodMigrationStatus};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use agent_api::Step;

use crate::statemachine::Answer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: String,
    answer: String,
}

/// All metrics of the operator, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    migrations: Family<ResultLabels, Counter>,
    phase_seconds: Family<PhaseLabels, Histogram>,
    downtime_seconds: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    agent_calls: Family<CallLabels, Histogram>,
    active: Gauge,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("migros");
        let migrations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "migrations",
            "PodMigrations that reached a final phase, by result",
            migrations.clone(),
        );
        let phase_seconds = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(seconds_buckets())
        });
        registry.register(
            "phase_duration_seconds",
            "Time spent in each phase",
            phase_seconds.clone(),
        );
        let downtime_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "downtime_seconds",
            "Source frozen until the target runs",
            downtime_seconds.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by error kind",
            reconcile_errors.clone(),
        );
        let agent_calls = Family::<CallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(seconds_buckets())
        });
        registry.register(
            "agent_call_duration_seconds",
            "Agent calls, by step and answer",
            agent_calls.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "active_migrations",
            "PodMigrations not in a final phase",
            active.clone(),
        );
        Self {
            registry,
            migrations,
            phase_seconds,
            downtime_seconds,
            reconcile_errors,
            agent_calls,
            active,
        }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { kind: kind.into() })
            .inc();
    }

    pub fn set_active(&self, n: usize) {
        self.active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An agent call answered; the `call` label is the step's name, as the agents' metrics name it.
    pub fn agent_call(&self, step: Step, answer: &Answer, took: Duration) {
        let answer = match answer {
            Answer::Running { .. } => "running",
            Answer::Succeeded(_) => "succeeded",
            Answer::Failed(_) => "failed",
            Answer::Unreachable(_) => "unreachable",
        };
        let labels = CallLabels {
            call: step.name().into(),
            answer: answer.into(),
        };
        self.agent_calls
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Records the phase just left (from the transitions) and, on a final phase, the result.
    pub fn phase_changed(&self, before: Option<Phase>, status: &PodMigrationStatus) {
        let transitions = &status.phase_transitions;
        if let (Some(before), [.., left, entered]) = (before, transitions.as_slice())
            && left.phase == before
        {
            let seconds = entered.time.0.duration_since(left.time.0).as_secs_f64();
            self.phase_seconds
                .get_or_create(&PhaseLabels {
                    phase: format!("{before:?}"),
                })
                .observe(seconds);
        }
        if let Some(phase) = status.phase.filter(|p| p.is_final()) {
            self.migrations
                .get_or_create(&ResultLabels {
                    result: format!("{phase:?}"),
                })
                .inc();
            if let Some(ms) = status.timings.and_then(|t| t.downtime_ms) {
                self.downtime_seconds.observe(ms as f64 / 1000.0);
            }
        }
    }
}
