//! Propagation and resources, against a local etcd started by the testkit.
//!
//! - Propagation: from `Registrar::register` returning to 100 independent
//!   discovery clients (each with its own connection and watch stream)
//!   showing the instance in their caches; percentiles (nearest rank, HDR
//!   histogram: three significant figures) and max over every (client,
//!   registration) pair.
//! - Resources: gRPC streams opened on etcd by one process holding many
//!   registrations and watching many services (read from etcd's metrics),
//!   and resident memory per cached instance.
//! - Apply time of one change to a large table: a 10,000-instance service
//!   followed by discovery, and a catalog of 100 services of 100.
//!
//! Run: `cargo bench -p muster-bench --bench propagation` (needs `etcd` on
//! PATH).
//! `MUSTER_BENCH_ROUNDS` sets the number of registrations (default 200).

use std::time::{Duration, Instant};

use muster::{Config, Discovery, Etcd, Instance, Registrar, RegistrarConfig};
use muster_bench::Latencies;
use muster_testkit::EtcdNode;

const CLIENTS: usize = 100;

fn client(endpoint: &str) -> Etcd {
    Etcd::connect(Config::new([endpoint.to_string()])).expect("client")
}

/// The put that registers `inst` under `prefix` (muster's layout).
fn put_of(prefix: &str, inst: &Instance) -> muster_proto::PutRequest {
    muster_proto::PutRequest {
        key: inst.key(prefix).into_bytes(),
        value: inst.encode().expect("encode"),
        ..Default::default()
    }
}

/// Puts `rounds` changed instances (`changed(round)`) one at a time, each
/// waited for until `seen` shows it: yielding, so that the wait adds no
/// sleep to what is measured.
async fn change_each(
    writer: &Etcd,
    prefix: &str,
    rounds: usize,
    changed: impl Fn(usize) -> Instance,
    seen: impl Fn(&Instance) -> bool,
) {
    for round in 0..rounds {
        let inst = changed(round);
        writer.put(put_of(prefix, &inst)).await.expect("put");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen(&inst) {
            assert!(Instant::now() < deadline, "update {round} never arrived");
            tokio::task::yield_now().await;
        }
    }
}

/// The mean of `total` over `count` applies.
fn mean(total: Duration, count: u64) -> Duration {
    total / u32::try_from(count.max(1)).unwrap_or(u32::MAX)
}

/// Writes `instances` under `prefix` in txns of 100 puts.
async fn populate(writer: &Etcd, prefix: &str, instances: Vec<Instance>) {
    for chunk in instances.chunks(100) {
        let ops = chunk
            .iter()
            .map(|inst| muster_proto::RequestOp {
                request: Some(muster_proto::request_op::Request::RequestPut(put_of(
                    prefix, inst,
                ))),
            })
            .collect();
        writer
            .txn(muster_proto::TxnRequest {
                success: ops,
                ..Default::default()
            })
            .await
            .expect("txn");
    }
}

async fn propagation(node: &EtcdNode, rounds: usize) {
    let endpoint = node.endpoint();
    let registrar = Registrar::start(client(&endpoint), RegistrarConfig::default())
        .await
        .expect("registrar");
    let mut services = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let discovery = Discovery::new(client(&endpoint));
        services.push(discovery.service("bench").await.expect("discover"));
    }
    let mut samples = Latencies::new();
    for round in 0..rounds {
        let id = format!("i{round}");
        let waiters: Vec<_> = services
            .iter()
            .map(|svc| {
                let svc = svc.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let shown = svc
                        .wait_for(Duration::from_secs(10), |s| s.get(&id).is_some())
                        .await
                        .expect("propagated");
                    // When the table had it, not when this task woke.
                    shown.published_at().unwrap_or_else(Instant::now)
                })
            })
            .collect();
        registrar
            .register(Instance::new(
                "bench",
                id.as_str(),
                format!("10.0.0.1:{round}"),
            ))
            .await
            .expect("register");
        let returned = Instant::now();
        for w in waiters {
            let seen = w.await.expect("waiter");
            samples.record(seen.saturating_duration_since(returned));
        }
    }
    println!(
        "propagation to {CLIENTS} clients over {rounds} registrations ({} samples): {}",
        samples.len(),
        samples.text()
    );
    registrar.shutdown().await.ok();
}

