//! `migros-runc`, the OCI runtime of the `kube-migros` RuntimeClass, decided here (pure, apart from
//! reading files): containerd runs it in place of runc (the runc shim's `BinaryName`), and for every
//! container it is runc, except the first start of each container of a pod that is the restore of
//! a migration. For that one, `create` restores the container from the checkpoint the node agent
//! staged for the migration (`runc restore`, after applying the container's filesystem changes), and
//! `start` finds it running. Later starts of the same container (a restart) start fresh from its
//! image, as they would have on the source node.
//!
//! Which pod is a restore, and of which migration, comes from the container's OCI annotations: the
//! CRI's sandbox namespace, name and UID and container name, and the pod annotation
//! `migros.io/migration-uid` (the runtime handler passes `migros.io/*` pod annotations through).
//! Checkpoints are only ever taken from the agent's store, from the record of that migration,
//! which must name this pod and container: an annotation cannot point the wrapper anywhere else.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use crate::store::{self, Record, Role};

/// The pod annotation naming the migration a replacement pod restores.
pub const MIGRATION_UID_ANNOTATION: &str = "migros.io/migration-uid";
/// The CRI's annotations of a container (containerd and CRI-O set them).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// runc's global options that take a value (`--root DIR`, also written `--root=DIR`).
const GLOBAL_VALUES: [&str; 4] = ["--root", "--log", "--log-format", "--criu"];
/// Options of `create` that take a value.
const CREATE_VALUES: [&str; 5] = [
    "--bundle",
    "-b",
    "--pid-file",
    "--console-socket",
    "--preserve-fds",
];

/// One call of the runtime, as the runc shim makes it: `[global options] command [options] id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub globals: Vec<OsString>,
    pub command: String,
    pub options: Vec<OsString>,
    /// The container ID (the last argument), when the command has one.
    pub id: Option<String>,
}

impl Call {
    pub fn parse(args: &[OsString]) -> Self {
        let mut i = 0;
        let mut globals = Vec::new();
        while i < args.len() {
            let arg = args[i].to_string_lossy();
            if !arg.starts_with('-') {
                break;
            }
            globals.push(args[i].clone());
            if GLOBAL_VALUES.contains(&arg.as_ref()) && i + 1 < args.len() {
                globals.push(args[i + 1].clone());
                i += 1;
            }
            i += 1;
        }
        let command = args
            .get(i)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rest = args.get(i + 1..).unwrap_or_default();
        let id = rest
            .last()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| !a.starts_with('-'));
        let options = match id {
            Some(_) => rest[..rest.len() - 1].to_vec(),
            None => rest.to_vec(),
        };
        Self {
            globals,
            command,
            options,
            id,
        }
    }

    /// The value of option `name` of the command (`--name VALUE` or `--name=VALUE`).
    pub fn option(&self, names: &[&str]) -> Option<&OsStr> {
        let mut it = self.options.iter();
        while let Some(arg) = it.next() {
            let text = arg.to_string_lossy();
            if names.contains(&text.as_ref()) {
                return it.next().map(OsString::as_os_str);
            }
            for name in names {
                if let Some(value) = text.strip_prefix(&format!("{name}=")) {
                    let at = arg.len() - value.len();
                    return Some(OsStr::new(&arg.to_str()?[at..]));
                }
            }
        }
        None
    }

    /// The value of global option `name` (`--log FILE`).
    pub fn global(&self, name: &str) -> Option<&OsStr> {
        let mut it = self.globals.iter();
        while let Some(arg) = it.next() {
            if arg == name {
                return it.next().map(OsString::as_os_str);
            }
            if let Some(value) = arg.to_str()?.strip_prefix(&format!("{name}=")) {
                return Some(OsStr::new(value));
            }
        }
        None
    }

    /// The `create` options restore understands too (everything but `--bundle`, which the restore
    /// call names itself, and `--no-new-keyring` / `--preserve-fds`, which it has not).
    pub fn restore_options(&self) -> Vec<OsString> {
        let mut kept = Vec::new();
        let mut it = self.options.iter();
        while let Some(arg) = it.next() {
            let text = arg.to_string_lossy();
            let name = text.split('=').next().unwrap_or_default();
            let takes_value = CREATE_VALUES.contains(&name) && !text.contains('=');
            let dropped = matches!(
                name,
                "--bundle" | "-b" | "--no-new-keyring" | "--preserve-fds"
            );
            if !dropped {
                kept.push(arg.clone());
            }
            if takes_value
                && let Some(value) = it.next()
                && !dropped
            {
                kept.push(value.clone());
            }
        }
        kept
    }
}

/// What a container is, from its OCI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub name: String,
    /// The migration the pod is a restore of, if any.
    pub migration: Option<String>,
}

impl Container {
    /// A workload container of a pod (not the sandbox), from its annotations.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Self> {
        if annotations.get(CONTAINER_TYPE).map(String::as_str) != Some("container") {
            return None;
        }
        let get = |key: &str| annotations.get(key).cloned();
        Some(Self {
            namespace: get(SANDBOX_NAMESPACE)?,
            pod: get(SANDBOX_NAME)?,
            pod_uid: get(SANDBOX_UID)?,
            name: get(CONTAINER_NAME)?,
            migration: get(MIGRATION_UID_ANNOTATION).filter(|m| !m.is_empty()),
        })
    }
}

