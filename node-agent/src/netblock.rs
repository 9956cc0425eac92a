//! Silencing a pod IP on this node: an nftables table of the `bridge` family whose rules drop every
//! IPv4 packet and ARP frame from or to the addresses in its set, on the node's pod bridge. The
//! source node blocks a pod from just before its checkpoint (a peer's TCP stack then sees a pause,
//! not a reset, and nothing the checkpoint did not see is acknowledged); the target node blocks the
//! pod IP until the restored sockets exist. The set lives in the node's network namespace, so a
//! restarted agent finds its blocks where it left them.

use std::{net::Ipv4Addr, path::PathBuf};

use tokio::process::Command;

/// The nftables table of the agent.
pub const TABLE: &str = "kube_migros";

/// Errors of running `nft`.
#[derive(Debug, thiserror::Error)]
#[error("nft {args}: {message}")]
pub struct Error {
    args: String,
    message: String,
}

/// The block list of this node.
#[derive(Debug, Clone)]
pub struct NetBlock {
    nft: PathBuf,
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
        Self { nft }
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let err = |message: String| Error {
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

    /// Drops all traffic of `ip` on this node's bridge (idempotent).
    pub async fn block(&self, ip: Ipv4Addr) -> Result<(), Error> {
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
            Err(e) if e.message.contains("No such file or directory") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
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
