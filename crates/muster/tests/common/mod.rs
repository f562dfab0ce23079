//! Shared helpers for the integration tests: a real etcd per test, clients
//! with short timeouts, and polling with generous deadlines (no fixed sleeps).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use muster::{Config, Etcd};
use muster_testkit::{EmbeddedNode, EtcdNode, Registry};

/// A generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "muster=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Which registry a test body runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// A real etcd from Debian's etcd-server.
    Etcd,
    /// muster's embedded registry.
    Embedded,
}

/// A fresh registry of that kind; `None` (skipped loudly) for etcd when it
/// is not installed.
pub fn registry(backend: Backend) -> Option<Box<dyn Registry>> {
    init_tracing();
    match backend {
        Backend::Etcd => etcd().map(|n| Box::new(n) as Box<dyn Registry>),
        Backend::Embedded => Some(Box::new(
            EmbeddedNode::start().expect("start the embedded registry"),
        )),
    }
}

/// Runs each named `async fn(Box<dyn Registry>)` as two tests,
/// `<name>::etcd` and `<name>::embedded`.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn etcd() {
                    if let Some(r) = $crate::common::registry($crate::common::Backend::Etcd) {
                        super::$name(r).await
                    }
                }
                #[tokio::test]
                async fn embedded() {
                    if let Some(r) = $crate::common::registry($crate::common::Backend::Embedded) {
                        super::$name(r).await
                    }
                }
            }
        )*
    };
}

/// A fresh etcd, or `None` (test skipped loudly) when etcd is not installed.
pub fn etcd() -> Option<EtcdNode> {
    init_tracing();
    muster_testkit::require_etcd()?;
    Some(EtcdNode::start().expect("start etcd"))
}

/// Client settings for tests: short timeouts so outages are noticed fast.
pub fn config(endpoints: Vec<String>) -> Config {
    let mut c = Config::new(endpoints);
    c.request_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_millis(500);
    c
}

pub fn client(endpoint: &str) -> Etcd {
    Etcd::connect(config(vec![endpoint.to_string()])).expect("client")
}

/// Polls `cond` every 20 ms until it holds or `DEADLINE` passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The raw value at `key`, read directly from etcd.
pub async fn get(etcd: &Etcd, key: &str) -> Option<muster_proto::KeyValue> {
    let resp = etcd
        .range(muster_proto::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .ok()?;
    resp.kvs.into_iter().next()
}

pub async fn put(etcd: &Etcd, key: &str, value: &[u8]) {
    etcd.put(muster_proto::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.to_vec(),
        ..Default::default()
    })
    .await
    .expect("put");
}

pub async fn delete(etcd: &Etcd, key: &str) {
    etcd.delete_range(muster_proto::DeleteRangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .expect("delete");
}
