//! The data plane between agents, both halves of it. The source streams each container's checkpoint
//! archive to the target agent's `Receive`, in chunks, optionally zstd-compressed (each chunk on
//! its own) and paced to a bandwidth limit; the last chunk of an archive carries the SHA-256 of the
//! whole archive. The target checks the framing (one migration, known containers in turn, offsets,
//! announced sizes, digests), writes each archive into a `.part` file and hands it to its [`Sink`]
//! only once it is whole and verified, so a broken stream never leaves a file that looks complete.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_api::{
    client::Client,
    tls::TlsMaterial,
    v1::{self, Compression},
};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    archive,
    error::{Error, Result},
};

/// Uncompressed bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// A chunk may not decompress to more than this.
const MAX_CHUNK: usize = 4 * CHUNK;
/// zstd level: fast, the link is the bottleneck only on slow links.
const ZSTD_LEVEL: i32 = 1;
/// How long the source waits for the target agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---- the sending half ----

/// One archive to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub container: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub digest: String,
}

/// Paces sending to `limit` bytes per second (0: unlimited).
#[derive(Debug)]
pub struct Pace {
    limit: u64,
    start: Instant,
    sent: u64,
}

impl Pace {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            start: Instant::now(),
            sent: 0,
        }
    }

    /// How long to wait before `n` more bytes may go.
    pub fn delay(&mut self, n: u64) -> Duration {
        if self.limit == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.limit as f64);
        self.sent += n;
        due.saturating_sub(self.start.elapsed())
    }
}

