//! Tests of the hub's progress answers and key handling.

use std::time::Duration;

use muster_proto::{EventType, KeyValue};

use super::*;

/// A store's history: events by revision.
struct Events(Vec<Event>);

impl History for Events {
    fn events(&self, from: i64, to: i64, key: &[u8], range_end: &[u8]) -> Result<Vec<Event>, i64> {
        Ok(self
            .0
            .iter()
            .filter(|e| {
                let kv = e.kv.as_ref().unwrap();
                (from..=to).contains(&kv.mod_revision) && in_range(&kv.key, key, range_end)
            })
            .cloned()
            .collect())
    }
}

fn put(key: &[u8], rev: i64) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            value: b"v".to_vec(),
            lease: 0,
        }),
        prev_kv: None,
    }
}

const HEADER: HeaderInfo = HeaderInfo {
    cluster_id: 1,
    member_id: 2,
};

/// A hub at `revision` over `history` (keep the `Arc` alive).
fn hub(revision: i64, history: Vec<Event>) -> (Arc<WatchHub>, Arc<dyn History>) {
    let hub = WatchHub::new(HEADER, revision);
    let history: Arc<dyn History> = Arc::new(Events(history));
    hub.set_history(Arc::downgrade(&history));
    (hub, history)
}

fn request(key: &[u8], range_end: &[u8], start_revision: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.to_vec(),
        range_end: range_end.to_vec(),
        start_revision,
        ..Default::default()
    }
}

/// Waits (on the progress signal) until `stream` could answer a progress
/// request reaching `at_least`; the revision it would answer with.
async fn progress_ready(hub: &WatchHub, stream: u64, at_least: i64) -> i64 {
    let mut signal = hub.progress_signal();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(rev) = hub.progress(stream, at_least) {
                return rev;
            }
            signal.changed().await.unwrap();
        }
    })
    .await
    .expect("the stream's watchers catch up")
}

#[tokio::test]
async fn a_progress_answer_waits_for_the_streams_watchers_to_catch_up() {
    let history: Vec<Event> = (1..=5).map(|rev| put(b"k", rev)).collect();
    let (hub, _history) = hub(5, history);
    let (tx, mut rx) = mpsc::channel(16);
    let stream = hub.new_stream();
    // Without watchers: at once, at the dispatched revision.
    assert_eq!(hub.progress(stream, 0), Some(5));
    // A watcher from revision 1 is not current until it has its history.
    hub.register((stream, 0), &request(b"k", b"", 1), tx, 5)
        .unwrap();
    assert_eq!(hub.progress(stream, 0), None);
    hub.start((stream, 0));
    assert_eq!(progress_ready(&hub, stream, 0).await, 5);
    // By then the history is in the stream, ahead of any answer.
    let history = rx.try_recv().expect("the history was sent first");
    assert_eq!(history.events.len(), 5);
    // A request made when revision 6 was committed waits for its dispatch.
    assert_eq!(hub.progress(stream, 6), None);
    hub.dispatch(6, &[put(b"other", 6)]);
    assert_eq!(progress_ready(&hub, stream, 6).await, 6);
    // Another stream's watchers do not hold this one up.
    let (tx2, _rx2) = mpsc::channel(16);
    let other = hub.new_stream();
    hub.register((other, 0), &request(b"k", b"", 1), tx2, 6)
        .unwrap();
    assert_eq!(hub.progress(stream, 0), Some(6));
    assert_eq!(hub.progress(other, 0), None);
    // Nor does a watcher removed while catching up.
    assert!(hub.cancel((other, 0)));
    assert_eq!(hub.progress(other, 0), Some(6));
}

#[tokio::test]
async fn an_empty_key_watches_the_smallest_key() {
    let (hub, _history) = hub(1, Vec::new());
    let (tx, mut rx) = mpsc::channel(16);
    let stream = hub.new_stream();
    hub.register((stream, 0), &request(b"", b"", 0), tx, 1)
        .unwrap();
    hub.start((stream, 0));
    progress_ready(&hub, stream, 0).await;
    hub.dispatch(2, &[put(b"\0", 2)]);
    let resp = rx.try_recv().expect("the event of key \\0");
    assert_eq!(resp.events[0].kv.as_ref().unwrap().key, b"\0");
}

#[tokio::test]
async fn progress_notifications_skip_the_tick_after_events() {
    let (hub, _history) = hub(1, Vec::new());
    let (tx, _rx) = mpsc::channel(16);
    let stream = hub.new_stream();
    for (id, progress_notify) in [(0, true), (1, false)] {
        let req = WatchCreateRequest {
            progress_notify,
            ..request(b"k", b"", 0)
        };
        hub.register((stream, id), &req, tx.clone(), 1).unwrap();
        hub.start((stream, id));
    }
    progress_ready(&hub, stream, 0).await;
    assert_eq!(hub.progress_notify_targets(stream), (1, vec![0]));
    assert_eq!(hub.progress_notify_targets(stream), (1, vec![0]));
    // As etcd's: events since the last tick stand in for this one.
    hub.dispatch(2, &[put(b"k", 2)]);
    assert_eq!(hub.progress_notify_targets(stream), (2, vec![]));
    assert_eq!(hub.progress_notify_targets(stream), (2, vec![0]));
}
