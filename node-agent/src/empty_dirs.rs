//! A pod's `emptyDir` volumes travel with its checkpoint: the source packs each one (the pod is
//! frozen, so nothing writes to them) as a layer into the checkpoint directory of the pod's first
//! container (`empty-dirs/<volume>.tar`); `migros-runc`, restoring that container on the target,
//! applies each to the replacement pod's volume of the same name, which the kubelet has made by
//! then, before CRIU restores a process that may have files there open. Packing and applying are
//! those of the writable layer (`layer.rs`): nothing is written outside the volume.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::layer;

/// Directory of the packed volumes inside a container's checkpoint directory.
pub const DIR: &str = "empty-dirs";
/// Where the kubelet keeps a pod's emptyDir volumes, under the pod's directory.
const VOLUMES: &str = "volumes/kubernetes.io~empty-dir";

/// The emptyDir volumes of the pod `pod_uid` under the kubelet's root directory, by name.
pub fn of_pod(kubelet_dir: &Path, pod_uid: &str) -> io::Result<Vec<(String, PathBuf)>> {
    let dir = kubelet_dir.join("pods").join(pod_uid).join(VOLUMES);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut volumes = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            volumes.push((name.to_string(), entry.path()));
        }
    }
    volumes.sort();
    Ok(volumes)
}

/// Packs `volumes` into `checkpoint/empty-dirs/<name>.tar`; answers the bytes written.
pub fn pack(volumes: &[(String, PathBuf)], checkpoint: &Path) -> Result<u64, layer::Error> {
    if volumes.is_empty() {
        return Ok(0);
    }
    let dir = checkpoint.join(DIR);
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let mut bytes = 0;
    for (name, path) in volumes {
        let tar = dir.join(format!("{name}.tar"));
        let file = fs::File::create(&tar).map_err(io_at(&tar))?;
        layer::write_upper(path, io::BufWriter::new(file))?;
        bytes += fs::metadata(&tar).map_err(io_at(&tar))?.len();
    }
    Ok(bytes)
}

/// The pod directory (`<kubelet>/pods/<uid>`) the mounts of a container's OCI configuration come
/// from (its `/etc/hosts`, its volumes, its termination log).
pub fn pod_dir<'a>(mount_sources: impl IntoIterator<Item = &'a str>) -> Option<PathBuf> {
    mount_sources.into_iter().find_map(|source| {
        let (kubelet, rest) = source.split_once("/pods/")?;
        let uid = rest.split('/').next().filter(|u| !u.is_empty())?;
        Some(Path::new(kubelet).join("pods").join(uid))
    })
}

/// Applies every volume packed in `checkpoint` to the volume of the same name of the pod whose
/// directory is `pod_dir`; a volume the new pod does not have is an error (the pods differ).
pub fn apply(checkpoint: &Path, pod_dir: &Path) -> Result<usize, String> {
    let dir = checkpoint.join(DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut applied = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".tar"))
        else {
            continue;
        };
        if name.contains('/') || name.starts_with('.') {
            return Err(format!("{}: not a volume name", path.display()));
        }
        let volume = pod_dir.join(VOLUMES).join(name);
        if !volume.is_dir() {
            return Err(format!(
                "the restored pod has no emptyDir volume {name} ({} is missing)",
                volume.display()
            ));
        }
        let file = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        layer::apply(io::BufReader::new(file), &volume)
            .map_err(|e| format!("emptyDir volume {name}: {e}"))?;
        applied += 1;
    }
    Ok(applied)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> layer::Error + '_ {
    move |source| layer::Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pods_empty_dirs_are_packed_and_applied_to_the_new_pods_volumes() {
        let root = tempfile::tempdir().unwrap();
        let kubelet = root.path().join("kubelet");
        let old = kubelet.join("pods/old-uid").join(VOLUMES);
        fs::create_dir_all(old.join("data/sub")).unwrap();
        fs::write(old.join("data/id"), "process 42\n").unwrap();
        fs::write(old.join("data/sub/more"), "x").unwrap();
        fs::create_dir_all(old.join("cache")).unwrap();
        let volumes = of_pod(&kubelet, "old-uid").unwrap();
        let names: Vec<&str> = volumes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cache", "data"]);
        let checkpoint = root.path().join("checkpoint/app");
        assert!(pack(&volumes, &checkpoint).unwrap() > 0);
        assert!(of_pod(&kubelet, "no-such-pod").unwrap().is_empty());

        let new = kubelet.join("pods/new-uid");
        let sources = [
            "/proc",
            &*new.join("etc-hosts").to_string_lossy().into_owned(),
        ]
        .map(String::from);
        let pod = pod_dir(sources.iter().map(String::as_str)).unwrap();
        assert_eq!(pod, new);
        // The kubelet makes the volumes before the containers start.
        for v in ["data", "cache"] {
            fs::create_dir_all(new.join(VOLUMES).join(v)).unwrap();
        }
        assert_eq!(apply(&checkpoint, &pod).unwrap(), 2);
        let data = new.join(VOLUMES).join("data");
        assert_eq!(fs::read_to_string(data.join("id")).unwrap(), "process 42\n");
        assert_eq!(fs::read_to_string(data.join("sub/more")).unwrap(), "x");

        // A pod without the volume cannot take the checkpoint.
        fs::remove_dir_all(new.join(VOLUMES).join("cache")).unwrap();
        let why = apply(&checkpoint, &pod).unwrap_err();
        assert!(why.contains("no emptyDir volume cache"), "{why}");
    }
}
