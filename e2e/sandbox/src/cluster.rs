//! The whole sandbox cluster in one call: the control plane, three nodes with kubelets, the
//! registry with the test images, every node Ready with its (simulated) rxe counters; the agents'
//! device plugin advertises the nodes' `rdma/rxe` devices once agents run.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;

use crate::{
    Dirs,
    controlplane::{ControlPlane, Env},
    images, kubelets,
    kubelets::Kubelets,
    nodes::{Node, Nodes},
    registry::Registry,
};

/// The sandbox's node names.
pub const NODE_NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// What `up` brought up.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub env: Env,
    pub nodes: Vec<Node>,
    /// Image references by name (`demo`, `pause`).
    pub images: BTreeMap<String, String>,
}

/// Starts what does not run (building what is missing) and waits until every node is Ready.
pub async fn up(dirs: &Dirs) -> anyhow::Result<Cluster> {
    let env = ControlPlane::new(dirs)
        .up()
        .await
        .context("starting the control plane")?;
    let nodes = Nodes::named(&NODE_NAMES)?;
    let handle = Nodes::new(dirs);
    handle.up(&nodes).context("starting the nodes")?;
    let registry = Registry::new(dirs);
    registry.up().context("starting the registry")?;
    let images = images::ensure(dirs, &registry).context("building the images")?;
    let kubelets = Kubelets::new(dirs);
    for node in &nodes {
        kubelets.start(node).context("starting a kubelet")?;
    }
    let client = env.client().await?;
    if let Err(why) = kubelets::wait_ready(&client, &nodes, Duration::from_secs(120)).await {
        let tails: Vec<String> = nodes
            .iter()
            .map(|n| format!("--- kubelet of {}:\n{}", n.name, kubelets.log_tail(n, 15)))
            .collect();
        anyhow::bail!("{why}\n{}", tails.join("\n"));
    }
    for node in &nodes {
        handle.ensure_rxe_counters(node)?;
        // The agents' device plugin advertises `rdma/rxe`; nothing else may.
        kubelets::forget_patched_rxe(&client, node).await?;
        kubelets::label_sandbox_node(&client, node).await?;
    }
    Ok(Cluster { env, nodes, images })
}

/// Stops the nodes (kubelets and agents with them), the registry and the control plane.
pub async fn down(dirs: &Dirs) -> anyhow::Result<()> {
    Registry::new(dirs)
        .down()
        .context("stopping the registry")?;
    Nodes::new(dirs).down().context("stopping the nodes")?;
    ControlPlane::new(dirs)
        .down()
        .context("stopping the control plane")?;
    Ok(())
}

/// Prints what runs; true when the control plane is ready and every node is Ready.
pub async fn status(dirs: &Dirs) -> anyhow::Result<bool> {
    let cp = ControlPlane::new(dirs);
    for (name, pid) in cp.status() {
        match pid {
            Some(pid) => println!("{name:<24} running (pid {pid})"),
            None => println!("{name:<24} stopped"),
        }
    }
    let api_ready = cp.is_ready().await;
    println!(
        "{:<24} {}",
        "api server",
        if api_ready { "ready" } else { "not ready" }
    );
    let handle = Nodes::new(dirs);
    let client = if api_ready {
        cp.env().client().await.ok()
    } else {
        None
    };
    let mut all = api_ready;
    for node in Nodes::named(&NODE_NAMES)? {
        let containerd = node.containerd_pid().is_some();
        let kubelet = containerd && handle.running(&node, "kubelet");
        let ready = match &client {
            Some(c) => kubelets::wait_ready(c, std::slice::from_ref(&node), Duration::ZERO)
                .await
                .is_ok(),
            None => false,
        };
        all &= ready;
        println!(
            "{:<24} containerd {}, kubelet {}, Node {}",
            node.name,
            if containerd { "running" } else { "stopped" },
            if kubelet { "running" } else { "stopped" },
            if ready { "Ready" } else { "not Ready" }
        );
    }
    Ok(all)
}
