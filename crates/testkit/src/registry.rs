//! One interface over both backends, so that a test body runs against real
//! etcd and against muster's embedded registry.

use std::io;

use crate::{EmbeddedNode, EtcdNode, metric_value};

/// A registry a test can talk to and break.
pub trait Registry: Send {
    /// `etcd` or `embedded`, for messages.
    fn name(&self) -> &'static str;
    /// `http://127.0.0.1:<port>`.
    fn endpoint(&self) -> String;
    /// The gRPC port.
    fn client_port(&self) -> u16;
    /// Stops it abruptly (SIGKILL for etcd).
    fn kill(&mut self);
    /// Starts it again on the same data and port.
    fn restart(&mut self) -> io::Result<()>;
    /// Kills it and deletes its data.
    fn wipe(&mut self);
    /// Its Prometheus metrics text.
    fn metrics(&self) -> String;
    /// One metric summed over matching samples (see [`metric_value`]).
    fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }
}

impl Registry for EtcdNode {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn endpoint(&self) -> String {
        EtcdNode::endpoint(self)
    }
    fn client_port(&self) -> u16 {
        EtcdNode::client_port(self)
    }
    fn kill(&mut self) {
        EtcdNode::kill(self)
    }
    fn restart(&mut self) -> io::Result<()> {
        EtcdNode::restart(self)
    }
    fn wipe(&mut self) {
        EtcdNode::wipe(self)
    }
    fn metrics(&self) -> String {
        EtcdNode::metrics(self)
    }
}

impl Registry for EmbeddedNode {
    fn name(&self) -> &'static str {
        "embedded"
    }
    fn endpoint(&self) -> String {
        EmbeddedNode::endpoint(self)
    }
    fn client_port(&self) -> u16 {
        EmbeddedNode::client_port(self)
    }
    fn kill(&mut self) {
        EmbeddedNode::kill(self)
    }
    fn restart(&mut self) -> io::Result<()> {
        EmbeddedNode::restart(self)
    }
    fn wipe(&mut self) {
        EmbeddedNode::wipe(self)
    }
    fn metrics(&self) -> String {
        EmbeddedNode::metrics(self)
    }
}
