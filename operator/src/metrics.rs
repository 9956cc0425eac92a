//! The operator's Prometheus metrics (served on `/metrics`): migrations by result, phase
//! durations, downtime, agent calls, reconcile errors by kind, active migrations, and the requests
//! the operator sends to the API server (by verb and resource: what a migration costs the cluster).

use std::{
    collections::HashMap,
    sync::{Mutex, atomic::AtomicU64},
    time::Duration,
};

use crds::{Phase, PodMigrationStatus};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
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
struct InPhaseLabels {
    migration_namespace: String,
    migration: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: &'static str,
    resource: String,
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
    api_requests: Family<RequestLabels, Counter>,
    checkpoint_seconds: Histogram,
    checkpoint_bytes: Histogram,
    transfer_seconds: Histogram,
    restore_seconds: Histogram,
    in_phase: Family<InPhaseLabels, Gauge<f64, AtomicU64>>,
    /// The series of `in_phase` each migration (by UID) has, to remove it when the phase changes
    /// or the migration ends.
    in_phase_of: Mutex<HashMap<String, InPhaseLabels>>,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0].into_iter()
}

/// 1 MiB to 64 GiB, by fours.
fn byte_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1048576.0, 4.0, 9)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("migros");
        let migrations = Family::<ResultLabels, Counter>::default();
        // Every result from the start, at 0: a series that appears at its first count would
        // show no increase for it.
        for result in [Phase::Succeeded, Phase::Failed, Phase::RolledBack] {
            let _ = migrations.get_or_create(&ResultLabels {
                result: format!("{result:?}"),
            });
        }
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
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server, by verb and resource",
            api_requests.clone(),
        );
        // Named as KEP-5823 (pod-level checkpoint/restore) plans them for the kubelet, where they
        // mean the same: a pod's checkpoint, its size, its restore.
        let checkpoint_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "checkpoint_duration_seconds",
            "Freezing and checkpointing a pod's containers on the source node, per migration",
            checkpoint_seconds.clone(),
        );
        let checkpoint_bytes = Histogram::new(byte_buckets());
        registry.register(
            "checkpoint_size_bytes",
            "Size of a pod's checkpoint (all its containers' archives), per migration",
            checkpoint_bytes.clone(),
        );
        let transfer_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "transfer_duration_seconds",
            "Moving a checkpoint from the source node to the target node, staging included",
            transfer_seconds.clone(),
        );
        let restore_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "restore_duration_seconds",
            "Restoring a pod on the target node until it runs, per migration",
            restore_seconds.clone(),
        );
        let in_phase = Family::<InPhaseLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "migration_phase_entered_timestamp_seconds",
            "When each migration in flight entered its current phase (Unix time); the series goes when it ends",
            in_phase.clone(),
        );
        Self {
            api_requests,
            checkpoint_seconds,
            checkpoint_bytes,
            transfer_seconds,
            restore_seconds,
            in_phase,
            in_phase_of: Mutex::default(),
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

    /// A request to the API server is being sent (counted by [`request_kind`]).
    pub fn api_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = request_kind(method, uri);
        self.api_requests
            .get_or_create(&RequestLabels { verb, resource })
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
            Answer::Failed(_) | Answer::SourceResumed(_) | Answer::RxeOutsideBlock(_) => "failed",
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
            let timings = status.timings.unwrap_or_default();
            let seconds = |ms: Option<i64>| ms.map(|ms| ms as f64 / 1000.0);
            for (histogram, took) in [
                (&self.downtime_seconds, timings.downtime_ms),
                (&self.checkpoint_seconds, timings.checkpoint_ms),
                (&self.transfer_seconds, timings.transfer_ms),
                (&self.restore_seconds, timings.restore_ms),
            ] {
                if let Some(s) = seconds(took) {
                    histogram.observe(s);
                }
            }
            if let Some(checkpoint) = status.checkpoint.as_ref().filter(|c| c.bytes > 0) {
                self.checkpoint_bytes.observe(checkpoint.bytes as f64);
            }
        }
    }

    /// Where migration `uid` (`namespace`/`name`) stands: its current phase and since when, or
    /// `None` once it ended or is gone (its series is removed).
    pub fn in_phase(&self, uid: &str, now: Option<(&str, &str, &PodMigrationStatus)>) {
        let Ok(mut of) = self.in_phase_of.lock() else {
            return;
        };
        let current = now.and_then(|(namespace, name, status)| {
            let phase = status.phase.filter(|p| !p.is_final())?;
            let entered = status
                .phase_transitions
                .iter()
                .rev()
                .find(|t| t.phase == phase)?
                .time
                .0;
            let labels = InPhaseLabels {
                migration_namespace: namespace.to_string(),
                migration: name.to_string(),
                phase: format!("{phase:?}"),
            };
            Some((labels, entered.as_millisecond() as f64 / 1000.0))
        });
        let before = of.remove(uid);
        match current {
            Some((labels, entered)) => {
                if let Some(before) = before.filter(|b| *b != labels) {
                    self.in_phase.remove(&before);
                }
                self.in_phase.get_or_create(&labels).set(entered);
                of.insert(uid.to_string(), labels);
            }
            None => {
                if let Some(before) = before {
                    self.in_phase.remove(&before);
                }
            }
        }
    }

    /// Removes the phase series of migrations whose UID is not in `alive`.
    pub fn forget_gone(&self, alive: &std::collections::BTreeSet<String>) {
        if let Ok(mut of) = self.in_phase_of.lock() {
            of.retain(|uid, labels| {
                let keep = alive.contains(uid);
                if !keep {
                    self.in_phase.remove(labels);
                }
                keep
            });
        }
    }
}

