//! Post-copy (docs/node-agent.md#post-copy): the source dumps a container without its memory and
//! serves the pages afterwards; the target restores at once with a lazy-pages daemon that fetches
//! them on fault and in the background until all are in.
//!
//! Both CRIU ends live in private network namespaces of the agent (`netns`): the source's page
//! server (`runc checkpoint --lazy-pages`) listens in one, the target's `criu lazy-pages` connects
//! to the target agent's listener in another, and the two agents carry the bytes between them
//! over the mutual-TLS agent API (`Pages`), which only the migration's target node may call.
//!
//! A restored process whose lazy-pages daemon goes away would run on with zeroes where its
//! missing pages were (the kernel serves faults normally once the userfaultfd is closed). So the
//! target never lets the daemon's connection break while the process can run: when the source's
//! stream breaks, it freezes and kills the restored containers first, and only then closes it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_api::v1;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    netns::{self, PrivateNet},
    wire::Pace,
};

/// The port of the page server (source) and of the agent's listener (target), each in its own
/// private namespace.
pub const PAGE_PORT: u16 = 27000;
/// The marker in a staged container directory that tells the runtime wrapper to restore lazily.
pub const LAZY_MARKER: &str = "lazy-pages";
/// The socket the lazy-pages daemon creates in CRIU's work directory for the restore to find it.
const DAEMON_SOCKET: &str = "lazy-pages.socket";
/// Waiting for CRIU to be ready (the dump's status, the daemon's socket) at most this long.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How often the target pings the source agent while pages stream; two unanswered pings break
/// the stream (and the restored containers are killed, never left waiting on a page).
const PAGE_STREAM_PING: Duration = Duration::from_secs(5);
/// How long a lazy-pages daemon waits for its restore to connect.
const CONNECT_WITHIN: Duration = Duration::from_secs(600);
/// How long the daemon may take to end after the source closed a complete stream.
const DAEMON_ENDS: Duration = Duration::from_secs(5);
/// Bytes per frame of the page stream.
const FRAME: usize = 256 << 10;

/// Lazy pages of a CRIU pagemap entry (`PE_LAZY` in CRIU's `images/pagemap.proto`).
const PE_LAZY: u32 = 1 << 1;
/// What CRIU images begin with before their own magic.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    /// `compat_nr_pages`: the count where it fits 32 bits.
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    /// The count, written by CRIU versions that know it.
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// The bytes of memory that a lazy dump in `images` left on the source: the lazy entries of every
/// `pagemap-*.img` (one per process).
pub fn lazy_bytes(images: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(images).map_err(Error::io(images))? {
        let path = entry.map_err(Error::io(images))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("pagemap-") && name.ends_with(".img") {
            let data = std::fs::read(&path).map_err(Error::io(&path))?;
            total += lazy_pages(&data)
                .map_err(|why| Error::Invalid(format!("{}: {why}", path.display())))?
                * 4096;
        }
    }
    Ok(total)
}

/// The lazy pages of one pagemap image: magics, then entries of a 32-bit length and a protobuf
/// message each, the first being the head (`pages_id`).
fn lazy_pages(data: &[u8]) -> std::result::Result<u64, String> {
    use prost::Message;
    let word = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = if word(0) == Some(IMG_COMMON_MAGIC) {
        8
    } else {
        4
    };
    let (mut pages, mut head) = (0u64, true);
    while at < data.len() {
        let len = word(at).ok_or("a truncated entry length")? as usize;
        let body = data.get(at + 4..at + 4 + len).ok_or("a truncated entry")?;
        at += 4 + len;
        if std::mem::take(&mut head) {
            continue;
        }
        let entry = PagemapEntry::decode(body).map_err(|e| e.to_string())?;
        if entry.flags.unwrap_or(0) & PE_LAZY != 0 {
            pages += entry.nr_pages.unwrap_or(u64::from(entry.compat_nr_pages));
        }
    }
    Ok(pages)
}

