//! The node bridge `migros0`: the L2 network that joins the host, the nodes and the registry (the
//! sandbox's stand-in for a cluster's node network), with the host's address on it.

use std::{net::Ipv4Addr, path::Path, process::Command};

use crate::error::CommandFailed;

/// The bridge that joins the nodes.
pub const BRIDGE: &str = "migros0";
/// The bridge's address on the host; nodes are `10.88.0.(10 + index)`.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Prefix length of the node network.
pub const PREFIX: u8 = 16;

/// Creates the node bridge with its host address, if missing.
pub fn ensure_bridge() -> Result<(), CommandFailed> {
    if !link_exists(BRIDGE) {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{BRIDGE_IP}/{PREFIX}"),
            "dev",
            BRIDGE,
        ])?;
    }
    ip(&["link", "set", BRIDGE, "up"])
}

/// Whether the host has a network link of this name.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip ARGS` on the host.
pub fn ip(args: &[&str]) -> Result<(), CommandFailed> {
    let failed = |stderr: String| CommandFailed {
        command: format!("ip {}", args.join(" ")),
        stderr,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
