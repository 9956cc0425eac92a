//! `kubectl migros` against the sandbox cluster with kube-migros installed by its Helm chart, run
//! as users run it: `kubectl migros ...`, the plugin found on the PATH. Moves (plain lines when the
//! output is a pipe, exit codes for success and failure), the status table, the checkpoints the
//! agents keep and their byte budget, an abort before the commit point, the live progress bar under a real terminal (tmux), and a drain. One test: it owns
//! the nodes' agents and cordons a node.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crds::{
    Phase, PodMigration,
    discovery::{self, KeptCheckpoint, LEASE_PREFIX},
};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use sandbox::{Dirs, controlplane::Env, release};
use testkit::{
    harness::{self, eventually},
    workload::{self, node_of, num},
};

/// The plugin of this workspace.
const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-migros");

/// A directory holding only the plugin, put first on the PATH as a user's install would.
fn plugin_dir() -> PathBuf {
    let dir = Path::new(PLUGIN).parent().unwrap().join("kubectl-plugin");
    std::fs::create_dir_all(&dir).unwrap();
    let installed = dir.join("kubectl-migros");
    let _ = std::fs::remove_file(&installed);
    std::fs::copy(PLUGIN, &installed).unwrap();
    dir
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `kubectl migros ARGS` as a user runs it, its output a pipe.
async fn migros(env: &Env, dir: &Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env.kubectl());
    command
        .arg("migros")
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .env("PATH", path_with(dir));
    let out = command.output().await.expect("kubectl migros runs");
    eprintln!(
        "$ kubectl migros {}\n{}{}(exit {:?})",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The migration a `move` created, from its first line.
fn created(out: &Output) -> String {
    let text = stdout(out);
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("podmigration.migros.io/")
        .and_then(|rest| rest.split_once(' '))
        .map(|(name, _)| name.to_string())
        .unwrap_or_else(|| panic!("no migration created: {text}"))
}

async fn set_unschedulable(client: &kube::Client, node: &str, cordoned: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({"spec": {"unschedulable": cordoned}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn kubectl_migros_moves_follows_aborts_and_drains() {
    let dirs = Dirs::from_env();
    let (cluster, _, _) = harness::chart_installed(&dirs, &[])
        .await
        .unwrap_or_else(|e| panic!("kube-migros installed and rolled out: {e:#}"));
    let env = cluster.env.clone();
    let client = env.client().await.unwrap();
    // A node an interrupted run left cordoned.
    for node in &cluster.nodes {
        set_unschedulable(&client, &node.name, false).await;
    }
    let dir = plugin_dir();

    let (env_ref, dir_ref, cluster_ref) = (&env, dir.as_path(), &cluster);
    harness::with_namespace("plugin", |client, ns| async move {
        let (env, dir) = (env_ref, dir_ref);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pms: Api<PodMigration> = Api::namespaced(client.clone(), &ns);
        let demo = &cluster_ref.images["demo"];
        let app = workload::pod(
            demo,
            "app",
            "node-1",
            serde_json::json!([
                "serve", "--status", ":8080", "--listen", ":9000", "--touch", "48Mi"
            ]),
            serde_json::json!({"migros.io/migratable": "true"}),
            serde_json::json!({}),
        );
        pods.create(&PostParams::default(), &app).await.unwrap();
        let first = eventually(Duration::from_secs(90), || {
            workload::running(&pods, "app", None)
        })
        .await;
        let ip = workload::ip_of(&first).unwrap();
        let process = eventually(Duration::from_secs(60), || async move {
            workload::state(ip).await.filter(|s| num(s, "counter") > 5)
        })
        .await
        .get("id")
        .cloned();
        let same_process = || async {
            let now = eventually(Duration::from_secs(60), || async move {
                workload::state(ip).await
            })
            .await;
            assert_eq!(now.get("id").cloned(), process, "not the same process");
        };

        // A move followed to its end, the output a pipe: plain lines, no terminal codes.
        let out = migros(
            env,
            dir,
            &["-n", &ns, "move", "app", "--to", "node-2", "--wait"],
        )
        .await;
        assert_eq!(out.status.code(), Some(0));
        let moved = created(&out);
        let text = stdout(&out);
        assert!(!text.contains('\x1b'), "terminal codes in a pipe: {text:?}");
        for phase in [
            "Preparing node-1 -> node-2",
            "Checkpointing",
            "Transferring",
        ] {
            assert!(text.contains(phase), "no {phase:?} line: {text}");
        }
        let last = text.lines().last().unwrap();
        assert!(
            last.contains("Succeeded: app runs on node-2, downtime "),
            "last line: {last}"
        );
        let pm = pms.get(&moved).await.unwrap();
        assert_eq!(pm.status.as_ref().unwrap().phase, Some(Phase::Succeeded));
        assert_eq!(pm.spec.target_node.as_deref(), Some("node-2"));
        let on_two = eventually(Duration::from_secs(60), || {
            workload::running(&pods, "app", first.metadata.uid.as_deref())
        })
        .await;
        assert_eq!(node_of(&on_two), "node-2");
        assert_eq!(workload::ip_of(&on_two), Some(ip));
        same_process().await;

        // A move that cannot be done: the reason, and the exit code of a failure.
        let out = migros(
            env,
            dir,
            &["-n", &ns, "move", "app", "--to", "node-9", "--wait"],
        )
        .await;
        assert_eq!(out.status.code(), Some(4));
        assert!(
            stdout(&out).contains("Failed (TargetUnavailable): target node node-9 does not exist"),
            "{}",
            stdout(&out)
        );
        let failed = created(&out);
        // Input the API server refuses (a CEL rule): its message, exit code 1, nothing made.
        let names = || async {
            let list = pms.list(&Default::default()).await.unwrap();
            list.iter()
                .map(|p| p.name_any())
                .collect::<BTreeSet<String>>()
        };
        let before = names().await;
        let out = migros(
            env,
            dir,
            &["-n", &ns, "move", "app", "--bandwidth-limit", "1Ki"],
        )
        .await;
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .starts_with("error: PodMigration.migros.io \"app-"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("bandwidthLimit must be a quantity of at least 64Ki")
        );
        let after = names().await;
        assert_eq!(before, after);
        let out = migros(env, dir, &["-n", &ns, "move", "nothing"]).await;
        assert_eq!(out.status.code(), Some(1));

        // The status table: one row per migration of the pod, oldest first.
        let out = migros(env, dir, &["-n", &ns, "status", "app"]).await;
        assert_eq!(out.status.code(), Some(0));
        let text = stdout(&out);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME", "POD", "PHASE", "SOURCE", "TARGET", "DOWNTIME", "AGE", "REASON"
            ]
        );
        let row = |name: &str| -> Vec<String> {
            text.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no row {name}: {text}"))
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        let done = row(&moved);
        assert_eq!(done[1..5], ["app", "Succeeded", "node-1", "node-2"]);
        assert!(
            done[5].ends_with('s') && done[5] != "-",
            "downtime {:?}",
            done[5]
        );
        let refused = row(&failed);
        assert_eq!(refused[2], "Failed");
        assert_eq!(refused.last().unwrap(), "TargetUnavailable");
        assert!(
            text.find(&moved) < text.find(&failed),
            "oldest first: {text}"
        );
        // Past the commit point the source keeps its checkpoint and the target the one it
        // received, until the PodMigration goes: the agents publish them on their Leases with
        // the bytes on their disk (the 48 MiB the pod touched, and more), and status lists them.
        let moved_uid = pm.metadata.uid.clone().unwrap();
        for (node, role) in [("node-1", "source"), ("node-2", "target")] {
            let kept = eventually(Duration::from_secs(60), || async {
                kept_on(&client, node)
                    .await
                    .into_iter()
                    .find(|k| k.migration == moved_uid)
            })
            .await;
            assert_eq!((kept.role.as_str(), kept.pod.as_str()), (role, "app"));
            assert!(kept.bytes > 48 << 20, "{kept:?}");
            assert!(kept.location.starts_with(&format!("{node}:/")), "{kept:?}");
        }
        let out = migros(env, dir, &["-n", &ns, "status", "app"]).await;
        let text = stdout(&out);
        assert!(text.contains("Checkpoints the agents keep"), "{text}");
        let rows = kept_rows(&text);
        for (role, node) in [("source", "node-1:"), ("target", "node-2:")] {
            assert!(
                rows.iter().any(|r| r[0] == moved
                    && r[1] == "app"
                    && r[2] == role
                    && r[3].starts_with(node)
                    && r[4].ends_with("Mi")),
                "no kept {role} of {moved}: {text}"
            );
        }

        // The byte budget (128Mi per sandbox node): a bigger checkpoint of a second pod on the
        // same two nodes puts each over it once that migration ended; the older checkpoint
        // (app's, whose pod runs anyway) goes, the newer stays.
        let big = workload::pod(
            demo,
            "big",
            "node-1",
            serde_json::json!(["serve", "--status", ":8080", "--touch", "96Mi"]),
            serde_json::json!({"migros.io/migratable": "true"}),
            serde_json::json!({}),
        );
        pods.create(&PostParams::default(), &big).await.unwrap();
        let big_ip = workload::ip_of(
            &eventually(Duration::from_secs(90), || {
                workload::running(&pods, "big", None)
            })
            .await,
        )
        .unwrap();
        eventually(Duration::from_secs(60), || async move {
            workload::state(big_ip)
                .await
                .filter(|s| num(s, "counter") > 2)
        })
        .await;
        let out = migros(
            env,
            dir,
            &["-n", &ns, "move", "big", "--to", "node-2", "--wait"],
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
        let big_uid = pms.get(&created(&out)).await.unwrap().metadata.uid.unwrap();
        let budget: u64 = 128 << 20;
        let mut big_kept = Vec::new();
        for node in ["node-1", "node-2"] {
            // The older checkpoint goes; the newer is decided in the same collection.
            let kept = eventually(Duration::from_secs(60), || async {
                let kept = kept_on(&client, node).await;
                (!kept.iter().any(|k| k.migration == moved_uid)).then_some(kept)
            })
            .await;
            // What earlier tests may have left (a deleted migration's checkpoint after a failed
            // restore, a possible only copy) is removed after the newer one, whose pod runs: the
            // newer stays unless it no longer fits beside that.
            let others: u64 = kept
                .iter()
                .filter(|k| k.migration != big_uid)
                .map(|k| k.bytes)
                .sum();
            match kept.iter().find(|k| k.migration == big_uid) {
                Some(big) => {
                    // The premise: the newer checkpoint alone fits the budget, both did not.
                    assert!((96 << 20..budget).contains(&big.bytes), "{node}: {big:?}");
                    assert!(
                        others + big.bytes <= budget,
                        "{node}: over the budget: {kept:?}"
                    );
                    big_kept.push(node);
                }
                None => assert!(
                    others + (96 << 20) > budget,
                    "{node}: the newer checkpoint went although it fits: {kept:?}"
                ),
            }
        }
        let out = migros(env, dir, &["-n", &ns, "status"]).await;
        let text = stdout(&out);
        let rows = kept_rows(&text);
        assert!(!rows.iter().any(|r| r[0] == moved), "{text}");
        for (node, role) in [("node-1", "source"), ("node-2", "target")] {
            if big_kept.contains(&node) {
                assert!(
                    rows.iter().any(|r| r[1] == "big" && r[2] == role),
                    "no {role} row of big: {text}"
                );
            }
        }
        pods.delete("big", &Default::default()).await.unwrap();

        // An abort before the commit point: the pod goes on where it was, the same process.
        let out = migros(
            env,
            dir,
            &[
                "-n",
                &ns,
                "move",
                "app",
                "--to",
                "node-3",
                "--bandwidth-limit",
                "1Mi",
                "--wait=false",
            ],
        )
        .await;
        assert_eq!(out.status.code(), Some(0));
        let slow = created(&out);
        assert_eq!(
            stdout(&out).lines().count(),
            1,
            "--wait=false follows nothing"
        );
        eventually(Duration::from_secs(60), || async {
            let pm = pms.get(&slow).await.ok()?;
            (pm.status?.phase == Some(Phase::Transferring)).then_some(())
        })
        .await;
        let out = migros(env, dir, &["-n", &ns, "abort", &slow]).await;
        assert_eq!(out.status.code(), Some(0));
        assert!(
            stdout(&out).contains("aborted: app runs as before"),
            "{}",
            stdout(&out)
        );
        assert!(
            pms.get_opt(&slow).await.unwrap().is_none(),
            "the aborted migration stays"
        );
        let still = pods.get("app").await.unwrap();
        assert_eq!(still.metadata.uid, on_two.metadata.uid);
        assert_eq!(node_of(&still), "node-2");
        same_process().await;
        // A finished migration has nothing to abort.
        let out = migros(env, dir, &["-n", &ns, "abort", &moved]).await;
        assert_eq!(out.status.code(), Some(1));

        // Under a real terminal: the bar moves while the bytes do.
        let frames = under_tmux(env, dir, &ns).await;
        // The bytes the bar shows (`12.00 MiB/48.05 MiB`), as they changed.
        let moved_bytes: BTreeSet<&str> = frames
            .iter()
            .flat_map(|f| f.lines())
            .filter(|l| l.contains("Transferring ["))
            .filter_map(|l| l.split_once("] ")?.1.split('/').next())
            .collect();
        assert!(
            moved_bytes.len() >= 2,
            "the progress bar did not move ({} frames, bytes shown {moved_bytes:?})",
            frames.len()
        );
        let end = frames.last().unwrap();
        assert!(end.contains("Succeeded: app runs on node-3"), "{end}");
        assert!(end.contains("EXIT=0"), "{end}");
        let on_three = eventually(Duration::from_secs(60), || {
            workload::running(&pods, "app", on_two.metadata.uid.as_deref())
        })
        .await;
        assert_eq!(node_of(&on_three), "node-3");
        same_process().await;

        // A drain of node-3: cordoned, the migratable pod moved, the other left with its reason.
        let plain = workload::pod(
            demo,
            "plain",
            "node-3",
            serde_json::json!(["serve", "--status", ":8080"]),
            serde_json::json!({}),
            serde_json::json!({}),
        );
        pods.create(&PostParams::default(), &plain).await.unwrap();
        let plain = eventually(Duration::from_secs(90), || {
            workload::running(&pods, "plain", None)
        })
        .await;
        let out = migros(env, dir, &["drain", "node-3"]).await;
        set_unschedulable(&client, "node-3", false).await;
        assert_eq!(out.status.code(), Some(0));
        let text = stdout(&out);
        assert!(text.starts_with("node/node-3 cordoned\n"), "{text}");
        assert!(
            text.contains(&format!("  {ns}/plain: not migratable")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{ns}/app: Succeeded: app runs on node-")),
            "{text}"
        );
        assert!(text.contains(" off node/node-3:\n"), "{text}");
        assert!(
            text.trim_end().ends_with(" moved") && text.contains("\nnode/node-3: "),
            "{text}"
        );
        let drained = eventually(Duration::from_secs(60), || {
            workload::running(&pods, "app", on_three.metadata.uid.as_deref())
        })
        .await;
        assert_ne!(node_of(&drained), "node-3");
        assert_eq!(workload::ip_of(&drained), Some(ip));
        same_process().await;
        let left = pods.get("plain").await.unwrap();
        assert_eq!(
            left.metadata.uid, plain.metadata.uid,
            "the other pod was touched"
        );
        let drain_pm = pms
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|p| p.name_any().starts_with("app-drain-"))
            .expect("the drain's migration");
        assert_eq!(
            drain_pm
                .labels()
                .get("migros.io/reason")
                .map(String::as_str),
            Some("kubectl-migros-drain")
        );
    })
    .await;
    release::uninstall(&dirs, &env).expect("helm uninstall");
}

/// What the agent of `node` publishes on its Lease that it keeps.
async fn kept_on(client: &kube::Client, node: &str) -> Vec<KeptCheckpoint> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), release::NAMESPACE);
    let lease = leases
        .get_opt(&format!("{LEASE_PREFIX}{node}"))
        .await
        .unwrap();
    lease
        .map(|l| discovery::kept_of(l.annotations()).expect("a list of kept checkpoints"))
        .unwrap_or_default()
}

/// The rows (cells) of the kept checkpoints' table in `status` output.
fn kept_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip_while(|l| !l.starts_with("MIGRATION "))
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// `kubectl migros move app --to node-3 --wait` in a tmux session of its own (a real terminal),
/// its screen captured every 100 ms until the command ends: the frames seen, in order.
async fn under_tmux(env: &Env, dir: &Path, ns: &str) -> Vec<String> {
    let socket = format!("kube-migros-{ns}");
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .expect("tmux runs")
    };
    // The environment is given in the command: the session's shell may set its own PATH.
    let script = format!(
        "env KUBECONFIG={} PATH={}:{} kubectl migros -n {ns} move app --to node-3 \
         --bandwidth-limit 2Mi --wait; echo EXIT=$?; sleep 300",
        env.kubeconfig.display(),
        env.kubectl().parent().unwrap().display(),
        path_with(dir)
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "plugin",
        "-x",
        "160",
        "-y",
        "12",
        "-e",
        "TERM=xterm-256color",
        &script,
    ]);
    assert!(out.status.success(), "tmux: {out:?}");
    let mut frames: Vec<String> = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let out = tmux(&["capture-pane", "-p", "-t", "plugin"]);
        let frame = String::from_utf8_lossy(&out.stdout).into_owned();
        let ended = frame.contains("EXIT=");
        if frames.last() != Some(&frame) {
            frames.push(frame);
        }
        if ended || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tmux(&["kill-server"]);
    eprintln!(
        "under tmux, {} frames; the last:\n{}",
        frames.len(),
        frames.last().unwrap()
    );
    frames
}
