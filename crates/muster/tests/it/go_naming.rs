//! Interop with the real Go code of etcd's naming package (etcd 3.4's
//! `clientv3/naming/endpoints` and `clientv3/naming/resolver`, from Debian's
//! golang-etcd-server-dev), through the two programs in `tests/go/`:
//!
//! * `naming-register` adds an endpoint with `endpoints.Manager.AddEndpoint`
//!   under a lease it keeps alive: muster's discovery, following the
//!   `etcd-naming` layout, sees it, and sees it go when the program deletes
//!   it or dies and its lease expires.
//! * `naming-resolve` runs the package's gRPC resolver (`etcd:///greeter`)
//!   with a `resolver.ClientConn` that prints every state pushed to it: it
//!   sees what muster's registrar writes in that layout, and sees it go
//!   after the registrar's shutdown.
//!
//! Skipped loudly without Go or the Debian packages (failing with
//! `MUSTER_REQUIRE_GO=1`, as CI sets).

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use muster::{DiscoveryConfig, Instance, LayoutKind, Registrar, RegistrarConfig, Source};
use muster_testkit::{GoProcess, GoProgram, Registry};
use serde_json::{Value, json};

/// The Go packages the programs import.
const PACKAGES: &[&str] = &[
    "go.etcd.io/etcd/clientv3",
    "go.etcd.io/etcd/clientv3/naming/endpoints",
    "go.etcd.io/etcd/clientv3/naming/resolver",
    "google.golang.org/grpc/resolver",
];
const INSTALL: &str = "apt-get install golang-go golang-etcd-server-dev";

/// The two programs, built once per test process; `None` (skipped loudly)
/// without Go or the packages.
async fn programs() -> Option<(GoProgram, GoProgram)> {
    muster_testkit::require_go(PACKAGES, INSTALL)?;
    let build = |name: &str| {
        let dir = format!("{}/tests/go/{name}", env!("CARGO_MANIFEST_DIR"));
        // The first build takes a while: off the runtime's workers.
        tokio::task::spawn_blocking(move || GoProgram::build(dir))
    };
    let register = build("naming-register").await.expect("build task");
    let resolve = build("naming-resolve").await.expect("build task");
    let (register, resolve) = match (register, resolve) {
        (Ok(register), Ok(resolve)) => (register, resolve),
        (Err(e), _) | (_, Err(e)) => panic!("{e}"),
    };
    Some((register, resolve))
}

/// etcd's naming layout under its default (empty) prefix.
fn naming() -> Source {
    Source::new(LayoutKind::EtcdNaming)
}

/// Parses one of the programs' JSON lines.
fn event(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn is_event(line: &str, name: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["event"] == name)
}

/// `naming-register` adding `addr` to `target` under a lease of `ttl_secs`,
/// once it says the endpoint is written.
async fn go_register(
    program: &GoProgram,
    node: &dyn Registry,
    target: &str,
    addr: &str,
    ttl_secs: u64,
    metadata: Option<Value>,
) -> GoProcess {
    let mut args = vec![
        "-endpoint".to_string(),
        node.endpoint(),
        "-target".into(),
        target.into(),
        "-addr".into(),
        addr.into(),
        "-ttl".into(),
        ttl_secs.to_string(),
    ];
    if let Some(meta) = metadata {
        args.extend(["-metadata".into(), meta.to_string()]);
    }
    let mut go = program.spawn(&args).expect("start naming-register");
    let ready = go
        .expect_line("naming-register's ready line", |l| is_event(l, "ready"))
        .await;
    assert_eq!(event(&ready)["key"], format!("{target}/{addr}"));
    go
}

/// The addresses (and their metadata) of a resolver's `update` line.
fn resolved(line: &str) -> Option<Vec<(String, Value)>> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["event"] != "update" {
        return None;
    }
    let addrs = v["addrs"].as_array()?;
    Some(
        addrs
            .iter()
            .map(|a| {
                (
                    a["addr"].as_str().unwrap_or("").to_string(),
                    a["metadata"].clone(),
                )
            })
            .collect(),
    )
}

