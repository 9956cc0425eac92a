//! The baselines, measured on the same nodes as kube-migros, node-1 to node-2: the raw recipe
//! (`e2e/bench/raw-recipe.sh`: CRI checkpoint, copy, CRI restore, no Kubernetes) and the CRIU floor
//! (`e2e/bench/criu-floor.sh`: CRIU dump to memory, a TCP copy, CRIU restore, no containerd) at
//! each memory size, and the limits of moving the raw recipe's archive: a plain TCP pipe between the two nodes' network namespaces
//! (1 MiB writes from memory, read and dropped), scp (the raw recipe's), and a copy in memory.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use sandbox::{Dirs, cluster, nodes::Nodes};

use crate::{FloorRun, Options, RawRun, TransferRuns};

/// What the baselines measured.
#[derive(Debug)]
pub struct Baselines {
    pub raw: BTreeMap<String, Vec<RawRun>>,
    pub floor: BTreeMap<String, Vec<FloorRun>>,
    pub transfer: TransferRuns,
}

/// Runs the raw recipe and the CRIU floor `options.runs` times per size, then the transfer limits
/// on an archive of the middle size.
pub async fn run(dirs: &Dirs, options: &Options) -> anyhow::Result<Baselines> {
    let cluster = cluster::up(dirs).await?;
    let demo = cluster.images.get("demo").context("no demo image")?.clone();
    let nodes = Nodes::new(dirs);
    // The recipe plays the kubelet through crictl; a real kubelet would remove its pods. The
    // kubelets are started again by the next `cluster up`.
    for node in &cluster.nodes {
        nodes.stop_all(node, "kubelet")?;
    }
    let keep_size = options
        .sizes
        .get(options.sizes.len() / 2)
        .cloned()
        .unwrap_or_default();
    let archive = dirs.state.join("bench/archive.tar");
    std::fs::create_dir_all(archive.parent().unwrap_or(Path::new("/")))?;
    let (mut raw, mut floor) = (BTreeMap::new(), BTreeMap::new());
    for size in &options.sizes {
        let mut runs = Vec::new();
        for i in 0..options.runs {
            let keep = (*size == keep_size && i == 0).then_some(archive.as_path());
            let run = tokio::task::spawn_blocking({
                let (demo, size, keep) = (demo.clone(), size.clone(), keep.map(Path::to_path_buf));
                move || raw_recipe(&demo, &size, keep.as_deref())
            })
            .await??;
            eprintln!(
                "bench: raw {size} #{}: checkpoint {:.0} ms, scp {:.0} ms, restore {:.0} ms, {} bytes",
                i + 1,
                run.checkpoint_ms,
                run.scp_ms,
                run.restore_ms,
                run.archive_bytes
            );
            runs.push(run);
        }
        raw.insert(size.clone(), runs);
        let mut runs = Vec::new();
        for i in 0..options.runs {
            let run = tokio::task::spawn_blocking({
                let (size, demo) = (size.clone(), sandbox::images::binary(dirs, "demo"));
                move || criu_floor(&demo, &size)
            })
            .await??;
            eprintln!(
                "bench: CRIU floor {} #{}: dump {:.0} ms, transfer {:.0} ms, restore {:.0} ms, {} bytes",
                size,
                i + 1,
                run.dump_ms,
                run.transfer_ms,
                run.restore_ms,
                run.image_bytes
            );
            runs.push(run);
        }
        floor.insert(size.clone(), runs);
    }

    let bytes = std::fs::read(&archive).context("the kept archive")?;
    let mut transfer = TransferRuns {
        bytes: bytes.len() as u64,
        ..Default::default()
    };
    let mb_per_s = |seconds: f64| bytes.len() as f64 / 1e6 / seconds;
    let (from, to) = (&cluster.nodes[0], &cluster.nodes[1]);
    // The destination of the memory copy, touched once so that page faults are not counted.
    let mut copy = vec![1u8; bytes.len()];
    for _ in 0..options.runs.max(3) {
        let copy_started = Instant::now();
        copy.copy_from_slice(&bytes);
        std::hint::black_box(&copy);
        let copy_s = copy_started.elapsed().as_secs_f64();
        transfer
            .mb_per_s
            .entry("memory copy".into())
            .or_default()
            .push(mb_per_s(copy_s));
        let pipe_s = tcp_pipe(&from.netns(), &to.netns(), to.ip().into(), &bytes)?;
        transfer
            .mb_per_s
            .entry("tcp pipe".into())
            .or_default()
            .push(mb_per_s(pipe_s));
    }
    if let Some(runs) = raw.get(&keep_size) {
        transfer.mb_per_s.insert(
            "scp".into(),
            runs.iter()
                .map(|r| r.archive_bytes as f64 / 1e6 / (r.scp_ms / 1000.0))
                .collect(),
        );
    }
    Ok(Baselines {
        raw,
        floor,
        transfer,
    })
}

