//! `migros-runc`: the OCI runtime of the `kube-migros` RuntimeClass. runc for every container, except
//! the first start of a container that is the restore of a migration, which is restored from the
//! checkpoint the node agent staged (see `node_agent::wrapper`). containerd runs it through the runc
//! shim (`BinaryName`); the real runc is `runc` on PATH (or `$MIGROS_RUNC_RUNTIME`), the agent's
//! store `/var/lib/kube-migros` (or `$MIGROS_RUNC_STORE`).
//!
//! `migros-runc --install-to DIR` copies itself to `DIR/migros-runc` (what the agent's DaemonSet
//! does on each node, from its image).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use node_agent::{
    empty_dirs, layer,
    store::Store,
    wrapper::{Call, Container, Plan, Restores, restore_args},
};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let [flag, dir] = args.as_slice()
        && flag == "--install-to"
    {
        return match install(Path::new(dir)) {
            Ok(to) => {
                println!("installed {}", to.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "migros-runc: installing into {}: {e}",
                    Path::new(dir).display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let call = Call::parse(&args);
    let runc = std::env::var_os("MIGROS_RUNC_RUNTIME").unwrap_or_else(|| "runc".into());
    let store = std::env::var_os("MIGROS_RUNC_STORE")
        .map_or_else(|| PathBuf::from("/var/lib/kube-migros"), PathBuf::from);
    let restores = Restores {
        store: Store::new(&store),
    };
    let result = match call.command.as_str() {
        "create" => create(&call, &args, &runc, &restores),
        "start" if started(&call, &runc) => Ok(ExitCode::SUCCESS),
        _ => Err(runc_as_is(&runc, &args)),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            fail(&call, &message);
            ExitCode::FAILURE
        }
    }
}

/// Copies this executable to `dir/migros-runc`, replacing an older one at once (a rename).
fn install(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let (tmp, to) = (dir.join(".migros-runc.tmp"), dir.join("migros-runc"));
    std::fs::copy(std::env::current_exe()?, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &to)?;
    Ok(to)
}

/// Replaces this process with runc, called with the same arguments; returns only if that fails.
fn runc_as_is(runc: &OsString, args: &[OsString]) -> String {
    let e = Command::new(runc).args(args).exec();
    format!("cannot run {}: {e}", runc.to_string_lossy())
}

/// A `create`: runc's, or a restore in its place.
fn create(
    call: &Call,
    args: &[OsString],
    runc: &OsString,
    restores: &Restores,
) -> Result<ExitCode, String> {
    let bundle = call
        .option(&["--bundle", "-b"])
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let container = annotations(&bundle).and_then(|a| Container::from_annotations(&a));
    match restores.plan(container.as_ref()) {
        Plan::Runc => Err(runc_as_is(runc, args)),
        Plan::Refuse(why) => Err(why),
        Plan::Restore { migration, dir } => {
            // Checked by the plan: a restore is of a container.
            let container = container.ok_or("no container")?;
            restore(call, runc, &bundle, &dir)?;
            if let Some(marker) = restores.marker(&container) {
                mark(&marker, &migration, call.id.as_deref().unwrap_or_default())?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Applies the container's filesystem changes to its new root (and the pod's emptyDir volumes
/// that came with it to the new pod's) and restores its processes.
fn restore(call: &Call, runc: &OsString, bundle: &Path, dir: &Path) -> Result<(), String> {
    if dir.join(empty_dirs::DIR).is_dir() {
        let sources = mount_sources(bundle);
        let pod = empty_dirs::pod_dir(sources.iter().map(String::as_str)).ok_or_else(|| {
            format!(
                "the checkpoint carries emptyDir volumes, but the mounts in {} name no pod \
                 directory",
                bundle.join("config.json").display()
            )
        })?;
        empty_dirs::apply(dir, &pod)?;
    }
    let diff = dir.join("rootfs-diff.tar");
    if diff.exists() {
        let file = std::fs::File::open(&diff).map_err(|e| format!("{}: {e}", diff.display()))?;
        let layer = layer::decompressed(std::io::BufReader::new(file))
            .map_err(|e| format!("{}: {e}", diff.display()))?;
        layer::apply(layer, &bundle.join("rootfs"))
            .map_err(|e| format!("applying the container's filesystem changes: {e}"))?;
    }
    std::fs::create_dir_all(dir.join("work")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let status = Command::new(runc)
        .args(restore_args(call, bundle, dir))
        .status()
        .map_err(|e| format!("cannot run {}: {e}", runc.to_string_lossy()))?;
    if !status.success() {
        return Err(format!(
            "runc restore from {} failed ({status}); CRIU's log is {}",
            dir.display(),
            dir.join("work").join("restore.log").display()
        ));
    }
    Ok(())
}

/// Records that the container was restored (a later start of it starts fresh).
fn mark(marker: &Path, migration: &str, id: &str) -> Result<(), String> {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = marker.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(marker, format!("{migration} {id}\n"))
    };
    write().map_err(|e| format!("recording the restore at {}: {e}", marker.display()))
}

/// Whether the container of a `start` runs already: a restore started it at `create`.
fn started(call: &Call, runc: &OsString) -> bool {
    let Some(id) = &call.id else { return false };
    let Ok(out) = Command::new(runc)
        .args(&call.globals)
        .args(["state", id])
        .output()
    else {
        return false;
    };
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    out.status.success() && state["status"] == "running"
}

/// The sources of the mounts of the OCI bundle's configuration.
fn mount_sources(bundle: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return Vec::new();
    };
    let config: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    config["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["source"].as_str().map(String::from))
        .collect()
}

/// The annotations of the OCI bundle's configuration.
fn annotations(bundle: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&text).ok()?;
    serde_json::from_value(config["annotations"].clone()).ok()
}

/// Reports a failure where the shim reads runc's errors (the `--log` file, JSON lines), so that it
/// reaches the container's status and the pod's events, and on stderr.
fn fail(call: &Call, message: &str) {
    eprintln!("migros-runc: {message}");
    let Some(log) = call.global("--log") else {
        return;
    };
    let line = serde_json::json!({
        "level": "error",
        "msg": format!("migros-runc: {message}"),
        "time": k8s_openapi::jiff::Timestamp::now().to_string(),
    });
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(file, "{line}");
    }
}
