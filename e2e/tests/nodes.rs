//! The node runtime: nodes come up as namespaces on the bridge with the cached rootfs, run the
//! containerd of their setting (node-1 2.4 built from its module, node-2 Debian's 2.1) with CRIU 4
//! that passes `criu check`, reach each other over the bridge, pull the
//! images built from this repository from the sandbox registry over TLS, and `down` leaves no
//! namespace, process, link, cgroup or state behind. One test, as it owns the nodes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use sandbox::{Dirs, bridge::BRIDGE, containerd::Containerd, nodes::Nodes};

fn run(node: &sandbox::nodes::Node, command: &[&str]) -> String {
    let out = node.exec(command).expect("exec in the node");
    assert!(
        out.status.success(),
        "{command:?} on {}: {}",
        node.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn nodes_come_up_with_a_working_runtime_and_go_down_cleanly() {
    let nodes = Nodes::new(&Dirs::from_env());
    let wanted = Nodes::named(&["node-1", "node-2"]).unwrap();
    nodes.up(&wanted).expect("nodes up");

    for node in &wanted {
        let version = run(node, &["ctr", "version"]);
        let server = version.split("Server:").nth(1).unwrap_or_default();
        let expected = match node.containerd {
            Containerd::Debian => "Version:  2.1.".to_string(),
            Containerd::Upstream => format!("Version:  {}", sandbox::containerd::CONTAINERD.1),
        };
        assert!(
            server.contains(&expected),
            "{} on {}: {version}",
            node.containerd.describe(),
            node.name
        );
        assert!(
            run(node, &["criu", "check"]).contains("Looks good"),
            "criu check on {}",
            node.name
        );
        assert_eq!(run(node, &["busybox", "hostname"]).trim(), node.name);
        // Its own root: the sid rootfs, not the host's bookworm.
        assert!(
            run(node, &["cat", "/etc/debian_version"]).contains("sid"),
            "{} runs on the host's root",
            node.name
        );
    }
    let peer = wanted[1].ip().to_string();
    assert!(
        run(
            &wanted[0],
            &["busybox", "ping", "-c", "1", "-W", "2", &peer]
        )
        .contains("1 packets received")
    );

    // Both nodes pull the images built from this repository from the sandbox registry over TLS.
    let registry = sandbox::registry::Registry::new(&Dirs::from_env());
    registry.up().expect("registry up");
    let images =
        sandbox::images::ensure(&Dirs::from_env(), &registry).expect("images built and pushed");
    for node in &wanted {
        for reference in images.values() {
            let pulled = run(node, &["crictl", "pull", reference]);
            assert!(
                pulled.contains("Image is up to date for sha256:"),
                "{reference} on {}: {pulled}",
                node.name
            );
        }
    }

    // `up` again leaves running nodes alone.
    let before = wanted[0].containerd_pid().expect("containerd runs");
    nodes.up(&wanted).expect("nodes up again");
    assert_eq!(wanted[0].containerd_pid(), Some(before));

    registry.down().expect("registry down");
    nodes.down().expect("nodes down");
    for node in &wanted {
        assert_eq!(
            node.containerd_pid(),
            None,
            "containerd of {} still runs",
            node.name
        );
        assert!(
            !std::path::Path::new("/run/netns")
                .join(node.netns())
                .exists(),
            "{} netns left",
            node.name
        );
    }
    assert!(
        !std::path::Path::new("/sys/class/net").join(BRIDGE).exists(),
        "bridge left"
    );
    assert!(
        !Dirs::from_env().state.join("nodes").exists(),
        "node state left"
    );
    assert!(
        !sandbox::process::is_alive(before),
        "containerd {before} survived down"
    );
}