/// Source: the page server of one lazily checkpointed container.
#[derive(Debug)]
pub struct PageServer {
    net: PrivateNet,
    /// `runc checkpoint --lazy-pages`, which ends once every page was served (its waiter holds
    /// the lock for as long as that takes).
    child: tokio::sync::Mutex<Child>,
    /// Its process group (its PID), to kill it while someone waits for it.
    group: Option<u32>,
    /// Bytes of pages sent to the target.
    pub served: AtomicU64,
}

/// Page servers by migration and container.
type ByContainer = BTreeMap<(String, String), Arc<PageServer>>;

/// Source: the page servers of this node.
#[derive(Debug, Clone, Default)]
pub struct PageServers(Arc<Mutex<ByContainer>>);

impl PageServers {
    fn lock(&self) -> std::sync::MutexGuard<'_, ByContainer> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, uid: &str, container: &str) -> Option<Arc<PageServer>> {
        self.lock()
            .get(&(uid.to_string(), container.to_string()))
            .cloned()
    }

    fn of(&self, uid: &str) -> Vec<Arc<PageServer>> {
        self.lock()
            .iter()
            .filter(|((u, _), _)| u == uid)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Dumps container `id` lazily into `images` (CRIU's log in `work`): once CRIU reports the
    /// dump done, its page server waits for the target in a namespace of its own. The container
    /// stays frozen (a paused one stays paused) until its pages were served.
    pub async fn dump(
        &self,
        uid: &str,
        container: &str,
        id: &str,
        runc_root: &Path,
        images: &Path,
        work: &Path,
    ) -> Result<()> {
        let status = work.join("status");
        let _ = std::fs::remove_file(&status);
        std::fs::write(&status, b"").map_err(Error::io(&status))?;
        let mut command = in_node("sh");
        command
            .args(["-c", "s=$1; shift; exec \"$@\" 3>>\"$s\"", "sh"])
            .arg(&status)
            .arg("runc")
            .arg("--root")
            .arg(runc_root)
            .args(["checkpoint", "--lazy-pages", "--page-server"])
            .arg(format!("127.0.0.1:{PAGE_PORT}"))
            .args(["--status-fd", "3", "--tcp-established", "--file-locks"])
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(id)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let (mut child, net) = PrivateNet::start(|| {
            let child = command.spawn()?;
            let pid = child.id().unwrap_or_default();
            Ok((child, pid))
        })
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot run runc checkpoint in a namespace of its own: {e}"
            ))
        })?;
        // Until the server is registered, a failure or a cancelled dump (the checkpoint's time
        // ran out) must not leave CRIU holding the pod: the source then resumes it.
        let guard = KillGroupOnDrop(child.id());
        match ready(&mut child, || {
            std::fs::metadata(&status).is_ok_and(|m| m.len() > 0)
        })
        .await
        {
            Ok(()) => {}
            Err(Some(exit)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(Error::Invalid(format!(
                    "the lazy checkpoint of container {container} failed ({exit}): {}; CRIU's log is {}",
                    err.trim(),
                    work.join("dump.log").display()
                )));
            }
            Err(None) => {
                return Err(Error::NotReady(format!(
                    "the lazy checkpoint of container {container} was not ready within {READY_WITHIN:?}"
                )));
            }
        }
        guard.disarm();
        self.lock().insert(
            (uid.to_string(), container.to_string()),
            Arc::new(PageServer {
                net,
                group: child.id(),
                child: tokio::sync::Mutex::new(child),
                served: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Waits until every page server of migration `uid` ended (all pages served, or the target
    /// went away), at most `within`; answers whether all ended well.
    pub async fn finished(&self, uid: &str, within: Duration) -> Result<()> {
        let servers = self.of(uid);
        if servers.is_empty() {
            return Err(Error::NotReady(format!(
                "no page server of migration {uid} runs under this agent"
            )));
        }
        // One deadline for all: the pod stays frozen until the last one ends.
        let deadline = tokio::time::Instant::now() + within;
        for server in servers {
            let mut child = server.child.lock().await;
            let exit = tokio::time::timeout_at(deadline, child.wait())
                .await
                .map_err(|_| {
                    Error::NotReady(format!("the pages were not all served within {within:?}"))
                })?
                .map_err(Error::io("runc checkpoint"))?;
            if !exit.success() {
                return Err(Error::Invalid(format!(
                    "the page server ended with {exit} before every page was served"
                )));
            }
        }
        Ok(())
    }

    /// Stops the page servers of migration `uid` (an abort before the commit: the containers stay
    /// paused, and whole, for the source to resume them) and forgets them.
    pub async fn stop(&self, uid: &str) {
        let servers: Vec<_> = {
            let mut all = self.lock();
            let keys: Vec<_> = all.keys().filter(|(u, _)| u == uid).cloned().collect();
            keys.into_iter().filter_map(|k| all.remove(&k)).collect()
        };
        for server in servers {
            // Killed first: a waiter for its end (`finished`) holds the child until it ends.
            if let Some(group) = server.group {
                killpg(group);
            }
            let _ = server.child.lock().await.wait().await;
        }
    }

    /// Whether migration `uid` has page servers under this agent.
    pub fn serving(&self, uid: &str) -> bool {
        !self.of(uid).is_empty()
    }
}

/// A command of the node's `program` run in the node's mount and PID namespaces (those of
/// `/proc`'s first process, the node's init where the agent runs with `hostPID`):
/// - the node's runc and CRIU are the ones its containerd and the runtime wrapper use (the
///   MigrOS-patched CRIU on an RDMA node); the agent's image carries neither, only `nsenter`.
///   The paths handed to them (the agent's store, the runtime's state under `/run/containerd`)
///   are the node's own: the chart mounts them at the same paths;
/// - runc and CRIU read `/proc/self`, which must be their own, also where the agent runs in another
///   PID namespace than the `/proc` it sees.
///
/// The network namespace stays the caller's (the private one of [`PrivateNet`]).
pub(crate) fn in_node(program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command.args([
        "--mount=/proc/1/ns/mnt",
        "--pid=/proc/1/ns/pid",
        "--",
        program,
    ]);
    command
}

/// Waits until `is_ready` (CRIU said so), at most [`READY_WITHIN`]; `Err` with the exit status
/// when `child` ended first, or with none when the time ran out.
async fn ready(
    child: &mut Child,
    is_ready: impl Fn() -> bool,
) -> std::result::Result<(), Option<std::process::ExitStatus>> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if is_ready() {
            return Ok(());
        }
        match child.try_wait() {
            Ok(Some(exit)) => return Err(Some(exit)),
            Ok(None) => {}
            Err(_) => return Err(None),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills a child's process group (nsenter, and runc or CRIU under it).
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        killpg(pid);
    }
}

fn killpg(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Kills what an earlier run of the agent left of a migration's CRIU ends (page servers,
/// lazy-pages daemons): every process whose command line has a lazy-pages argument and a path
/// under the migration's directory `dir`, with its process group. Answers how many were found.
pub fn kill_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let dir = dir.to_string_lossy().into_owned();
    let mut found = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !leftover(&cmdline, &dir) {
            continue;
        }
        found += 1;
        let pid = nix::unistd::Pid::from_raw(pid);
        let group = nix::unistd::getpgid(Some(pid)).unwrap_or(pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    found
}

/// Whether a command line (NUL-separated) is a CRIU end of the migration whose directory is `dir`.
fn leftover(cmdline: &[u8], dir: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let lazy = args
        .iter()
        .any(|a| *a == b"--lazy-pages" || *a == b"lazy-pages");
    let prefix = format!("{dir}/");
    lazy && args
        .iter()
        .any(|a| String::from_utf8_lossy(a).starts_with(&prefix))
}

/// Removes the network lock CRIU put into a pod's network namespace for a dump (its `inet
/// CRIU-...` nftables tables, which drop everything but CRIU's own packets). CRIU lifts it when
/// the dump ends; a page server killed before (an abort) leaves it. Answers the tables removed.
pub fn unlock_network(netns: &Path, nft: &Path) -> std::io::Result<usize> {
    crate::address::in_netns(netns, || {
        // Spawned from the namespace's thread, nft runs in the pod's namespace.
        let out = std::process::Command::new(nft)
            .args(["list", "tables"])
            .output()?;
        let mut removed = 0;
        for table in criu_locks(&String::from_utf8_lossy(&out.stdout)) {
            let done = std::process::Command::new(nft)
                .args(["delete", "table", "inet", table])
                .status()?;
            if done.success() {
                removed += 1;
            }
        }
        Ok(removed)
    })
}

/// The names of CRIU's network-lock tables in `nft list tables` output.
fn criu_locks(tables: &str) -> Vec<&str> {
    tables
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|name| name.starts_with("CRIU"))
        .collect()
}

/// Kills a process group when dropped, unless disarmed.
struct KillGroupOnDrop(Option<u32>);

impl KillGroupOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            killpg(pid);
        }
    }
}

