//! The chart's monitoring (docs/monitoring.md): off by default; turned on, a PodMonitor, a
//! PrometheusRule whose rules `promtool check rules` accepts and whose alerts fire as
//! `charts/kube-migros/tests/alerts.test.yaml` expects (`promtool test rules`, promtool built from
//! the Prometheus Go module), and a Grafana dashboard whose queries, like the rules', name only
//! metrics that the operator and the agents export. Also rendered: the agents' access to
//! PodMigrations, only `list` and only with a byte budget for kept checkpoints.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::{collections::BTreeSet, path::Path, process::Command};

use sandbox::{Dirs, release};
use serde_json::Value;

/// A user's values: where the images are (the chart requires it).
const IMAGES: (&str, &str) = ("image.repository", "registry.example/kube-migros");

const ON: &[(&str, &str)] = &[
    IMAGES,
    ("monitoring.podMonitor.enabled", "true"),
    ("monitoring.prometheusRule.enabled", "true"),
    ("monitoring.dashboard.enabled", "true"),
];

/// The rendered documents of `helm template`, as JSON values.
fn documents(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<Value>(doc).ok())
        .filter(|doc| doc.is_object())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The `migros_*` metric families an expression names (`_bucket`, `_sum`, `_count`, `_total`
/// dropped: the family's name).
fn families(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("migros_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(family(&name));
    }
    out
}

fn family(name: &str) -> String {
    ["_bucket", "_sum", "_count", "_total"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
        .to_string()
}

/// The families the operator's and an agent's `/metrics` declare (`# TYPE` lines) once a
/// migration went through them (a family with labels shows only from its first sample on).
fn exported() -> BTreeSet<String> {
    use crds::{CheckpointStatus, Phase, PhaseTransition, PodMigrationStatus, Timings};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let operator = operator::metrics::Metrics::default();
    let transition = |phase, time: &str| PhaseTransition {
        phase,
        time: MicroTime(time.parse().unwrap()),
    };
    let mut status = PodMigrationStatus {
        phase: Some(Phase::Restoring),
        phase_transitions: vec![
            transition(Phase::Pending, "2026-12-04T10:00:00Z"),
            transition(Phase::Restoring, "2026-12-04T10:00:02Z"),
        ],
        ..Default::default()
    };
    operator.in_phase("u1", Some(("apps", "web-1", &status)));
    status.phase = Some(Phase::Succeeded);
    status
        .phase_transitions
        .push(transition(Phase::Succeeded, "2026-12-04T10:00:03Z"));
    status.timings = Some(Timings {
        checkpoint_ms: Some(300),
        transfer_ms: Some(400),
        restore_ms: Some(500),
        downtime_ms: Some(1200),
        ..Default::default()
    });
    status.checkpoint = Some(CheckpointStatus {
        bytes: 16 << 20,
        ..Default::default()
    });
    operator.phase_changed(Some(Phase::Restoring), &status);
    // Still in flight in this scrape: the phase series shows.
    let operator = operator.encode();
    let agent = node_agent::metrics::Metrics::for_node("node-1");
    agent.step(
        agent_api::Step::Checkpoint,
        true,
        std::time::Duration::from_millis(300),
    );
    agent.bytes("sent", 1 << 20);
    agent.observe_node(1 << 30, 4 << 30, std::time::Duration::ZERO);
    let agent = agent.encode();
    assert!(
        agent.contains("migros_agent_bytes_total{node=\"node-1\",direction=\"sent\"}"),
        "the agent's series carry its node: {agent}"
    );
    [operator, agent]
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(family)
        .collect()
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn the_charts_alerts_pass_promtool_and_the_dashboard_shows_exported_metrics() {
    let dirs = Dirs::from_env();
    // Off by default.
    let plain = documents(&release::render(&dirs, &[IMAGES]).expect("helm template"));
    for kind in ["PrometheusRule", "PodMonitor"] {
        assert!(
            of_kind(&plain, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    assert!(
        !plain
            .iter()
            .any(|d| d["metadata"]["labels"]["grafana_dashboard"].is_string()),
        "a dashboard rendered by default"
    );

    let docs = documents(&release::render(&dirs, ON).expect("helm template"));
    let exported = exported();
    for name in [
        "migros_checkpoint_duration_seconds",
        "migros_checkpoint_size_bytes",
        "migros_restore_duration_seconds",
    ] {
        assert!(exported.contains(name), "{name} not exported: {exported:?}");
    }

    // The PodMonitor scrapes the operator's and the agents' port `http`.
    let monitors = of_kind(&docs, "PodMonitor");
    assert_eq!(monitors.len(), 1);
    assert_eq!(
        monitors[0]["spec"]["podMetricsEndpoints"][0]["port"],
        "http"
    );

    // The rules: promtool accepts them, and they fire (and stay quiet) as the unit tests say.
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let groups = serde_json::json!({"groups": rules[0]["spec"]["groups"]});
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml_ng::to_string(&groups).unwrap(),
    )
    .unwrap();
    let tests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kube-migros/tests/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml")).unwrap();
    let promtool = sandbox::promtool::ensure(&dirs.cache).expect("promtool");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules", "rules.yaml"])
        .current_dir(dir.path()));
    let alerts: Vec<&str> = groups["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "KubeMigrosMigrationFailed",
            "KubeMigrosMigrationStuck",
            "KubeMigrosSourcePaused",
            "KubeMigrosAgentMissing",
            "KubeMigrosCheckpointStoreFull"
        ]
    );
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(dir.path()));
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let test_text = std::fs::read_to_string(&tests).unwrap();
    for alert in &alerts {
        assert!(
            test_text.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
    }
    let mut named = BTreeSet::new();
    for rule in groups["groups"][0]["rules"].as_array().unwrap() {
        named.extend(families(rule["expr"].as_str().unwrap()));
    }

    // The dashboard: JSON in a ConfigMap labelled for Grafana's sidecar.
    let maps: Vec<&Value> = of_kind(&docs, "ConfigMap")
        .into_iter()
        .filter(|m| m["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(maps.len(), 1);
    let dashboard: Value =
        serde_json::from_str(maps[0]["data"]["kube-migros.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Migrations by result",
        "Phase durations, p95",
        "Downtime (the pause the application sees)",
        "Bytes per node (checkpointed, sent, received)",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            named.extend(families(target["expr"].as_str().unwrap()));
        }
    }
    let unknown: Vec<&String> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queries name metrics nobody exports: {unknown:?} (exported: {exported:?})"
    );
}

#[test]
fn agents_may_list_podmigrations_only_with_a_byte_budget() {
    let dirs = Dirs::from_env();
    let agent_rules = |sets: &[(&str, &str)]| -> Vec<Value> {
        let docs = documents(&release::render(&dirs, sets).expect("helm template"));
        of_kind(&docs, "ClusterRole")
            .into_iter()
            .filter(|r| {
                r["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-agent"))
            })
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| {
                rule["resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r == "podmigrations"))
            })
            .collect()
    };
    assert!(agent_rules(&[IMAGES]).is_empty(), "no budget, no access");
    let rules = agent_rules(&[IMAGES, ("agent.retentionBudget", "20Gi")]);
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["verbs"], serde_json::json!(["list"]));
}
