//! What this node offers the migration strategies beyond stop-and-copy, checked rather than
//! assumed, for the agent's capabilities (the operator chooses a PostCopy target only among the
//! nodes that report it met; see docs/node-agent.md#strategy-requirements).
//!
//! - **PostCopy** restores the process before its memory has arrived: CRIU's lazy pages, which
//!   need userfaultfd (the kernel has it when `vm.unprivileged_userfaultfd` exists, kernel 5.2 and
//!   later; its non-cooperative events are older) and a pipe of 3.2 MiB to splice pages through,
//!   which the kernel rounds up to 4 MiB and allows only when `fs.pipe-max-size` is at least that
//!   (with the default 1 MiB the first page request fails).
//! - **PreCopy** dumps memory while the process runs and then only what changed: the kernel's
//!   soft-dirty bits, tried on a page of the agent itself (clear them, write the page, read its
//!   pagemap entry), as CRIU's own check does.

use agent_api::v1;
use tokio::sync::OnceCell;

pub const POST_COPY: &str = "PostCopy";
pub const PRE_COPY: &str = "PreCopy";

/// The pipe CRIU's lazy pages ask for, as the kernel rounds it (a power of two of pages).
pub const LAZY_PAGES_PIPE_BYTES: u64 = 4 << 20;

const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

const USERFAULTFD_SYSCTL: &str = "/proc/sys/vm/unprivileged_userfaultfd";

/// Soft-dirty, as tried once (it does not change while the node runs).
static SOFT_DIRTY: OnceCell<Result<(), String>> = OnceCell::const_new();

/// What the node offers PostCopy and PreCopy now; `criu`: whether the node has CRIU (the agent
/// asks it in the node's namespaces, as post-copy runs it).
pub async fn requirements(criu: bool) -> Vec<v1::StrategyRequirements> {
    let dumper = if criu {
        Ok(())
    } else {
        Err("criu: the node has none (its runtime's checkpoints need it too)".to_string())
    };
    let uffd = if tokio::fs::try_exists(USERFAULTFD_SYSCTL)
        .await
        .unwrap_or(false)
    {
        Ok(())
    } else {
        Err(format!(
            "userfaultfd: this kernel has none ({USERFAULTFD_SYSCTL} does not exist)"
        ))
    };
    let pipe = match tokio::fs::read_to_string(PIPE_MAX_SIZE).await {
        Ok(text) => pipe_room(&text),
        Err(e) => Err(format!("cannot read {PIPE_MAX_SIZE}: {e}")),
    };
    let dirty = SOFT_DIRTY
        .get_or_init(|| async {
            tokio::task::spawn_blocking(soft_dirty)
                .await
                .unwrap_or_else(|e| Err(format!("soft-dirty: the check did not finish: {e}")))
        })
        .await
        .clone();
    vec![
        entry(POST_COPY, [dumper, uffd, pipe]),
        entry(PRE_COPY, [dirty]),
    ]
}

fn entry<const N: usize>(name: &str, checks: [Result<(), String>; N]) -> v1::StrategyRequirements {
    let missing: Vec<String> = checks.into_iter().filter_map(Result::err).collect();
    v1::StrategyRequirements {
        name: name.into(),
        met: missing.is_empty(),
        missing: missing.join("; "),
    }
}

/// Raises the node's `fs.pipe-max-size` to what CRIU's lazy pages need when it is lower (what an
/// admin allows with the agent's `--raise-pipe-max-size`); answers the value before, if it was
/// raised. The sysctl is the node's (not namespaced): it applies to every process there.
pub fn raise_pipe_max_size() -> std::io::Result<Option<u64>> {
    let text = std::fs::read_to_string(PIPE_MAX_SIZE)?;
    if pipe_room(&text).is_ok() {
        return Ok(None);
    }
    std::fs::write(PIPE_MAX_SIZE, LAZY_PAGES_PIPE_BYTES.to_string())?;
    Ok(Some(text.trim().parse().unwrap_or(0)))
}

/// Whether `fs.pipe-max-size` (its file's text) lets CRIU's lazy pages have their pipe.
pub fn pipe_room(text: &str) -> Result<(), String> {
    let bytes: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("fs.pipe-max-size is not a number: {:?}", text.trim()))?;
    if bytes >= LAZY_PAGES_PIPE_BYTES {
        Ok(())
    } else {
        Err(format!(
            "fs.pipe-max-size is {bytes} bytes; CRIU's lazy pages need at least \
             {LAZY_PAGES_PIPE_BYTES} (sysctl fs.pipe-max-size={LAZY_PAGES_PIPE_BYTES})"
        ))
    }
}

/// Bit 55 of a pagemap entry: the page was written since its soft-dirty bits were cleared.
const SOFT_DIRTY_BIT: u64 = 1 << 55;

/// Whether a pagemap entry (8 bytes, native order) has the soft-dirty bit.
pub fn soft_dirty_bit(entry: [u8; 8]) -> bool {
    u64::from_ne_bytes(entry) & SOFT_DIRTY_BIT != 0
}

/// Tries the soft-dirty bits on a page of this process: clear them, write the page, and read
/// whether its pagemap entry says it was written.
fn soft_dirty() -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: usize = 4096;
    let fail = |what: &str, e: std::io::Error| format!("soft-dirty: {what}: {e}");
    let mut memory = vec![0u8; 2 * PAGE];
    let start = memory.as_ptr() as usize;
    let offset = (PAGE - start % PAGE) % PAGE;
    let page = (start + offset) / PAGE;
    if !std::path::Path::new("/proc/self/clear_refs").exists() {
        // An agent in another PID namespace than its /proc's (entered into a node's mounts).
        return Err("soft-dirty: cannot tell, this /proc is not the agent's own".into());
    }
    std::fs::write("/proc/self/clear_refs", "4").map_err(|e| fail("clearing", e))?;
    memory[offset] = 1;
    std::hint::black_box(&mut memory);
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| fail("pagemap", e))?;
    let mut entry = [0u8; 8];
    pagemap
        .seek(SeekFrom::Start((page * 8) as u64))
        .and_then(|_| pagemap.read_exact(&mut entry))
        .map_err(|e| fail("reading pagemap", e))?;
    std::hint::black_box(&memory);
    if soft_dirty_bit(entry) {
        Ok(())
    } else {
        Err(
            "dirty page tracking: this kernel keeps no soft-dirty bits (a written page does not \
             show it; CONFIG_MEM_SOFT_DIRTY)"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_must_hold_what_lazy_pages_splice() {
        assert_eq!(pipe_room("4194304\n"), Ok(()));
        assert_eq!(pipe_room("16777216"), Ok(()));
        let small = pipe_room("1048576\n").unwrap_err();
        assert!(
            small.contains("fs.pipe-max-size is 1048576 bytes") && small.contains("4194304"),
            "{small}"
        );
        assert!(pipe_room("lots").is_err());
    }

    #[test]
    fn the_soft_dirty_bit_is_bit_55() {
        assert!(soft_dirty_bit((1u64 << 55 | 0x1234).to_ne_bytes()));
        assert!(!soft_dirty_bit((1u64 << 63 | 0x1234).to_ne_bytes()));
    }

    #[test]
    fn a_strategy_is_met_only_with_nothing_missing() {
        let met = entry(POST_COPY, [Ok(()), Ok(())]);
        assert!(met.met && met.missing.is_empty(), "{met:?}");
        let not = entry(POST_COPY, [Err("a".into()), Ok(()), Err("b".into())]);
        assert!(!not.met && not.missing == "a; b", "{not:?}");
    }
}