/// The verb and resource of an API server request, as the API server's own metrics name them:
/// `GET /api/v1/namespaces/ns/pods/p` is (`GET`, `pods`), without a name `LIST`, with `watch=true`
/// `WATCH`; a subresource follows a slash (`podmigrations/status`).
pub fn request_kind(method: &http::Method, uri: &http::Uri) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    };
    let Some(mut rest) = rest else {
        // Not a resource: /version, /healthz.
        let path = segments.first().copied().unwrap_or_default();
        return (verb_of(method, false, false), path.to_string());
    };
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        rest = &rest[2..];
    }
    let named = rest.len() >= 2;
    let resource = match rest {
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_string(),
        [] => String::new(),
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    (verb_of(method, named, watch), resource)
}

fn verb_of(method: &http::Method, named: bool, watch: bool) -> &'static str {
    match *method {
        http::Method::GET if watch => "WATCH",
        http::Method::GET if named => "GET",
        http::Method::GET => "LIST",
        http::Method::POST => "CREATE",
        http::Method::PUT => "UPDATE",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE if named => "DELETE",
        http::Method::DELETE => "DELETECOLLECTION",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;
    use crds::{Phase, PhaseTransition, PodMigrationStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn at(phase: Phase, transitions: &[(Phase, &str)]) -> PodMigrationStatus {
        PodMigrationStatus {
            phase: Some(phase),
            phase_transitions: transitions
                .iter()
                .map(|(phase, time)| PhaseTransition {
                    phase: *phase,
                    time: MicroTime(time.parse().unwrap()),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_migration_in_flight_has_one_phase_series_until_it_ends() {
        let metrics = Metrics::default();
        let series = || -> Vec<String> {
            metrics
                .encode()
                .lines()
                .filter(|l| l.starts_with("migros_migration_phase_entered_timestamp_seconds{"))
                .map(String::from)
                .collect()
        };
        let preparing = at(
            Phase::Preparing,
            &[
                (Phase::Pending, "2026-12-04T10:00:00Z"),
                (Phase::Preparing, "2026-12-04T10:00:01Z"),
            ],
        );
        metrics.in_phase("u1", Some(("apps", "web-1", &preparing)));
        assert_eq!(
            series(),
            [
                "migros_migration_phase_entered_timestamp_seconds{migration_namespace=\"apps\",migration=\"web-1\",phase=\"Preparing\"} 1796378401.0"
            ]
        );
        let mut transferring = preparing.clone();
        transferring.phase = Some(Phase::Transferring);
        transferring.phase_transitions.push(PhaseTransition {
            phase: Phase::Transferring,
            time: MicroTime("2026-12-04T10:00:05Z".parse().unwrap()),
        });
        metrics.in_phase("u1", Some(("apps", "web-1", &transferring)));
        let now = series();
        assert_eq!(now.len(), 1, "{now:?}");
        assert!(
            now[0].contains("phase=\"Transferring\"} 1796378405.0"),
            "{now:?}"
        );
        // Ended: the series goes; a gone migration's too.
        let mut done = transferring.clone();
        done.phase = Some(Phase::Succeeded);
        metrics.in_phase("u1", Some(("apps", "web-1", &done)));
        assert!(series().is_empty());
        metrics.in_phase("u2", Some(("apps", "db-1", &preparing)));
        metrics.forget_gone(&Default::default());
        assert!(series().is_empty());
    }

    use super::request_kind;
    use http::Method;

    fn kind(method: Method, uri: &str) -> (&'static str, String) {
        request_kind(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let cases = [
            (Method::GET, "/api/v1/namespaces/a/pods/p", ("GET", "pods")),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods?labelSelector=x",
                ("LIST", "pods"),
            ),
            (
                Method::GET,
                "/api/v1/pods?watch=true&resourceVersion=1",
                ("WATCH", "pods"),
            ),
            (Method::GET, "/api/v1/nodes/n1", ("GET", "nodes")),
            (Method::GET, "/api/v1/namespaces/a", ("GET", "namespaces")),
            (
                Method::PATCH,
                "/apis/migros.io/v1alpha1/namespaces/a/podmigrations/m/status?fieldManager=x",
                ("PATCH", "podmigrations/status"),
            ),
            (
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/a/leases",
                ("CREATE", "leases"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/pods/p",
                ("DELETE", "pods"),
            ),
            (
                Method::DELETE,
                "/apis/migros.io/v1alpha1/namespaces/a/podmigrations",
                ("DELETECOLLECTION", "podmigrations"),
            ),
            (Method::GET, "/version", ("LIST", "version")),
        ];
        for (method, uri, (verb, resource)) in cases {
            assert_eq!(kind(method, uri), (verb, resource.to_string()), "{uri}");
        }
    }
}