/// What to do with a `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not a restore (or one already done: this is a restart): runc as it is.
    Runc,
    /// Restore the container from the checkpoint in `dir`.
    Restore { migration: String, dir: PathBuf },
    /// A restore that cannot be done: fail the create with this message (a fresh start in place
    /// of a restore would run the workload from its beginning).
    Refuse(String),
}

/// The node's restores, as the wrapper sees them: the agent's store.
#[derive(Debug, Clone)]
pub struct Restores {
    pub store: store::Store,
}

impl Restores {
    /// Where the marker of a done restore of `container` lives: by pod UID (a restart of the
    /// container, or a new sandbox of the same pod, keeps it) and container name.
    pub fn marker(&self, container: &Container) -> Option<PathBuf> {
        let plain = |s: &str| store::valid_uid(s);
        (plain(&container.pod_uid) && store::valid_name(&container.name)).then(|| {
            self.store
                .root()
                .join("restored")
                .join(&container.pod_uid)
                .join(&container.name)
        })
    }

    /// The staged checkpoint of `container` in migration `uid`.
    pub fn staged_dir(&self, uid: &str, container: &str) -> Option<PathBuf> {
        Some(
            self.store
                .dir(uid)
                .ok()?
                .join(agent_api::layout::STAGED)
                .join(container),
        )
    }

    /// What to do with the `create` of `container`.
    pub fn plan(&self, container: Option<&Container>) -> Plan {
        let Some(c) = container else {
            return Plan::Runc;
        };
        let Some(uid) = &c.migration else {
            return Plan::Runc;
        };
        if self.marker(c).is_some_and(|m| m.exists()) {
            return Plan::Runc;
        }
        let refuse = |why: String| {
            Plan::Refuse(format!(
                "container {} of pod {}/{} is the restore of migration {uid}, but {why}; it is not \
                 started fresh in its place",
                c.name, c.namespace, c.pod
            ))
        };
        if !store::valid_uid(uid) || !store::valid_name(&c.name) {
            return refuse("the migration UID or the container name is not valid".into());
        }
        let record = match self.store.load(uid) {
            Ok(Some(r)) => r,
            Ok(None) => return refuse("this node has no record of the migration".into()),
            Err(e) => return refuse(format!("its record cannot be read: {e}")),
        };
        if let Err(why) = owns(&record, c) {
            return refuse(why);
        }
        let Some(dir) = self.staged_dir(uid, &c.name) else {
            return refuse("its staged checkpoint has no place in the store".into());
        };
        let staged = record.containers.iter().any(|s| {
            s.name == c.name && s.staged.as_deref() == Some(dir.to_string_lossy().as_ref())
        });
        if !staged || !dir.join("checkpoint").join("inventory.img").is_file() {
            return refuse(format!(
                "no complete checkpoint of the container is staged at {}",
                dir.display()
            ));
        }
        Plan::Restore {
            migration: uid.clone(),
            dir,
        }
    }
}

/// Whether `record` is the target side of a migration of exactly this pod and container.
fn owns(record: &Record, c: &Container) -> Result<(), String> {
    if record.role != Role::Target {
        return Err("this node is not the migration's target".into());
    }
    if record.namespace != c.namespace || record.pod != c.pod {
        return Err(format!(
            "the migration moves pod {}/{}, not this one",
            record.namespace, record.pod
        ));
    }
    if !record.containers.iter().any(|s| s.name == c.name) {
        return Err("the migration has no such container".into());
    }
    Ok(())
}

