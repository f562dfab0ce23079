//! Shared helpers for the integration tests: clients with short timeouts,
//! registrars and discovery on them, raw reads and writes, and polling
//! with generous deadlines (no fixed sleeps).

use std::time::Duration;

use muster::discovery::{Change, Service, Update, Updates};
use muster::{Config, Discovery, DiscoveryConfig, Etcd, Instance, Registrar, RegistrarConfig};

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

/// Registrar settings for tests: leases of `ttl_secs`, a short drain.
pub fn rconfig(ttl_secs: u64) -> RegistrarConfig {
    RegistrarConfig::default()
        .with_ttl(Duration::from_secs(ttl_secs))
        .with_grace(Duration::from_millis(300))
}

/// A registrar with [`rconfig`]`(ttl_secs)`.
pub async fn start_registrar(etcd: &Etcd, ttl_secs: u64) -> Registrar {
    Registrar::start(etcd.clone(), rconfig(ttl_secs))
        .await
        .expect("registrar")
}

/// [`start_registrar`], once it has registered `instances`.
pub async fn registered(
    etcd: &Etcd,
    ttl_secs: u64,
    instances: impl IntoIterator<Item = Instance>,
) -> Registrar {
    let registrar = start_registrar(etcd, ttl_secs).await;
    for instance in instances {
        registrar.register(instance).await.expect("register");
    }
    registrar
}

/// Discovery's table of `service`, followed through `etcd`.
pub async fn follow(etcd: &Etcd, service: &str) -> Service {
    Discovery::new(etcd.clone())
        .service(service)
        .await
        .expect("discovery")
}

/// [`follow`] with these discovery settings.
pub async fn follow_with(etcd: &Etcd, config: DiscoveryConfig, service: &str) -> Service {
    Discovery::with_config(etcd.clone(), config)
        .expect("discovery config")
        .service(service)
        .await
        .expect("discovery")
}

/// The next batch of changes on `updates`; anything else fails the test,
/// which expected `what`.
pub async fn next_changes(updates: &mut Updates, what: &str) -> Vec<Change> {
    match updates.next().await {
        Some(Update::Changes { changes, .. }) => changes,
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// `127.0.0.1:{port}` where nothing listens.
pub fn dead_endpoint() -> String {
    format!("127.0.0.1:{}", muster_testkit::free_port())
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

/// Writes `instance` under the default prefix directly, as another
/// registrar would (no lease).
pub async fn put_instance(etcd: &Etcd, instance: &Instance) {
    put(
        etcd,
        &instance.key(muster::instance::DEFAULT_PREFIX),
        &instance.encode().unwrap(),
    )
    .await;
}

pub async fn delete(etcd: &Etcd, key: &str) {
    etcd.delete_range(muster_proto::DeleteRangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .expect("delete");
}

/// Runs `etcdctl` (API v3) against `endpoint` with `args` (say
/// `--user=root:pw` among them), feeding it `stdin`, off the async
/// runtime; its stdout. Panics with its stderr when it fails. Works for
/// either backend: it only needs the endpoint.
pub async fn etcdctl_with_input(endpoint: &str, args: &[&str], stdin: &str) -> String {
    let endpoint = endpoint.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        muster_testkit::etcdctl_ok(&endpoint, &args, &stdin)
    })
    .await
    .expect("etcdctl task")
}

/// [`etcdctl_with_input`] with nothing on stdin.
pub async fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    etcdctl_with_input(endpoint, args, "").await
}
