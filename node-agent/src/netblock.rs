//! Silencing a pod IP on this node: an nftables table of the `bridge` family whose rules drop every
//! IPv4 packet and ARP frame from or to the addresses in its set, on the node's pod bridge. The
//! source node blocks a pod from just before its checkpoint (a peer's TCP stack then sees a pause,
//! not a reset, and nothing the checkpoint did not see is acknowledged); the target node holds the
//! pod IP until the restored sockets exist: its IPv4 packets are dropped, its ARP goes through, so
//! that the network learns where the address lives now before the restore (set `held`). The sets
//! live in the node's network namespace, so a restarted agent finds its blocks where it left them. Whatever it is asked, the agent never
//! blocks an address of its own node (a pod on the node's network has the node's address:
//! blocking it would take the node off the network), one of the cluster's control plane (the API
//! server as the agent reaches it, the in-cluster service address, and what `--protect-address`
//! names), nor one that is not a unicast address.
//!
//! Segments of established TCP connections to a blocked address that arrive on the node's uplink
//! interfaces (`--answer-device`, the chart's `agent.answerDevices`) are not dropped silently but
//! answered with an ICMP host-unreachable, by a table of the `netdev` family whose ingress chains
//! on those devices share the set (it acts before the node bridges or routes the segment, and the
//! kernel sends the answer itself, without the node's ICMP rate limit). A peer's TCP takes it as a
//! connectivity disruption (RFC 6069, which Linux implements): each one that answers a
//! retransmission undoes one doubling of the peer's retransmission timeout, so the peer keeps
//! retrying every few hundred milliseconds instead of every few seconds, and resumes soon after the
//! pod runs again (measured in docs/node-agent.md#blocking-a-pod-ip). Nothing is acknowledged and no connection is reset;
//! connection attempts (SYN) are still dropped, so a new client waits as before rather than failing.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

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
    /// The node's uplink interfaces, where segments to a blocked address are answered.
    answer_devices: Vec<String>,
}

/// The set of addresses whose IPv4 packets and ARP frames are dropped (a source's pod).
const BLOCKED: &str = "blocked";
/// The set of addresses whose IPv4 packets are dropped and whose ARP goes through (a target's
/// pod waiting for its restore: the network learns where it lives from its new sandbox, so that
/// peers send to this node, whose uplinks answer them).
const HELD: &str = "held";

/// The bridge hooks the table filters on.
const HOOKS: [&str; 3] = ["forward", "input", "output"];

/// The rules of the held set (also added to an older table that lacks them).
const HELD_RULES: [&str; 2] = ["ip saddr @held drop", "ip daddr @held drop"];

/// The bridge table: every frame from or to a blocked address is dropped; only IPv4 packets of a
/// held one.
fn ruleset() -> String {
    let rules = format!(
        "ip saddr @{BLOCKED} drop\n    ip daddr @{BLOCKED} drop\n    \
         arp saddr ip @{BLOCKED} drop\n    arp daddr ip @{BLOCKED} drop\n    {}",
        HELD_RULES.join("\n    ")
    );
    let chains: String = HOOKS
        .iter()
        .map(|name| {
            format!(
                "  chain {name} {{\n    type filter hook {name} priority -10; policy accept;\n    {rules}\n  }}\n"
            )
        })
        .collect();
    format!(
        "table bridge {TABLE} {{\n  set {BLOCKED} {{ type ipv4_addr; }}\n  set {HELD} {{ type ipv4_addr; }}\n{chains}}}\n"
    )
}

/// What makes a bridge table of an older agent (without the held set) the current one.
fn held_upgrade() -> String {
    let mut script = format!("add set bridge {TABLE} {HELD} {{ type ipv4_addr; }}\n");
    for hook in HOOKS {
        for rule in HELD_RULES {
            script.push_str(&format!("add rule bridge {TABLE} {hook} {rule}\n"));
        }
    }
    script
}

/// The rule that answers a segment of an established connection to a blocked address.
const ANSWER: &str =
    "ip daddr @blocked tcp flags & syn == 0 counter reject with icmp type host-unreachable";

/// The netdev table: segments of established connections to a blocked address that arrive on
/// one of `devices` are answered (the rest is dropped further on by the bridge table).
fn answer_ruleset(devices: &[String]) -> String {
    let chains: String = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            format!(
                "  chain ingress{i} {{\n    type filter hook ingress device \"{device}\" priority -10; \
                 policy accept;\n    {ANSWER}\n  }}\n"
            )
        })
        .collect();
    format!("table netdev {TABLE} {{\n  set blocked {{ type ipv4_addr; }}\n{chains}}}\n")
}