/// Source: carries one page stream between the target's agent (`inbound` frames, `outbound`
/// frames) and the container's page server, pacing pages to `limit` bytes per second.
pub async fn serve(
    server: Arc<PageServer>,
    first: v1::PageFrame,
    mut inbound: tonic::Streaming<v1::PageFrame>,
    outbound: tokio::sync::mpsc::Sender<std::result::Result<v1::PageFrame, tonic::Status>>,
    limit: u64,
) -> Result<()> {
    let conn = server
        .net
        .connect(PAGE_PORT)
        .map_err(Error::io("the page server"))?;
    let (mut from_server, mut to_server) = conn.into_split();
    if !first.data.is_empty() {
        to_server
            .write_all(&first.data)
            .await
            .map_err(Error::io("the page server"))?;
    }
    let requests = async move {
        while let Ok(Some(frame)) = inbound.message().await {
            if to_server.write_all(&frame.data).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    // Owns the answer stream: when the page server ends, the target's stream ends too.
    let pages = async move {
        let mut pace = Pace::new(limit);
        let mut buf = vec![0u8; FRAME];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tokio::time::sleep(pace.delay(n as u64)).await;
            server.served.fetch_add(n as u64, Ordering::Relaxed);
            let frame = v1::PageFrame {
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            if outbound.send(Ok(frame)).await.is_err() {
                break;
            }
        }
    };
    // Either end closing ends the stream.
    tokio::select! {
        () = requests => {}
        () = pages => {}
    }
    Ok(())
}

/// Target: where a container's memory stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Pages stream in.
    Streaming,
    /// Every page is in; the source is no longer needed.
    Complete,
    /// Not every page can come; the restored containers were killed.
    Failed(String),
}

/// Target: the lazy-pages daemon of one container and its stream from the source.
#[derive(Debug)]
pub struct LazyDaemon {
    pub container: String,
    /// Bytes of pages the source left behind (from the pagemap).
    pub total: u64,
    /// Bytes received from the source.
    pub received: AtomicU64,
    /// Decided once: Streaming, then Complete or Failed.
    state: tokio::sync::watch::Sender<Memory>,
}

impl LazyDaemon {
    fn new(container: String, total: u64, received: u64, memory: Memory) -> Self {
        Self {
            container,
            total,
            received: AtomicU64::new(received),
            state: tokio::sync::watch::Sender::new(memory),
        }
    }

    pub fn memory(&self) -> Memory {
        self.state.borrow().clone()
    }

    /// The container's memory once decided (Complete or Failed).
    pub async fn decided(&self) -> Memory {
        let mut state = self.state.subscribe();
        let decided = state.wait_for(|m| *m != Memory::Streaming).await;
        // The sender lives in `self`: it cannot have gone while this waits.
        decided.map_or_else(|_| self.memory(), |m| m.clone())
    }

    fn set(&self, memory: Memory) {
        self.state.send_if_modified(|state| {
            let streaming = *state == Memory::Streaming;
            if streaming {
                *state = memory;
            }
            streaming
        });
    }
}

/// Target: the lazy-pages daemons of this node, by migration.
#[derive(Debug, Clone, Default)]
pub struct LazyDaemons(Arc<Mutex<BTreeMap<String, Vec<Arc<LazyDaemon>>>>>);

/// What the target needs to fetch one container's pages.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub uid: String,
    pub container: String,
    /// The staged container directory (`checkpoint/` images, `work/`).
    pub dir: PathBuf,
    pub source: v1::PostCopySource,
    pub tls: agent_api::tls::TlsMaterial,
}

