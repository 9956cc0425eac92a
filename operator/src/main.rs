//! The kube-migros operator binary. Round one ships the API (`crds`) and the test control plane;
//! the PodMigration reconciler is built in the next milestone (see the README status).

use clap::Parser;

/// Command-line arguments of the operator.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "kube-migros operator: live migration of (RDMA) pods between nodes"
)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!(
        "kube-migros operator {}: the PodMigration reconciler is not part of this release yet; \
         only the {} API is installed (see the README status)",
        env!("CARGO_PKG_VERSION"),
        crds::GROUP
    );
    std::process::exit(2);
}