/// How an address is silenced on the node's bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// IPv4 and ARP dropped: the source's pod, which must not answer for its address again.
    Blocked,
    /// IPv4 dropped, ARP let through: the target's pod, whose new sandbox tells the network
    /// where the address lives now.
    Held,
}

/// One nft transaction that puts `ip` into the bridge set of `silence` (and the netdev set with
/// `answering`), or with no `silence` takes it out of every set (adding first makes the removal
/// succeed whether or not it was there).
fn set_change(ip: Ipv4Addr, silence: Option<Silence>, answering: bool) -> String {
    let mut sets: Vec<(&str, &str)> = match silence {
        Some(Silence::Blocked) => vec![("bridge", BLOCKED)],
        Some(Silence::Held) => vec![("bridge", HELD)],
        None => vec![("bridge", BLOCKED), ("bridge", HELD)],
    };
    if answering {
        sets.push(("netdev", BLOCKED));
    }
    let mut script = String::new();
    for (family, set) in sets {
        script.push_str(&format!("add element {family} {TABLE} {set} {{ {ip} }}\n"));
        if silence.is_none() {
            script.push_str(&format!(
                "delete element {family} {TABLE} {set} {{ {ip} }}\n"
            ));
        }
    }
    script
}

impl NetBlock {
    /// The `nft` program the agent runs.
    pub fn nft_binary(&self) -> PathBuf {
        self.nft.clone()
    }

    pub fn new(nft: PathBuf) -> Self {
        Self {
            nft,
            protected: Vec::new(),
            answer_devices: Vec::new(),
        }
    }

    /// Answers segments of established connections to a blocked address that arrive on `devices`
    /// (those this network namespace has; the others are returned, to be reported).
    pub fn answering_on(mut self, devices: &[String]) -> (Self, Vec<String>) {
        let (present, missing) = devices
            .iter()
            .cloned()
            .partition(|d| Path::new("/sys/class/net").join(d).exists());
        self.answer_devices = present;
        (self, missing)
    }