impl LazyDaemons {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<Arc<LazyDaemon>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The daemons of migration `uid`, if it streams memory on this node.
    pub fn of(&self, uid: &str) -> Option<Vec<Arc<LazyDaemon>>> {
        self.lock().get(uid).cloned()
    }

    /// Whether container `container` of migration `uid` has its daemon here.
    pub fn has(&self, uid: &str, container: &str) -> bool {
        self.lock()
            .get(uid)
            .is_some_and(|d| d.iter().any(|d| d.container == container))
    }

    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// Starts the lazy-pages daemon of one container, ready for the restore (its socket exists),
    /// and marks the directory for the runtime wrapper. `kill` freezes and kills the restored
    /// container; it runs before the daemon's connection is closed whenever the stream fails.
    pub async fn start<K>(&self, fetch: Fetch, kill: K) -> Result<()>
    where
        K: FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    {
        let images = fetch.dir.join("checkpoint");
        let work = fetch.dir.join("work");
        std::fs::create_dir_all(&work).map_err(Error::io(&work))?;
        let total = lazy_bytes(&images)?;
        let socket = work.join(DAEMON_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let mut command = in_node("criu");
        command
            .args(["lazy-pages", "--page-server", "--address", "127.0.0.1"])
            .arg("--port")
            .arg(PAGE_PORT.to_string())
            .arg("--images-dir")
            .arg(&images)
            .arg("--work-dir")
            .arg(&work)
            .args(["--log-file", "lazy-pages.log", "-v4"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        // The listener first: the daemon connects to it as soon as the restore hands it over.
        let ((listener, mut child), net) = PrivateNet::start(|| {
            let listener = netns::listen(PAGE_PORT)?;
            let child = command.spawn()?;
            let pid = child.id().unwrap_or_default();
            Ok(((listener, child), pid))
        })
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot run criu lazy-pages in a namespace of its own: {e}"
            ))
        })?;
        let guard = KillGroupOnDrop(child.id());
        match ready(&mut child, || socket.exists()).await {
            Ok(()) => {}
            Err(Some(exit)) => {
                return Err(Error::Invalid(format!(
                    "criu lazy-pages for container {} ended ({exit}); its log is {}",
                    fetch.container,
                    work.join("lazy-pages.log").display()
                )));
            }
            Err(None) => {
                return Err(Error::NotReady(format!(
                    "criu lazy-pages for container {} was not ready within {READY_WITHIN:?}",
                    fetch.container
                )));
            }
        }
        let marker = fetch.dir.join(LAZY_MARKER);
        std::fs::write(&marker, b"").map_err(Error::io(&marker))?;
        guard.disarm();
        let daemon = Arc::new(LazyDaemon::new(
            fetch.container.clone(),
            total,
            0,
            Memory::Streaming,
        ));
        self.lock()
            .entry(fetch.uid.clone())
            .or_default()
            .push(daemon.clone());
        tokio::spawn(run(fetch, daemon, net, listener, child, kill));
        Ok(())
    }
}

