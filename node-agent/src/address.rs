//! Telling the network where a pod's address lives now. A restored pod has a new MAC address on a
//! new bridge port; until the bridges and the peers learn it, traffic to the address goes where the
//! pod was. One ARP request from the pod itself teaches all of them.
//!
//! And letting the restored pod reach its peers at once: when CRIU switches a restored socket out
//! of TCP repair, the kernel sends its peer a window probe, which is what wakes the peer. In the
//! new network namespace that probe first needs the peer's (or the gateway's) MAC address; the ARP
//! request it causes is dropped while the target still blocks the pod's IP, and the kernel asks
//! again only a second later (`retrans_time`), the probe waiting in the neighbour entry's queue.
//! [`resolve_waiting`] makes the kernel ask again right after the unblock, keeping the queue, so
//! that the probe leaves within milliseconds (docs/node-agent.md#blocking-a-pod-ip).

use std::net::Ipv4Addr;

/// Makes the network learn where a pod's address lives now: from inside the pod's network
/// namespace, sends one UDP datagram to the pod's default gateway (discard port), so that the pod's
/// kernel asks for the gateway's MAC with an ARP request. Every bridge on the way learns the pod's
/// MAC address and port from it, and every host that has an entry for the pod's address (a peer in
/// the middle of a connection) updates it to the pod's new MAC. Blocking; run off the async runtime.
pub fn announce(netns: &std::path::Path) -> std::io::Result<()> {
    in_netns(netns, || {
        let routes = std::fs::read_to_string("/proc/thread-self/net/route")?;
        let gateway = default_gateway(&routes)
            .ok_or_else(|| std::io::Error::other("the pod has no default gateway"))?;
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(b"kube-migros", (gateway, 9))?;
        Ok(())
    })
}

/// Runs `f` in the network namespace at `netns` (a path such as `/var/run/netns/...`): sockets it
/// opens and processes it spawns are in that namespace. setns changes the calling thread's
/// namespace only, so `f` runs on a thread of its own, ended right after.
pub fn in_netns<T: Send>(
    netns: &std::path::Path,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(netns)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// Asks the kernel of the pod's network namespace to resolve again, now, every neighbour whose
/// resolution is pending (an ARP request of the pod went unanswered, for instance because its IP
/// was blocked), keeping what waits for it: per entry, its state is set to none (which stops its
/// retry timer and keeps its queue) and then it is marked in use (which starts a resolution at once
/// from the none state). Answers the addresses asked for. Blocking; run off the async runtime.
pub fn resolve_waiting(netns: &std::path::Path) -> std::io::Result<Vec<Ipv4Addr>> {
    in_netns(netns, || {
        let table = std::fs::read_to_string("/proc/thread-self/net/arp")?;
        let waiting = incomplete(&table);
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        // Opened after the setns: the socket speaks to this namespace's kernel.
        let rtnl = Rtnetlink::open()?;
        for (ip, device) in &waiting {
            let index = nix::net::if_::if_nametoindex(device.as_str())?;
            rtnl.request(&neighbour_message(
                *ip,
                index,
                NeighbourChange::StopRetrying,
                1,
            ))?;
            rtnl.request(&neighbour_message(
                *ip,
                index,
                NeighbourChange::ResolveNow,
                2,
            ))?;
        }
        Ok(waiting.into_iter().map(|(ip, _)| ip).collect())
    })
}

/// The entries of `/proc/net/arp` whose resolution is pending (flags 0: not complete), with
/// their device.
fn incomplete(table: &str) -> Vec<(Ipv4Addr, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, _hw, _mask, device] = fields.as_slice() else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            // ATF_COM (0x2): the entry has an address.
            (flags & 0x2 == 0).then(|| Some((ip.parse().ok()?, (*device).to_string())))?
        })
        .collect()
}

/// What a neighbour request does to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NeighbourChange {
    /// `ip neigh change ADDR dev DEV nud none`: no retry timer, the queue kept.
    StopRetrying,
    /// `ip neigh replace ADDR dev DEV use`: resolve now.
    ResolveNow,
}

const RTM_NEWNEIGH: u16 = 28;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NUD_NONE: u16 = 0x0;
const NUD_PERMANENT: u16 = 0x80;
const NTF_USE: u8 = 0x1;
const NDA_DST: u16 = 1;
const AF_INET: u8 = 2;

