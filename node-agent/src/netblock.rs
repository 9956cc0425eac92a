//! Silencing a pod IP on this node: an nftables table of the `bridge` family whose rules drop every
//! IPv4 packet and ARP frame from or to the addresses in its set, on the node's pod bridge. The
//! source node blocks a pod from just before its checkpoint (a peer's TCP stack then sees a pause,
//! not a reset, and nothing the checkpoint did not see is acknowledged); the target node blocks the
//! pod IP until the restored sockets exist. The set lives in the node's network namespace, so a
//! restarted agent finds its blocks where it left them. Whatever it is asked, the agent never
//! blocks an address of its own node (a pod on the node's network has the node's address:
//! blocking it would take the node off the network), one of the cluster's control plane (the API
//! server as the agent reaches it, the in-cluster service address, and what `--protect-address`
//! names), nor one that is not a unicast address.

use std::{net::Ipv4Addr, path::PathBuf};

use tokio::process::Command;

/// The nftables table of the agent.
pub const TABLE: &str = "kube_migros";

/// Why an address could not be blocked or let through.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nft {args}: {message}")]
    Nft { args: String, message: String },
    #[error(
        "{0} is an address of this node or of the control plane, or not a unicast address: \
         blocking it would take the node off the network, so the agent never does"
    )]
    Guarded(Ipv4Addr),
    #[error("listing this node's addresses: {0}")]
    Addresses(nix::Error),
}

/// The block list of this node.
#[derive(Debug, Clone)]
pub struct NetBlock {
    nft: PathBuf,
    /// Addresses never blocked besides the node's own: the control plane's.
    protected: Vec<Ipv4Addr>,
}

fn ruleset() -> String {
    let rules = "ip saddr @blocked drop\n    ip daddr @blocked drop\n    \
                 arp saddr ip @blocked drop\n    arp daddr ip @blocked drop";
    let chain = |name: &str| {
        format!(
            "  chain {name} {{\n    type filter hook {name} priority -10; policy accept;\n    {rules}\n  }}\n"
        )
    };
    format!(
        "table bridge {TABLE} {{\n  set blocked {{ type ipv4_addr; }}\n{}{}{}}}\n",
        chain("forward"),
        chain("input"),
        chain("output")
    )
}

impl NetBlock {
    pub fn new(nft: PathBuf) -> Self {
        Self {
            nft,
            protected: Vec::new(),
        }
    }

    /// Also never blocks `addresses` (the control plane's).
    pub fn protecting(mut self, addresses: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.protected.extend(addresses);
        self.protected.sort();
        self.protected.dedup();
        self
    }

    /// The addresses protected besides the node's own.
    pub fn protected(&self) -> &[Ipv4Addr] {
        &self.protected
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let err = |message: String| Error::Nft {
            args: args.join(" "),
            message,
        };
        let mut command = Command::new(&self.nft);
        command
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| err(format!("cannot run {}: {e}", self.nft.display())))?;
        if let Some(mut input) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            if let Some(text) = stdin {
                input
                    .write_all(text.as_bytes())
                    .await
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| err(e.to_string()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    }

    /// Creates the table unless it exists (a restarted agent keeps the blocks in force).
    pub async fn ensure(&self) -> Result<(), Error> {
        if self
            .nft(&["list", "table", "bridge", TABLE], None)
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.nft(&["-f", "-"], Some(&ruleset())).await.map(drop)
    }

    /// Drops all traffic of `ip` on this node's bridge (idempotent); refuses an address of the
    /// node itself or of the control plane.
    pub async fn block(&self, ip: Ipv4Addr) -> Result<(), Error> {
        if self.protected.contains(&ip) || guarded(ip, &own_addresses()?) {
            return Err(Error::Guarded(ip));
        }
        self.ensure().await?;
        let element = format!("{{ {ip} }}");
        self.nft(
            &["add", "element", "bridge", TABLE, "blocked", &element],
            None,
        )
        .await
        .map(drop)
    }

    /// Lets `ip` through again (idempotent: an address not blocked is fine).
    pub async fn unblock(&self, ip: Ipv4Addr) -> Result<(), Error> {
        if !self.blocked().await?.contains(&ip) {
            return Ok(());
        }
        let element = format!("{{ {ip} }}");
        self.nft(
            &["delete", "element", "bridge", TABLE, "blocked", &element],
            None,
        )
        .await
        .map(drop)
    }

    /// The addresses blocked now.
    pub async fn blocked(&self) -> Result<Vec<Ipv4Addr>, Error> {
        match self
            .nft(&["-j", "list", "set", "bridge", TABLE, "blocked"], None)
            .await
        {
            Ok(json) => Ok(parse_set(&json)),
            // No table yet: nothing is blocked.
            Err(Error::Nft { message, .. }) if message.contains("No such file or directory") => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }
}

/// The IPv4 addresses of this network namespace's interfaces (the node's, for an agent on the
/// node's network).
fn own_addresses() -> Result<Vec<Ipv4Addr>, Error> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(Error::Addresses)?;
    Ok(addresses
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect())
}

/// Whether `ip` must never be blocked: one of the node's own addresses, or not a unicast one.
fn guarded(ip: Ipv4Addr, own: &[Ipv4Addr]) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_link_local()
        || own.contains(&ip)
}

