//! The data plane between agents, both halves of it. The source streams each container's checkpoint
//! archive to the target agent's `Receive`, in chunks, optionally zstd-compressed (each chunk on
//! its own) and paced to a bandwidth limit; the last chunk of an archive carries the SHA-256 of the
//! whole archive. The target checks the framing (one migration, known containers in turn, offsets,
//! announced sizes, digests) and, as its [`Sink`] chooses per archive, writes it into a `.part`
//! file or unpacks it as it arrives (every entry checked before it is written, see
//! [`archive::unpack`]); the sink gets an archive only once it is whole and its digest verified,
//! so a broken stream never leaves anything that looks complete.

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

/// One archive to send: a file, or a directory sent as the archive [`archive::Layout`] makes of it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub container: String,
    pub path: PathBuf,
    pub directory: bool,
    pub bytes: u64,
    /// The file's digest, checked as it is sent; a directory's is taken as it is sent.
    pub digest: String,
}

/// The bytes of one outgoing archive, in pieces.
enum Reader {
    File(tokio::fs::File),
    /// A thread writes the directory's archive into the channel.
    Directory {
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        pending: Vec<u8>,
        taken: usize,
        done: tokio::task::JoinHandle<std::result::Result<u64, archive::Error>>,
    },
}

impl Reader {
    async fn open(a: &Outgoing) -> Result<Self> {
        if !a.directory {
            let file = tokio::fs::File::open(&a.path)
                .await
                .map_err(Error::io(&a.path))?;
            return Ok(Self::File(file));
        }
        let layout = {
            let path = a.path.clone();
            tokio::task::spawn_blocking(move || archive::Layout::of(&path)).await??
        };
        if layout.bytes() != a.bytes {
            return Err(Error::NotReady(format!(
                "the checkpoint of container {} changed since it was taken",
                a.container
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let done = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(CHUNK, ChannelWriter(tx));
            let written = layout.write(&mut out)?;
            std::io::Write::flush(&mut out).map_err(|source| archive::Error::Io {
                path: PathBuf::new(),
                source,
            })?;
            Ok(written)
        });
        Ok(Self::Directory {
            rx,
            pending: Vec::new(),
            taken: 0,
            done,
        })
    }

    /// Fills `buf` unless the archive ends first; answers the bytes put there.
    async fn fill(&mut self, buf: &mut [u8], path: &Path) -> Result<usize> {
        let mut filled = 0;
        match self {
            Self::File(file) => {
                while filled < buf.len() {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(Error::io(path))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
            }
            Self::Directory {
                rx,
                pending,
                taken,
                done,
            } => {
                while filled < buf.len() {
                    if *taken == pending.len() {
                        match rx.recv().await {
                            Some(data) => (*pending, *taken) = (data, 0),
                            None => {
                                // The writer ended: what it says is how the archive ended.
                                (&mut *done).await??;
                                break;
                            }
                        }
                    }
                    let n = (buf.len() - filled).min(pending.len() - *taken);
                    buf[filled..filled + n].copy_from_slice(&pending[*taken..*taken + n]);
                    (filled, *taken) = (filled + n, *taken + n);
                }
            }
        }
        Ok(filled)
    }
}

/// The writing thread's end of a directory's archive.
struct ChannelWriter(tokio::sync::mpsc::Sender<Vec<u8>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::other("the stream stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

/// What a stream moved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sent {
    /// Bytes on the wire (compressed).
    pub wire: u64,
    /// The archives with the digests they were sent with.
    pub archives: Vec<v1::ContainerArchive>,
    /// The stream alone, as the target measured it.
    pub stream: Duration,
    /// The target had the archives from an earlier stream: nothing went this time.
    pub before: bool,
}

/// Sends `archives` of the migration in `request` to the target agent at its endpoint, once:
/// answers what went over the wire. Whether another attempt may help is the error's
/// [`Error::retryable`].
pub async fn send(
    tls: &TlsMaterial,
    request: &v1::TransferRequest,
    archives: &[Outgoing],
    progress: impl Fn(u64) + Send + 'static,
) -> Result<Sent> {
    let endpoint = &request.target_endpoint;
    let channel = tls
        .endpoint(endpoint, &request.target_node)
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
        .into_inner();
    if received.received_before {
        return had_before(archives, received);
    }
    if received.bytes != total {
        return Err(Error::Peer {
            what: "the checkpoint stream".into(),
            source: tonic::Status::data_loss(format!(
                "the target received {} of {total} bytes",
                received.bytes
            )),
        });
    }
    let (wire, archives) = produced?;
    Ok(Sent {
        wire,
        archives,
        stream: Duration::from_millis(received.stream_ms),
        before: false,
    })
}

/// The target had the checkpoint from an earlier stream of this transfer (whose answer was lost):
/// done, if it holds the same archives (by digest where the source knows it before sending; a
/// directory's digest is the target's, as after a first answer, and the operator checks it at
/// StageRestore like any other).
fn had_before(outgoing: &[Outgoing], received: v1::ReceiveResult) -> Result<Sent> {
    let same = outgoing.len() == received.archives.len()
        && outgoing.iter().all(|o| {
            received.archives.iter().any(|a| {
                a.name == o.container && a.bytes == o.bytes && (o.directory || a.digest == o.digest)
            })
        });
    if !same {
        return Err(Error::Peer {
            what: "the checkpoint stream".into(),
            source: tonic::Status::already_exists(format!(
                "the target holds other archives of this migration: {:?}",
                received.archives
            )),
        });
    }
    Ok(Sent {
        wire: 0,
        archives: received.archives,
        stream: Duration::ZERO,
        before: true,
    })
}

/// Reads `archives` and produces the chunks of one stream into `tx`, reporting progress (bytes of
/// archive data produced) to `progress`. Stops early if the receiver went away. Answers the bytes
/// on the wire and the archives with their digests.
pub async fn produce(
    uid: String,
    archives: Vec<Outgoing>,
    compression: Compression,
    bandwidth_limit: u64,
    tx: tokio::sync::mpsc::Sender<v1::ReceiveChunk>,
    progress: impl Fn(u64),
) -> Result<(u64, Vec<v1::ContainerArchive>)> {
    let mut pace = Pace::new(bandwidth_limit);
    let mut done = 0u64;
    let mut wire = 0u64;
    let mut sent = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for a in archives {
        let mut reader = Reader::open(&a).await?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        loop {
            let filled = reader.fill(&mut buf, &a.path).await?;
            let data = &buf[..filled];
            hasher.update(data);
            let last = offset + filled as u64 >= a.bytes || filled < CHUNK;
            let mut digest = String::new();
            if last {
                digest = archive::format_digest(std::mem::take(&mut hasher));
                let expected = a.directory || digest == a.digest;
                if !expected || offset + filled as u64 != a.bytes {
                    return Err(Error::NotReady(format!(
                        "the archive of container {} changed on disk since the checkpoint",
                        a.container
                    )));
                }
                sent.push(v1::ContainerArchive {
                    name: a.container.clone(),
                    bytes: a.bytes,
                    digest: digest.clone(),
                });
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
    Ok((wire, sent))
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
    #[error("no chunk came for {0}s: the stream is given up")]
    Idle(u64),
    #[error(
        "the agent of node {peer:?} may not send the checkpoint of migration {uid}: it comes from node {from:?}"
    )]
    WrongSender {
        uid: String,
        peer: String,
        from: String,
    },
    /// Every receive slot of this node is taken (by streams whose senders were checked).
    #[error("this node receives {0} checkpoints already; try again later")]
    Busy(usize),
    #[error("the archive of container {container} is not a safe checkpoint archive: {source}")]
    Unsafe {
        container: String,
        #[source]
        source: archive::Error,
    },
}

impl Rejected {
    /// The gRPC code of the refusal: no room is `ResourceExhausted`, anything else about the data
    /// `InvalidArgument`. Neither is worth sending again as it is; a busy node is `Unavailable`,
    /// which the sender retries.
    pub fn code(&self) -> tonic::Code {
        match self {
            Rejected::TooLarge { .. } | Rejected::NoSpace { .. } => tonic::Code::ResourceExhausted,
            Rejected::WrongSender { .. } => tonic::Code::PermissionDenied,
            Rejected::Busy(_) => tonic::Code::Unavailable,
            _ => tonic::Code::InvalidArgument,
        }
    }

    pub fn retryable(&self) -> bool {
        false
    }
}

/// Where an arriving archive goes (the sink's choice).
#[derive(Debug, Clone)]
pub enum Destination {
    /// Into `<dir>/<container>.part`.
    File(PathBuf),
    /// Unpacked as it arrives into `dir` (created; it must not exist) with these limits, so that
    /// network and disk overlap and the archive is never written whole.
    Unpack {
        dir: PathBuf,
        limits: archive::Limits,
    },
}

/// An archive being received.
#[derive(Debug)]
pub struct Incoming {
    pub container: String,
    /// The `.part` file or the directory it is unpacked into.
    pub path: PathBuf,
    writer: Writer,
    hasher: Sha256,
    pub written: u64,
    pub total: u64,
}

#[derive(Debug)]
enum Writer {
    File(tokio::fs::File),
    Unpack(Unpacker),
}

/// Unpacks an archive on a blocking thread from the chunks it is given.
#[derive(Debug)]
struct Unpacker {
    dir: PathBuf,
    /// Data for the thread; dropped at the end of the archive.
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    done: tokio::task::JoinHandle<std::result::Result<archive::Contents, archive::Error>>,
}

impl Unpacker {
    /// Chunks in flight between the stream and the unpacking thread.
    const DEPTH: usize = 8;

    fn start(dir: PathBuf, limits: archive::Limits) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(Self::DEPTH);
        let at = dir.clone();
        let done = tokio::task::spawn_blocking(move || {
            let io = |source| archive::Error::Io {
                path: at.clone(),
                source,
            };
            let mut reader = ChannelReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            };
            let contents = archive::unpack(&mut reader, &at, limits)?;
            // What follows the end of the archive (tar's padding) is read and dropped, so that
            // the stream never waits on a thread that stopped reading.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(io)?;
            // Not synced: until the migration is cleaned up (never, when it fails after the
            // commit) the source keeps its copy, which covers a target that fails.
            Ok(contents)
        });
        Self {
            dir,
            tx: Some(tx),
            done,
        }
    }

    fn ended(&self, why: String) -> archive::Error {
        archive::Error::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(why),
        }
    }

    /// Hands `data` to the thread. Once it stopped (an unsafe entry, a full disk), the rest is
    /// dropped and [`Self::finish`] says why: whether the data was corrupted on the way is known
    /// only at the end, and is the better reason when it was.
    async fn write(&mut self, data: Vec<u8>) {
        if let Some(tx) = &self.tx
            && tx.send(data).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The end of the archive: waits for the thread to finish.
    async fn finish(mut self) -> std::result::Result<archive::Contents, archive::Error> {
        self.tx = None;
        match (&mut self.done).await {
            Ok(done) => done,
            Err(e) => Err(self.ended(format!("unpacking failed: {e}"))),
        }
    }
}

/// The unpacking thread's view of the chunks: a blocking [`std::io::Read`].
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(data) => (self.buf, self.pos) = (data, 0),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Incoming {
    pub async fn create(container: &str, to: Destination, total: u64) -> Result<Self> {
        let (path, writer) = match to {
            Destination::File(dir) => {
                let path = dir.join(format!("{container}.part"));
                let file = tokio::fs::File::create(&path)
                    .await
                    .map_err(Error::io(&path))?;
                (path, Writer::File(file))
            }
            Destination::Unpack { dir, limits } => {
                (dir.clone(), Writer::Unpack(Unpacker::start(dir, limits)))
            }
        };
        Ok(Self {
            container: container.into(),
            path,
            writer,
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
        let n = data.len();
        if self.written + n as u64 > self.total {
            return Err(Rejected::Oversized {
                container: self.container.clone(),
                bytes: self.total,
            }
            .into());
        }
        self.hasher.update(&data);
        self.written += n as u64;
        match &mut self.writer {
            Writer::File(file) => file.write_all(&data).await.map_err(Error::io(&self.path))?,
            Writer::Unpack(unpacker) => unpacker.write(data).await,
        }
        Ok(n)
    }

    /// Checks size and digest once the last chunk arrived; a `.part` file is synced.
    pub async fn finish(self, digest: &str) -> Result<PathBuf> {
        if self.written != self.total {
            let truncated = self.truncated();
            self.abandon().await;
            return Err(truncated.into());
        }
        let got = archive::format_digest(self.hasher.clone());
        // An unpacked archive is complete once its thread is done; a digest that does not match
        // says more than the broken entry it may have caused.
        match self.writer {
            Writer::File(ref file) => file.sync_all().await.map_err(Error::io(&self.path))?,
            Writer::Unpack(unpacker) => {
                let finished = unpacker.finish().await;
                if got == digest {
                    finished.map_err(|source| Rejected::Unsafe {
                        container: self.container.clone(),
                        source,
                    })?;
                }
            }
        }
        if got != digest {
            return Err(Rejected::Corrupted {
                container: self.container,
                want: digest.into(),
                got,
            }
            .into());
        }
        Ok(self.path)
    }

    /// Gives up on the archive: waits for its unpacking (if any) to stop writing.
    async fn abandon(self) {
        if let Writer::Unpack(unpacker) = self.writer {
            let _ = unpacker.finish().await;
        }
    }

    fn truncated(&self) -> Rejected {
        Rejected::Truncated {
            container: self.container.clone(),
            got: self.written,
            bytes: self.total,
        }
    }
}

/// How a receiving node takes a stream, once its first chunk named the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The stream must carry the archives of these containers, once each.
    Receive(Vec<String>),
    /// The node had the checkpoint whole before (an earlier stream delivered it): the stream's
    /// data is not taken, and these archives are the answer.
    Had(Vec<v1::ContainerArchive>),
}

/// What the receiving node does with a stream's archives.
pub trait Sink {
    /// The stream is for migration `uid`: answers how it is taken.
    fn open(&mut self, uid: &str) -> impl Future<Output = Result<Opened>> + Send;
    /// The archive of `container`, `bytes` long, is about to come: answers where it goes, or
    /// refuses (too large, no room).
    fn admit(
        &mut self,
        container: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<Destination>> + Send;
    /// The archive of `container` arrived whole with its digest verified: the `.part` file or
    /// the directory it was unpacked into is at `at`.
    fn received(
        &mut self,
        archive: &v1::ContainerArchive,
        at: &Path,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What a stream delivered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Received {
    pub uid: String,
    /// Archive bytes (uncompressed).
    pub bytes: u64,
    pub archives: Vec<v1::ContainerArchive>,
    /// The stream alone: from the first chunk's arrival until the last one was taken in (written
    /// or handed to the unpacking, which overlaps it); what follows the last byte (the sync, the
    /// backend's staging) is not in it.
    pub stream: Duration,
    /// An earlier stream had delivered the checkpoint; this one's data was not taken.
    pub before: bool,
}

/// Receives one stream into `sink`, checking its framing chunk by chunk; what was received before
/// an error is the sink's to discard.
/// How long a receiving agent waits for the next chunk of a stream.
pub const STREAM_IDLE: Duration = Duration::from_secs(60);

pub async fn receive(
    stream: impl Stream<Item = Result<v1::ReceiveChunk, tonic::Status>> + Unpin,
    sink: &mut impl Sink,
) -> Result<Received> {
    let mut current: Option<Incoming> = None;
    let result = receive_into(stream, sink, &mut current).await;
    // An archive cut short: its unpacking ends before the caller discards what it wrote.
    if let (Err(_), Some(incoming)) = (&result, current) {
        incoming.abandon().await;
    }
    result
}

async fn receive_into(
    mut stream: impl Stream<Item = Result<v1::ReceiveChunk, tonic::Status>> + Unpin,
    sink: &mut impl Sink,
    current: &mut Option<Incoming>,
) -> Result<Received> {
    let mut got = Received::default();
    let mut expected: Option<Vec<String>> = None;
    let mut first: Option<Instant> = None;
    // A sender that stops sending gives its stream (and the archive half written) up.
    while let Some(chunk) = tokio::time::timeout(STREAM_IDLE, stream.next())
        .await
        .map_err(|_| Rejected::Idle(STREAM_IDLE.as_secs()))?
    {
        let chunk = chunk.map_err(|source| Error::Peer {
            what: "the checkpoint stream broke".into(),
            source,
        })?;
        let first = *first.get_or_insert_with(Instant::now);
        if expected.is_none() {
            if !crate::store::valid_uid(&chunk.migration_uid) {
                return Err(Rejected::BadUid(chunk.migration_uid).into());
            }
            got.uid = chunk.migration_uid.clone();
            match sink.open(&got.uid).await? {
                Opened::Receive(containers) => expected = Some(containers),
                Opened::Had(archives) => {
                    got.bytes = archives.iter().map(|a| a.bytes).sum();
                    got.archives = archives;
                    got.before = true;
                    return Ok(got);
                }
            }
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
            if let Some(c) = current.as_ref() {
                return Err(c.truncated().into());
            }
            let known = containers.contains(&chunk.container);
            if !known || got.archives.iter().any(|a| a.name == chunk.container) {
                return Err(Rejected::UnknownContainer(chunk.container).into());
            }
            let to = sink.admit(&chunk.container, chunk.total_bytes).await?;
            *current = Some(Incoming::create(&chunk.container, to, chunk.total_bytes).await?);
        }
        let Some(incoming) = current.as_mut() else {
            continue;
        };
        got.bytes += incoming.append(&chunk).await? as u64;
        got.stream = first.elapsed();
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
    if let Some(c) = current.as_ref() {
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

    /// A sink that keeps archives in a directory (as files, or unpacked into
    /// `<dir>/<container>`) and refuses nothing; or one that `had` them before.
    struct Keep {
        dir: PathBuf,
        containers: Vec<String>,
        unpack: bool,
        kept: Vec<(v1::ContainerArchive, PathBuf)>,
        had: Option<Vec<v1::ContainerArchive>>,
    }

    impl Sink for Keep {
        async fn open(&mut self, _uid: &str) -> Result<Opened> {
            Ok(match &self.had {
                Some(had) => Opened::Had(had.clone()),
                None => Opened::Receive(self.containers.clone()),
            })
        }
        async fn admit(&mut self, container: &str, _bytes: u64) -> Result<Destination> {
            assert!(self.had.is_none(), "an archive admitted after all arrived");
            Ok(if self.unpack {
                Destination::Unpack {
                    dir: self.dir.join(container),
                    limits: archive::Limits::default(),
                }
            } else {
                Destination::File(self.dir.clone())
            })
        }
        async fn received(&mut self, archive: &v1::ContainerArchive, at: &Path) -> Result<()> {
            self.kept.push((archive.clone(), at.to_path_buf()));
            Ok(())
        }
    }

    fn keep(dir: &Path, containers: &[&str]) -> Keep {
        Keep {
            dir: dir.to_path_buf(),
            containers: containers.iter().map(|c| c.to_string()).collect(),
            unpack: false,
            kept: Vec::new(),
            had: None,
        }
    }

    fn unpack(dir: &Path, containers: &[&str]) -> Keep {
        Keep {
            unpack: true,
            ..keep(dir, containers)
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
                directory: false,
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

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_stops_sending_is_given_up_and_its_archive_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; CHUNK * 2];
        let chunks = chunks_of(dir.path(), &[("app", &data)], Compression::None).await;
        // The first chunk, then nothing more, without the stream ending.
        let first = futures::stream::iter(chunks.into_iter().take(1).map(Ok));
        let stalled = first.chain(futures::stream::pending());
        let out = tempfile::tempdir().unwrap();
        let mut sink = unpack(out.path(), &["app"]);
        let err = receive(Box::pin(stalled), &mut sink).await.unwrap_err();
        assert!(
            matches!(err, Error::Rejected(Rejected::Idle(s)) if s == STREAM_IDLE.as_secs()),
            "{err}"
        );
        assert!(sink.kept.is_empty(), "a stalled archive was kept");
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
            assert_eq!(std::fs::read(&sink.kept[0].1).unwrap(), data);
            assert_eq!(std::fs::read(&sink.kept[1].1).unwrap(), b"");
            assert_eq!(
                got.archives,
                vec![sink.kept[0].0.clone(), sink.kept[1].0.clone()]
            );
        }
    }

    #[tokio::test]
    async fn a_stream_for_a_checkpoint_received_before_takes_nothing_and_answers_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = chunks_of(dir.path(), &[("app", b"first")], Compression::None).await;
        let mut sink = keep(dir.path(), &["app"]);
        let got = deliver(first, &mut sink).await.unwrap();
        assert!(!got.before);
        // Other data for the same migration: none of it is taken.
        let other = chunks_of(dir.path(), &[("app", b"other data")], Compression::None).await;
        let mut had = Keep {
            had: Some(got.archives.clone()),
            ..keep(dir.path(), &["app"])
        };
        let again = deliver(other, &mut had).await.unwrap();
        assert!(again.before && had.kept.is_empty(), "{again:?}");
        assert_eq!((again.bytes, again.archives), (5, got.archives));
    }

    #[test]
    fn a_source_takes_a_receipt_from_before_only_for_its_own_archives() {
        let outgoing = |name: &str, digest: &str, directory: bool| Outgoing {
            container: name.into(),
            path: PathBuf::from("/unused"),
            directory,
            bytes: 5,
            digest: digest.into(),
        };
        let archive = |name: &str, digest: &str| v1::ContainerArchive {
            name: name.into(),
            bytes: 5,
            digest: digest.into(),
        };
        let receipt = |archives: Vec<v1::ContainerArchive>| v1::ReceiveResult {
            bytes: 5 * archives.len() as u64,
            archives,
            stream_ms: 0,
            received_before: true,
        };
        let ours = [
            outgoing("app", "sha256:a", false),
            outgoing("dir", "", true),
        ];
        let theirs = vec![archive("app", "sha256:a"), archive("dir", "sha256:d")];
        let sent = had_before(&ours, receipt(theirs.clone())).unwrap();
        assert!(sent.before && sent.wire == 0);
        // A directory's digest is the one the target took as it arrived.
        assert_eq!(sent.archives, theirs);
        for other in [
            vec![archive("app", "sha256:b"), archive("dir", "sha256:d")],
            vec![archive("app", "sha256:a")],
            vec![archive("app", "sha256:a"), archive("side", "sha256:d")],
        ] {
            let err = had_before(&ours, receipt(other)).unwrap_err();
            assert!(!err.retryable(), "{err}");
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
        let mut inc = Incoming::create("app", Destination::File(dir.path().into()), 10)
            .await
            .unwrap();
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

        let mut inc = Incoming::create("app", Destination::File(dir.path().into()), 3)
            .await
            .unwrap();
        inc.append(&chunk(0, b"abc", "sha256:beef", 3))
            .await
            .unwrap();
        let bad = rejected(inc.finish("sha256:beef").await);
        assert!(matches!(bad, Rejected::Corrupted { .. }), "{bad}");

        let mut inc = Incoming::create("app", Destination::File(dir.path().into()), 3)
            .await
            .unwrap();
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

    /// A checkpoint-shaped archive of more than two chunks.
    fn checkpoint_tar() -> (Vec<u8>, Vec<u8>) {
        let pages: Vec<u8> = (0..(CHUNK * 2 + 4321)).map(|i| (i % 253) as u8).collect();
        let tar = archive::tar_with(&[
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            (
                "checkpoint/pages-1.img",
                tar::EntryType::Regular,
                &pages,
                None,
            ),
            ("rootfs-diff.tar", tar::EntryType::Regular, b"diff", None),
        ]);
        (tar, pages)
    }

    #[tokio::test]
    async fn archives_are_unpacked_as_they_arrive() {
        let (tar, pages) = checkpoint_tar();
        for compression in [Compression::None, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let chunks = chunks_of(dir.path(), &[("app", &tar)], compression).await;
            assert!(chunks.len() > 2);
            let mut sink = unpack(dir.path(), &["app"]);
            let got = deliver(chunks, &mut sink).await.unwrap();
            assert_eq!(got.bytes, tar.len() as u64);
            let at = &sink.kept[0].1;
            assert_eq!(at, &dir.path().join("app"));
            assert_eq!(
                std::fs::read(at.join("checkpoint/pages-1.img")).unwrap(),
                pages
            );
            assert_eq!(std::fs::read(at.join("rootfs-diff.tar")).unwrap(), b"diff");
        }
    }

    #[tokio::test]
    async fn an_unpacked_archive_that_is_unsafe_or_corrupted_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (tar, _) = checkpoint_tar();
        let hostile = archive::tar_with(&[
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            ("../evil", tar::EntryType::Regular, &[1u8; 3 * CHUNK], None),
        ]);
        let chunks = chunks_of(dir.path(), &[("app", &hostile)], Compression::None).await;
        let refused = rejected(deliver(chunks, &mut unpack(dir.path(), &["app"])).await);
        assert!(
            matches!(&refused, Rejected::Unsafe { source, .. } if source.to_string().contains("leaves")),
            "{refused}"
        );
        assert!(!dir.path().join("evil").exists());

        // One flipped byte in the middle: unpacked, but the digest of the whole does not match.
        let other = tempfile::tempdir().unwrap();
        let mut chunks = chunks_of(other.path(), &[("app", &tar)], Compression::None).await;
        chunks[1].data[10] ^= 0xff;
        let corrupted = rejected(deliver(chunks, &mut unpack(other.path(), &["app"])).await);
        assert!(
            matches!(corrupted, Rejected::Corrupted { .. }),
            "{corrupted}"
        );
    }

    #[tokio::test]
    async fn a_directory_is_sent_as_an_archive_and_its_digest_taken_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        std::fs::create_dir_all(root.join("checkpoint")).unwrap();
        let pages: Vec<u8> = (0..(CHUNK * 2 + 99)).map(|i| (i % 241) as u8).collect();
        std::fs::write(root.join("checkpoint/pages-1.img"), &pages).unwrap();
        std::fs::write(root.join("rootfs-diff.tar"), b"diff").unwrap();
        let layout = archive::Layout::of(&root).unwrap();
        let mut whole = Vec::new();
        layout.write(&mut whole).unwrap();
        let outgoing = Outgoing {
            container: "app".into(),
            path: root.clone(),
            directory: true,
            bytes: layout.bytes(),
            digest: String::new(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let (_, sent) = produce("m".into(), vec![outgoing], Compression::Zstd, 0, tx, |_| {})
            .await
            .unwrap();
        let mut hasher = Sha256::new();
        hasher.update(&whole);
        assert_eq!(sent[0].digest, archive::format_digest(hasher));
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        let target = tempfile::tempdir().unwrap();
        let mut sink = unpack(target.path(), &["app"]);
        let got = deliver(chunks, &mut sink).await.unwrap();
        assert_eq!(got.archives[0].digest, sent[0].digest);
        let at = &sink.kept[0].1;
        assert_eq!(
            std::fs::read(at.join("checkpoint/pages-1.img")).unwrap(),
            pages
        );
        assert_eq!(std::fs::read(at.join("rootfs-diff.tar")).unwrap(), b"diff");
    }
}
