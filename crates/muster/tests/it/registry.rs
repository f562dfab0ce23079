//! Registration and discovery against a real etcd: the happy path, the
//! failure paths, and bad input.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use muster::discovery::{Change, Update};
use muster::{Discovery, Error, Instance, Registrar, RegistrarConfig, RegistrarState, Status};
use muster_testkit::Registry;

fn ids(snapshot: &muster::discovery::Snapshot) -> Vec<String> {
    snapshot.instances().iter().map(|i| i.id.clone()).collect()
}

async fn registration_is_discovered_and_changes_propagate(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let a = Instance::new("user", "a", "http://127.0.0.1:8080").with_zone("z1");
    let registrar = registered(&etcd, 5, [a.clone()]).await;
    // One discovery for both services below.
    let discovery = Discovery::new(etcd.clone());
    let user = discovery.service("user").await.unwrap();
    assert_eq!(ids(&user.snapshot()), ["a"]);
    assert_eq!(*user.snapshot().get("a").unwrap().as_ref(), a);

    let mut updates = user.updates();
    assert!(matches!(updates.next().await, Some(Update::Reset(s)) if s.len() == 1));

    let b = Instance::new("user", "b", "http://127.0.0.1:8081");
    registrar.register(b.clone()).await.unwrap();
    assert_eq!(
        next_changes(&mut updates, "an addition").await,
        vec![Change::Added(Arc::new(b.clone()))]
    );

    let a2 = a.clone().with_metadata("build", "42");
    registrar.update(a2.clone()).await.unwrap();
    let changes = next_changes(&mut updates, "an update").await;
    assert!(
        matches!(&changes[..], [Change::Updated { old, new }] if **old == a && **new == a2),
        "{changes:?}"
    );

    registrar.deregister("user", "b").await.unwrap();
    let changes = next_changes(&mut updates, "a removal").await;
    assert!(matches!(&changes[..], [Change::Removed(i)] if i.id == "b"));
    assert_eq!(ids(&user.snapshot()), ["a"]);
    assert!(user.health().stale_for.is_none());

    // A service name that is a prefix of another is not mixed up with it.
    registrar
        .register(Instance::new("user_admin", "x", "http://127.0.0.1:9000"))
        .await
        .unwrap();
    let admin = discovery.service("user_admin").await.unwrap();
    assert_eq!(ids(&admin.snapshot()), ["x"]);
    assert_eq!(ids(&user.snapshot()), ["a"]);
}

async fn keepalive_holds_an_instance_past_many_ttls(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let registrar = registered(&etcd, 1, [a]).await;
    let user = follow(&etcd, "user").await;
    // Check continuously for six TTLs: the instance never disappears.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            user.snapshot().len(),
            1,
            "instance vanished after {:?}",
            start.elapsed()
        );
        assert!(get(&etcd, "/muster/services/user/a").await.is_some());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let RegistrarState::Registered { lease } = registrar.state() else {
        panic!("not registered: {:?}", registrar.state())
    };
    let ttl = etcd.lease_time_to_live(lease, true).await.unwrap();
    // Remaining seconds round down, so a live 1 s lease may say 0; -1 means gone.
    assert!(ttl.ttl >= 0, "lease expired: {ttl:?}");
    assert_eq!(ttl.granted_ttl, 1);
    assert_eq!(ttl.keys, vec![b"/muster/services/user/a".to_vec()]);
}

/// Run as a child process by `a_crashed_instance_disappears_after_its_ttl`.
#[tokio::test]
#[ignore = "runs only as the child process of a_crashed_instance_disappears_after_its_ttl"]
async fn child_registrant() {
    let endpoint = std::env::var("MUSTER_CHILD_ENDPOINT").expect("MUSTER_CHILD_ENDPOINT");
    let crashy = Instance::new("user", "crashy", "http://127.0.0.1:8082");
    let _registrar = registered(&client(&endpoint), 1, [crashy]).await;
    println!("REGISTERED");
    std::future::pending::<()>().await;
}

