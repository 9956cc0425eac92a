//! Checkpoint OCI images, and pushing them to a registry.
//!
//! Through the kubelet, containerd restores a container from a *checkpoint image*: an OCI image
//! whose one layer holds the files of a checkpoint archive and whose manifest is annotated with the
//! checkpointed container's name. The kubelet pulls it like any image (so it is in the CRI image
//! store and unpacked), and `CreateContainer` with it restores instead of starting fresh.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, StatusCode, body::Frame};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use crate::archive;

/// Why a checkpoint image could not be made or pushed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("checkpoint registry {repository:?}: {why}")]
    Config { repository: String, why: String },
    #[error("{method} {url}: {source}")]
    Request {
        method: Method,
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("the registry answered {status} to {what}: {body}")]
    Refused {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error(transparent)]
    Layer(#[from] archive::Error),
}

type Result<T, E = Error> = std::result::Result<T, E>;

use agent_api::checkpoint_image::{MANIFEST_TYPE, Parts};

/// A checkpoint image: the layer (a tar file on disk) with its digest and size, and the config
/// and manifest derived from them (`agent_api::checkpoint_image`, which the operator derives too).
#[derive(Debug, Clone)]
pub struct Image {
    pub layer_path: PathBuf,
    pub layer_digest: String,
    pub layer_size: u64,
    pub parts: Parts,
}

impl Image {
    /// The image of container `name` whose layer is the tar file `layer_path`.
    pub fn new(name: &str, layer_path: &Path) -> Result<Self, archive::Error> {
        let (layer_digest, layer_size) = archive::digest_file(layer_path)?;
        Ok(Self {
            parts: Parts::new(name, &layer_digest, layer_size),
            layer_path: layer_path.to_path_buf(),
            layer_digest,
            layer_size,
        })
    }
}

/// A repository in a registry (`host[:port]/path`), reached over HTTPS.
#[derive(Clone)]
pub struct Registry {
    host: String,
    path: String,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BoxBody<Bytes, std::io::Error>,
    >,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({}/{})", self.host, self.path)
    }
}

fn full(bytes: Bytes) -> BoxBody<Bytes, std::io::Error> {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

impl Registry {
    /// `repository` is `host[:port]/path`; `ca` a PEM bundle to trust (else the system roots).
    pub fn new(repository: &str, ca: Option<&[u8]>) -> Result<Self> {
        let config_error = |why: String| Error::Config {
            repository: repository.into(),
            why,
        };
        let (host, path) = repository
            .split_once('/')
            .filter(|(h, p)| !h.is_empty() && !p.is_empty())
            .ok_or_else(|| config_error("not host/path".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = ca {
            for cert in pem_certificates(pem).map_err(config_error)? {
                roots.add(cert).map_err(|e| config_error(e.to_string()))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            host: host.into(),
            path: path.into(),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    fn url(&self, rest: &str) -> String {
        format!("https://{}/v2/{}/{rest}", self.host, self.path)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        length: Option<u64>,
        body: BoxBody<Bytes, std::io::Error>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let req = req.body(body).map_err(|e| Error::Config {
            repository: url.into(),
            why: e.to_string(),
        })?;
        self.client
            .request(req)
            .await
            .map_err(|source| Error::Request {
                method,
                url: url.into(),
                source,
            })
    }

    /// Uploads a blob unless the registry has it.
    async fn blob(
        &self,
        digest: &str,
        size: u64,
        body: impl FnOnce() -> BoxBody<Bytes, std::io::Error>,
    ) -> Result<()> {
        let head = self
            .send(
                Method::HEAD,
                &self.url(&format!("blobs/{digest}")),
                None,
                None,
                full(Bytes::new()),
            )
            .await?;
        if head.status() == StatusCode::OK {
            return Ok(());
        }
        let start = self
            .send(
                Method::POST,
                &self.url("blobs/uploads/"),
                None,
                Some(0),
                full(Bytes::new()),
            )
            .await?;
        if start.status() != StatusCode::ACCEPTED {
            return Err(refused("starting an upload", start).await);
        }
        let Some(location) = start
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
        else {
            return Err(Error::Refused {
                what: "starting an upload".into(),
                status: start.status(),
                body: "no upload location".into(),
            });
        };
        let location = if location.starts_with('/') {
            format!("https://{}{location}", self.host)
        } else {
            location.to_string()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self
            .send(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                Some("application/octet-stream"),
                Some(size),
                body(),
            )
            .await?;
        if put.status() != StatusCode::CREATED {
            return Err(refused(&format!("uploading {digest}"), put).await);
        }
        Ok(())
    }

    /// Pushes `image` as `tag`; returns the reference pinned by the manifest's digest,
    /// `host/path:tag@sha256:<hex>`.
    pub async fn push(&self, image: &Image, tag: &str) -> Result<String> {
        let path = image.layer_path.clone();
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| archive::Error::Io { path, source })?;
        let stream = futures::StreamExt::map(tokio_util::io::ReaderStream::new(file), |r| {
            r.map(Frame::data)
        });
        let mut layer_body = Some(BodyExt::boxed(StreamBody::new(stream)));
        self.blob(&image.layer_digest, image.layer_size, || {
            layer_body.take().unwrap_or_else(|| full(Bytes::new()))
        })
        .await?;
        let config = Bytes::from(image.parts.config.clone());
        self.blob(&image.parts.config_digest(), config.len() as u64, || {
            full(config)
        })
        .await?;
        let manifest = Bytes::from(image.parts.manifest.clone());
        let put = self
            .send(
                Method::PUT,
                &self.url(&format!("manifests/{tag}")),
                Some(MANIFEST_TYPE),
                Some(manifest.len() as u64),
                full(manifest),
            )
            .await?;
        if put.status() != StatusCode::CREATED {
            return Err(refused("pushing the manifest", put).await);
        }
        // The registry addresses the manifest by the digest of the bytes it stored; one that
        // says another digest did not store these bytes.
        let digest = image.parts.manifest_digest();
        let stored = put
            .headers()
            .get("docker-content-digest")
            .and_then(|d| d.to_str().ok());
        if stored.is_some_and(|d| d != digest) {
            return Err(Error::Refused {
                what: "pushing the manifest".into(),
                status: put.status(),
                body: format!("it stored {stored:?}, not {digest}"),
            });
        }
        Ok(format!("{}/{}:{tag}@{digest}", self.host, self.path))
    }
}

/// The certificates of a PEM bundle.
/// An error for a registry answer that is not the one wanted, with what it said.
async fn refused(what: &str, response: hyper::Response<hyper::body::Incoming>) -> Error {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Error::Refused {
        what: what.into(),
        status,
        body,
    }
}

fn pem_certificates(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading the registry CA: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_checkpoint_image_is_the_one_the_operator_derives_from_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, b"tar bytes").unwrap();
        let image = Image::new("app", &layer).unwrap();
        let (digest, size) = archive::digest_file(&layer).unwrap();
        assert_eq!(size, 9);
        assert_eq!(
            (image.layer_digest.as_str(), image.layer_size),
            (digest.as_str(), size)
        );
        assert_eq!(image.parts, Parts::new("app", &digest, 9));
    }

    #[test]
    fn repositories_need_a_host_and_a_path() {
        assert!(Registry::new("10.88.0.1:5000/kube-migros/checkpoints", None).is_ok());
        assert!(Registry::new("no-path", None).is_err());
        assert!(Registry::new("/path", None).is_err());
    }
}