async fn a_go_registered_endpoint_is_discovered_until_it_goes(node: Box<dyn Registry>) {
    let Some((register, _)) = programs().await else {
        return;
    };
    let etcd = client(&node.endpoint());

    // Registered before muster looks: found by the initial read.
    let mut a = go_register(
        &register,
        node.as_ref(),
        "greeter",
        "10.0.0.1:50051",
        60,
        Some(json!({"zone": "z1", "weight": "7", "version": "v2"})),
    )
    .await;
    // What the Go package wrote, for the record: its capitalised fields.
    let raw = get(&etcd, "greeter/10.0.0.1:50051")
        .await
        .expect("the Go program's key");
    assert_eq!(
        serde_json::from_slice::<Value>(&raw.value).unwrap(),
        json!({"Op": 0, "Addr": "10.0.0.1:50051", "Metadata": {"zone": "z1", "weight": "7", "version": "v2"}})
    );
    assert_ne!(raw.lease, 0, "registered under the program's lease");

    let greeter = follow_with(
        &etcd,
        DiscoveryConfig::default().with_source(naming()),
        "greeter",
    )
    .await;
    let snapshot = greeter
        .wait_for(DEADLINE, |s| s.get("10.0.0.1:50051").is_some())
        .await
        .expect("discovery finds the Go endpoint");
    let found = snapshot.get("10.0.0.1:50051").unwrap();
    assert_eq!(found.service, "greeter");
    assert_eq!(found.addr, "10.0.0.1:50051");
    assert_eq!(found.zone, "z1");
    assert_eq!(found.weight, 7);
    assert_eq!(found.version, "v2");
    assert_eq!(found.metadata.get("zone").map(String::as_str), Some("z1"));

    // Registered while muster watches: found through the watch. A short
    // lease, for its expiry below.
    let mut b = go_register(
        &register,
        node.as_ref(),
        "greeter",
        "10.0.0.2:50051",
        2,
        None,
    )
    .await;
    let snapshot = greeter
        .wait_for(DEADLINE, |s| s.get("10.0.0.2:50051").is_some())
        .await
        .expect("discovery sees the second Go endpoint");
    let found = snapshot.get("10.0.0.2:50051").unwrap();
    assert_eq!(found.addr, "10.0.0.2:50051");
    assert_eq!(found.metadata, BTreeMap::new());
    assert_eq!(found.weight, muster::instance::DEFAULT_WEIGHT);
    assert_eq!(snapshot.len(), 2);

    // A clean stop: DeleteEndpoint and a revoke. a's lease (60 s) outlives
    // the deadline: only the program itself can remove it in time.
    a.close_stdin();
    a.expect_line("naming-register's removed line", |l| is_event(l, "removed"))
        .await;
    let status = a.expect_stopped().await;
    assert!(
        status.success(),
        "naming-register exited {status}: {}",
        a.stderr_tail(20)
    );
    greeter
        .wait_for(DEADLINE, |s| s.get("10.0.0.1:50051").is_none())
        .await
        .expect("discovery drops the deleted endpoint");
    assert!(greeter.snapshot().get("10.0.0.2:50051").is_some());

    // A crash: no delete, the key goes when its lease (2 s) expires.
    b.kill();
    let killed = Instant::now();
    greeter
        .wait_for(DEADLINE, |s| s.get("10.0.0.2:50051").is_none())
        .await
        .expect("discovery drops the endpoint once its lease expires");
    assert!(
        killed.elapsed() >= Duration::from_millis(500),
        "gone after {:?}: before its lease could expire",
        killed.elapsed()
    );
    assert!(get(&etcd, "greeter/10.0.0.2:50051").await.is_none());
    assert!(greeter.snapshot().is_empty());
}

async fn a_muster_registration_is_resolved_by_the_go_resolver(node: Box<dyn Registry>) {
    let Some((register, resolve)) = programs().await else {
        return;
    };
    let etcd = client(&node.endpoint());

    let mut resolver = resolve
        .spawn(["-endpoint", &node.endpoint(), "-target", "etcd:///greeter"])
        .expect("start naming-resolve");
    resolver
        .expect_line("naming-resolve's ready line", |l| is_event(l, "ready"))
        .await;

    // A Go service in the same fleet.
    let mut go = go_register(
        &register,
        node.as_ref(),
        "greeter",
        "10.0.0.9:50051",
        60,
        None,
    )
    .await;
    resolver
        .expect_line("the Go endpoint resolved", |l| {
            resolved(l).is_some_and(|a| a == [("10.0.0.9:50051".to_string(), Value::Null)])
        })
        .await;

    // muster's registrar writes the layout: the Go resolver hands gRPC the
    // bare host:port, and muster's fields as string metadata.
    let registrar = Registrar::start(
        etcd.clone(),
        RegistrarConfig::default()
            .with_source(naming())
            .with_grace(Duration::from_millis(300)),
    )
    .await
    .expect("registrar");
    let addr = "http://127.0.0.1:50061";
    let id = LayoutKind::EtcdNaming.layout().new_id("greeter", addr);
    assert_eq!(id, "127.0.0.1:50061");
    let instance = Instance::new("greeter", &id, addr)
        .with_zone("z1")
        .with_weight(3);
    registrar.register(instance).await.expect("register");
    let both = vec![
        ("10.0.0.9:50051".to_string(), Value::Null),
        (
            "127.0.0.1:50061".to_string(),
            json!({"zone": "z1", "weight": "3"}),
        ),
    ];
    resolver
        .expect_line("muster's instance resolved beside the Go one", |l| {
            resolved(l).is_some_and(|a| a == both)
        })
        .await;

    // Shutdown removes the key (the layout has no draining status) and
    // revokes the lease: the resolver is left with the Go endpoint.
    registrar.shutdown().await.expect("shutdown");
    resolver
        .expect_line("muster's instance gone from the resolver", |l| {
            resolved(l).is_some_and(|a| a == [("10.0.0.9:50051".to_string(), Value::Null)])
        })
        .await;
    assert!(get(&etcd, "greeter/127.0.0.1:50061").await.is_none());

    // The resolver reported no error on the way.
    assert!(
        !resolver.lines().iter().any(|l| is_event(l, "error")),
        "{:?}",
        resolver.lines()
    );
    let status = go.expect_stopped().await;
    assert!(
        status.success(),
        "naming-register exited {status}: {}",
        go.stderr_tail(20)
    );
    resolver
        .expect_line("the Go endpoint gone from the resolver", |l| {
            resolved(l).is_some_and(|a| a.is_empty())
        })
        .await;
    let status = resolver.expect_stopped().await;
    assert!(
        status.success(),
        "naming-resolve exited {status}: {}",
        resolver.stderr_tail(20)
    );
}

muster_testkit::on_both!(
    a_go_registered_endpoint_is_discovered_until_it_goes,
    a_muster_registration_is_resolved_by_the_go_resolver,
);