/// Sends `archives` of the migration in `request` to the target agent at its endpoint, once:
/// answers the bytes that went over the wire. Whether another attempt may help is the error's
/// [`Error::retryable`].
pub async fn send(
    tls: &TlsMaterial,
    request: &v1::TransferRequest,
    archives: &[Outgoing],
    progress: impl Fn(u64) + Send + 'static,
) -> Result<u64> {
    let endpoint = &request.target_endpoint;
    let channel = tls
        .endpoint(endpoint)
        .map_err(|e| Error::Invalid(format!("bad target endpoint {endpoint:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| Error::Peer {
            what: format!("connecting to the target agent {endpoint}"),
            source: tonic::Status::unavailable(e.to_string()),
        })?;
    let total: u64 = archives.iter().map(|a| a.bytes).sum();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let producer = tokio::spawn(produce(
        request.migration_uid.clone(),
        archives.to_vec(),
        request.compression(),
        request.bandwidth_limit,
        tx,
        progress,
    ));
    let answer = Client::new(channel)
        .raw()
        .receive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let produced = producer.await?;
    let received = answer
        .map_err(|source| Error::Peer {
            what: "the target agent refused the checkpoint".into(),
            source,
        })?
        .into_inner()
        .bytes;
    if received != total {
        return Err(Error::Peer {
            what: "the checkpoint stream".into(),
            source: tonic::Status::data_loss(format!(
                "the target received {received} of {total} bytes"
            )),
        });
    }
    produced
}

/// Reads `archives` and produces the chunks of one stream into `tx`, reporting progress (bytes of
/// archive data produced) to `progress`. Stops early if the receiver went away.
pub async fn produce(
    uid: String,
    archives: Vec<Outgoing>,
    compression: Compression,
    bandwidth_limit: u64,
    tx: tokio::sync::mpsc::Sender<v1::ReceiveChunk>,
    progress: impl Fn(u64),
) -> Result<u64> {
    let mut pace = Pace::new(bandwidth_limit);
    let mut done = 0u64;
    let mut wire = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for a in archives {
        let mut file = tokio::fs::File::open(&a.path)
            .await
            .map_err(Error::io(&a.path))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        loop {
            let filled = fill(&mut file, &mut buf)
                .await
                .map_err(Error::io(&a.path))?;
            let data = &buf[..filled];
            hasher.update(data);
            let last = offset + filled as u64 >= a.bytes || filled < CHUNK;
            let mut digest = String::new();
            if last {
                digest = archive::format_digest(std::mem::take(&mut hasher));
                if digest != a.digest || offset + filled as u64 != a.bytes {
                    return Err(Error::NotReady(format!(
                        "the archive of container {} changed on disk since the checkpoint",
                        a.container
                    )));
                }
            }
            let payload = match compression {
                Compression::Zstd => {
                    zstd::bulk::compress(data, ZSTD_LEVEL).map_err(|source| Error::Io {
                        what: "compressing a chunk".into(),
                        source,
                    })?
                }
                Compression::None => data.to_vec(),
            };
            tokio::time::sleep(pace.delay(payload.len() as u64)).await;
            wire += payload.len() as u64;
            let chunk = v1::ReceiveChunk {
                migration_uid: uid.clone(),
                container: a.container.clone(),
                offset,
                data: payload,
                digest,
                total_bytes: a.bytes,
                compression: compression.into(),
            };
            if tx.send(chunk).await.is_err() {
                return Err(Error::Peer {
                    what: "the checkpoint stream".into(),
                    source: tonic::Status::aborted("the target stopped receiving"),
                });
            }
            offset += filled as u64;
            done += filled as u64;
            progress(done);
            if last {
                break;
            }
        }
    }
    Ok(wire)
}

/// Reads until `buf` is full or the file ends; answers the bytes read.
async fn fill(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

// ---- the receiving half ----

/// Why a received stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("{0:?} is not a migration UID")]
    BadUid(String),
    #[error("chunk for migration {got} in a stream of migration {want}")]
    MixedMigrations { want: String, got: String },
    #[error("container {0:?} is not part of this migration")]
    UnknownContainer(String),
    #[error(
        "the archive of container {container} is announced as {bytes} bytes, more than this node's limit of {limit}"
    )]
    TooLarge {
        container: String,
        bytes: u64,
        limit: u64,
    },
    #[error("the archive of container {container} ({bytes} bytes) does not fit: {free} bytes free")]
    NoSpace {
        container: String,
        bytes: u64,
        free: u64,
    },
    #[error("chunk at offset {got} of container {container}, expected {want}")]
    OutOfOrder {
        container: String,
        want: u64,
        got: u64,
    },
    #[error("container {container} sent more than the {bytes} bytes it announced")]
    Oversized { container: String, bytes: u64 },
    #[error("the archive of container {container} ended at {got} of {bytes} bytes (truncated)")]
    Truncated {
        container: String,
        got: u64,
        bytes: u64,
    },
    #[error("the archive of container {container} is corrupted: digest {got}, expected {want}")]
    Corrupted {
        container: String,
        want: String,
        got: String,
    },
    #[error("container {container}: a chunk does not decompress: {why}")]
    Compression { container: String, why: String },
    #[error("the stream ended before the archive of container {0} arrived")]
    Missing(String),
    #[error("the stream carried no data")]
    Empty,
    #[error("the archive of container {container} is not a safe checkpoint archive: {source}")]
    Unsafe {
        container: String,
        #[source]
        source: archive::Error,
    },
}

impl Rejected {
    /// The gRPC code of the refusal: no room is `ResourceExhausted`, anything else about the data
    /// `InvalidArgument`. Neither is worth sending again as it is.
    pub fn code(&self) -> tonic::Code {
        match self {
            Rejected::TooLarge { .. } | Rejected::NoSpace { .. } => tonic::Code::ResourceExhausted,
            _ => tonic::Code::InvalidArgument,
        }
    }

    pub fn retryable(&self) -> bool {
        false
    }
}

/// An archive being received into a `.part` file.
#[derive(Debug)]
pub struct Incoming {
    pub container: String,
    pub path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    pub written: u64,
    pub total: u64,
}

impl Incoming {
    pub async fn create(container: &str, dir: &Path, total: u64) -> Result<Self> {
        let path = dir.join(format!("{container}.part"));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(Error::io(&path))?;
        Ok(Self {
            container: container.into(),
            path,
            file,
            hasher: Sha256::new(),
            written: 0,
            total,
        })
    }