/// The addresses of `nft -j list set` output.
pub fn parse_set(json: &str) -> Vec<Ipv4Addr> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut ips = Vec::new();
    let items = value["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        if let Some(elems) = item["set"]["elem"].as_array() {
            ips.extend(
                elems
                    .iter()
                    .filter_map(|e| e.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok())),
            );
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_and_non_unicast_addresses_are_never_blocked() {
        let own = own_addresses().unwrap();
        assert!(own.contains(&Ipv4Addr::LOCALHOST), "{own:?}");
        for ip in own.iter().copied().chain([
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(169, 254, 1, 1),
        ]) {
            assert!(guarded(ip, &own), "{ip}");
        }
        assert!(!guarded(
            Ipv4Addr::new(10, 88, 1, 5),
            &[Ipv4Addr::new(10, 88, 0, 1)]
        ));
    }

    #[tokio::test]
    async fn blocking_an_own_address_is_refused_before_nft_runs() {
        // An nft that cannot run: only the guard can answer.
        let net = NetBlock::new(PathBuf::from("/nonexistent/nft"));
        let refused = net.block(Ipv4Addr::LOCALHOST).await;
        assert!(matches!(refused, Err(Error::Guarded(_))), "{refused:?}");
        let other = net.block(Ipv4Addr::new(10, 88, 1, 5)).await;
        assert!(matches!(other, Err(Error::Nft { .. })), "{other:?}");
        // The control plane's addresses are refused the same way.
        let api_server = Ipv4Addr::new(10, 88, 0, 1);
        let net = NetBlock::new(PathBuf::from("/nonexistent/nft")).protecting([api_server]);
        let refused = net.block(api_server).await;
        assert!(matches!(refused, Err(Error::Guarded(_))), "{refused:?}");
        let other = net.block(Ipv4Addr::new(10, 88, 1, 5)).await;
        assert!(matches!(other, Err(Error::Nft { .. })), "{other:?}");
    }

    #[test]
    fn the_ruleset_drops_ip_and_arp_both_ways_on_every_bridge_hook() {
        let r = ruleset();
        for hook in ["forward", "input", "output"] {
            assert!(
                r.contains(&format!("type filter hook {hook} priority -10")),
                "{r}"
            );
        }
        for rule in [
            "ip saddr @blocked drop",
            "ip daddr @blocked drop",
            "arp saddr ip @blocked drop",
        ] {
            assert_eq!(r.matches(rule).count(), 3, "{rule} in {r}");
        }
    }

    #[test]
    fn set_listings_are_parsed() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.1.3"}},
            {"set": {"family": "bridge", "name": "blocked", "table": "kube_migros",
                     "type": "ipv4_addr", "elem": ["10.88.1.5", "10.88.2.7"]}}]}"#;
        assert_eq!(
            parse_set(json),
            vec![Ipv4Addr::new(10, 88, 1, 5), Ipv4Addr::new(10, 88, 2, 7)]
        );
        let empty = r#"{"nftables": [{"set": {"name": "blocked"}}]}"#;
        assert!(parse_set(empty).is_empty());
    }
}
