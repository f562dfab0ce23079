//! The workloads, one module each.

pub(crate) mod dns;
pub(crate) mod keepalive;
pub(crate) mod populate;
pub(crate) mod propagation;
pub(crate) mod put;
pub(crate) mod range;
pub(crate) mod ready;
pub(crate) mod robustness;
pub(crate) mod txn;
pub(crate) mod watch;
