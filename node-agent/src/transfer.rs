//! The data plane between agents: the source streams each container's checkpoint archive to the
//! target agent's `Receive`, in chunks, optionally zstd-compressed (each chunk on its own) and paced
//! to a bandwidth limit; the last chunk of an archive carries the SHA-256 of the whole archive. The
//! target writes into a `.part` file, checks offsets, sizes and the digest, and only then vets and
//! stages the archive (see `archive`), so a broken stream never leaves a file that looks complete.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_api::v1::{self, Compression};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::archive;

/// Uncompressed bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// A chunk may not decompress to more than this.
const MAX_CHUNK: usize = 4 * CHUNK;
/// zstd level: fast, the link is the bottleneck only on slow links.
const ZSTD_LEVEL: i32 = 1;

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

/// Reads `archives` and produces the chunks of one stream into `tx`, reporting progress (bytes of
/// archive data produced) to `progress`. Stops early if the receiver went away.
pub async fn produce(
    uid: String,
    archives: Vec<Outgoing>,
    compression: Compression,
    bandwidth_limit: u64,
    tx: tokio::sync::mpsc::Sender<v1::ReceiveChunk>,
    progress: impl Fn(u64),
) -> Result<u64, String> {
    let mut pace = Pace::new(bandwidth_limit);
    let mut done = 0u64;
    let mut wire = 0u64;
    for a in archives {
        let mut file = tokio::fs::File::open(&a.path)
            .await
            .map_err(|e| format!("opening {}: {e}", a.path.display()))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| format!("reading {}: {e}", a.path.display()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            let data = &buf[..filled];
            hasher.update(data);
            let last = offset + filled as u64 >= a.bytes || filled < CHUNK;
            let mut digest = String::new();
            if last {
                digest = archive::format_digest(std::mem::take(&mut hasher));
                if digest != a.digest || offset + filled as u64 != a.bytes {
                    return Err(format!(
                        "the archive of container {} changed on disk since the checkpoint",
                        a.container
                    ));
                }
            }
            let payload = match compression {
                Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL)
                    .map_err(|e| format!("compressing: {e}"))?,
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
                return Err("the target stopped receiving".into());
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

/// Why a received stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
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
    #[error("the archive of container {container} is not a safe checkpoint archive: {source}")]
    Unsafe {
        container: String,
        #[source]
        source: archive::Error,
    },
    #[error("{0}")]
    Io(String),
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
    pub async fn create(container: &str, dir: &Path, total: u64) -> Result<Self, RejectReason> {
        let path = dir.join(format!("{container}.part"));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| RejectReason::Io(format!("{}: {e}", path.display())))?;
        Ok(Self {
            container: container.into(),
            path,
            file,
            hasher: Sha256::new(),
            written: 0,
            total,
        })
    }

    /// Appends one chunk; with `digest` set it must be the last and complete the archive.
    pub async fn append(&mut self, chunk: &v1::ReceiveChunk) -> Result<usize, RejectReason> {
        if chunk.offset != self.written {
            return Err(RejectReason::OutOfOrder {
                container: self.container.clone(),
                want: self.written,
                got: chunk.offset,
            });
        }
        let data = match chunk.compression() {
            Compression::Zstd => zstd::bulk::decompress(&chunk.data, MAX_CHUNK).map_err(|e| {
                RejectReason::Compression {
                    container: self.container.clone(),
                    why: e.to_string(),
                }
            })?,
            Compression::None => chunk.data.clone(),
        };
        if self.written + data.len() as u64 > self.total {
            return Err(RejectReason::Oversized {
                container: self.container.clone(),
                bytes: self.total,
            });
        }
        self.file
            .write_all(&data)
            .await
            .map_err(|e| RejectReason::Io(format!("{}: {e}", self.path.display())))?;
        self.hasher.update(&data);
        self.written += data.len() as u64;
        Ok(data.len())
    }

    /// Checks size and digest once the last chunk arrived; the file is synced.
    pub async fn finish(self, digest: &str) -> Result<PathBuf, RejectReason> {
        if self.written != self.total {
            return Err(RejectReason::Truncated {
                container: self.container,
                got: self.written,
                bytes: self.total,
            });
        }
        let got = archive::format_digest(self.hasher);
        if got != digest {
            return Err(RejectReason::Corrupted {
                container: self.container,
                want: digest.into(),
                got,
            });
        }
        self.file
            .sync_all()
            .await
            .map_err(|e| RejectReason::Io(format!("{}: {e}", self.path.display())))?;
        Ok(self.path)
    }
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

    async fn roundtrip(data: &[u8], compression: Compression) -> Result<Vec<u8>, RejectReason> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.tar");
        std::fs::write(&src, data).unwrap();
        let (digest, bytes) = archive::digest_file(&src).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let out = Outgoing {
            container: "app".into(),
            path: src,
            bytes,
            digest,
        };
        let producer = tokio::spawn(produce("m".into(), vec![out], compression, 0, tx, |_| {}));
        let mut inc = Incoming::create("app", dir.path(), bytes).await.unwrap();
        let mut path = None;
        while let Some(chunk) = rx.recv().await {
            inc.append(&chunk).await?;
            if !chunk.digest.is_empty() {
                path = Some(inc.finish(&chunk.digest).await?);
                break;
            }
        }
        producer.await.unwrap().unwrap();
        Ok(std::fs::read(path.unwrap()).unwrap())
    }

    #[tokio::test]
    async fn archives_arrive_whole_with_and_without_compression() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&data, Compression::None).await.unwrap(), data);
        assert_eq!(roundtrip(&data, Compression::Zstd).await.unwrap(), data);
        assert_eq!(
            roundtrip(&[], Compression::Zstd).await.unwrap(),
            Vec::<u8>::new()
        );
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

    #[tokio::test]
    async fn bad_streams_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut inc = Incoming::create("app", dir.path(), 10).await.unwrap();
        inc.append(&chunk(0, b"12345", "", 10)).await.unwrap();
        let gap = inc.append(&chunk(7, b"xyz", "", 10)).await.unwrap_err();
        assert!(gap.to_string().contains("offset 7"), "{gap}");
        let over = inc.append(&chunk(5, b"123456", "", 10)).await.unwrap_err();
        assert!(matches!(over, RejectReason::Oversized { .. }), "{over}");
        let short = inc.finish("sha256:00").await.unwrap_err();
        assert!(
            matches!(short, RejectReason::Truncated { got: 5, .. }),
            "{short}"
        );

        let mut inc = Incoming::create("app", dir.path(), 3).await.unwrap();
        inc.append(&chunk(0, b"abc", "sha256:beef", 3))
            .await
            .unwrap();
        let bad = inc.finish("sha256:beef").await.unwrap_err();
        assert!(matches!(bad, RejectReason::Corrupted { .. }), "{bad}");

        let mut inc = Incoming::create("app", dir.path(), 3).await.unwrap();
        let mut z = chunk(0, b"not zstd", "", 3);
        z.compression = Compression::Zstd.into();
        assert!(matches!(
            inc.append(&z).await,
            Err(RejectReason::Compression { .. })
        ));
    }
}