async fn a_crashed_instance_disappears_after_its_ttl(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "registry::child_registrant",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MUSTER_CHILD_ENDPOINT", node.endpoint())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let user = follow(&etcd, "user").await;
    user.wait_for(DEADLINE, |s| s.get("crashy").is_some())
        .await
        .expect("the child registers");
    child.kill().unwrap(); // SIGKILL: no revoke, no goodbye
    child.wait().unwrap();
    let killed = Instant::now();
    assert!(
        user.snapshot().get("crashy").is_some(),
        "gone before the lease could expire"
    );
    user.wait_for(DEADLINE, |s| s.get("crashy").is_none())
        .await
        .expect("removed once the lease expires");
    assert!(killed.elapsed() < DEADLINE);
    assert!(get(&etcd, "/muster/services/user/crashy").await.is_none());
}

async fn graceful_shutdown_drains_then_removes_at_once(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    // A long TTL: only a revoke can remove the instance within the deadline.
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let registrar = registered(&etcd, 600, [a]).await;
    let user = follow(&etcd, "user").await;
    let mut updates = user.updates();
    updates.next().await; // reset
    let mut state = registrar.subscribe();
    let shutdown = tokio::spawn(registrar.shutdown());
    let changes = next_changes(&mut updates, "draining").await;
    assert!(
        matches!(&changes[..], [Change::Updated { new, .. }] if new.status == Status::Draining),
        "{changes:?}"
    );
    let changes = next_changes(&mut updates, "removal").await;
    assert!(matches!(&changes[..], [Change::Removed(i)] if i.id == "a"));
    shutdown.await.unwrap().unwrap();
    state
        .wait_for(|s| *s == RegistrarState::Stopped)
        .await
        .unwrap();
    assert!(get(&etcd, "/muster/services/user/a").await.is_none());
}

async fn registry_killed_past_the_ttl_then_restarted_registration_comes_back(
    mut node: Box<dyn Registry>,
) {
    let etcd = client(&node.endpoint());
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let registrar = registered(&etcd, 1, [a]).await;
    let user = follow(&etcd, "user").await;
    let before = registrar.state();

    node.kill();
    // The registrar notices by its local deadline, with etcd silent.
    let mut state = registrar.subscribe();
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, RegistrarState::Recovering { .. })),
    )
    .await
    .expect("registrar notices the lost lease")
    .unwrap();
    // Discovery keeps serving the last known instances and says they are stale.
    eventually("discovery reports staleness", || async {
        user.health().stale_for.is_some()
    })
    .await;
    assert_eq!(ids(&user.snapshot()), ["a"]);

    node.restart().unwrap();
    eventually("registrar registered again", || async {
        matches!(registrar.state(), RegistrarState::Registered { lease } if RegistrarState::Registered { lease } != before)
    })
    .await;
    eventually("discovery is fresh again", || async {
        user.health().stale_for.is_none()
    })
    .await;
    let RegistrarState::Registered { lease } = registrar.state() else {
        unreachable!()
    };
    eventually("the key is back under the new lease", || async {
        get(&etcd, "/muster/services/user/a")
            .await
            .is_some_and(|kv| kv.lease == lease)
    })
    .await;
    assert_eq!(ids(&user.snapshot()), ["a"]);
}

async fn a_registration_during_an_outage_waits_and_lands_when_the_registry_returns(
    node: Box<dyn Registry>,
) {
    let direct = client(&node.endpoint());
    let proxy = muster_testkit::TcpProxy::start(node.client_port()).unwrap();
    let cut_off = client(&proxy.endpoint());
    let registrar = Registrar::start(
        cut_off.clone(),
        rconfig(1).with_wait(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut state = registrar.subscribe();

    proxy.cut();
    // The registrar loses its lease by its local deadline; a registration
    // asked for now waits instead of failing.
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, RegistrarState::Recovering { .. })),
    )
    .await
    .expect("the registrar notices the outage")
    .unwrap();
    let registrar = Arc::new(registrar);
    let pending = tokio::spawn({
        let registrar = registrar.clone();
        async move {
            registrar
                .register(Instance::new("user", "w", "http://127.0.0.1:9"))
                .await
        }
    });
    assert!(get(&direct, "/muster/services/user/w").await.is_none());
    assert!(!pending.is_finished(), "the registration failed at once");

    proxy.restore();
    let result = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the registration completes once the registry is back")
        .unwrap();
    result.expect("registered after the outage");
    let RegistrarState::Registered { lease } = registrar.state() else {
        panic!("not registered: {:?}", registrar.state());
    };
    let kv = get(&direct, "/muster/services/user/w")
        .await
        .expect("the instance is in the registry");
    assert_eq!(kv.lease, lease, "under the registrar's new lease");
}