async fn streams(node: &EtcdNode) {
    let endpoint = node.endpoint();
    let before_ka = node
        .metric(
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
        .unwrap_or(0.0);
    let before_watch = node
        .metric("grpc_server_started_total", &["grpc_method=\"Watch\""])
        .unwrap_or(0.0);
    let etcd = client(&endpoint);
    let registrar = Registrar::start(etcd.clone(), RegistrarConfig::default())
        .await
        .expect("registrar");
    let discovery = Discovery::new(etcd.clone());
    let mut held = Vec::new();
    for s in 0..20 {
        for i in 0..50 {
            registrar
                .register(Instance::new(
                    format!("svc{s}"),
                    format!("i{i}"),
                    format!("10.1.{s}.{i}:80"),
                ))
                .await
                .expect("register");
        }
        held.push(
            discovery
                .service(&format!("svc{s}"))
                .await
                .expect("discover"),
        );
    }
    // Let several keep-alive rounds pass.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ka = node
        .metric(
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
        .unwrap_or(0.0)
        - before_ka;
    let watch = node
        .metric("grpc_server_started_total", &["grpc_method=\"Watch\""])
        .unwrap_or(0.0)
        - before_watch;
    println!(
        "streams for 1000 registrations and 20 watched services: keep-alive {ka}, watch {watch}"
    );
    registrar.shutdown().await.ok();
}

/// Memory per cached instance: one service of 10k instances, written
/// directly (as other processes would), then discovered. Runs first, so
/// that resident memory is not blurred by what other phases freed.
async fn memory(node: &EtcdNode) {
    let endpoint = node.endpoint();
    let writer = client(&endpoint);
    let big = 10_000;
    let instance = |i: usize, version: &str| {
        Instance::new(
            "big",
            format!("i{i}"),
            format!("10.2.{}.{}:8080", i / 256, i % 256),
        )
        .with_zone("eu-1")
        .with_version(version)
    };
    let prefix = muster::instance::DEFAULT_PREFIX;
    populate(
        &writer,
        prefix,
        (0..big).map(|i| instance(i, "1.0.0")).collect(),
    )
    .await;
    let before = muster_testkit::resident_bytes();
    let service = Discovery::new(client(&endpoint))
        .service("big")
        .await
        .expect("discover");
    assert_eq!(service.snapshot().len(), big);
    let after = muster_testkit::resident_bytes();
    let snapshot = service.snapshot();
    let heap: usize = snapshot
        .instances()
        .iter()
        .map(|i| {
            // The Arc (two counters + the Instance), its slot in the
            // snapshot's Vec, and every owned buffer.
            16 + std::mem::size_of::<Instance>()
                + std::mem::size_of::<std::sync::Arc<Instance>>()
                + i.service.capacity()
                + i.id.capacity()
                + i.addr.capacity()
                + i.version.capacity()
                + i.zone.capacity()
                + i.tags.iter().map(|t| t.capacity() + 24).sum::<usize>()
                + i.metadata
                    .iter()
                    .map(|(k, v)| k.capacity() + v.capacity() + 48)
                    .sum::<usize>()
        })
        .sum();
    println!(
        "memory per cached instance ({big} instances with zone and version): {} bytes of heap in the snapshot; process resident +{:.1} MiB ({:.0} bytes per instance, including transient list buffers)",
        heap / big,
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) as f64 / big as f64
    );

    // What one change costs a caller's table of that size: 200 updates,
    // each waited for, then the apply times (watch response received to
    // the new snapshot visible).
    let applies_before = service.apply_stats().count();
    change_each(
        &writer,
        prefix,
        200,
        |round| instance(round % big, &format!("2.0.{round}")),
        |inst| {
            service
                .snapshot()
                .get(&inst.id)
                .is_some_and(|seen| seen.version == inst.version)
        },
    )
    .await;
    let stats = service.apply_stats();
    println!(
        "one change to a table of {big} instances: {} applies, mean {:?}, p99 <= {:?}, max {:?}",
        stats.count() - applies_before,
        mean(stats.total(), stats.count()),
        stats.quantile(0.99).unwrap_or_default(),
        stats.max()
    );
}

/// What one change costs a catalog (the gateway's, the dashboard's, DNS's
/// table of every service): 100 services of 100 instances, 200 updates
/// spread over them, each waited for; the apply times of the services
/// changed.
async fn catalog(node: &EtcdNode) {
    let endpoint = node.endpoint();
    let writer = client(&endpoint);
    let prefix = "/catalog-bench";
    let instance = |s: usize, i: usize, version: &str| {
        Instance::new(
            format!("s{s}"),
            format!("i{i}"),
            format!("10.3.{s}.{i}:8080"),
        )
        .with_zone("eu-1")
        .with_version(version)
    };
    let all = (0..100)
        .flat_map(|s| (0..100).map(move |i| (s, i)))
        .map(|(s, i)| instance(s, i, "1.0.0"))
        .collect();
    populate(&writer, prefix, all).await;
    let catalog = muster::Catalog::follow(client(&endpoint), prefix)
        .await
        .expect("follow");
    assert_eq!(catalog.snapshot().len(), 10_000);
    change_each(
        &writer,
        prefix,
        200,
        |round| instance(round % 100, round / 100, &format!("2.0.{round}")),
        |inst| {
            catalog
                .snapshot()
                .service(&inst.service)
                .and_then(|m| m.get(&inst.id))
                .is_some_and(|e| e.instance.version == inst.version)
        },
    )
    .await;
    let (mut count, mut total, mut max) = (0u64, Duration::ZERO, Duration::ZERO);
    for s in 0..100 {
        if let Some(stats) = catalog.apply_stats(&format!("s{s}")) {
            count += stats.count();
            total += stats.total();
            max = max.max(stats.max());
        }
    }
    println!(
        "one change to a catalog of 100 services x 100 instances: {count} applies, mean {:?}, max {max:?}",
        mean(total, count)
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs benches with no flag.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !muster_testkit::etcd_available() {
        eprintln!("propagation bench skipped: etcd is not on PATH (apt-get install etcd-server)");
        return;
    }
    let rounds = std::env::var("MUSTER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let node = EtcdNode::start().expect("etcd");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        memory(&node).await;
        catalog(&node).await;
        propagation(&node, rounds).await;
        streams(&node).await;
    });
}