/// The `key=value` lines a baseline script printed.
struct Printed(String);

impl Printed {
    /// Runs `script` (next to this crate) from node-1 to node-2 with `last` as its third
    /// argument; checks that the target runs the source's process (equal workload ids).
    fn of(script: &str, last: &str, configure: impl FnOnce(&mut Command)) -> anyhow::Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
        let mut cmd = Command::new("bash");
        cmd.arg(&path).args(["node-1", "node-2", last]);
        configure(&mut cmd);
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "{script} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let printed = Self(String::from_utf8_lossy(&out.stdout).into_owned());
        let id = |key| printed.text(key).filter(|v| !v.is_empty());
        if id("source_id").is_none() || id("source_id") != id("target_id") {
            bail!(
                "{script}: the target does not run the restored process:\n{}",
                printed.0
            );
        }
        Ok(printed)
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    }

    fn number(&self, key: &str) -> anyhow::Result<f64> {
        self.text(key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in the script's output:\n{}", self.0))
    }
}

/// One run of the raw recipe from node-1 to node-2.
fn raw_recipe(demo: &str, size: &str, keep: Option<&Path>) -> anyhow::Result<RawRun> {
    let out = Printed::of("raw-recipe.sh", demo, |cmd| {
        cmd.env("TOUCH", size).env("MIN_COUNTER", "100");
        if let Some(path) = keep {
            cmd.env("KEEP_ARCHIVE", path);
        }
    })?;
    Ok(RawRun {
        archive_bytes: out.number("archive_bytes")? as u64,
        checkpoint_ms: out.number("checkpoint_ms")?,
        copy_ms: out.number("copy_ms")?,
        scp_ms: out.number("scp_ms")?,
        restore_ms: out.number("restore_ms")?,
    })
}

/// One run of the CRIU floor from node-1 to node-2: the demo workload's binary (from its image's
/// rootfs, which the sandbox keeps) as a plain process.
fn criu_floor(demo: &Path, size: &str) -> anyhow::Result<FloorRun> {
    let out = Printed::of("criu-floor.sh", &demo.display().to_string(), |cmd| {
        cmd.env("TOUCH", size);
    })?;
    Ok(FloorRun {
        image_bytes: out.number("image_bytes")? as u64,
        dump_ms: out.number("dump_ms")?,
        transfer_ms: out.number("transfer_ms")?,
        restore_ms: out.number("restore_ms")?,
    })
}

/// Sends `bytes` over one TCP connection from network namespace `from` to a reader in `to`
/// listening on `to_ip`; returns the seconds from connect until the reader saw the end.
fn tcp_pipe(from: &str, to: &str, to_ip: std::net::IpAddr, bytes: &[u8]) -> anyhow::Result<f64> {
    let (to_ns, from_ns) = (netns_path(to), netns_path(from));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
    let reader = std::thread::spawn(move || -> anyhow::Result<(u64, Instant)> {
        let listener = (|| {
            enter(&to_ns)?;
            Ok(TcpListener::bind((to_ip, 0))?)
        })();
        let listener: TcpListener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
                return Err(e);
            }
        };
        let _ = ready_tx.send(Ok(listener.local_addr()?));
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok((total, Instant::now()))
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the pipe's reader did not start")??;
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || -> anyhow::Result<Instant> {
        enter(&from_ns)?;
        let started = Instant::now();
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        for chunk in data.chunks(1 << 20) {
            conn.write_all(chunk)?;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(started)
    });
    let started = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the pipe's writer panicked"))??;
    let (total, ended) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the pipe's reader panicked"))??;
    if total != bytes.len() as u64 {
        bail!("the pipe moved {total} of {} bytes", bytes.len());
    }
    Ok((ended - started).as_secs_f64())
}

fn netns_path(name: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the calling thread into a network namespace (the thread is discarded afterwards).
fn enter(path: &Path) -> anyhow::Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", path.display()))?;
    Ok(())
}