/// Target: carries the daemon's page requests to the source and the pages back, until the daemon
/// ends; decides the container's memory state. The daemon's connection is this function's until
/// the end: closing it would end the daemon, and with it the userfaultfd of the restored process.
async fn run<K>(
    fetch: Fetch,
    daemon: Arc<LazyDaemon>,
    _net: PrivateNet,
    listener: tokio::net::TcpListener,
    mut child: Child,
    kill: K,
) where
    K: FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
{
    let uid = fetch.uid.clone();
    enum Ended {
        Daemon(std::io::Result<std::process::ExitStatus>),
        Stream(std::result::Result<(), String>),
    }
    // The daemon connects once the restore handed it the process (or never, if no restore comes).
    let accepted = tokio::select! {
        exit = child.wait() => Err(Ended::Daemon(exit)),
        conn = tokio::time::timeout(CONNECT_WITHIN, listener.accept()) => match conn {
            Ok(Ok((conn, _))) => Ok(conn),
            Ok(Err(e)) => Err(Ended::Stream(Err(format!("the daemon did not connect: {e}")))),
            Err(_) => Err(Ended::Stream(Err(format!(
                "no restore used the lazy-pages daemon within {CONNECT_WITHIN:?}"
            )))),
        },
    };
    let (ended, mut conn) = match accepted {
        Err(ended) => (ended, None),
        Ok(mut conn) => {
            conn.set_nodelay(true).ok();
            let ended = tokio::select! {
                exit = child.wait() => Ended::Daemon(exit),
                streamed = tunnel(&fetch, &daemon, &mut conn) => Ended::Stream(streamed),
            };
            (ended, Some(conn))
        }
    };
    let outcome = match ended {
        Ended::Daemon(Ok(exit)) if exit.success() => Memory::Complete,
        Ended::Daemon(Ok(exit)) => Memory::Failed(format!("criu lazy-pages ended with {exit}")),
        Ended::Daemon(Err(e)) => Memory::Failed(format!("criu lazy-pages: {e}")),
        // The source closes the stream once it served every page; the daemon, whose connection
        // is still open, ends right after.
        Ended::Stream(Ok(())) => match tokio::time::timeout(DAEMON_ENDS, child.wait()).await {
            Ok(Ok(exit)) if exit.success() => Memory::Complete,
            _ => {
                Memory::Failed("the source closed the page stream before every page was in".into())
            }
        },
        Ended::Stream(Err(why)) => Memory::Failed(why),
    };
    match &outcome {
        Memory::Complete => {
            info!(migration = %uid, container = %daemon.container, bytes = daemon.received.load(Ordering::Relaxed), "all memory is in");
        }
        Memory::Failed(why) => {
            warn!(migration = %uid, container = %daemon.container, %why, "the memory cannot all come: killing the restored container");
            kill().await;
            kill_group(&child);
            let _ = child.wait().await;
        }
        Memory::Streaming => {}
    }
    daemon.set(outcome);
    // Only now may the daemon's connection close.
    drop(conn.take());
}

