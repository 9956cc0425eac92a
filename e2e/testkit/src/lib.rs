//! What the kube-migros tests (and the benchmarks) share, on top of the sandbox:
//!
//! - `harness`: the sandbox control plane started once, the CRDs installed, throwaway namespaces
//!   whose state is dumped when a test fails, waits on conditions (`eventually`);
//! - `fixtures`: mutual-TLS certificates, Node objects without kubelets, pods marked Running;
//! - `history`: watches held through a test (pods ever seen, migrations in flight);
//! - `testagent`: a scriptable agent that speaks the real agent API and keeps the real
//!   operations table;
//! - `webhooks`: the operator's admission webhooks registered for one test namespace;
//! - `workload`: the demo workload's pods, their state and their peer.

pub mod fixtures;
pub mod harness;
pub mod history;
pub mod testagent;
pub mod webhooks;
pub mod workload;
