//! Shared helpers for the integration tests: clients with short timeouts,
//! and polling with generous deadlines (no fixed sleeps).

use std::time::Duration;

use muster::{Config, Etcd};

pub use muster_testkit::DEADLINE;
pub use muster_testkit::init_tracing;

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

pub use muster_testkit::eventually;

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