/// One page stream: the daemon's connection on one side, the source agent's `Pages` on the other.
/// Ends when the source closes its side (Ok) or either breaks (Err); never closes the daemon's
/// connection (its halves are borrowed).
async fn tunnel(
    fetch: &Fetch,
    daemon: &LazyDaemon,
    conn: &mut tokio::net::TcpStream,
) -> std::result::Result<(), String> {
    let endpoint = &fetch.source.endpoint;
    let channel = fetch
        .tls
        .endpoint(endpoint, &fetch.source.node)
        .map_err(|e| format!("bad source endpoint {endpoint:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        // A source node that goes silent (powered off, cut off) sends no reset: without pings
        // the stream, and the restored process waiting on a page, would wait forever.
        .http2_keep_alive_interval(PAGE_STREAM_PING)
        .keep_alive_timeout(PAGE_STREAM_PING * 2)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| format!("connecting to the source agent {endpoint}: {e}"))?;
    let (mut from_daemon, mut to_daemon) = conn.split();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(v1::PageFrame {
        migration_uid: fetch.uid.clone(),
        container: fetch.container.clone(),
        data: Vec::new(),
    })
    .await
    .map_err(|_| "the page stream closed".to_string())?;
    let requests = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from_daemon.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = v1::PageFrame {
                        data: buf[..n].to_vec(),
                        ..Default::default()
                    };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The daemon said all it had to say; its answers may still be coming.
        std::future::pending::<()>().await;
    };
    let pages = async {
        let mut inbound = agent_api::client::Client::new(channel)
            .raw()
            .pages(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("the source agent refused the page stream: {}", e.message()))?
            .into_inner();
        loop {
            match inbound.message().await {
                Ok(Some(frame)) => {
                    daemon
                        .received
                        .fetch_add(frame.data.len() as u64, Ordering::Relaxed);
                    to_daemon
                        .write_all(&frame.data)
                        .await
                        .map_err(|e| format!("writing pages to the daemon: {e}"))?;
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("the page stream broke: {}", e.message())),
            }
        }
    };
    tokio::select! {
        () = requests => Ok(()),
        r = pages => r,
    }
}