async fn registry_wiped_registrations_come_back(mut node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let registrar = registered(
        &etcd,
        2,
        ["a", "b"].map(|id| Instance::new("user", id, "http://127.0.0.1:8080")),
    )
    .await;
    // Bump the revision so that the wiped store is clearly behind it.
    for i in 0..20 {
        put(&etcd, &format!("/noise/{i}"), b"x").await;
    }
    let user = follow(&etcd, "user").await;
    node.wipe();
    node.restart().unwrap();
    eventually("both keys are back in the wiped etcd", || async {
        get(&etcd, "/muster/services/user/a").await.is_some()
            && get(&etcd, "/muster/services/user/b").await.is_some()
    })
    .await;
    eventually("discovery converges on the new store", || async {
        let s = user.snapshot();
        s.len() == 2 && user.health().stale_for.is_none()
    })
    .await;
    assert!(matches!(
        registrar.state(),
        RegistrarState::Registered { .. }
    ));
}

async fn compaction_while_a_watcher_was_disconnected_relists_without_missing_a_change(
    node: Box<dyn Registry>,
) {
    let direct = client(&node.endpoint());
    let proxy = muster_testkit::TcpProxy::start(node.client_port()).unwrap();
    let partitioned = client(&proxy.endpoint());

    let a = Instance::new("user", "a", "http://127.0.0.1:1");
    let b = Instance::new("user", "b", "http://127.0.0.1:2");
    let registrar = registered(&direct, 30, [a.clone(), b.clone()]).await;

    let user = follow(&partitioned, "user").await;
    let mut updates = user.updates();
    updates.next().await; // reset
    assert_eq!(user.snapshot().len(), 2);

    proxy.cut();
    eventually("discovery notices the partition", || async {
        user.health().stale_for.is_some()
    })
    .await;
    // While it is cut off: one removal, one addition, one update, then compaction.
    registrar.deregister("user", "a").await.unwrap();
    let c = Instance::new("user", "c", "http://127.0.0.1:3");
    registrar.register(c.clone()).await.unwrap();
    let b2 = b.clone().with_weight(7);
    registrar.update(b2.clone()).await.unwrap();
    let rev = direct.status().await.unwrap().header.unwrap().revision;
    direct.compact(rev, true).await.unwrap();
    assert_eq!(
        ids(&user.snapshot()),
        ["a", "b"],
        "stale list is served during the partition"
    );

    proxy.restore();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(DEADLINE, updates.next())
            .await
            .expect("changes arrive")
        {
            Some(Update::Changes { changes, .. }) => seen.extend(changes),
            Some(Update::Reset(_)) => {}
            None => panic!("updates ended"),
        }
    }
    assert!(seen.contains(&Change::Removed(Arc::new(a))));
    assert!(seen.contains(&Change::Added(Arc::new(c))));
    assert!(seen.contains(&Change::Updated {
        old: Arc::new(b),
        new: Arc::new(b2)
    }));
    assert_eq!(ids(&user.snapshot()), ["b", "c"]);
    eventually("fresh again", || async {
        user.health().stale_for.is_none()
    })
    .await;
}

async fn a_key_deleted_from_outside_is_restored(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let _registrar = registered(&etcd, 30, [a]).await;
    let key = "/muster/services/user/a";
    let original = get(&etcd, key).await.unwrap();
    let restored = || async {
        get(&etcd, key)
            .await
            .is_some_and(|kv| kv.lease == original.lease && kv.value == original.value)
    };

    delete(&etcd, key).await;
    eventually("the deleted key is restored", restored).await;

    put(&etcd, key, b"overwritten by hand").await;
    eventually("the overwritten key is restored", restored).await;
}

