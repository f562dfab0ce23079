//! The shared watch stream and discovery under load: slow watchers catch up
//! from history in order, large services are listed in pages, and lagging
//! subscribers get a fresh reset instead of a hole.

use crate::common;

use std::time::Duration;

use common::*;
use muster::client::{WatchEvent, WatchOptions};
use muster::discovery::Update;
use muster::{DiscoveryConfig, Instance};
use muster_testkit::Registry;

async fn a_slow_watcher_catches_up_in_order_without_blocking_others(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    // Both watchers start at a known revision, so each sees this first put
    // however long their creation takes on the server.
    let ready = etcd
        .put(muster_proto::PutRequest {
            key: b"/load/ready".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    let from = || WatchOptions::prefix("/load/").from_revision(ready);
    let mut slow = etcd.watch(from()).await.unwrap();
    let mut fast = etcd.watch(from()).await.unwrap();
    for w in [&mut slow, &mut fast] {
        loop {
            match tokio::time::timeout(DEADLINE, w.next()).await.unwrap() {
                Some(WatchEvent::Events { .. }) => break,
                Some(_) => continue,
                None => panic!("watcher ended"),
            }
        }
    }
    // Far more responses than a watcher buffers (256), while `slow` reads none.
    let n = 1500;
    let writer = etcd.clone();
    let writes = tokio::spawn(async move {
        for i in 0..n {
            put(&writer, &format!("/load/{i:05}"), format!("{i}").as_bytes()).await;
        }
    });
    // The fast watcher keeps up while the slow one is stuck.
    let mut fast_seen = 0;
    while fast_seen < n {
        match tokio::time::timeout(DEADLINE, fast.next())
            .await
            .expect("fast watcher progresses")
        {
            Some(WatchEvent::Events { events, .. }) => fast_seen += events.len(),
            Some(_) => {}
            None => panic!("fast watcher ended"),
        }
    }
    writes.await.unwrap();
    // Now the slow one reads everything: all of it, once, in order.
    let mut revs = Vec::new();
    let mut values = Vec::new();
    while values.len() < n {
        match tokio::time::timeout(DEADLINE, slow.next())
            .await
            .expect("slow watcher catches up")
        {
            Some(WatchEvent::Events { events, .. }) => {
                for e in events {
                    let kv = e.kv.unwrap();
                    revs.push(kv.mod_revision);
                    values.push(String::from_utf8(kv.value).unwrap());
                }
            }
            Some(other) => assert!(!other.is_terminal(), "{other:?}"),
            None => panic!("slow watcher ended"),
        }
    }
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(values, expected);
    assert!(
        revs.windows(2).all(|w| w[1] == w[0] + 1),
        "revisions have a gap or repeat"
    );
    assert_eq!(etcd.watch_streams_opened(), 1);
}

async fn a_large_service_is_listed_in_pages_at_one_revision(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    for i in 0..57 {
        let inst = Instance::new("big", format!("i{i:03}"), format!("10.0.0.{i}:80"));
        put_instance(&etcd, &inst).await;
    }
    let config = DiscoveryConfig {
        page_size: 5,
        ..Default::default()
    };
    let big = follow_with(&etcd, config, "big").await;
    let snapshot = big.snapshot();
    assert_eq!(snapshot.len(), 57);
    assert_eq!(snapshot.instances()[0].id, "i000");
    assert_eq!(snapshot.instances()[56].id, "i056");
    // And it follows from the listed revision.
    let inst = Instance::new("big", "i999", "10.0.9.9:80");
    put_instance(&etcd, &inst).await;
    big.wait_for(DEADLINE, |s| s.len() == 58).await.unwrap();
}

async fn a_lagging_subscriber_gets_a_reset_with_the_current_table(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let config = DiscoveryConfig {
        subscriber_buffer: 4,
        ..Default::default()
    };
    let svc = follow_with(&etcd, config, "lag").await;
    let mut updates = svc.updates();
    assert!(matches!(updates.next().await, Some(Update::Reset(s)) if s.is_empty()));
    // One update per put (waiting for each: a busy registry may otherwise
    // deliver several puts in one watch response, one update), far more
    // than the subscriber's buffer of 4.
    for i in 0..20 {
        let inst = Instance::new("lag", format!("i{i:02}"), "10.0.0.1:80");
        put_instance(&etcd, &inst).await;
        svc.wait_for(DEADLINE, |s| s.len() == i + 1).await.unwrap();
    }
    // Too far behind to be told each change: it gets the whole table.
    match tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .unwrap()
    {
        Some(Update::Reset(s)) => assert_eq!(s.len(), 20),
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// A deletion at exactly the compact revision is gone from history (etcd
/// drops a tombstone at the compact revision), and etcd serves a watch from
/// that revision without a word about it. The library asks one revision
/// early, so a watcher resuming there hears of the compaction instead of
/// silently missing the deletion; and a watch from just after it is
/// served, without the revision it asked to skip.
async fn a_watch_from_a_compacted_deletion_is_told_of_the_compaction(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    put(&etcd, "/cut/k", b"v").await;
    let deleted = etcd
        .delete_range(muster_proto::DeleteRangeRequest {
            key: b"/cut/k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    etcd.compact(deleted, true).await.unwrap();

    let mut cut = etcd
        .watch(WatchOptions::prefix("/cut/").from_revision(deleted))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(DEADLINE, cut.next()).await.unwrap() {
            Some(WatchEvent::Compacted { compact_revision }) => {
                assert_eq!(compact_revision, deleted);
                break;
            }
            Some(WatchEvent::Events { events, .. }) => {
                panic!("events instead of the compaction: {events:?}")
            }
            Some(other) => assert!(!other.is_terminal(), "{other:?}"),
            None => panic!("watcher ended without a word"),
        }
    }

    // From the next revision: served, and the first event is the next write.
    let mut next = etcd
        .watch(WatchOptions::prefix("/cut/").from_revision(deleted + 1))
        .await
        .unwrap();
    put(&etcd, "/cut/later", b"x").await;
    loop {
        match tokio::time::timeout(DEADLINE, next.next()).await.unwrap() {
            Some(WatchEvent::Events { events, .. }) => {
                let kv = events[0].kv.as_ref().unwrap();
                assert_eq!(kv.key, b"/cut/later");
                break;
            }
            Some(other) => assert!(!other.is_terminal(), "{other:?}"),
            None => panic!("watcher ended"),
        }
    }
}

muster_testkit::on_both!(
    a_watch_from_a_compacted_deletion_is_told_of_the_compaction,
    a_slow_watcher_catches_up_in_order_without_blocking_others,
    a_large_service_is_listed_in_pages_at_one_revision,
    a_lagging_subscriber_gets_a_reset_with_the_current_table,
);
