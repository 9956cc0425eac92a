//! Restore backends: how a node turns a received, vetted checkpoint archive into something its
//! runtime restores a container from. Built: the runtime wrapper (the archive unpacked into the
//! store, restored by `migros-runc` when the kubelet starts the replacement under the `kube-migros`
//! RuntimeClass: any containerd 2.x, no registry), and the CRI backends (containerd 2.1-2.3, CRI-O)
//! with the archive's path (for CRI clients that create the container themselves) or a checkpoint
//! OCI image (what the kubelet can start there). KEP-5823 `RestorePod` slots in here when it ships
//! (docs/architecture.md, "Restore backends").

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    oci,
    runtime::Runtime,
};

pub use agent_api::backend::{CRI_CHECKPOINT_ARCHIVE, CRI_CHECKPOINT_IMAGE, RUNTIME_WRAPPER};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One way of restoring.
pub trait RestoreBackend: Send + Sync + std::fmt::Debug {
    /// The backend's name as capabilities report it.
    fn name(&self) -> &'static str;
    /// Why the node cannot restore this way now, if it cannot (e.g. the runtime lacks a handler).
    fn unavailable<'a>(&'a self, _runtime: &'a Runtime) -> BoxFuture<'a, Option<String>> {
        Box::pin(std::future::ready(None))
    }
    /// Whether the archive is unpacked into `<work>/<container>` as it arrives (checked entry by
    /// entry), instead of received whole into a file.
    fn unpacks_on_arrival(&self) -> bool {
        false
    }
    /// Makes the vetted checkpoint archive of `container` restorable (it may be moved into
    /// `work`) and answers the reference the replacement pod's container names as its image.
    /// With [`Self::unpacks_on_arrival`], `archive` is the directory it was unpacked into.
    fn stage<'a>(
        &'a self,
        uid: &'a str,
        container: &'a str,
        archive: &'a Path,
        work: &'a Path,
    ) -> BoxFuture<'a, Result<String>>;
}

/// Moves the vetted archive to `<work>/<container>.tar`.
async fn keep(container: &str, archive: &Path, work: &Path) -> Result<PathBuf> {
    let out = work.join(format!("{container}.tar"));
    tokio::fs::rename(archive, &out)
        .await
        .map_err(Error::io(&out))?;
    Ok(out)
}

/// Restore by the runtime wrapper: the archive is unpacked as it arrives into `<work>/<container>/`
/// (the CRIU images in `checkpoint/`, the filesystem changes in `rootfs-diff.tar`), where
/// `migros-runc` finds it for the replacement pod's container; the pod keeps its images.
#[derive(Debug, Clone)]
pub struct RuntimeWrapper {
    /// The runtime handler (RuntimeClass handler) that runs `migros-runc`.
    pub handler: String,
}

impl RestoreBackend for RuntimeWrapper {
    fn name(&self) -> &'static str {
        RUNTIME_WRAPPER
    }

    fn unavailable<'a>(&'a self, runtime: &'a Runtime) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            match runtime.handlers().await {
                Ok(handlers) if handlers.contains(&self.handler) => None,
                Ok(handlers) => Some(format!(
                    "{RUNTIME_WRAPPER}: the runtime has no handler {:?} (it has {handlers:?}); \
                     configure it to run migros-runc (docs/node-agent.md)",
                    self.handler
                )),
                Err(e) => Some(format!("{RUNTIME_WRAPPER}: {e}")),
            }
        })
    }

    fn unpacks_on_arrival(&self) -> bool {
        true
    }

    fn stage<'a>(
        &'a self,
        _uid: &'a str,
        container: &'a str,
        unpacked: &'a Path,
        _work: &'a Path,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            // migros-runc applies the layers inside when it restores: look at them now, while a
            // refusal still rolls the migration back.
            let (dir, name) = (unpacked.to_path_buf(), container.to_string());
            tokio::task::spawn_blocking(move || check_layers(&dir, &name)).await??;
            Ok(unpacked.display().to_string())
        })
    }
}

