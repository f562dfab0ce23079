//! The Go registries' layouts against both backends: entries written byte
//! for byte as each Go library writes them are discovered; entries muster
//! writes are read back by parsers that follow the Go structs' JSON tags
//! (and nothing more), under a lease of the library's TTL, and removed on
//! shutdown; a mixed fleet is one table; `auto` reads every layout under
//! one prefix and counts what it cannot.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use muster::catalog::Catalog;
use muster::layout::{self, LayoutKind, Source};
use muster::{DiscoveryConfig, Instance, Registrar, RegistrarConfig, Status};
use muster_testkit::Registry;
use serde::Deserialize;

/// Puts `value` at `key` under a fresh lease, as the Go libraries do.
async fn put_leased(etcd: &muster::Etcd, key: &str, value: &[u8], ttl: i64) -> i64 {
    let lease = etcd.lease_grant(ttl).await.expect("grant").id;
    etcd.put(muster_proto::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    })
    .await
    .expect("put");
    lease
}

async fn wait_addrs(service: &muster::Service, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    service
        .wait_for(DEADLINE, |s| {
            let mut got: Vec<String> = s.instances().iter().map(|i| i.addr.clone()).collect();
            got.sort();
            got == want
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} never had {want:?}: {:?}",
                service.name(),
                service.instances()
            )
        });
}

/// The fixtures: (layout, key, value), each as its Go library writes it.
fn go_fixtures() -> Vec<(LayoutKind, String, Vec<u8>, &'static str)> {
    vec![
        (
            LayoutKind::EtcdNaming,
            "greeter/10.0.0.1:50051".into(),
            br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#.to_vec(),
            "10.0.0.1:50051",
        ),
        (
            LayoutKind::Kratos,
            "/microservices/greeter/6f2b6c1e-8d0a-4c1e-9a59-3f6f0c1d2e3f".into(),
            br#"{"id":"6f2b6c1e-8d0a-4c1e-9a59-3f6f0c1d2e3f","name":"greeter","version":"v1.0.0","metadata":{"weight":"20"},"endpoints":["grpc://10.0.0.5:9000","http://10.0.0.5:8000"]}"#.to_vec(),
            "http://10.0.0.5:8000",
        ),
        (
            LayoutKind::GoZero,
            "greeter/7587869785858585".into(),
            b"10.0.0.3:8080".to_vec(),
            "10.0.0.3:8080",
        ),
        (
            LayoutKind::GoMicro,
            "/micro/registry/greeter/greeter-8c1e6f3a-1111-4c1e-9a59-3f6f0c1d2e3f".into(),
            br#"{"name":"greeter","version":"latest","metadata":null,"endpoints":[],"nodes":[{"id":"greeter-8c1e6f3a-1111-4c1e-9a59-3f6f0c1d2e3f","address":"10.0.0.4:54321","metadata":{"protocol":"grpc","registry":"etcd"}}]}"#.to_vec(),
            "10.0.0.4:54321",
        ),
    ]
}

async fn discovers_what_go_libraries_write(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    for (kind, key, value, addr) in go_fixtures() {
        let lease = put_leased(&etcd, &key, &value, 30).await;
        let config = DiscoveryConfig::default().with_source(Source::new(kind));
        let service = follow_with(&etcd, config, "greeter").await;
        wait_addrs(&service, &[addr]).await;
        let instance = service.instances()[0].clone();
        if kind == LayoutKind::Kratos {
            assert_eq!((instance.version.as_str(), instance.weight), ("v1.0.0", 20));
        }
        // Expiry (here: revocation) removes it, as for muster's own keys.
        etcd.lease_revoke(lease).await.unwrap();
        wait_addrs(&service, &[]).await;
    }
}

/// kratos's `registry.ServiceInstance`, as its JSON tags define it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KratosInstance {
    id: String,
    name: String,
    version: String,
    metadata: Option<BTreeMap<String, String>>,
    endpoints: Vec<String>,
}

/// go-micro's `registry.Service` and `Node`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MicroService {
    name: String,
    version: String,
    #[allow(dead_code)]
    metadata: Option<BTreeMap<String, String>>,
    #[allow(dead_code)]
    endpoints: Option<Vec<serde_json::Value>>,
    nodes: Vec<MicroNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MicroNode {
    id: String,
    address: String,
    metadata: Option<BTreeMap<String, String>>,
}

/// etcd's `endpoints/internal.Update` (Go field names, no tags).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
struct NamingUpdate {
    Op: u8,
    Addr: String,
    #[allow(dead_code)]
    Metadata: Option<serde_json::Value>,
}