    /// Appends one chunk; answers the archive bytes it carried.
    pub async fn append(&mut self, chunk: &v1::ReceiveChunk) -> Result<usize> {
        if chunk.offset != self.written {
            return Err(Rejected::OutOfOrder {
                container: self.container.clone(),
                want: self.written,
                got: chunk.offset,
            }
            .into());
        }
        let data = match chunk.compression() {
            Compression::Zstd => zstd::bulk::decompress(&chunk.data, MAX_CHUNK).map_err(|e| {
                Rejected::Compression {
                    container: self.container.clone(),
                    why: e.to_string(),
                }
            })?,
            Compression::None => chunk.data.clone(),
        };
        if self.written + data.len() as u64 > self.total {
            return Err(Rejected::Oversized {
                container: self.container.clone(),
                bytes: self.total,
            }
            .into());
        }
        self.file
            .write_all(&data)
            .await
            .map_err(Error::io(&self.path))?;
        self.hasher.update(&data);
        self.written += data.len() as u64;
        Ok(data.len())
    }

    /// Checks size and digest once the last chunk arrived; the file is synced.
    pub async fn finish(self, digest: &str) -> Result<PathBuf> {
        if self.written != self.total {
            return Err(self.truncated().into());
        }
        let got = archive::format_digest(self.hasher);
        if got != digest {
            return Err(Rejected::Corrupted {
                container: self.container,
                want: digest.into(),
                got,
            }
            .into());
        }
        self.file.sync_all().await.map_err(Error::io(&self.path))?;
        Ok(self.path)
    }

    fn truncated(&self) -> Rejected {
        Rejected::Truncated {
            container: self.container.clone(),
            got: self.written,
            bytes: self.total,
        }
    }
}

