//! The baselines, measured on the same nodes as kube-migros: the raw recipe (`e2e/bench/raw-recipe.sh`:
//! CRI checkpoint, copy, CRI restore, no Kubernetes) at each memory size, and the limits of moving
//! its archive from node-1 to node-2: a plain TCP pipe between the two nodes' network namespaces
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

use crate::{Options, RawRun, TransferRuns};

/// Runs the raw recipe `options.runs` times per size, then the transfer limits on an archive of
/// the middle size.
pub async fn run(
    dirs: &Dirs,
    options: &Options,
) -> anyhow::Result<(BTreeMap<String, Vec<RawRun>>, TransferRuns)> {
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
    let mut raw = BTreeMap::new();
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
    Ok((raw, transfer))
}

/// One run of the raw recipe from node-1 to node-2.
fn raw_recipe(demo: &str, size: &str, keep: Option<&Path>) -> anyhow::Result<RawRun> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("raw-recipe.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["node-1", "node-2", demo])
        .env("TOUCH", size)
        .env("MIN_COUNTER", "100");
    if let Some(path) = keep {
        cmd.env("KEEP_ARCHIVE", path);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "raw-recipe.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {key} in the recipe's output:\n{text}"))
    };
    let id = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if id("source_id").is_none() || id("source_id") != id("target_id") {
        bail!("the raw recipe's target does not run the restored process:\n{text}");
    }
    Ok(RawRun {
        archive_bytes: field("archive_bytes")? as u64,
        checkpoint_ms: field("checkpoint_ms")?,
        copy_ms: field("copy_ms")?,
        scp_ms: field("scp_ms")?,
        restore_ms: field("restore_ms")?,
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
