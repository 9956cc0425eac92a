//! What the end-to-end tests share: the sandbox control plane (started on first use, once per
//! machine), the project's CRDs installed from the chart, and throwaway namespaces whose state is
//! dumped when a test fails.

use std::{
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
};

use futures::FutureExt;
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::OnceCell;

use sandbox::{
    Dirs,
    controlplane::{ControlPlane, Env},
    install,
};

static ENV: OnceCell<Env> = OnceCell::const_new();

/// The running sandbox control plane, brought up if needed (the first call may build Kubernetes).
pub async fn env() -> Env {
    ENV.get_or_init(|| async {
        match ControlPlane::new(&Dirs::from_env()).up().await {
            Ok(env) => env,
            Err(e) => panic!("the sandbox control plane could not be started: {e}"),
        }
    })
    .await
    .clone()
}

/// An admin client of the sandbox. Each test gets its own: a client belongs to the runtime of the
/// test that made it.
pub async fn client() -> Client {
    env().await.client().await.unwrap_or_else(|e| panic!("{e}"))
}

/// A client impersonating `user` with `extra` user information (see `sandbox`'s `Env::client_as`).
pub async fn client_as(user: &str, extra: &[(&str, &str)]) -> Client {
    env()
        .await
        .client_as(user, extra)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Applies the chart's CRDs and waits until the API server serves them. The tests that use them
/// play the operator or run their own, so a kube-migros release left by the demo (whose operator
/// would reconcile their PodMigrations too) is uninstalled first, once per test process.
pub async fn install_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    static RETIRED: OnceCell<()> = OnceCell::const_new();
    RETIRED
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| sandbox::release::retire(&Dirs::from_env()))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("uninstalling the demo's kube-migros: {e}"));
            release_stale_namespaces(client).await;
        })
        .await;
    install::apply_chart_crds(client)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `test` in a new namespace named `<prefix>-<unique>`. When the test fails, the namespace's
/// PodMigrations and Events are printed; the namespace is deleted either way.
pub async fn with_namespace<F, Fut>(prefix: &str, test: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let client = client().await;
    let name = unique_name(prefix);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    let outcome = std::panic::AssertUnwindSafe(test(client.clone(), name.clone()))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        dump_namespace(&name).await;
    }
    // The test's operator is gone with the test: nothing would lift the finalizers of its
    // PodMigrations (a failed test leaves some in flight), and the namespace would stay.
    release_migrations(&client, &name).await;
    crate::webhooks::unregister(&client, &name).await;
    if let Err(e) = namespaces.delete(&name, &DeleteParams::default()).await {
        eprintln!("warning: could not delete namespace {name}: {e}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The sandbox cluster with kube-migros installed by its chart, as users install it: images
/// built from this checkout, `helm upgrade --install` with the sandbox's values and `extra` (typed,
/// as `--set`), rolled out (the agents' device plugins registered). Before it: the agents that tests run as processes in the nodes stopped unless the
/// release runs (they would hold the agent's ports), the chart's CRDs applied, and what an
/// interrupted run left cleared (agent pods terminating on kubelet-less nodes, namespaces
/// terminating with migrations that the chart's operator would take up).
/// Answers the cluster, the images and when the install began.
pub async fn chart_installed(
    dirs: &Dirs,
    extra: &[(&str, &str)],
) -> anyhow::Result<(
    sandbox::cluster::Cluster,
    sandbox::release::Images,
    k8s_openapi::jiff::Timestamp,
)> {
    use sandbox::release;
    let cluster = sandbox::cluster::up(dirs).await?;
    let env = cluster.env.clone();
    let client = env.client().await?;
    if !release::installed(dirs, &env)? {
        for node in &cluster.nodes {
            sandbox::nodes::Nodes::new(dirs).stop_all(node, "node-agent")?;
        }
    }
    install::apply_chart_crds(&client).await?;
    release::clear_stuck_pods(&client).await?;
    release_stale_namespaces(&client).await;
    let registry = sandbox::registry::Registry::new(dirs);
    let images = release::ensure_images(dirs, &registry)?;
    let at = k8s_openapi::jiff::Timestamp::now();
    release::install_rolled_out(
        dirs,
        &env,
        &images,
        &registry,
        extra,
        std::time::Duration::from_secs(300),
    )
    .await?;
    Ok((cluster, images, at))
}

/// Lets go the namespaces an interrupted run left terminating, held by its PodMigrations'
/// finalizer with no operator of theirs left (an installed operator would reconcile them).
pub async fn release_stale_namespaces(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let listed = namespaces.list(&ListParams::default()).await;
    let mut live = Vec::new();
    for ns in listed.map(|l| l.items).unwrap_or_default() {
        let terminating =
            ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
        if terminating {
            release_migrations(client, &ns.name_any()).await;
        } else {
            live.push(ns.name_any());
        }
    }
    crate::webhooks::unregister_stale(client, &live).await;
}

/// Removes the finalizer of every PodMigration in `ns` (best effort: a namespace without the CRD
/// or without migrations has nothing to release).
async fn release_migrations(client: &Client, ns: &str) {
    let migrations: Api<crds::PodMigration> = Api::namespaced(client.clone(), ns);
    let Ok(list) = migrations.list(&ListParams::default()).await else {
        return;
    };
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    for pm in list.items.iter().filter(|pm| !pm.finalizers().is_empty()) {
        if let Err(e) = migrations
            .patch(
                &pm.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            eprintln!(
                "warning: could not release PodMigration {ns}/{}: {e}",
                pm.name_any()
            );
        }
    }
}

async fn dump_namespace(ns: &str) {
    let env = env().await;
    for what in ["podmigrations.migros.io", "events"] {
        let out = kubectl(&env, &["get", what, "-n", ns, "-o", "yaml"]);
        eprintln!(
            "--- {what} in {ns} ---\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs the sandbox's kubectl with its admin kubeconfig.
pub fn kubectl(env: &Env, args: &[&str]) -> Output {
    std::process::Command::new(env.kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", env.kubectl().display()))
}

/// `kubectl drain node --ignore-daemonsets --force` with `extra` flags, which must finish by
/// itself (successfully) within `timeout`; answers what it printed on stderr.
pub async fn kubectl_drain(env: &Env, node: &str, extra: &[&str], timeout: &str) -> String {
    let mut args: Vec<String> = ["drain", node, "--ignore-daemonsets", "--force"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.extend(extra.iter().map(ToString::to_string));
    args.push(format!("--timeout={timeout}"));
    let env = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&env, &args)
    })
    .await
    .unwrap_or_else(|e| panic!("kubectl drain: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "kubectl drain {node} failed: {stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// A name unique across the tests of all processes on this machine.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{:x}{n}", std::process::id(), nanos >> 12)
}

/// Waits until the controller-manager created the namespace's `default` ServiceAccount; pods cannot
/// be created before.
pub async fn wait_for_default_service_account(client: &Client, ns: &str) {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), ns);
    let exists = kube::runtime::wait::await_condition(
        accounts,
        "default",
        |sa: Option<&k8s_openapi::api::core::v1::ServiceAccount>| sa.is_some(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(60), exists)
        .await
        .unwrap_or_else(|_| panic!("ServiceAccount {ns}/default not created within 60s"))
        .unwrap_or_else(|e| panic!("watching ServiceAccounts: {e}"));
}

/// Polls `probe` until it yields a value, failing after `timeout`; for state that no watch shows.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
