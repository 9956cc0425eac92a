//! The kube-migros node agent. Today: announcing the agent to the operator (`announce`); the
//! checkpoint, transfer and restore service arrives with the node-runtime milestone.

pub mod announce;
