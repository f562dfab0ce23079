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

/// Which registry a test body runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A real etcd from Debian's etcd-server.
    Etcd,
    /// muster's embedded registry.
    Embedded,
}

/// How a test registry is started, beyond the defaults.
///
/// Every test registry hashes passwords at bcrypt's lowest cost (4, etcd's
/// `--bcrypt-cost=4`): at the default 10 each user add and login costs
/// ~80 ms of CPU, which auth tests would spend hundreds of times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Simple tokens' lifetime (`--auth-token-ttl`); `None`: the default
    /// 300 s.
    pub auth_token_ttl: Option<std::time::Duration>,
}

/// A fresh registry of that kind, with test logging installed; `None`
/// (skipped loudly, see [`require_etcd`](crate::require_etcd)) for etcd
/// when it is not installed.
pub fn registry(backend: Backend) -> Option<Box<dyn Registry>> {
    registry_with(backend, RegistryOptions::default())
}

/// [`registry`] started with `options`.
pub fn registry_with(backend: Backend, options: RegistryOptions) -> Option<Box<dyn Registry>> {
    crate::init_tracing();
    match backend {
        Backend::Etcd => {
            crate::require_etcd()?;
            let mut opts = crate::EtcdOptions::default();
            if let Some(ttl) = options.auth_token_ttl {
                opts.extra_args
                    .push(format!("--auth-token-ttl={}", ttl.as_secs().max(1)));
            }
            Some(Box::new(EtcdNode::start_with(opts).expect("start etcd")))
        }
        Backend::Embedded => Some(Box::new(
            match options.auth_token_ttl {
                Some(ttl) => EmbeddedNode::start_with_token_ttl(ttl),
                None => EmbeddedNode::start(),
            }
            .expect("start the embedded registry"),
        )),
    }
}

/// Runs each named `async fn(Box<dyn Registry>)` as two tests,
/// `<name>::etcd` and `<name>::embedded`: the same body against real etcd
/// and the embedded registry. The calling crate needs tokio (with the
/// `macros` and `rt-multi-thread` features). `on_both!(options = EXPR;
/// names...)` starts both with [`RegistryOptions`] `EXPR`.
#[macro_export]
macro_rules! on_both {
    (options = $opts:expr; $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    if let Some(r) = $crate::registry_with($crate::Backend::Etcd, $opts) {
                        super::$name(r).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    if let Some(r) = $crate::registry_with($crate::Backend::Embedded, $opts) {
                        super::$name(r).await
                    }
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    if let Some(r) = $crate::registry($crate::Backend::Etcd) {
                        super::$name(r).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    if let Some(r) = $crate::registry($crate::Backend::Embedded) {
                        super::$name(r).await
                    }
                }
            }
        )*
    };
}

/// A generous deadline for anything a test expects to happen "soon".
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Polls `cond` every 20 ms until it holds; panics naming `what` after
/// [`DEADLINE`]. Tests wait for conditions this way, never with fixed sleeps.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
