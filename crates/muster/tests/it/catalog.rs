//! The catalog (every service under the prefix, for operators) against both
//! backends: listing, following, event kinds, registration times, lease
//! time left, malformed values, and a registry that goes down.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use common::*;
use muster::catalog::{Catalog, CatalogEvent, CatalogEvents, CatalogUpdate, EventKind};
use muster::instance::DEFAULT_PREFIX;
use muster::{Instance, Status};
use muster_testkit::Registry;

/// Collects events until `done` holds for what was collected.
async fn collect_until(
    events: &mut CatalogEvents,
    mut done: impl FnMut(&[CatalogEvent]) -> bool,
) -> Vec<CatalogEvent> {
    let mut seen = Vec::new();
    let wait = async {
        while !done(&seen) {
            match events.next().await {
                Some(CatalogUpdate::Events(batch)) => seen.extend(batch.iter().cloned()),
                Some(CatalogUpdate::Reset(_)) => {}
                None => panic!("catalog stopped"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out; events so far: {seen:?}"));
    seen
}

fn kinds(events: &[CatalogEvent]) -> Vec<(EventKind, String)> {
    events
        .iter()
        .map(|e| (e.kind, format!("{}/{}", e.service, e.id)))
        .collect()
}

async fn lists_every_service_with_counts_and_times(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let before = SystemTime::now() - Duration::from_secs(1);
    let registrar = start_registrar(&etcd, 30).await;
    let a = Instance::new("user", "a", "127.0.0.1:1");
    registrar.register(a.clone()).await.unwrap();
    registrar
        .register(Instance::new("user", "b", "127.0.0.1:2"))
        .await
        .unwrap();
    registrar.set_status(a, Status::Draining).await.unwrap();
    registrar
        .register(Instance::new("user_admin", "x", "127.0.0.1:3"))
        .await
        .unwrap();
    // Written by a Go program through etcd's naming package.
    put(
        &etcd,
        &format!("{DEFAULT_PREFIX}/billing/10.0.0.1:80"),
        br#"{"Op":0,"Addr":"10.0.0.1:80","Metadata":null}"#,
    )
    .await;
    // Garbage is skipped, not fatal.
    put(
        &etcd,
        &format!("{DEFAULT_PREFIX}/user/broken"),
        b"{not json",
    )
    .await;

    let snap = Catalog::list(&etcd, DEFAULT_PREFIX).await.unwrap();
    let names: Vec<&str> = snap.services().keys().map(String::as_str).collect();
    assert_eq!(names, ["billing", "user", "user_admin"]);
    assert_eq!(snap.counts("user"), (1, 1));
    assert_eq!(snap.counts("user_admin"), (1, 0));
    assert_eq!(snap.counts("nope"), (0, 0));
    assert_eq!(snap.len(), 4);

    let user = snap.service("user").unwrap();
    let a = &user["a"];
    let at = a.registered_at.expect("the registrar stamps registrations");
    assert!(at >= before && at <= SystemTime::now(), "{at:?}");
    assert_ne!(a.lease, 0);
    assert!(a.create_revision > 0 && a.mod_revision > a.create_revision);
    // The drain kept the first registration time.
    assert_eq!(user["b"].lease, a.lease);
    assert!(
        snap.service("billing").unwrap()["10.0.0.1:80"]
            .registered_at
            .is_none()
    );

    let left = muster::catalog::lease_time_left(&etcd, [a.lease, a.lease, 0, 987654])
        .await
        .unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    let ttl = left[&a.lease].expect("live lease");
    assert!(
        ttl > Duration::ZERO && ttl <= Duration::from_secs(30),
        "{ttl:?}"
    );
    assert_eq!(left[&987654], None);

    let err = Catalog::list(&etcd, "no-leading-slash").await.unwrap_err();
    assert!(err.to_string().contains("prefix"), "{err}");
    registrar.shutdown().await.unwrap();
}

async fn follows_changes_and_tells_expired_from_deregistered(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let catalog = Catalog::follow(etcd.clone(), DEFAULT_PREFIX).await.unwrap();
    let mut events = catalog.subscribe();
    assert!(matches!(events.next().await, Some(CatalogUpdate::Reset(s)) if s.is_empty()));

    let registrar = start_registrar(&etcd, 30).await;
    let a = Instance::new("user", "a", "127.0.0.1:1");
    registrar.register(a.clone()).await.unwrap();
    registrar.update(a.clone().with_weight(7)).await.unwrap();
    registrar
        .set_status(a.clone().with_weight(7), Status::Draining)
        .await
        .unwrap();
    registrar
        .set_status(a.clone().with_weight(7), Status::Serving)
        .await
        .unwrap();
    registrar.deregister("user", "a").await.unwrap();
    let seen = collect_until(&mut events, |e| e.len() >= 5).await;
    assert_eq!(
        kinds(&seen),
        [
            (EventKind::Registered, "user/a".to_string()),
            (EventKind::Updated, "user/a".to_string()),
            (EventKind::Draining, "user/a".to_string()),
            (EventKind::Serving, "user/a".to_string()),
            (EventKind::Deregistered, "user/a".to_string()),
        ]
    );
    assert!(seen.windows(2).all(|w| w[0].revision < w[1].revision));
    assert_eq!(
        seen[4].instance.weight, 7,
        "a removal carries the last state"
    );

    // A process that dies: nothing renews its lease, which expires and
    // takes its keys with it.
    let lease = etcd.lease_grant(2).await.unwrap().id;
    for (id, addr) in [("c1", "127.0.0.1:5"), ("c2", "127.0.0.1:6")] {
        let instance = Instance::new("cart", id, addr);
        etcd.put(muster_proto::PutRequest {
            key: instance.key(DEFAULT_PREFIX).into_bytes(),
            value: instance.encode().unwrap(),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let seen = collect_until(&mut events, |e| e.len() >= 2).await;
    assert_eq!(
        kinds(&seen),
        [
            (EventKind::Registered, "cart/c1".to_string()),
            (EventKind::Registered, "cart/c2".to_string()),
        ]
    );
    assert_eq!(
        catalog.snapshot().service("cart").unwrap()["c1"].lease,
        lease
    );
    let seen = collect_until(&mut events, |e| e.len() >= 2).await;
    let mut got: HashMap<String, EventKind> = seen.iter().map(|e| (e.id.clone(), e.kind)).collect();
    assert_eq!(got.remove("c1"), Some(EventKind::Expired), "{seen:?}");
    assert_eq!(got.remove("c2"), Some(EventKind::Expired), "{seen:?}");
    assert_eq!(
        seen[0].revision, seen[1].revision,
        "one expiry, one revision"
    );
    assert!(catalog.snapshot().service("cart").is_none());
    let left = muster::catalog::lease_time_left(&etcd, [lease])
        .await
        .unwrap();
    assert_eq!(left[&lease], None);

    // Graceful shutdown drains first: deregistered, not expired.
    let c3 = Instance::new("cart", "c3", "127.0.0.1:7");
    let leaving = registered(&etcd, 30, [c3]).await;
    leaving.shutdown().await.unwrap();
    let seen = collect_until(&mut events, |e| e.len() >= 3).await;
    assert_eq!(
        kinds(&seen),
        [
            (EventKind::Registered, "cart/c3".to_string()),
            (EventKind::Draining, "cart/c3".to_string()),
            (EventKind::Deregistered, "cart/c3".to_string()),
        ]
    );
    let recent = catalog.recent();
    assert_eq!(recent.len(), 12, "{recent:?}");
    assert_eq!(recent.last().unwrap().kind, EventKind::Deregistered);
    registrar.shutdown().await.unwrap();
}

async fn serves_the_last_state_while_the_registry_is_down(mut node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let a = Instance::new("user", "a", "127.0.0.1:1");
    let registrar = registered(&etcd, 60, [a]).await;
    let catalog = Catalog::follow(etcd.clone(), DEFAULT_PREFIX).await.unwrap();
    assert_eq!(catalog.snapshot().len(), 1);
    assert!(catalog.health().stale_for.is_none());

    node.kill();
    eventually("the catalog reports staleness", || {
        let stale = catalog.health().stale_for.is_some();
        async move { stale }
    })
    .await;
    assert_eq!(catalog.snapshot().len(), 1, "the last state is kept");
    let err = Catalog::list(&etcd, DEFAULT_PREFIX).await.unwrap_err();
    assert!(!err.to_string().is_empty());

    node.restart().unwrap();
    eventually("a registration succeeds again", || {
        let registrar = &registrar;
        async move {
            registrar
                .register(Instance::new("user", "b", "127.0.0.1:2"))
                .await
                .is_ok()
        }
    })
    .await;
    eventually("the catalog is fresh and current again", || {
        let ok = catalog.health().stale_for.is_none()
            && catalog
                .snapshot()
                .service("user")
                .is_some_and(|s| s.contains_key("b"));
        async move { ok }
    })
    .await;
}

muster_testkit::on_both!(
    lists_every_service_with_counts_and_times,
    follows_changes_and_tells_expired_from_deregistered,
    serves_the_last_state_while_the_registry_is_down,
);