/// Checks the layers an unpacked checkpoint carries (`rootfs-diff.tar`, `empty-dirs/*.tar`) as
/// applying them would, writing nothing.
fn check_layers(dir: &Path, container: &str) -> Result<()> {
    let mut layers = vec![dir.join("rootfs-diff.tar")];
    if let Ok(entries) = std::fs::read_dir(dir.join(crate::empty_dirs::DIR)) {
        layers.extend(entries.filter_map(|e| Some(e.ok()?.path())));
    }
    for path in layers.iter().filter(|p| p.exists()) {
        let file = std::fs::File::open(path).map_err(Error::io(path))?;
        let reader =
            crate::layer::decompressed(std::io::BufReader::new(file)).map_err(Error::io(path))?;
        crate::layer::check(reader).map_err(|e| {
            Error::Invalid(format!(
                "the checkpoint of container {container} carries a layer that is not safe to apply ({}): {e}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
        })?;
    }
    Ok(())
}

/// Whether a runtime restores a container created from a checkpoint image: containerd removed that
/// in 2.4 (2.2 and 2.3 have it off unless `enable_experimental_restore_via_create` is set, which
/// cannot be seen from here); CRI-O keeps it.
fn restores_from_images(runtime: &str, version: &str) -> Result<(), String> {
    let mut parts = version.trim_start_matches('v').split('.');
    let (major, minor) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts.next().and_then(|p| p.parse::<u32>().ok()),
    );
    match (runtime, major, minor) {
        ("containerd", Some(major), Some(minor)) if (major, minor) >= (2, 4) => Err(format!(
            "{CRI_CHECKPOINT_IMAGE}: containerd {version} does not restore from checkpoint images \
             (removed in 2.4); the runtime wrapper does"
        )),
        _ => Ok(()),
    }
}

/// Restore through the CRI from an archive path: `CreateContainer` whose image is the archive.
#[derive(Debug, Clone, Copy)]
pub struct CriCheckpointArchive;

impl RestoreBackend for CriCheckpointArchive {
    fn name(&self) -> &'static str {
        CRI_CHECKPOINT_ARCHIVE
    }

    fn stage<'a>(
        &'a self,
        _uid: &'a str,
        container: &'a str,
        archive: &'a Path,
        work: &'a Path,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move { Ok(keep(container, archive, work).await?.display().to_string()) })
    }
}

/// Restore through the CRI from a checkpoint OCI image: packed, pushed to a registry the node
/// pulls from, and pulled into the node's runtime at once (so the kubelet finds it present). The
/// reference it answers is pinned by the manifest's digest, which the operator checks.
#[derive(Debug, Clone)]
pub struct CriCheckpointImage {
    pub registry: oci::Registry,
    pub runtime: Runtime,
}

impl RestoreBackend for CriCheckpointImage {
    fn name(&self) -> &'static str {
        CRI_CHECKPOINT_IMAGE
    }

    fn unavailable<'a>(&'a self, runtime: &'a Runtime) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let (name, version) = runtime.version().await.ok()?;
            restores_from_images(&name, &version).err()
        })
    }

    fn stage<'a>(
        &'a self,
        uid: &'a str,
        container: &'a str,
        archive: &'a Path,
        work: &'a Path,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            // The checkpoint archive is the image's one layer as it is.
            let layer = keep(container, archive, work).await?;
            let image = {
                let (name, layer) = (container.to_string(), layer.clone());
                tokio::task::spawn_blocking(move || oci::Image::new(&name, &layer)).await??
            };
            let reference = self
                .registry
                .push(&image, &agent_api::checkpoint_image::tag(uid, container))
                .await
                .map_err(|e| Error::from(e).during("pushing the checkpoint image"))?;
            self.runtime
                .pull(&reference)
                .await
                .map_err(|e| Error::from(e).during("pulling the checkpoint image"))?;
            // The runtime has its own copy now.
            let _ = tokio::fs::remove_file(&layer).await;
            Ok(reference)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_from_2_4_is_not_offered_checkpoint_images() {
        assert!(restores_from_images("containerd", "v2.1.9").is_ok());
        assert!(restores_from_images("containerd", "2.3.4").is_ok());
        let why = restores_from_images("containerd", "v2.4.2").unwrap_err();
        assert!(why.contains("removed in 2.4"), "{why}");
        assert!(restores_from_images("containerd", "3.0.0").is_err());
        assert!(restores_from_images("cri-o", "1.34.0").is_ok());
    }
}
