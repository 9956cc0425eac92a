//! `address::resolve_waiting` on real network namespaces: a datagram that waits for the ARP
//! answer of its destination leaves as soon as the agent asks the kernel to resolve again, with
//! the kernel's own retry a minute away, and nothing that waited is lost. Needs root and `ip`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Pair {
    a: String,
    b: String,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` in network namespace `ns` (a thread of its own).
fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn what_waits_for_a_neighbour_leaves_when_the_agent_asks_to_resolve_again() {
    let id = std::process::id();
    let pair = Pair {
        a: format!("km-nb-a-{id}"),
        b: format!("km-nb-b-{id}"),
    };
    let (a, b) = (pair.a.clone(), pair.b.clone());
    ip(&["netns", "add", &a]);
    ip(&["netns", "add", &b]);
    ip(&[
        "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns", &b,
    ]);
    ip(&["-n", &a, "addr", "add", "10.99.7.1/24", "dev", "va"]);
    ip(&["-n", &b, "addr", "add", "10.99.7.2/24", "dev", "vb"]);
    ip(&["-n", &a, "link", "set", "va", "up"]);
    ip(&["-n", &b, "link", "set", "vb", "up"]);
    // A's kernel would ask again only after a minute; B does not answer ARP for now.
    inside(&a, || {
        std::fs::write("/proc/sys/net/ipv4/neigh/va/retrans_time_ms", "60000").unwrap()
    });
    ip(&["-n", &b, "link", "set", "vb", "arp", "off"]);
    let receiver = inside(&b, || {
        let s = UdpSocket::bind("10.99.7.2:9999").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    });
    // A datagram from A waits in the neighbour entry of B, whose ARP request went unanswered.
    inside(&a, || {
        let s = UdpSocket::bind("10.99.7.1:0").unwrap();
        s.send_to(b"waited", "10.99.7.2:9999").unwrap();
    });
    let neighbours = || {
        let out = Command::new("ip")
            .args(["-n", &a, "neigh", "show", "10.99.7.2"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(neighbours().contains("INCOMPLETE"), "{}", neighbours());
    ip(&["-n", &b, "link", "set", "vb", "arp", "on"]);

    let asked = node_agent::address::resolve_waiting(Path::new(&format!("/run/netns/{a}")))
        .expect("resolve the waiting neighbours");
    assert_eq!(asked, [Ipv4Addr::new(10, 99, 7, 2)]);
    // Delivered: the datagram was kept and left on the new answer, long before the kernel's
    // own retry.
    let mut buf = [0u8; 16];
    let (n, from) = receiver.recv_from(&mut buf).expect("the waiting datagram");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"waited"[..], "10.99.7.1".parse().unwrap())
    );
    assert!(neighbours().contains("REACHABLE"), "{}", neighbours());
    // Nothing waits any more: nothing is asked.
    let again =
        node_agent::address::resolve_waiting(Path::new(&format!("/run/netns/{a}"))).unwrap();
    assert!(again.is_empty(), "{again:?}");
}
