//! `migros-ipam`: a CNI IPAM plugin that gives a pod the address reserved for it by a kube-migros
//! migration and hands every other request to another IPAM plugin. See `node_agent::ipam`.

fn main() {
    std::process::exit(node_agent::ipam::plugin_main());
}
