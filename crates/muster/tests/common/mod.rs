//! Shared helpers for the integration tests: a real etcd per test, clients
//! with short timeouts, and polling with generous deadlines (no fixed sleeps).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use muster::{Config, Etcd};
use muster_testkit::EtcdNode;

/// A generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(20);

pub use muster_testkit::init_tracing;

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