async fn go_readers_parse_what_muster_writes(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    for kind in [
        LayoutKind::EtcdNaming,
        LayoutKind::Kratos,
        LayoutKind::GoZero,
        LayoutKind::GoMicro,
    ] {
        let source = Source::new(kind);
        let config = RegistrarConfig::default()
            .with_source(source.clone())
            .with_grace(Duration::from_millis(200));
        assert_eq!(config.ttl, kind.layout().default_ttl());
        let registrar = Registrar::start(etcd.clone(), config).await.unwrap();
        let id = kind.layout().new_id("greeter", "10.0.0.9:7000");
        let instance = Instance::new("greeter", id.clone(), "10.0.0.9:7000")
            .with_version("1.2.3")
            .with_zone("eu-1");
        registrar.register(instance.clone()).await.unwrap();
        let key = source.key("greeter", &id);
        let kv = get(&etcd, &key)
            .await
            .unwrap_or_else(|| panic!("{kind}: no key {key}"));
        assert_ne!(kv.lease, 0, "{kind}: the key is under a lease");
        let ttl = etcd.lease_time_to_live(kv.lease, false).await.unwrap();
        assert_eq!(
            ttl.granted_ttl,
            kind.layout().default_ttl().as_secs() as i64,
            "{kind}"
        );
        match kind {
            LayoutKind::Kratos => {
                let si: KratosInstance = serde_json::from_slice(&kv.value).unwrap();
                assert_eq!(
                    (si.id.as_str(), si.name.as_str(), si.version.as_str()),
                    (id.as_str(), "greeter", "1.2.3")
                );
                assert_eq!(si.endpoints, vec!["http://10.0.0.9:7000".to_string()]);
                assert_eq!(si.metadata.unwrap()["zone"], "eu-1");
            }
            LayoutKind::GoMicro => {
                let s: MicroService = serde_json::from_slice(&kv.value).unwrap();
                assert_eq!((s.name.as_str(), s.version.as_str()), ("greeter", "1.2.3"));
                assert_eq!(
                    (s.nodes[0].id.as_str(), s.nodes[0].address.as_str()),
                    (id.as_str(), "10.0.0.9:7000")
                );
                assert_eq!(s.nodes[0].metadata.as_ref().unwrap()["zone"], "eu-1");
            }
            LayoutKind::EtcdNaming => {
                let u: NamingUpdate = serde_json::from_slice(&kv.value).unwrap();
                assert_eq!((u.Op, u.Addr.as_str()), (0, "10.0.0.9:7000"));
                assert_eq!(
                    key, "greeter/10.0.0.9:7000",
                    "by convention the id is the address"
                );
            }
            LayoutKind::GoZero => {
                assert_eq!(kv.value, b"10.0.0.9:7000");
                assert!(id.parse::<i64>().is_ok(), "go-zero ids are numbers: {id}");
            }
            _ => unreachable!(),
        }
        // Read back by muster in the same layout.
        let service = follow_with(
            &etcd,
            DiscoveryConfig::default().with_source(source.clone()),
            "greeter",
        )
        .await;
        wait_addrs(&service, &[kv_addr(kind)]).await;
        // Draining: no status in these layouts, so the key goes.
        registrar
            .set_status(instance.clone(), Status::Draining)
            .await
            .unwrap();
        assert!(
            get(&etcd, &key).await.is_none(),
            "{kind}: a draining instance's key is removed"
        );
        wait_addrs(&service, &[]).await;
        // Serving again puts it back, and shutdown removes it.
        registrar
            .set_status(instance, Status::Serving)
            .await
            .unwrap();
        assert!(get(&etcd, &key).await.is_some(), "{kind}: serving again");
        registrar.shutdown().await.unwrap();
        assert!(
            get(&etcd, &key).await.is_none(),
            "{kind}: shutdown removes it"
        );
    }
}

fn kv_addr(kind: LayoutKind) -> &'static str {
    match kind {
        LayoutKind::Kratos => "http://10.0.0.9:7000",
        _ => "10.0.0.9:7000",
    }
}

async fn a_mixed_fleet_is_one_table(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let muster = registered(
        &etcd,
        30,
        [Instance::new("user", "rust-1", "127.0.0.1:7001")],
    )
    .await;
    let kratos = Registrar::start(
        etcd.clone(),
        RegistrarConfig::default().with_source(Source::new(LayoutKind::Kratos)),
    )
    .await
    .unwrap();
    kratos
        .register(Instance::new("user", "go-1", "http://127.0.0.1:7002"))
        .await
        .unwrap();
    // The same id in both sources is kept twice.
    kratos
        .register(Instance::new("user", "rust-1", "http://127.0.0.1:7003"))
        .await
        .unwrap();
    let config = DiscoveryConfig::default().also(Source::new(LayoutKind::Kratos));
    let service = follow_with(&etcd, config, "user").await;
    wait_addrs(
        &service,
        &[
            "127.0.0.1:7001",
            "http://127.0.0.1:7002",
            "http://127.0.0.1:7003",
        ],
    )
    .await;
    let snap = service.snapshot();
    assert!(
        snap.get("rust-1@kratos").is_some(),
        "{:?}",
        snap.instances()
    );
    // Changes in either source reach the one table.
    kratos.deregister("user", "go-1").await.unwrap();
    wait_addrs(&service, &["127.0.0.1:7001", "http://127.0.0.1:7003"]).await;
    muster.shutdown().await.unwrap();
    wait_addrs(&service, &["http://127.0.0.1:7003"]).await;
    kratos.shutdown().await.unwrap();
    wait_addrs(&service, &[]).await;
}