/// The arguments of the `runc restore` that replaces `call` (a `create`) for a checkpoint in `dir`:
/// detached (the shim reaps the restored process as it would a created one), established TCP
/// connections and file locks kept, CRIU's log in `dir/work`.
pub fn restore_args(call: &Call, bundle: &Path, dir: &Path) -> Vec<OsString> {
    let mut args = call.globals.clone();
    args.push("restore".into());
    args.extend(
        [
            "--detach",
            "--no-subreaper",
            "--tcp-established",
            "--file-locks",
        ]
        .map(OsString::from),
    );
    args.push("--bundle".into());
    args.push(bundle.into());
    args.push("--image-path".into());
    args.push(dir.join("checkpoint").into());
    args.push("--work-path".into());
    args.push(dir.join("work").into());
    // Post-copy: the memory comes through the lazy-pages daemon the agent started for it.
    if dir.join(crate::post_copy::LAZY_MARKER).exists() {
        args.push("--lazy-pages".into());
    }
    args.extend(call.restore_options());
    args.extend(call.id.clone().map(OsString::from));
    args
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::{Container as Staged, Store};

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn shim_calls_parse_into_globals_command_options_and_id() {
        let call = Call::parse(&args(
            "--root /run/containerd/runc/k8s.io --log /b/log.json --log-format json --systemd-cgroup \
             create --bundle /b --pid-file /b/init.pid --no-new-keyring abc123",
        ));
        assert_eq!(call.command, "create");
        assert_eq!(call.id.as_deref(), Some("abc123"));
        assert_eq!(call.option(&["--bundle", "-b"]), Some(OsStr::new("/b")));
        assert_eq!(call.global("--log"), Some(OsStr::new("/b/log.json")));
        assert_eq!(call.globals.len(), 7);
        assert_eq!(
            call.restore_options(),
            args("--pid-file /b/init.pid"),
            "the bundle is named by the restore itself; restore has no --no-new-keyring"
        );
        let eq = Call::parse(&args("--root=/r create --bundle=/b --console-socket=/s x"));
        assert_eq!(eq.option(&["--bundle"]), Some(OsStr::new("/b")));
        assert_eq!(eq.restore_options(), args("--console-socket=/s"));
        let state = Call::parse(&args("--root /r state abc"));
        assert_eq!(
            (state.command.as_str(), state.id.as_deref()),
            ("state", Some("abc"))
        );
        let features = Call::parse(&args("features"));
        assert_eq!((features.command.as_str(), features.id), ("features", None));
    }

    #[test]
    fn the_restore_names_the_checkpoint_and_keeps_what_the_shim_asked() {
        let call = Call::parse(&args(
            "--root /r --log /l create --bundle /b --pid-file /p --console-socket /s id1",
        ));
        let got = restore_args(&call, Path::new("/b"), Path::new("/store/m/staged/app"));
        assert_eq!(
            got,
            args(
                "--root /r --log /l restore --detach --no-subreaper --tcp-established --file-locks \
                 --bundle /b --image-path /store/m/staged/app/checkpoint \
                 --work-path /store/m/staged/app/work --pid-file /p --console-socket /s id1"
            )
        );
    }

    fn annotations(migration: Option<&str>) -> BTreeMap<String, String> {
        let mut a: BTreeMap<String, String> = [
            (CONTAINER_TYPE, "container"),
            (SANDBOX_NAMESPACE, "team"),
            (SANDBOX_NAME, "app"),
            (SANDBOX_UID, "pod-uid-2"),
            (CONTAINER_NAME, "main"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if let Some(m) = migration {
            a.insert(MIGRATION_UID_ANNOTATION.into(), m.into());
        }
        a
    }

    /// A store where migration `m1` staged container `main` of pod team/app.
    fn staged() -> (tempfile::TempDir, Restores) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let restores = Restores {
            store: store.clone(),
        };
        let staged = restores.staged_dir("m1", "main").unwrap();
        std::fs::create_dir_all(staged.join("checkpoint")).unwrap();
        std::fs::write(staged.join("checkpoint/inventory.img"), b"x").unwrap();
        let mut record = Record::new("m1", Role::Target, "team", "app");
        record.containers.push(Staged {
            name: "main".into(),
            staged: Some(staged.display().to_string()),
            ..Default::default()
        });
        store.save(&record).unwrap();
        (dir, restores)
    }

    #[test]
    fn only_a_pod_marked_as_a_restore_is_restored_and_only_once() {
        let (_dir, restores) = staged();
        let plain = Container::from_annotations(&annotations(None));
        assert_eq!(restores.plan(plain.as_ref()), Plan::Runc);
        let mut sandbox = annotations(Some("m1"));
        sandbox.insert(CONTAINER_TYPE.into(), "sandbox".into());
        assert_eq!(Container::from_annotations(&sandbox), None);
        let restore = Container::from_annotations(&annotations(Some("m1"))).unwrap();
        let Plan::Restore { migration, dir } = restores.plan(Some(&restore)) else {
            panic!("not a restore");
        };
        assert_eq!(migration, "m1");
        assert!(dir.ends_with("migrations/m1/staged/main"));
        // Once done, a restart of the container starts fresh.
        let marker = restores.marker(&restore).unwrap();
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, "m1").unwrap();
        assert_eq!(restores.plan(Some(&restore)), Plan::Runc);
    }

    #[test]
    fn a_restore_that_cannot_be_done_is_refused_never_started_fresh() {
        let (dir, restores) = staged();
        let refused = |a: BTreeMap<String, String>| match restores
            .plan(Container::from_annotations(&a).as_ref())
        {
            Plan::Refuse(why) => why,
            other => panic!("{other:?}"),
        };
        // Another migration, or one of another pod, or a path instead of a UID.
        assert!(refused(annotations(Some("m2"))).contains("no record"));
        assert!(refused(annotations(Some("../../etc"))).contains("not valid"));
        let mut other_pod = annotations(Some("m1"));
        other_pod.insert(SANDBOX_NAME.into(), "intruder".into());
        assert!(refused(other_pod).contains("moves pod team/app, not this one"));
        let mut other_container = annotations(Some("m1"));
        other_container.insert(CONTAINER_NAME.into(), "side".into());
        assert!(refused(other_container).contains("no such container"));
        // Missing or partial images.
        std::fs::remove_file(
            dir.path()
                .join("migrations/m1/staged/main/checkpoint/inventory.img"),
        )
        .unwrap();
        assert!(refused(annotations(Some("m1"))).contains("no complete checkpoint"));
    }
}