/// An `RTM_NEWNEIGH` request (netlink header, `ndmsg`, the `NDA_DST` attribute), as `ip neigh`
/// sends it.
fn neighbour_message(ip: Ipv4Addr, ifindex: u32, change: NeighbourChange, seq: u32) -> Vec<u8> {
    let (flags, state, ndm_flags) = match change {
        NeighbourChange::StopRetrying => (NLM_F_REPLACE, NUD_NONE, 0),
        NeighbourChange::ResolveNow => (NLM_F_REPLACE | NLM_F_CREATE, NUD_PERMANENT, NTF_USE),
    };
    let len: u32 = 16 + 12 + 8;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&state.to_ne_bytes());
    m.extend_from_slice(&[ndm_flags, 0]); // ndm_flags, ndm_type
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&NDA_DST.to_ne_bytes());
    m.extend_from_slice(&ip.octets());
    m
}

const RTM_NEWLINK: u16 = 16;
const IFF_UP: u32 = 0x1;
/// The loopback device's index in every network namespace.
const LOOPBACK_INDEX: i32 = 1;

/// Brings the loopback device of the calling thread's network namespace up (`ip link set lo up`).
pub fn loopback_up() -> std::io::Result<()> {
    Rtnetlink::open()?.request(&link_up_message(LOOPBACK_INDEX, 1))
}

/// An `RTM_NEWLINK` request that sets `IFF_UP` on interface `index` (netlink header, `ifinfomsg`).
fn link_up_message(index: i32, seq: u32) -> Vec<u8> {
    let len: u32 = 16 + 16;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]); // ifi_family AF_UNSPEC, pad, ifi_type
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    m.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change: only this flag
    m
}

/// A route netlink socket of the calling thread's network namespace.
struct Rtnetlink(std::os::fd::OwnedFd);

impl Rtnetlink {
    fn open() -> std::io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        Ok(Self(fd))
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(&self, message: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
        let fd = self.0.as_raw_fd();
        sendto(fd, message, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        let mut answer = [0u8; 1024];
        let n = recv(fd, &mut answer, MsgFlags::empty())?;
        acknowledged(&answer[..n])
    }
}

/// Whether a netlink answer is a success acknowledgement (an `NLMSG_ERROR` of error 0).
fn acknowledged(answer: &[u8]) -> std::io::Result<()> {
    let field = |at: usize| answer.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match (kind, field(16).map(i32::from_ne_bytes)) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(errno)) => Err(std::io::Error::from_raw_os_error(-errno)),
        _ => Err(std::io::Error::other("an unexpected netlink answer")),
    }
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

    #[test]
    fn only_entries_without_an_address_wait() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.88.3.15       0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                     10.88.0.1        0x1         0x2         9a:3b:11:22:33:44     *        eth0\n";
        assert_eq!(
            incomplete(table),
            [(Ipv4Addr::new(10, 88, 3, 15), "eth0".to_string())]
        );
        assert!(incomplete("IP address HW type Flags HW address Mask Device\n").is_empty());
    }

    #[test]
    fn neighbour_requests_are_laid_out_as_ip_neigh_sends_them() {
        let ip = Ipv4Addr::new(10, 88, 3, 15);
        let stop = neighbour_message(ip, 7, NeighbourChange::StopRetrying, 1);
        assert_eq!(stop.len(), 36);
        assert_eq!(&stop[0..4], &36u32.to_ne_bytes());
        assert_eq!(&stop[4..6], &RTM_NEWNEIGH.to_ne_bytes());
        assert_eq!(&stop[6..8], &(0x1u16 | 0x4 | 0x100).to_ne_bytes());
        assert_eq!(&stop[20..24], &7u32.to_ne_bytes());
        assert_eq!(&stop[24..26], &0u16.to_ne_bytes());
        assert_eq!(stop[26], 0);
        assert_eq!(&stop[32..36], &[10, 88, 3, 15]);
        let now = neighbour_message(ip, 7, NeighbourChange::ResolveNow, 2);
        assert_eq!(&now[6..8], &(0x1u16 | 0x4 | 0x100 | 0x400).to_ne_bytes());
        // Byte for byte what `ip neigh replace ... use` of iproute2 6.1 sends (strace).
        assert_eq!(&now[24..28], &[0x80, 0x00, 0x01, 0x00]);
    }

    #[test]
    fn only_an_error_of_zero_is_an_acknowledgement() {
        let answer = |errno: i32| {
            let mut a = vec![0u8; 36];
            a[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            a[16..20].copy_from_slice(&errno.to_ne_bytes());
            a
        };
        assert!(acknowledged(&answer(0)).is_ok());
        assert_eq!(
            acknowledged(&answer(-2)).unwrap_err().raw_os_error(),
            Some(2)
        );
        assert!(acknowledged(&[0u8; 4]).is_err());
    }
}
