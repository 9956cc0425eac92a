//! The kube-migros node agent binary. Its gRPC service (rxe counters, CRI checkpoint, transfer,
//! staged restore) is built in a later milestone (see the README status).

use clap::Parser;

/// Command-line arguments of the node agent.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "kube-migros node agent: checkpoint, transfer and restore on one node"
)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!(
        "kube-migros node-agent {}: the agent service is not part of this release yet (see the README status)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
