//! Telling the network where a pod's address lives now. A restored pod has a new MAC address on a
//! new bridge port; until the bridges and the peers learn it, traffic to the address goes where the
//! pod was. One ARP request from the pod itself teaches all of them.

use std::net::Ipv4Addr;

/// Makes the network learn where a pod's address lives now: from inside the pod's network
/// namespace, sends one UDP datagram to the pod's default gateway (discard port), so that the pod's
/// kernel asks for the gateway's MAC with an ARP request. Every bridge on the way learns the pod's
/// MAC address and port from it, and every host that has an entry for the pod's address (a peer in
/// the middle of a connection) updates it to the pod's new MAC. Blocking; run off the async runtime.
pub fn announce(netns: &std::path::Path) -> std::io::Result<()> {
    let path = netns.to_path_buf();
    // setns changes the calling thread's namespace only: a thread of its own, ended right after.
    std::thread::spawn(move || -> std::io::Result<()> {
        let ns = std::fs::File::open(&path)?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let routes = std::fs::read_to_string("/proc/thread-self/net/route")?;
        let gateway = default_gateway(&routes)
            .ok_or_else(|| std::io::Error::other("the pod has no default gateway"))?;
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(b"kube-migros", (gateway, 9))?;
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the announcing thread panicked"))?
}

/// The default route's gateway in `/proc/net/route` (addresses in little-endian hex).
fn default_gateway(routes: &str) -> Option<Ipv4Addr> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"00000000") {
            return None;
        }
        let raw = u32::from_str_radix(fields.get(2)?, 16).ok()?;
        (raw != 0).then(|| Ipv4Addr::from(raw.to_le_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\n\
                      eth0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\n";
        assert_eq!(default_gateway(routes), Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!(default_gateway("Iface\n"), None);
    }
}
