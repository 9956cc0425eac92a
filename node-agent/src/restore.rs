//! Restore backends: how a node turns a received, vetted checkpoint archive into something its
//! runtime restores a container from. Built: the CRI backends (containerd 2.1-2.3, CRI-O) with the
//! archive's path (for CRI clients that create the container themselves) or a checkpoint OCI image
//! (what the kubelet can start). An OCI runtime wrapper selected by a RuntimeClass, or KEP-5823
//! `RestorePod`, slot in here (docs/architecture.md, "Restore backends").

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    oci,
    runtime::Runtime,
};

/// The restore backend that hands the runtime the archive's path.
pub const CRI_CHECKPOINT_ARCHIVE: &str = "cri-checkpoint-archive";
/// The restore backend that hands the runtime a checkpoint OCI image.
pub const CRI_CHECKPOINT_IMAGE: &str = "cri-checkpoint-image";

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One way of restoring.
pub trait RestoreBackend: Send + Sync + std::fmt::Debug {
    /// The backend's name as capabilities report it.
    fn name(&self) -> &'static str;
    /// Makes the vetted checkpoint archive of `container` restorable (it may be moved into
    /// `work`) and answers the reference the replacement pod's container names as its image.
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
/// pulls from, and pulled into the node's runtime at once (so the kubelet finds it present).
#[derive(Debug, Clone)]
pub struct CriCheckpointImage {
    pub registry: oci::Registry,
    pub runtime: Runtime,
}

impl RestoreBackend for CriCheckpointImage {
    fn name(&self) -> &'static str {
        CRI_CHECKPOINT_IMAGE
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
                .push(&image, &format!("{uid}-{container}"))
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