/// The memory of migration `uid` as an operation: RUNNING while any container's pages stream
/// in, FAILED if any cannot all come, SUCCEEDED once all are in.
pub fn operation(uid: &str, daemons: &[Arc<LazyDaemon>]) -> v1::Operation {
    let mut op = v1::Operation::succeeded(uid);
    op.bytes_total = daemons.iter().map(|d| d.total).sum();
    // What came counts the protocol's headers too: never more than the pages.
    op.bytes_done = daemons
        .iter()
        .map(|d| d.received.load(Ordering::Relaxed).min(d.total))
        .sum();
    let failed: Vec<String> = daemons
        .iter()
        .filter_map(|d| match d.memory() {
            Memory::Failed(why) => Some(format!("container {}: {why}", d.container)),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        op.state = v1::State::Failed as i32;
        op.message = failed.join("; ");
    } else if daemons.iter().any(|d| d.memory() == Memory::Streaming) {
        op.state = v1::State::Running as i32;
        op.message = format!("{} of {} bytes of memory in", op.bytes_done, op.bytes_total);
    } else {
        op.message = "all memory is in".into();
    }
    op
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A pagemap image as CRIU 4 writes it (checked against one it wrote: the magics, the head,
    /// entries with `compat_nr_pages` 0 and the count in `nr_pages`).
    fn image(entries: &[(u64, u64, Option<u32>)]) -> Vec<u8> {
        use prost::Message;
        let mut data = Vec::new();
        data.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        data.extend_from_slice(&0x5608_4025u32.to_le_bytes());
        // The head: pages_id = 1.
        let head = [0x08, 0x01];
        data.extend_from_slice(&(head.len() as u32).to_le_bytes());
        data.extend_from_slice(&head);
        for &(vaddr, nr_pages, flags) in entries {
            let body = PagemapEntry {
                vaddr,
                compat_nr_pages: 0,
                in_parent: None,
                flags,
                nr_pages: Some(nr_pages),
            }
            .encode_to_vec();
            data.extend_from_slice(&(body.len() as u32).to_le_bytes());
            data.extend_from_slice(&body);
        }
        data
    }

    #[test]
    fn only_lazy_pagemap_entries_count_as_memory_left_on_the_source() {
        let present = 1 << 2;
        let data = image(&[
            (0x400000, 3, Some(present)),
            (0x7f00_0000_0000, 16384, Some(PE_LAZY | present)),
            (0x7f00_1000_0000, 5, Some(PE_LAZY)),
            (0x7fff_0000_0000, 2, None),
        ]);
        assert_eq!(lazy_pages(&data).unwrap(), 16384 + 5);
        assert_eq!(&data[..4], [0x19, 0x43, 0x56, 0x54], "CRIU's common magic");
        assert!(lazy_pages(&data[..data.len() - 3]).is_err(), "truncated");
    }

    fn daemon(total: u64, received: u64, memory: Memory) -> Arc<LazyDaemon> {
        Arc::new(LazyDaemon::new("app".into(), total, received, memory))
    }

    #[test]
    fn memory_is_in_only_when_every_container_has_all_of_its_pages() {
        let running = operation(
            "u",
            &[
                daemon(100, 100, Memory::Complete),
                daemon(50, 10, Memory::Streaming),
            ],
        );
        assert_eq!(running.state, v1::State::Running as i32);
        assert_eq!((running.bytes_done, running.bytes_total), (110, 150));
        let failed = operation(
            "u",
            &[
                daemon(100, 10, Memory::Failed("gone".into())),
                daemon(50, 10, Memory::Streaming),
            ],
        );
        assert_eq!(failed.state, v1::State::Failed as i32);
        assert!(failed.message.contains("gone"), "{}", failed.message);
        let done = operation("u", &[daemon(100, 100, Memory::Complete)]);
        assert_eq!(done.state, v1::State::Succeeded as i32);
    }

    #[test]
    fn only_criu_network_locks_are_lifted() {
        let tables =
            "table inet CRIU-c3500aa2-5ba4-4b0d-b6\ntable bridge kube-migros\ntable inet filter\n";
        assert_eq!(criu_locks(tables), ["CRIU-c3500aa2-5ba4-4b0d-b6"]);
    }

    #[test]
    fn leftovers_are_the_lazy_criu_ends_of_that_migration_only() {
        let dir = "/var/lib/kube-migros/migrations/mig-1";
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        let source = cmd(&[
            "nsenter",
            "--mount=/proc/1/ns/mnt",
            "--pid=/proc/1/ns/pid",
            "--",
            "sh",
            "-c",
            "...",
            "sh",
            "/var/lib/kube-migros/migrations/mig-1/checkpoint/app.criu/status",
            "runc",
            "checkpoint",
            "--lazy-pages",
            "--image-path",
            "/var/lib/kube-migros/migrations/mig-1/checkpoint/app/checkpoint",
        ]);
        let daemon = cmd(&[
            "criu",
            "lazy-pages",
            "--images-dir",
            "/var/lib/kube-migros/migrations/mig-1/staged/app/checkpoint",
        ]);
        assert!(leftover(&source, dir));
        assert!(leftover(&daemon, dir));
        // Another migration's, one whose name begins the same, and a plain checkpoint.
        assert!(!leftover(&daemon, "/var/lib/kube-migros/migrations/mig-2"));
        assert!(!leftover(&daemon, "/var/lib/kube-migros/migrations/mig"));
        let plain = cmd(&[
            "runc",
            "checkpoint",
            "--image-path",
            "/var/lib/kube-migros/migrations/mig-1/x",
        ]);
        assert!(!leftover(&plain, dir));
    }

    #[test]
    fn a_decided_memory_state_is_not_changed_again() {
        let d = daemon(1, 1, Memory::Streaming);
        d.set(Memory::Complete);
        d.set(Memory::Failed("late".into()));
        assert_eq!(d.memory(), Memory::Complete);
    }

    #[tokio::test]
    async fn a_waiter_learns_the_decision_when_it_is_made() {
        let d = daemon(1, 0, Memory::Streaming);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.decided().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "decided while still streaming");
        d.set(Memory::Failed("the stream broke".into()));
        assert_eq!(
            waiter.await.unwrap(),
            Memory::Failed("the stream broke".into())
        );
        // Decided before anyone waits: answered at once.
        assert_eq!(
            daemon(1, 1, Memory::Complete).decided().await,
            Memory::Complete
        );
    }
}