    /// The devices where blocked addresses' segments are answered.
    pub fn answer_devices(&self) -> &[String] {
        &self.answer_devices
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

    /// Creates the tables unless they exist (a restarted agent keeps the blocks in force), and
    /// gives a table an older agent made the sets it lacks; at the agent's start.
    pub async fn ensure(&self) -> Result<(), Error> {
        self.ensure_tables().await?;
        // A table an older agent made has no held set yet.
        if self
            .nft(&["list", "set", "bridge", TABLE, HELD], None)
            .await
            .is_err()
        {
            self.nft(&["-f", "-"], Some(&held_upgrade())).await?;
        }
        Ok(())
    }

    /// Creates the tables unless they exist (someone may have deleted them since the start).
    async fn ensure_tables(&self) -> Result<(), Error> {
        let mut tables = vec![("bridge", ruleset())];
        if !self.answer_devices.is_empty() {
            tables.push(("netdev", answer_ruleset(&self.answer_devices)));
        }
        for (family, rules) in tables {
            if self
                .nft(&["list", "table", family, TABLE], None)
                .await
                .is_err()
            {
                self.nft(&["-f", "-"], Some(&rules)).await?;
            }
        }
        Ok(())
    }

    /// Drops all traffic of `ip` on this node's bridge (idempotent); refuses an address of the
    /// node itself or of the control plane.
    pub async fn block(&self, ip: Ipv4Addr) -> Result<(), Error> {
        self.silence(ip, Silence::Blocked).await
    }

    /// Drops the IPv4 traffic of `ip` on this node's bridge and lets its ARP through (idempotent),
    /// for a pod about to be restored here; refuses what [`NetBlock::block`] refuses.
    pub async fn hold(&self, ip: Ipv4Addr) -> Result<(), Error> {
        self.silence(ip, Silence::Held).await
    }

    async fn silence(&self, ip: Ipv4Addr, how: Silence) -> Result<(), Error> {
        if self.protected.contains(&ip) || guarded(ip, &own_addresses()?) {
            return Err(Error::Guarded(ip));
        }
        self.ensure_tables().await?;
        let script = set_change(ip, Some(how), !self.answer_devices.is_empty());
        self.nft(&["-f", "-"], Some(&script)).await.map(drop)
    }

    /// Lets `ip` through again (idempotent: an address not blocked is fine).
    pub async fn unblock(&self, ip: Ipv4Addr) -> Result<(), Error> {
        if !self.blocked().await?.contains(&ip) {
            return Ok(());
        }
        // The tables exist: the agent made them at its start (an answer table that cannot be
        // made turns answering off there) and `blocked` listed the bridge one.
        let script = set_change(ip, None, !self.answer_devices.is_empty());
        self.nft(&["-f", "-"], Some(&script)).await.map(drop)
    }

    /// The addresses blocked or held now.
    pub async fn blocked(&self) -> Result<Vec<Ipv4Addr>, Error> {
        match self
            .nft(&["-j", "list", "table", "bridge", TABLE], None)
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

/// The packets the agent's reject rules answered, from `nft -j list ruleset` output (0 when the
/// listing has none).
pub fn parse_answered(json: &str) -> u64 {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let items = value["nftables"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter(|item| item["rule"]["table"] == TABLE)
        .filter_map(|item| item["rule"]["expr"].as_array())
        .filter(|exprs| exprs.iter().any(|e| e.get("reject").is_some()))
        .flat_map(|exprs| {
            exprs
                .iter()
                .filter_map(|e| e["counter"]["packets"].as_u64())
        })
        .sum()
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
            "ip saddr @held drop",
            "ip daddr @held drop",
        ] {
            assert_eq!(r.matches(rule).count(), 3, "{rule} in {r}");
        }
        // A held address's ARP goes through.
        assert!(!r.contains("arp saddr ip @held") && !r.contains("arp daddr ip @held"));
        // An older table gets the same held rules.
        let upgrade = held_upgrade();
        assert!(
            upgrade.starts_with("add set bridge kube_migros held"),
            "{upgrade}"
        );
        for hook in HOOKS {
            for rule in HELD_RULES {
                assert!(
                    upgrade.contains(&format!("add rule bridge kube_migros {hook} {rule}\n")),
                    "{upgrade}"
                );
            }
        }
    }

    #[test]
    fn segments_of_connections_arriving_on_the_uplinks_are_answered_and_connection_attempts_not() {
        let r = answer_ruleset(&["eth0".into(), "bond0".into()]);
        assert!(r.starts_with(&format!("table netdev {TABLE} ")), "{r}");
        for (i, device) in ["eth0", "bond0"].iter().enumerate() {
            assert!(
                r.contains(&format!(
                    "chain ingress{i} {{\n    type filter hook ingress device \"{device}\" \
                     priority -10; policy accept;\n    ip daddr @blocked tcp flags & syn == 0 \
                     counter reject with icmp type host-unreachable\n  }}"
                )),
                "{r}"
            );
        }
        assert_eq!(r.matches("reject").count(), 2, "{r}");
        assert!(!ruleset().contains("reject"), "the bridge table only drops");
    }

    #[test]
    fn the_sets_change_in_one_transaction_and_a_removal_cannot_fail_on_a_missing_element() {
        let ip = Ipv4Addr::new(10, 88, 1, 5);
        assert_eq!(
            set_change(ip, Some(Silence::Blocked), true),
            "add element bridge kube_migros blocked { 10.88.1.5 }\n\
             add element netdev kube_migros blocked { 10.88.1.5 }\n"
        );
        // Held: the bridge's held set, and answered on the uplinks all the same.
        assert_eq!(
            set_change(ip, Some(Silence::Held), true),
            "add element bridge kube_migros held { 10.88.1.5 }\n\
             add element netdev kube_migros blocked { 10.88.1.5 }\n"
        );
        assert!(!set_change(ip, None, false).contains("netdev"));
        let remove = set_change(ip, None, true);
        for set in [
            "bridge kube_migros blocked",
            "bridge kube_migros held",
            "netdev kube_migros blocked",
        ] {
            let add = remove
                .find(&format!("add element {set} "))
                .unwrap_or(usize::MAX);
            let delete = remove.find(&format!("delete element {set} ")).unwrap_or(0);
            assert!(add < delete, "{set}: {remove}");
        }
    }

    #[test]
    fn the_reject_rules_counter_is_parsed() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.1.3"}},
            {"table": {"family": "ip", "name": "kube_migros"}},
            {"rule": {"family": "netdev", "table": "kube_migros", "chain": "ingress0", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                           "right": "@blocked"}},
                {"counter": {"packets": 42, "bytes": 4200}},
                {"reject": {"type": "icmp", "expr": "host-unreachable"}}]}},
            {"rule": {"family": "netdev", "table": "kube_migros", "chain": "ingress0", "expr": [
                {"counter": {"packets": 7, "bytes": 70}}, {"accept": null}]}}]}"#;
        assert_eq!(parse_answered(json), 42);
        assert_eq!(parse_answered("not json"), 0);
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