async fn auto_reads_every_layout_and_skips_the_rest(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let prefix = "/fleet";
    let source = Source::with_prefix(LayoutKind::Auto, prefix);
    let mut want = Vec::new();
    for (_, key, value, addr) in go_fixtures() {
        let id = key.rsplit('/').next().unwrap().to_string();
        put(&etcd, &source.key("greeter", &id), &value).await;
        want.push(addr);
    }
    let muster_value = Instance::new("greeter", "m1", "127.0.0.1:9")
        .encode()
        .unwrap();
    put(&etcd, &source.key("greeter", "m1"), &muster_value).await;
    want.push("127.0.0.1:9");
    let before = layout::malformed_total(LayoutKind::Auto);
    put(&etcd, &source.key("greeter", "junk"), b"{\"what\":1}").await;
    let service = follow_with(
        &etcd,
        DiscoveryConfig::default().with_source(source.clone()),
        "greeter",
    )
    .await;
    wait_addrs(&service, &want).await;
    assert!(service.health().malformed >= 1);
    assert!(layout::malformed_total(LayoutKind::Auto) > before);
    // The catalog reads the same prefix the same way.
    let catalog = Catalog::follow_source(etcd.clone(), source).await.unwrap();
    assert_eq!(
        catalog.snapshot().service("greeter").map(|s| s.len()),
        Some(want.len())
    );
}

async fn catalog_of_an_unprefixed_layout_reads_only_its_keys(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    // go-zero keys have no prefix; muster's own keys and others around
    // them are not go-zero entries and are not counted as malformed.
    put(&etcd, "user.rpc/101", b"10.0.0.1:8080").await;
    put(&etcd, "user.rpc/102", b"10.0.0.2:8080").await;
    put_instance(&etcd, &Instance::new("user", "a", "127.0.0.1:1")).await;
    put(&etcd, "config/feature-x", b"on").await;
    let catalog = Catalog::follow_source(etcd.clone(), Source::new(LayoutKind::GoZero))
        .await
        .unwrap();
    let snap = catalog.snapshot();
    assert_eq!(snap.service("user.rpc").map(|s| s.len()), Some(2));
    // `config/feature-x` has a go-zero key shape but "on" is no address.
    assert_eq!(catalog.health().malformed, 1);
    put(&etcd, "user.rpc/103", b"10.0.0.3:8080").await;
    eventually("the catalog sees a third go-zero instance", || {
        let n = catalog
            .snapshot()
            .service("user.rpc")
            .map_or(0, |s| s.len());
        async move { n == 3 }
    })
    .await;
}

async fn a_catalog_over_two_layouts(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let _muster = registered(&etcd, 30, [Instance::new("user", "a", "127.0.0.1:1")]).await;
    put_leased(&etcd, "user/7", b"127.0.0.1:2", 30).await;
    put_leased(&etcd, "user/a", b"127.0.0.1:3", 30).await;
    let catalog = Catalog::follow_sources(
        etcd.clone(),
        vec![
            Source::new(LayoutKind::Muster),
            Source::new(LayoutKind::GoZero),
        ],
    )
    .await
    .unwrap();
    let addrs = |c: &Catalog| -> Vec<(String, String)> {
        c.snapshot()
            .service("user")
            .map(|s| {
                s.iter()
                    .map(|(id, e)| (id.clone(), e.instance.addr.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        addrs(&catalog),
        [
            ("7".to_string(), "127.0.0.1:2".to_string()),
            ("a".to_string(), "127.0.0.1:1".to_string()),
            ("a@go-zero".to_string(), "127.0.0.1:3".to_string()),
        ]
    );
    // The first lists make no events; later changes in either do.
    let mut events = catalog.subscribe();
    assert!(matches!(
        events.next().await,
        Some(muster::catalog::CatalogUpdate::Reset(_))
    ));
    delete(&etcd, "user/a").await;
    match events.next().await {
        Some(muster::catalog::CatalogUpdate::Events(batch)) => {
            assert_eq!(batch.len(), 1);
            assert_eq!(
                (batch[0].id.as_str(), batch[0].kind),
                ("a@go-zero", muster::catalog::EventKind::Deregistered)
            );
        }
        other => panic!("expected the go-zero removal, got {other:?}"),
    }
    put(&etcd, "user/8", b"127.0.0.1:4").await;
    eventually("the go-zero addition reaches the catalog", || {
        let n = addrs(&catalog).len();
        async move { n == 3 }
    })
    .await;
    assert!(catalog.recent().iter().all(|e| e.service == "user"));
}

muster_testkit::on_both!(
    a_catalog_over_two_layouts,
    discovers_what_go_libraries_write,
    go_readers_parse_what_muster_writes,
    a_mixed_fleet_is_one_table,
    auto_reads_every_layout_and_skips_the_rest,
    catalog_of_an_unprefixed_layout_reads_only_its_keys,
);