async fn a_malformed_value_is_skipped_and_counted(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    put(&etcd, "/muster/services/user/bad", b"{not json").await;
    put(
        &etcd,
        "/muster/services/user/go",
        br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#,
    )
    .await;
    put(
        &etcd,
        "/muster/services/user/ok",
        br#"{"schema":1,"addr":"http://127.0.0.1:1"}"#,
    )
    .await;
    let user = follow(&etcd, "user").await;
    assert_eq!(ids(&user.snapshot()), ["go", "ok"]);
    assert_eq!(user.health().malformed, 1);

    // A valid entry turning malformed later is skipped too; the rest stays.
    put(&etcd, "/muster/services/user/ok", b"\xff\xfe").await;
    put(&etcd, "/muster/services/user/deep/er", b"{}").await;
    user.wait_for(DEADLINE, |s| s.get("ok").is_none())
        .await
        .unwrap();
    assert_eq!(ids(&user.snapshot()), ["go"]);
    eventually("both are counted", || async {
        user.health().malformed == 3
    })
    .await;
}

async fn bad_input_gets_a_clear_error(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let registrar = start_registrar(&etcd, 30).await;
    let cases = [
        Instance::new("us/er", "a", "x:1"),
        Instance::new("user", "", "x:1"),
        Instance::new("user", "a", " "),
        Instance::new("user", "a", "x:1").with_weight(0),
        Instance::new("user", "a", "x:1").with_metadata("big", "x".repeat(70_000)),
    ];
    for bad in cases {
        let err = registrar.register(bad.clone()).await.unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{bad:?}: {err}");
    }
    let discovery = Discovery::new(etcd.clone());
    assert!(matches!(
        discovery.service("a/b").await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        discovery.service("").await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        Registrar::start(
            etcd.clone(),
            RegistrarConfig::default().with_prefix("no-slash")
        )
        .await,
        Err(Error::Invalid { .. })
    ));

    // The same id held by another live instance.
    let a = Instance::new("user", "a", "http://127.0.0.1:1");
    registrar.register(a.clone()).await.unwrap();
    let other = start_registrar(&etcd, 30).await;
    let err = other.register(a.clone()).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyRegistered { .. }), "{err}");
    assert!(err.to_string().contains("user/a"), "{err}");
    assert!(matches!(
        other.deregister("user", "a").await,
        Err(Error::NotRegistered { .. })
    ));
    // Nothing was lost: the first holder still has it.
    let RegistrarState::Registered { lease } = registrar.state() else {
        panic!()
    };
    assert_eq!(
        get(&etcd, "/muster/services/user/a").await.unwrap().lease,
        lease
    );
}