/// What the receiving node does with a stream's archives.
pub trait Sink {
    /// The stream is for migration `uid`: answers the containers it must carry, once each.
    fn open(&mut self, uid: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The archive of `container`, `bytes` long, is about to come: answers the directory its
    /// `.part` file goes into, or refuses (too large, no room).
    fn admit(
        &mut self,
        container: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<PathBuf>> + Send;
    /// The archive of `container` arrived whole with its digest verified, at `part`.
    fn received(
        &mut self,
        archive: &v1::ContainerArchive,
        part: &Path,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What a stream delivered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Received {
    pub uid: String,
    /// Archive bytes (uncompressed).
    pub bytes: u64,
    pub archives: Vec<v1::ContainerArchive>,
}

/// Receives one stream into `sink`, checking its framing chunk by chunk; what was received before
/// an error is the sink's to discard.
pub async fn receive(
    mut stream: impl Stream<Item = Result<v1::ReceiveChunk, tonic::Status>> + Unpin,
    sink: &mut impl Sink,
) -> Result<Received> {
    let mut got = Received::default();
    let mut expected: Option<Vec<String>> = None;
    let mut current: Option<Incoming> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| Error::Peer {
            what: "the checkpoint stream broke".into(),
            source,
        })?;
        if expected.is_none() {
            if !crate::store::valid_uid(&chunk.migration_uid) {
                return Err(Rejected::BadUid(chunk.migration_uid).into());
            }
            got.uid = chunk.migration_uid.clone();
            expected = Some(sink.open(&got.uid).await?);
        }
        let Some(containers) = expected.as_ref() else {
            continue;
        };
        if chunk.migration_uid != got.uid {
            return Err(Rejected::MixedMigrations {
                want: got.uid,
                got: chunk.migration_uid,
            }
            .into());
        }
        if current
            .as_ref()
            .is_none_or(|c| c.container != chunk.container)
        {
            if let Some(c) = current.take() {
                return Err(c.truncated().into());
            }
            let known = containers.contains(&chunk.container);
            if !known || got.archives.iter().any(|a| a.name == chunk.container) {
                return Err(Rejected::UnknownContainer(chunk.container).into());
            }
            let dir = sink.admit(&chunk.container, chunk.total_bytes).await?;
            current = Some(Incoming::create(&chunk.container, &dir, chunk.total_bytes).await?);
        }
        let Some(incoming) = current.as_mut() else {
            continue;
        };
        got.bytes += incoming.append(&chunk).await? as u64;
        if !chunk.digest.is_empty() {
            let Some(incoming) = current.take() else {
                continue;
            };
            let archive = v1::ContainerArchive {
                name: incoming.container.clone(),
                bytes: incoming.total,
                digest: chunk.digest.clone(),
            };
            let part = incoming.finish(&chunk.digest).await?;
            sink.received(&archive, &part).await?;
            got.archives.push(archive);
        }
    }
    if let Some(c) = current {
        return Err(c.truncated().into());
    }
    let Some(containers) = expected else {
        return Err(Rejected::Empty.into());
    };
    if let Some(missing) = containers
        .iter()
        .find(|c| !got.archives.iter().any(|a| &a.name == *c))
    {
        return Err(Rejected::Missing(missing.clone()).into());
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pacing_spreads_bytes_over_time_and_unlimited_never_waits() {
        let mut p = Pace::new(1000);
        assert_eq!(p.delay(500), Duration::ZERO);
        let d = p.delay(500);
        assert!(
            d > Duration::from_millis(400) && d <= Duration::from_millis(500),
            "{d:?}"
        );
        let mut free = Pace::new(0);
        assert_eq!(free.delay(1 << 30), Duration::ZERO);
    }

    /// A sink that keeps archives in a directory and refuses nothing.
    struct Keep {
        dir: PathBuf,
        containers: Vec<String>,
        kept: Vec<(v1::ContainerArchive, Vec<u8>)>,
    }

    impl Sink for Keep {
        async fn open(&mut self, _uid: &str) -> Result<Vec<String>> {
            Ok(self.containers.clone())
        }
        async fn admit(&mut self, _container: &str, _bytes: u64) -> Result<PathBuf> {
            Ok(self.dir.clone())
        }
        async fn received(&mut self, archive: &v1::ContainerArchive, part: &Path) -> Result<()> {
            self.kept
                .push((archive.clone(), std::fs::read(part).unwrap()));
            Ok(())
        }
    }

    fn keep(dir: &Path, containers: &[&str]) -> Keep {
        Keep {
            dir: dir.to_path_buf(),
            containers: containers.iter().map(|c| c.to_string()).collect(),
            kept: Vec::new(),
        }
    }

    async fn chunks_of(
        dir: &Path,
        archives: &[(&str, &[u8])],
        compression: Compression,
    ) -> Vec<v1::ReceiveChunk> {
        let mut outgoing = Vec::new();
        for (name, data) in archives {
            let path = dir.join(format!("{name}.tar"));
            std::fs::write(&path, data).unwrap();
            let (digest, bytes) = archive::digest_file(&path).unwrap();
            outgoing.push(Outgoing {
                container: name.to_string(),
                path,
                bytes,
                digest,
            });
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        produce("m".into(), outgoing, compression, 0, tx, |_| {})
            .await
            .unwrap();
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        chunks
    }

    async fn deliver(chunks: Vec<v1::ReceiveChunk>, sink: &mut Keep) -> Result<Received> {
        receive(futures::stream::iter(chunks.into_iter().map(Ok)), sink).await
    }

    #[tokio::test]
    async fn archives_arrive_whole_with_and_without_compression() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        for compression in [Compression::None, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let chunks = chunks_of(dir.path(), &[("app", &data), ("side", b"")], compression).await;
            let mut sink = keep(dir.path(), &["app", "side"]);
            let got = deliver(chunks, &mut sink).await.unwrap();
            assert_eq!(got.uid, "m");
            assert_eq!(got.bytes, data.len() as u64);
            assert_eq!(sink.kept[0].1, data);
            assert_eq!(sink.kept[1].1, b"");
            assert_eq!(
                got.archives,
                vec![sink.kept[0].0.clone(), sink.kept[1].0.clone()]
            );
        }
    }

    #[tokio::test]
    async fn a_stream_missing_an_archive_or_naming_a_stranger_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = chunks_of(dir.path(), &[("app", b"abc")], Compression::None).await;
        let missing = deliver(chunks.clone(), &mut keep(dir.path(), &["app", "side"])).await;
        assert!(matches!(missing, Err(Error::Rejected(Rejected::Missing(c))) if c == "side"));
        let stranger = deliver(chunks.clone(), &mut keep(dir.path(), &["side"])).await;
        assert!(matches!(
            stranger,
            Err(Error::Rejected(Rejected::UnknownContainer(_)))
        ));
        let twice = deliver(
            [chunks.clone(), chunks.clone()].concat(),
            &mut keep(dir.path(), &["app"]),
        )
        .await;
        assert!(matches!(
            twice,
            Err(Error::Rejected(Rejected::UnknownContainer(_)))
        ));
        let mut mixed = chunks.clone();
        mixed.insert(
            0,
            v1::ReceiveChunk {
                migration_uid: "other".into(),
                ..chunks[0].clone()
            },
        );
        mixed[0].digest.clear();
        let mixed = deliver(mixed, &mut keep(dir.path(), &["app"])).await;
        assert!(
            matches!(
                mixed,
                Err(Error::Rejected(Rejected::MixedMigrations { .. }))
            ),
            "{mixed:?}"
        );
        let empty = deliver(Vec::new(), &mut keep(dir.path(), &["app"])).await;
        assert!(matches!(empty, Err(Error::Rejected(Rejected::Empty))));
    }

    fn chunk(offset: u64, data: &[u8], digest: &str, total: u64) -> v1::ReceiveChunk {
        v1::ReceiveChunk {
            migration_uid: "m".into(),
            container: "app".into(),
            offset,
            data: data.to_vec(),
            digest: digest.into(),
            total_bytes: total,
            compression: Compression::None.into(),
        }
    }

    fn rejected(r: Result<impl std::fmt::Debug>) -> Rejected {
        match r {
            Err(Error::Rejected(reason)) => reason,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_chunks_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut inc = Incoming::create("app", dir.path(), 10).await.unwrap();
        inc.append(&chunk(0, b"12345", "", 10)).await.unwrap();
        let gap = rejected(inc.append(&chunk(7, b"xyz", "", 10)).await);
        assert!(gap.to_string().contains("offset 7"), "{gap}");
        let over = rejected(inc.append(&chunk(5, b"123456", "", 10)).await);
        assert!(matches!(over, Rejected::Oversized { .. }), "{over}");
        let short = rejected(inc.finish("sha256:00").await);
        assert!(
            matches!(short, Rejected::Truncated { got: 5, .. }),
            "{short}"
        );

        let mut inc = Incoming::create("app", dir.path(), 3).await.unwrap();
        inc.append(&chunk(0, b"abc", "sha256:beef", 3))
            .await
            .unwrap();
        let bad = rejected(inc.finish("sha256:beef").await);
        assert!(matches!(bad, Rejected::Corrupted { .. }), "{bad}");

        let mut inc = Incoming::create("app", dir.path(), 3).await.unwrap();
        let mut z = chunk(0, b"not zstd", "", 3);
        z.compression = Compression::Zstd.into();
        assert!(matches!(
            rejected(inc.append(&z).await),
            Rejected::Compression { .. }
        ));

        // A stream that stops in the middle of an archive is truncated, not complete.
        let cut = deliver(
            vec![chunk(0, b"12345", "", 10)],
            &mut keep(dir.path(), &["app"]),
        )
        .await;
        assert!(matches!(
            rejected(cut),
            Rejected::Truncated {
                got: 5,
                bytes: 10,
                ..
            }
        ));
    }
}