#[tokio::test]
async fn a_registry_that_is_down_gets_a_clear_error() {
    muster_testkit::require_etcd();
    let etcd = client(&dead_endpoint());
    // Without a wait, at once, with the outage's own error.
    let err = Registrar::start(etcd.clone(), rconfig(5).with_wait(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(_) | Error::Timeout(_)),
        "{err}"
    );
    // With one, after retrying for it, saying so and why.
    let err = Registrar::start(
        etcd.clone(),
        rconfig(5).with_wait(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    let Error::Outage { waited, last } = &err else {
        panic!("expected an outage error, got {err}");
    };
    assert!(*waited <= Duration::from_millis(500), "{err}");
    assert!(
        matches!(**last, Error::Unavailable(_) | Error::Timeout(_)),
        "{err}"
    );
    assert!(err.to_string().contains("stayed unavailable"), "{err}");
    assert!(err.is_transient(), "{err}");
    let err = Discovery::new(etcd).service("user").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

/// The value of `muster_faults_injected_total{fault="NAME"}` in `metrics`.
fn injected(metrics: &str, fault: &str) -> f64 {
    let prefix = format!("muster_faults_injected_total{{fault=\"{fault}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Samples `service`'s table every millisecond until the returned flag is
/// set, failing if a table ever lacks `id`; the task answers how many
/// tables it looked at.
fn always_listed(
    service: &muster::discovery::Service,
    id: &'static str,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<u64>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (service, stop) = (service.clone(), stop.clone());
        async move {
            let mut looked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let snapshot = service.snapshot();
                assert!(
                    snapshot.get(id).is_some(),
                    "a table without the live instance {id}: {:?}",
                    ids(&snapshot)
                );
                looked += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            looked
        }
    });
    (stop, sampler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_rides_out_dropped_watches_and_compaction() {
    let faults = "drop-watch=20/s,compact=200ms,seed=11".parse().unwrap();
    let node = muster_testkit::EmbeddedNode::start_with_faults(faults).unwrap();
    let etcd = client(&node.endpoint());
    let stable = Instance::new("user", "stable", "http://127.0.0.1:1");
    let registrar = registered(&etcd, 5, [stable]).await;
    let user = follow(&etcd, "user").await;

    // Every table a caller could pick from while the registry misbehaves
    // still holds the instance that never left.
    let (stop, sampler) = always_listed(&user, "stable");
    // Churn until the faults have acted several times during it.
    let started = Instant::now();
    let mut last = 0;
    loop {
        registrar
            .register(Instance::new(
                "user",
                format!("c{last}"),
                "http://127.0.0.1:2",
            ))
            .await
            .unwrap();
        if last > 0 {
            registrar
                .deregister("user", &format!("c{}", last - 1))
                .await
                .unwrap();
        }
        let m = node.metrics();
        if last >= 40 && injected(&m, "drop-watch") >= 5.0 && injected(&m, "compact") >= 3.0 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the faults did not act");
        last += 1;
    }
    let want = vec![format!("c{last}"), "stable".to_string()];
    eventually("the table converges to the registry", || async {
        ids(&user.snapshot()) == want
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(sampler.await.unwrap() > 0);
    // Still following: a change after the churn arrives.
    registrar
        .deregister("user", &format!("c{last}"))
        .await
        .unwrap();
    eventually("a later change arrives", || async {
        ids(&user.snapshot()) == ["stable"]
    })
    .await;
}

/// The lease TTL of the instances that die in
/// [`a_dead_instance_leaves_every_table_within_a_ttl_of_its_expiry`].
const DYING_TTL: i64 = 2;
/// What "one watch round trip" is allowed to take on a loaded 2-core
/// machine, on top of the bound.
const ROUND_TRIP_ALLOWANCE: Duration = Duration::from_secs(1);

/// Issue 16's discovery guarantee under faults: an instance whose lease
/// nobody keeps alive leaves every caller's table no later than one TTL
/// after its lease expired (plus one watch round trip), while the instance
/// that stays registered is never missing from any table.
async fn dead_instances_leave_within_a_ttl_of_expiry(node: &dyn Registry, faulty: bool) {
    let etcd = client(&node.endpoint());
    let stable = Instance::new("user", "stable", "http://127.0.0.1:1");
    let _registrar = registered(&etcd, DYING_TTL as u64, [stable]).await;
    let user = follow(&etcd, "user").await;
    let (stop, sampler) = always_listed(&user, "stable");
    for round in 0..3 {
        // A registration whose owner died at once: a lease granted and
        // never kept alive, the key attached to it.
        let id = format!("dead{round}");
        let dead = Instance::new("user", id.as_str(), "http://127.0.0.1:3");
        let lease = etcd.lease_grant(DYING_TTL).await.unwrap().id;
        // The registry started the lease's clock before this instant: it
        // expires by `granted + TTL`.
        let granted = Instant::now();
        etcd.put(muster_proto::PutRequest {
            key: dead.key(muster::instance::DEFAULT_PREFIX).into_bytes(),
            value: dead.encode().unwrap(),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
        user.wait_for(DEADLINE, |s| s.get(&id).is_some())
            .await
            .expect("the instance is listed");
        let bound = Duration::from_secs(2 * DYING_TTL as u64) + ROUND_TRIP_ALLOWANCE;
        let left = user
            .wait_for(bound.saturating_sub(granted.elapsed()), |s| {
                s.get(&id).is_none()
            })
            .await;
        assert!(
            left.is_ok(),
            "{id} still listed {:?} after its lease was granted (TTL {DYING_TTL}s): {:?}",
            granted.elapsed(),
            ids(&user.snapshot())
        );
    }
    if faulty {
        let m = node.metrics();
        assert!(
            injected(&m, "drop-watch") >= 1.0 && injected(&m, "compact") >= 1.0,
            "the faults did not act: {m}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(sampler.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_leaves_every_table_within_a_ttl_of_its_expiry() {
    muster_testkit::require_etcd();
    let etcd = muster_testkit::EtcdNode::start().unwrap();
    dead_instances_leave_within_a_ttl_of_expiry(&etcd, false).await;
    drop(etcd);
    // The embedded registry, misbehaving: watch streams dropped, history
    // compacted under the watchers, every request delayed.
    let faults = "drop-watch=5/s,compact=500ms,latency=2ms±2ms,seed=16"
        .parse()
        .unwrap();
    let node = muster_testkit::EmbeddedNode::start_with_faults(faults).unwrap();
    dead_instances_leave_within_a_ttl_of_expiry(&node, true).await;
}

async fn one_keepalive_stream_and_one_watch_stream_per_process(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let registrar = start_registrar(&etcd, 2).await;
    let discovery = Discovery::new(etcd.clone());
    let mut services = Vec::new();
    for s in 0..5 {
        for i in 0..10 {
            registrar
                .register(Instance::new(
                    format!("svc{s}"),
                    format!("i{i}"),
                    format!("10.0.0.{i}:80"),
                ))
                .await
                .unwrap();
        }
        services.push(discovery.service(&format!("svc{s}")).await.unwrap());
    }
    for s in &services {
        assert_eq!(s.snapshot().len(), 10);
    }
    // Wait for several keep-alive rounds (as etcd counts them), then ask
    // etcd how many streams were opened.
    eventually("several keep-alive rounds", || async {
        node.metric(
            "grpc_server_msg_received_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
        .is_some_and(|n| n >= 5.0)
    })
    .await;
    assert_eq!(etcd.watch_streams_opened(), 1);
    let keepalive_streams = node
        .metric(
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
        .expect("etcd exports grpc_server_started_total");
    assert_eq!(keepalive_streams, 1.0);
    let watch_streams = node
        .metric("grpc_server_started_total", &["grpc_method=\"Watch\""])
        .expect("etcd exports grpc_server_started_total");
    assert_eq!(watch_streams, 1.0);
}

/// A table applies its changes on the watch stream's own task; once the
/// table is dropped its watch must still be cancelled on the registry, and
/// the tables left on the same stream must keep following.
#[tokio::test]
async fn a_dropped_table_cancels_its_watch_and_the_others_keep_following() {
    let node = muster_testkit::EmbeddedNode::start().unwrap();
    let watchers = || {
        muster_testkit::metric_value(&node.metrics(), "muster_registry_watchers", &[])
            .unwrap_or(-1.0)
    };
    // The registrar's own watchers (of its keys) come first.
    let etcd = client(&node.endpoint());
    let registrar = registered(&etcd, 5, [Instance::new("user", "a", "http://127.0.0.1:1")]).await;
    eventually("the registrar's watch", || async { watchers() >= 1.0 }).await;
    let others = client(&node.endpoint());
    let base = watchers();
    let kept = follow(&others, "user").await;
    let dropped = follow(&others, "user").await;
    eventually("two more watchers on the registry", || async {
        watchers() == base + 2.0
    })
    .await;
    drop(dropped);
    eventually("the dropped table's watch cancelled", || async {
        watchers() == base + 1.0
    })
    .await;
    registrar
        .register(Instance::new("user", "b", "http://127.0.0.1:2"))
        .await
        .unwrap();
    eventually("the kept table sees the change", || async {
        kept.snapshot().len() == 2
    })
    .await;
}

async fn fails_over_to_the_next_endpoint(node: Box<dyn Registry>) {
    let etcd = muster::Etcd::connect(config(vec![dead_endpoint(), node.endpoint()])).unwrap();
    let a = Instance::new("user", "a", "http://127.0.0.1:1");
    let _registrar = registered(&etcd, 5, [a]).await;
    let user = follow(&etcd, "user").await;
    assert_eq!(user.snapshot().len(), 1);
    assert_eq!(etcd.current_endpoint(), node.endpoint());
}

#[tokio::test]
async fn authenticates_and_refreshes_an_expired_token() {
    muster_testkit::require_etcd();
    if !muster_testkit::etcd_available() {
        return;
    }
    init_tracing();
    let node = muster_testkit::EtcdNode::start_with(muster_testkit::EtcdOptions {
        extra_args: vec!["--auth-token-ttl=1".into()],
        ..Default::default()
    })
    .unwrap();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = node.etcdctl(args).unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrong =
        muster::Etcd::connect(config(vec![node.endpoint()]).with_credentials("root", "nope"))
            .unwrap();
    let err = Registrar::start(wrong, rconfig(5)).await.unwrap_err();
    assert!(matches!(err, Error::AuthFailed(_)), "{err}");

    let etcd =
        muster::Etcd::connect(config(vec![node.endpoint()]).with_credentials("root", "rootpw"))
            .unwrap();
    let a = Instance::new("user", "a", "http://127.0.0.1:1");
    let registrar = registered(&etcd, 5, [a]).await;
    let user = follow(&etcd, "user").await;
    assert_eq!(user.snapshot().len(), 1);
    // Outlive the 1 s token: calls keep working because the token is refreshed.
    let mut state = registrar.subscribe();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert!(get(&etcd, "/muster/services/user/a").await.is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    registrar
        .register(Instance::new("user", "b", "http://127.0.0.1:2"))
        .await
        .unwrap();
    user.wait_for(DEADLINE, |s| s.len() == 2).await.unwrap();
    assert!(matches!(
        *state.borrow_and_update(),
        RegistrarState::Registered { .. }
    ));
}

#[tokio::test]
async fn survives_losing_the_cluster_member_it_talks_to() {
    init_tracing();
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    let mut cluster = muster_testkit::EtcdCluster::start(3).expect("cluster");
    let etcd = muster::Etcd::connect(config(cluster.endpoints())).unwrap();
    let a = Instance::new("user", "a", "http://127.0.0.1:1");
    let registrar = registered(&etcd, 2, [a]).await;
    let user = follow(&etcd, "user").await;
    assert_eq!(ids(&user.snapshot()), ["a"]);

    let current = etcd.current_endpoint();
    let member = cluster
        .endpoints()
        .iter()
        .position(|e| *e == current)
        .expect("the current endpoint is a member");
    cluster.kill_member(member);

    // Registering goes through another member once the client fails over.
    let b = Instance::new("user", "b", "http://127.0.0.1:2");
    eventually("a registration through the surviving members", || {
        let registrar = &registrar;
        let b = b.clone();
        async move { registrar.register(b).await.is_ok() }
    })
    .await;
    user.wait_for(DEADLINE, |s| s.get("b").is_some())
        .await
        .expect("discovery follows through another member");
    assert_ne!(etcd.current_endpoint(), current);
    // The first registration lived through the failover (or was restored).
    eventually("both registered, registrar healthy", || async {
        matches!(registrar.state(), RegistrarState::Registered { .. })
            && get(&etcd, "/muster/services/user/a").await.is_some()
    })
    .await;
    assert_eq!(ids(&user.snapshot()), ["a", "b"]);
}

muster_testkit::on_both!(
    registration_is_discovered_and_changes_propagate,
    keepalive_holds_an_instance_past_many_ttls,
    a_crashed_instance_disappears_after_its_ttl,
    graceful_shutdown_drains_then_removes_at_once,
    registry_killed_past_the_ttl_then_restarted_registration_comes_back,
    registry_wiped_registrations_come_back,
    a_registration_during_an_outage_waits_and_lands_when_the_registry_returns,
    compaction_while_a_watcher_was_disconnected_relists_without_missing_a_change,
    a_key_deleted_from_outside_is_restored,
    a_malformed_value_is_skipped_and_counted,
    bad_input_gets_a_clear_error,
    one_keepalive_stream_and_one_watch_stream_per_process,
    fails_over_to_the_next_endpoint,
);
