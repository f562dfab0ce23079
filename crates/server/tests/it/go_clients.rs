//! The etcd v3 features the Go registries muster must interoperate with
//! rely on (etcd's `naming/endpoints`, kratos `contrib/registry/etcd`,
//! go-zero `core/discov`, go-micro `registry/etcd`), each checked at the
//! gRPC level with the same body against a real etcd 3.4 and the embedded
//! server (`muster_testkit::on_both!`): the bodies assert etcd's answers
//! exactly (revisions, key-values, watch ids, flags, error codes and
//! messages).
//!
//! - Watch `prev_kv` on puts and deletes, deletes by lease revoke and
//!   expiry, several ops of one txn, and history catch-up from an old
//!   revision (go-micro decodes deletes from `prev_kv`; the naming
//!   resolvers watch with it).
//! - Watch filters NOPUT and NODELETE, alone, together and with `prev_kv`.
//! - Progress: the `WatchProgressRequest` kratos sends right after creating
//!   its watch, and `progress_notify` watches.
//! - The require-leader metadata (`hasleader: true`, clientv3's
//!   `WithRequireLeader`, which go-zero and clientv3's keep-alive send).
//! - Serializable ranges, `keys_only`, `count_only`, `limit` and `more`,
//!   sorting, on prefix ranges.
//! - The compacted-revision answers of Range and Watch, and the re-list and
//!   re-watch the Go clients do after one (the plain error cases are also
//!   in the differential tests; these follow the clients' flow).
//! - The ranges the clients watch: a prefix without a trailing slash
//!   (kratos), with one (go-zero), from-key, everything, the empty key.
//!
//! Negative checks ("this watcher got nothing") wait for a sentinel: a
//! later write that a watcher of the same stream sees. etcd delivers the
//! events of one stream in revision order, so whatever a watcher got for
//! earlier revisions has arrived by then. No test sleeps.

use std::collections::BTreeMap;
use std::time::Duration;

use muster_proto as pb;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use pb::watch_create_request::FilterType;
use pb::watch_request::RequestUnion;
use pb::{Event, EventType, KeyValue};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use muster_testkit::{DEADLINE, Registry};

muster_testkit::on_both!(
    watch_prev_kv_on_puts_and_deletes,
    watch_prev_kv_on_lease_revoke_and_expiry,
    watch_prev_kv_on_every_op_of_a_txn,
    watch_prev_kv_when_catching_up_from_an_old_revision,
    watch_filters_noput_and_nodelete,
    watch_filters_when_catching_up,
    progress_request_right_after_create_answers_at_the_current_revision,
    progress_request_while_a_watcher_catches_up,
    require_leader_metadata_is_served_with_a_leader,
    range_options_on_a_prefix,
    compacted_revision_answers_and_the_clients_recovery,
    watch_ranges_the_go_clients_use,
);

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

async fn connect(r: &dyn Registry) -> Channel {
    connect_to(&r.endpoint()).await
}

async fn connect_to(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"))
}

/// clientv3's `WithRequireLeader`: metadata `hasleader: true`.
fn require_leader<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("hasleader", "true".parse().expect("metadata value"));
    req
}

/// A key-value as etcd stores it.
fn kval(key: &str, value: &str, create: i64, modified: i64, version: i64, lease: i64) -> KeyValue {
    KeyValue {
        key: b(key),
        create_revision: create,
        mod_revision: modified,
        version,
        value: b(value),
        lease,
    }
}

fn put_event(kv: KeyValue, prev: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(kv),
        prev_kv: prev,
    }
}

/// A delete event: etcd's carries the key and the delete's revision only.
fn delete_event(key: &str, revision: i64, prev: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key: b(key),
            mod_revision: revision,
            ..Default::default()
        }),
        prev_kv: prev,
    }
}

/// `events` without their `prev_kv` (what a watcher without it gets).
fn without_prev(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .map(|e| Event {
            prev_kv: None,
            ..e.clone()
        })
        .collect()
}

fn watch_req(key: &str, range_end: &[u8]) -> pb::WatchCreateRequest {
    pb::WatchCreateRequest {
        key: b(key),
        range_end: range_end.to_vec(),
        ..Default::default()
    }
}

/// clientv3's `WithPrefix`.
fn prefix(key: &str) -> pb::WatchCreateRequest {
    watch_req(key, &pb::prefix_range_end(key.as_bytes()))
}

fn create(req: pb::WatchCreateRequest) -> RequestUnion {
    RequestUnion::CreateRequest(req)
}

fn progress() -> RequestUnion {
    RequestUnion::ProgressRequest(pb::WatchProgressRequest {})
}

/// The header revision of a watch response.
fn rev(r: &pb::WatchResponse) -> i64 {
    r.header.as_ref().map_or(-1, |h| h.revision)
}

/// An answer to a progress request: watch id -1, header only.
fn is_progress(r: &pb::WatchResponse) -> bool {
    r.watch_id == -1
        && !r.created
        && !r.canceled
        && r.events.is_empty()
        && r.compact_revision == 0
        && r.cancel_reason.is_empty()
}

/// One watch stream (gRPC `Watch` call).
struct Stream {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: tonic::Streaming<pb::WatchResponse>,
}

impl Stream {
    /// Opens a stream with `first` queued (etcd answers the call once a
    /// request is in); with `leader`, under the require-leader metadata.
    async fn open(channel: &Channel, first: Vec<RequestUnion>, leader: bool) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        for r in first {
            tx.send(pb::WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("queue a watch request");
        }
        let mut client = WatchClient::new(channel.clone());
        let rx = ReceiverStream::new(rx);
        let rx = if leader {
            client.watch(require_leader(rx)).await
        } else {
            client.watch(rx).await
        }
        .expect("watch call")
        .into_inner();
        Stream { tx, rx }
    }

    /// A stream with one watch created: the stream and the watch id.
    async fn with_watch(channel: &Channel, req: pb::WatchCreateRequest) -> (Stream, i64) {
        let mut s = Stream::open(channel, vec![create(req)], false).await;
        let id = s.created().await;
        (s, id)
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(pb::WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("watch stream open");
    }

    /// The next response, within [`DEADLINE`].
    async fn next(&mut self) -> pb::WatchResponse {
        match tokio::time::timeout(DEADLINE, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("the watch stream ended"),
            Ok(Err(s)) => panic!("the watch stream failed: {s}"),
            Err(_) => panic!("no watch response within {DEADLINE:?}"),
        }
    }

    /// Reads a `created` answer; its watch id.
    async fn created(&mut self) -> i64 {
        let r = self.next().await;
        assert!(r.created && !r.canceled, "expected a created answer: {r:?}");
        r.watch_id
    }

    /// Creates a watch on this stream; its id.
    async fn watch(&mut self, req: pb::WatchCreateRequest) -> i64 {
        self.send(create(req)).await;
        self.created().await
    }

    /// Responses until `done` says the last one read completes the set.
    async fn until(
        &mut self,
        mut done: impl FnMut(&[pb::WatchResponse]) -> bool,
    ) -> Vec<pb::WatchResponse> {
        let mut got = Vec::new();
        while !done(&got) {
            got.push(self.next().await);
        }
        got
    }

    /// The next `n` responses, grouped by watch id (etcd serves the
    /// watchers of one revision in no defined order).
    async fn by_watch(&mut self, n: usize) -> BTreeMap<i64, Vec<pb::WatchResponse>> {
        let mut out: BTreeMap<i64, Vec<pb::WatchResponse>> = BTreeMap::new();
        for _ in 0..n {
            let r = self.next().await;
            out.entry(r.watch_id).or_default().push(r);
        }
        out
    }
}

/// An event response: the header revision and the events.
fn events_of(r: &pb::WatchResponse) -> (i64, Vec<Event>) {
    assert!(
        !r.created && !r.canceled && r.compact_revision == 0,
        "expected events: {r:?}"
    );
    (rev(r), r.events.clone())
}

struct Kv(KvClient<Channel>);

impl Kv {
    fn new(channel: &Channel) -> Kv {
        Kv(KvClient::new(channel.clone()))
    }

    async fn put_with_lease(&mut self, key: &str, value: &str, lease: i64) -> i64 {
        let r = self
            .0
            .put(pb::PutRequest {
                key: b(key),
                value: b(value),
                lease,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"))
            .into_inner();
        r.header.unwrap().revision
    }

    /// Puts `key`; the revision of the write.
    async fn put(&mut self, key: &str, value: &str) -> i64 {
        self.put_with_lease(key, value, 0).await
    }

    /// Deletes `[key, range_end)`; the revision.
    async fn delete(&mut self, key: &str, range_end: &[u8]) -> i64 {
        let r = self
            .0
            .delete_range(pb::DeleteRangeRequest {
                key: b(key),
                range_end: range_end.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("delete {key}: {e}"))
            .into_inner();
        r.header.unwrap().revision
    }

    async fn txn(&mut self, success: Vec<pb::request_op::Request>) -> i64 {
        let r = self
            .0
            .txn(pb::TxnRequest {
                compare: Vec::new(),
                success: success
                    .into_iter()
                    .map(|r| pb::RequestOp { request: Some(r) })
                    .collect(),
                failure: Vec::new(),
            })
            .await
            .expect("txn")
            .into_inner();
        assert!(r.succeeded);
        r.header.unwrap().revision
    }

    async fn range(&mut self, req: pb::RangeRequest) -> Result<pb::RangeResponse, tonic::Status> {
        self.0.range(req).await.map(tonic::Response::into_inner)
    }

    async fn compact(&mut self, revision: i64) {
        self.0
            .compact(pb::CompactionRequest {
                revision,
                physical: false,
            })
            .await
            .expect("compact");
    }
}

fn op_put(key: &str, value: &str) -> pb::request_op::Request {
    pb::request_op::Request::RequestPut(pb::PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    })
}

fn op_delete(key: &str, range_end: &[u8]) -> pb::request_op::Request {
    pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
        key: b(key),
        range_end: range_end.to_vec(),
        ..Default::default()
    })
}

async fn grant(channel: &Channel, ttl: i64) -> i64 {
    let r = LeaseClient::new(channel.clone())
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("lease grant")
        .into_inner();
    assert!(r.error.is_empty(), "{r:?}");
    r.id
}

// ---------------------------------------------------------------------------
// 1. prev_kv.
// ---------------------------------------------------------------------------

/// go-micro's watcher and etcd's naming resolvers watch their prefix with
/// `prev_kv`: an update carries the value it replaced, a delete the value
/// it removed (the only way to know what was deregistered); a creation,
/// even after a delete, carries none. A watcher without `prev_kv` on the
/// same stream gets the same events without it.
async fn watch_prev_kv_on_puts_and_deletes(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let (mut s, with) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    let without = s.watch(prefix("svc/")).await;

    let r1 = kv.put("svc/a", "1").await;
    let r2 = kv.put("svc/a", "2").await;
    let r3 = kv.delete("svc/a", b"").await;
    let r4 = kv.put("svc/a", "3").await;
    let a1 = kval("svc/a", "1", r1, r1, 1, 0);
    let a2 = kval("svc/a", "2", r1, r2, 2, 0);
    let expected = [
        (r1, put_event(a1.clone(), None)),
        (r2, put_event(a2.clone(), Some(a1))),
        (r3, delete_event("svc/a", r3, Some(a2))),
        (r4, put_event(kval("svc/a", "3", r4, r4, 1, 0), None)),
    ];
    let got = s.by_watch(8).await;
    for (id, prev_kv) in [(with, true), (without, false)] {
        let got: Vec<(i64, Vec<Event>)> = got[&id].iter().map(events_of).collect();
        let want: Vec<(i64, Vec<Event>)> = expected
            .iter()
            .map(|(rev, e)| {
                let e = if prev_kv {
                    vec![e.clone()]
                } else {
                    without_prev(std::slice::from_ref(e))
                };
                (*rev, e)
            })
            .collect();
        assert_eq!(got, want, "{}: watcher with prev_kv={prev_kv}", r.name());
    }
}

/// A registration's keys vanish with its lease: revoked (go-zero's and
/// kratos's deregistration) or expired (a crashed instance). The deletes
/// come in one revision, in key order, each with the removed key-value
/// and its lease.
async fn watch_prev_kv_on_lease_revoke_and_expiry(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let long = grant(&ch, 60).await;
    let ra = kv.put_with_lease("svc/a", "A", long).await;
    let rb = kv.put_with_lease("svc/b", "B", long).await;
    let (mut s, id) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;

    let revoked = LeaseClient::new(ch.clone())
        .lease_revoke(pb::LeaseRevokeRequest { id: long })
        .await
        .expect("revoke")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let resp = s.next().await;
    assert_eq!(resp.watch_id, id);
    assert_eq!(
        events_of(&resp),
        (
            revoked,
            vec![
                delete_event("svc/a", revoked, Some(kval("svc/a", "A", ra, ra, 1, long))),
                delete_event("svc/b", revoked, Some(kval("svc/b", "B", rb, rb, 1, long))),
            ]
        ),
        "{}",
        r.name()
    );

    // Expiry: the server revokes the lease itself.
    let short = grant(&ch, 1).await;
    let rc = kv.put_with_lease("svc/c", "C", short).await;
    let c = kval("svc/c", "C", rc, rc, 1, short);
    assert_eq!(
        events_of(&s.next().await),
        (rc, vec![put_event(c.clone(), None)])
    );
    // Within DEADLINE: the TTL is 1 s.
    let expired = s.next().await;
    assert_eq!(
        events_of(&expired),
        (rc + 1, vec![delete_event("svc/c", rc + 1, Some(c))]),
        "{}",
        r.name()
    );
}

/// A txn's ops reach a watcher as one response at the txn's revision, in
/// the txn's order, each with its own `prev_kv`; a range delete's events
/// come in key order.
async fn watch_prev_kv_on_every_op_of_a_txn(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let ra = kv.put("svc/a", "1").await;
    let rb = kv.put("svc/b", "1").await;
    let (mut s, _) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    let rt = kv
        .txn(vec![
            op_put("svc/a", "2"),
            op_delete("svc/b", b""),
            op_put("svc/c", "1"),
            op_put("other", "x"),
        ])
        .await;
    let a2 = kval("svc/a", "2", ra, rt, 2, 0);
    let c1 = kval("svc/c", "1", rt, rt, 1, 0);
    assert_eq!(
        events_of(&s.next().await),
        (
            rt,
            vec![
                put_event(a2.clone(), Some(kval("svc/a", "1", ra, ra, 1, 0))),
                delete_event("svc/b", rt, Some(kval("svc/b", "1", rb, rb, 1, 0))),
                put_event(c1.clone(), None),
            ]
        ),
        "{}",
        r.name()
    );
    // One txn deleting the whole prefix.
    let rd = kv
        .txn(vec![op_delete("svc/", &pb::prefix_range_end(b"svc/"))])
        .await;
    assert_eq!(
        events_of(&s.next().await),
        (
            rd,
            vec![
                delete_event("svc/a", rd, Some(a2)),
                delete_event("svc/c", rd, Some(c1)),
            ]
        ),
        "{}",
        r.name()
    );
}

/// A watch from an old revision (etcd's naming resolver resumes from the
/// revision after its list) gets the history in one response stamped with
/// the current revision, with `prev_kv` as for live events, also for a
/// start in the middle of a key's history; live events follow. After a
/// compaction, an update at the compact revision itself has no `prev_kv`
/// (the revision before it is gone), as etcd's.
async fn watch_prev_kv_when_catching_up_from_an_old_revision(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let r1 = kv.put("svc/a", "1").await;
    let r2 = kv.put("svc/a", "2").await;
    let r3 = kv.delete("svc/a", b"").await;
    let r4 = kv.put("svc/b", "1").await;
    let r5 = kv
        .txn(vec![op_put("svc/b", "2"), op_put("svc/c", "1")])
        .await;
    let r6 = kv.put("other", "x").await;
    let a1 = kval("svc/a", "1", r1, r1, 1, 0);
    let a2 = kval("svc/a", "2", r1, r2, 2, 0);
    let b1 = kval("svc/b", "1", r4, r4, 1, 0);
    let b2 = kval("svc/b", "2", r4, r5, 2, 0);
    let c1 = kval("svc/c", "1", r5, r5, 1, 0);
    let history = [
        put_event(a1.clone(), None),
        put_event(a2.clone(), Some(a1.clone())),
        delete_event("svc/a", r3, Some(a2.clone())),
        put_event(b1.clone(), None),
        put_event(b2.clone(), Some(b1.clone())),
        put_event(c1.clone(), None),
    ];
    for (start, skip) in [(r1, 0), (r2, 1)] {
        let (mut s, _) = Stream::with_watch(
            &ch,
            pb::WatchCreateRequest {
                start_revision: start,
                prev_kv: true,
                ..prefix("svc/")
            },
        )
        .await;
        assert_eq!(
            events_of(&s.next().await),
            (r6, history[skip..].to_vec()),
            "{}: from revision {start}",
            r.name()
        );
    }
    // Live after catch-up.
    let (mut s, _) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            start_revision: r4,
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    assert_eq!(events_of(&s.next().await), (r6, history[3..].to_vec()));
    let r7 = kv.put("svc/c", "2").await;
    let c2 = kval("svc/c", "2", r5, r7, 2, 0);
    assert_eq!(
        events_of(&s.next().await),
        (r7, vec![put_event(c2, Some(c1.clone()))])
    );

    // Compacted at r5: the update of b at r5 has no prev_kv any more (the
    // value it replaced, at r4, is compacted away); c's update at r7 does.
    kv.compact(r5).await;
    let (mut s, _) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            start_revision: r5,
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    assert_eq!(
        events_of(&s.next().await),
        (
            r7,
            vec![
                put_event(b2, None),
                put_event(c1.clone(), None),
                put_event(kval("svc/c", "2", r5, r7, 2, 0), Some(c1)),
            ]
        ),
        "{}: from the compact revision",
        r.name()
    );
}

// ---------------------------------------------------------------------------
// 2. Filters.
// ---------------------------------------------------------------------------

/// NOPUT leaves deletes, NODELETE leaves puts, both leave nothing, each
/// with `prev_kv` when asked. Each write below reaches exactly one watcher
/// of the stream, so the order of the stream's responses is etcd's, and
/// the sentinel's event proves the watcher with both filters got nothing.
async fn watch_filters_noput_and_nodelete(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let noput = FilterType::Noput as i32;
    let nodelete = FilterType::Nodelete as i32;
    let (mut s, deletes) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            filters: vec![noput],
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    let puts = s
        .watch(pb::WatchCreateRequest {
            filters: vec![nodelete],
            prev_kv: true,
            ..prefix("svc/")
        })
        .await;
    let nothing = s
        .watch(pb::WatchCreateRequest {
            filters: vec![noput, nodelete],
            prev_kv: true,
            ..prefix("svc/")
        })
        .await;
    let sentinel = s.watch(watch_req("sentinel", b"")).await;

    let r1 = kv.put("svc/a", "1").await;
    let r2 = kv.put("svc/a", "2").await;
    let r3 = kv.delete("svc/a", b"").await;
    let r4 = kv
        .txn(vec![op_put("svc/b", "1"), op_put("svc/c", "1")])
        .await;
    let r5 = kv.delete("svc/", &pb::prefix_range_end(b"svc/")).await;
    let r6 = kv.put("sentinel", "x").await;
    let a1 = kval("svc/a", "1", r1, r1, 1, 0);
    let a2 = kval("svc/a", "2", r1, r2, 2, 0);
    let b1 = kval("svc/b", "1", r4, r4, 1, 0);
    let c1 = kval("svc/c", "1", r4, r4, 1, 0);
    let want = vec![
        (puts, r1, vec![put_event(a1.clone(), None)]),
        (puts, r2, vec![put_event(a2.clone(), Some(a1))]),
        (deletes, r3, vec![delete_event("svc/a", r3, Some(a2))]),
        (
            puts,
            r4,
            vec![put_event(b1.clone(), None), put_event(c1.clone(), None)],
        ),
        (
            deletes,
            r5,
            vec![
                delete_event("svc/b", r5, Some(b1)),
                delete_event("svc/c", r5, Some(c1)),
            ],
        ),
        (
            sentinel,
            r6,
            vec![put_event(kval("sentinel", "x", r6, r6, 1, 0), None)],
        ),
    ];
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let resp = s.next().await;
        let (rev, events) = events_of(&resp);
        got.push((resp.watch_id, rev, events));
    }
    assert_eq!(got, want, "{}", r.name());
    assert!(got.iter().all(|(id, ..)| *id != nothing));
}

/// The filters apply to history too: a NOPUT watch from the first
/// revision replays only the deletes (with `prev_kv`), a NODELETE one only
/// the puts.
async fn watch_filters_when_catching_up(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let r1 = kv.put("svc/a", "1").await;
    let r2 = kv.put("svc/b", "1").await;
    let r3 = kv.delete("svc/a", b"").await;
    let r4 = kv.put("svc/b", "2").await;
    let a1 = kval("svc/a", "1", r1, r1, 1, 0);
    let b1 = kval("svc/b", "1", r2, r2, 1, 0);
    for (filter, want) in [
        (
            FilterType::Noput,
            vec![delete_event("svc/a", r3, Some(a1.clone()))],
        ),
        (
            FilterType::Nodelete,
            vec![
                put_event(a1.clone(), None),
                put_event(b1.clone(), None),
                put_event(kval("svc/b", "2", r2, r4, 2, 0), Some(b1.clone())),
            ],
        ),
    ] {
        let (mut s, _) = Stream::with_watch(
            &ch,
            pb::WatchCreateRequest {
                start_revision: r1,
                filters: vec![filter as i32],
                prev_kv: true,
                ..prefix("svc/")
            },
        )
        .await;
        assert_eq!(
            events_of(&s.next().await),
            (r4, want),
            "{}: {filter:?}",
            r.name()
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Progress.
// ---------------------------------------------------------------------------

/// kratos's watcher sends a progress request right behind the create of its
/// watch (from the current revision), on the same stream. etcd answers the
/// create, then the progress request with a header-only response: watch id
/// -1 (clientv3 broadcasts it to every watcher of the stream) at the
/// current revision. Tried on many fresh streams, since a server that
/// answers only once its watchers are in sync must not miss a watcher that
/// joined a moment ago. Several watchers still get one answer; a stream
/// without watchers gets one too (etcd 3.4).
async fn progress_request_right_after_create_answers_at_the_current_revision(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    kv.put("ns/svc/1", "a").await;
    let current = kv.put("other", "x").await;
    for attempt in 0..20 {
        let mut s = Stream::open(&ch, vec![create(prefix("ns/svc")), progress()], false).await;
        let created = s.next().await;
        assert!(created.created && !created.canceled, "{created:?}");
        assert_eq!((created.watch_id, rev(&created)), (0, current));
        let answer = s.next().await;
        assert!(
            is_progress(&answer) && rev(&answer) == current,
            "{}, attempt {attempt}: expected a progress answer at {current}: {answer:?}",
            r.name()
        );
    }

    // After an event: the answer is at the new revision.
    let mut s = Stream::open(&ch, vec![create(prefix("ns/svc"))], false).await;
    s.created().await;
    let second = s.watch(watch_req("other", b"")).await;
    assert_eq!(second, 1);
    let later = kv.put("ns/svc/2", "b").await;
    let resp = s.next().await;
    assert_eq!((resp.watch_id, rev(&resp)), (0, later));
    s.send(progress()).await;
    let answer = s.next().await;
    assert!(is_progress(&answer) && rev(&answer) == later, "{answer:?}");
    // One answer for the stream, not one per watcher: the next response
    // is the event of the next write.
    let last = kv.put("other", "y").await;
    let resp = s.next().await;
    assert_eq!((resp.watch_id, rev(&resp)), (1, last), "{resp:?}");

    // No watchers at all.
    let mut s = Stream::open(&ch, vec![progress()], false).await;
    let answer = s.next().await;
    assert!(is_progress(&answer) && rev(&answer) == last, "{answer:?}");
}

/// A progress request while a watcher is still catching up from history
/// is answered too, at the current revision, and the history arrives in
/// full. (etcd 3.4.23 answers at once, possibly ahead of the history,
/// which claims progress the watcher has not seen (etcd-io/etcd#15220,
/// fixed in later releases); the embedded server answers once the
/// watchers of the stream are current, behind the history: see
/// `progress_answer_never_overtakes_history` below.)
async fn progress_request_while_a_watcher_catches_up(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let first = kv.put("svc/a", "1").await;
    let mut current = first;
    for i in 0..50 {
        current = kv.put(&format!("svc/{i}"), "x").await;
    }
    let mut s = Stream::open(
        &ch,
        vec![
            create(pb::WatchCreateRequest {
                start_revision: first,
                ..prefix("svc/")
            }),
            progress(),
        ],
        false,
    )
    .await;
    let created = s.next().await;
    assert!(created.created && rev(&created) == current, "{created:?}");
    let got = s
        .until(|got| {
            got.iter().any(is_progress) && got.iter().map(|r| r.events.len()).sum::<usize>() == 51
        })
        .await;
    let answers: Vec<_> = got.iter().filter(|r| is_progress(r)).collect();
    assert_eq!(answers.len(), 1, "{}: {got:?}", r.name());
    assert_eq!(rev(answers[0]), current, "{}", r.name());
    let events: Vec<&pb::WatchResponse> = got.iter().filter(|r| !is_progress(r)).collect();
    assert!(
        events.iter().all(|r| r.watch_id == 0 && rev(r) == current),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. Require-leader metadata.
// ---------------------------------------------------------------------------

/// With `hasleader: true` etcd fails a request only when the member has
/// no leader; a single-node registry always has one, so Range, Put, Txn,
/// LeaseGrant, LeaseKeepAlive (clientv3 always sends its keep-alive stream
/// with this metadata) and Watch (go-zero's watches) all just work.
async fn require_leader_metadata_is_served_with_a_leader(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());

    let granted = lease
        .lease_grant(require_leader(pb::LeaseGrantRequest { ttl: 30, id: 0 }))
        .await
        .expect("LeaseGrant with hasleader")
        .into_inner();
    let put = kv
        .put(require_leader(pb::PutRequest {
            key: b("svc/a"),
            value: b("1"),
            lease: granted.id,
            ..Default::default()
        }))
        .await
        .expect("Put with hasleader")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let got = kv
        .range(require_leader(pb::RangeRequest {
            key: b("svc/"),
            range_end: pb::prefix_range_end(b"svc/"),
            ..Default::default()
        }))
        .await
        .expect("Range with hasleader")
        .into_inner();
    assert_eq!(got.kvs, vec![kval("svc/a", "1", put, put, 1, granted.id)]);
    let serializable = kv
        .range(require_leader(pb::RangeRequest {
            key: b("svc/a"),
            serializable: true,
            ..Default::default()
        }))
        .await
        .expect("serializable Range with hasleader")
        .into_inner();
    assert_eq!(serializable.count, 1);
    kv.txn(require_leader(pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(op_put("svc/b", "2")),
        }],
        ..Default::default()
    }))
    .await
    .expect("Txn with hasleader");

    // Keep-alive stream.
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::LeaseKeepAliveRequest { id: granted.id })
        .await
        .unwrap();
    let mut keepalive = lease
        .lease_keep_alive(require_leader(ReceiverStream::new(rx)))
        .await
        .expect("LeaseKeepAlive with hasleader")
        .into_inner();
    for _ in 0..2 {
        let answer = tokio::time::timeout(DEADLINE, keepalive.message())
            .await
            .expect("keep-alive answer in time")
            .expect("keep-alive stream")
            .expect("keep-alive stream open");
        assert_eq!((answer.id, answer.ttl), (granted.id, 30), "{answer:?}");
        tx.send(pb::LeaseKeepAliveRequest { id: granted.id })
            .await
            .unwrap();
    }

    // Watch stream.
    let mut s = Stream::open(&ch, vec![create(prefix("svc/"))], true).await;
    s.created().await;
    let rc = kv
        .put(pb::PutRequest {
            key: b("svc/c"),
            value: b("3"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    assert_eq!(
        events_of(&s.next().await),
        (rc, vec![put_event(kval("svc/c", "3", rc, rc, 1, 0), None)])
    );
}

/// The other half of the require-leader contract, on etcd alone (the
/// embedded registry cannot lose its leader): on a member that lost its
/// quorum, a request with `hasleader: true` fails with Unavailable
/// "etcdserver: no leader", the one without it still reads. This proves
/// the metadata the test above sends is the one etcd honours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_leader_fails_on_an_etcd_member_without_a_leader() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    muster_testkit::init_tracing();
    let mut cluster = muster_testkit::EtcdCluster::start(3).expect("start a 3-member etcd");
    cluster.kill_member(1);
    cluster.kill_member(2);
    let ch = connect_to(&cluster.member_endpoint(0)).await;
    let mut kv = KvClient::new(ch);
    let req = || pb::RangeRequest {
        key: b("k"),
        serializable: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        match kv.range(require_leader(req())).await {
            Err(s) if s.code() == tonic::Code::Unavailable => break s,
            other => assert!(
                std::time::Instant::now() < deadline,
                "still served with hasleader after losing the quorum: {other:?}"
            ),
        }
        // Poll interval.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.message(), "etcdserver: no leader");
    kv.range(req())
        .await
        .expect("a serializable range without the metadata is served");
}

// ---------------------------------------------------------------------------
// 5. Range options on prefixes.
// ---------------------------------------------------------------------------

/// How the Go clients list a prefix: serializable (go-micro, etcd's
/// endpoints manager) or not, keys only, count only, with a limit (`more`
/// then says whether keys were left out; `count` is always the total),
/// sorted. Keys next to the prefix ("svc", "svc0") are outside it.
async fn range_options_on_a_prefix(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    kv.put("svc", "outside").await;
    // Distinct versions, values and revisions: no sort ties.
    let mut want: Vec<KeyValue> = Vec::new();
    for (key, values) in [
        ("svc/b", &["9"][..]),
        ("svc/d/e", &["1", "2", "3", "4"]),
        ("svc/a", &["3", "7"]),
        ("svc/c", &["0", "1", "5"]),
    ] {
        let mut created = 0;
        for (i, value) in values.iter().enumerate() {
            let rev = kv.put(key, value).await;
            if i == 0 {
                created = rev;
            }
            let entry = kval(key, value, created, rev, i as i64 + 1, 0);
            want.retain(|k| k.key != entry.key);
            want.push(entry);
        }
    }
    let current = kv.put("svc0", "outside").await;
    want.sort_by(|a, b| a.key.cmp(&b.key));
    let on_prefix = || pb::RangeRequest {
        key: b("svc/"),
        range_end: pb::prefix_range_end(b"svc/"),
        ..Default::default()
    };
    let keys = |kvs: &[KeyValue]| -> Vec<String> {
        kvs.iter()
            .map(|k| String::from_utf8_lossy(&k.key).into_owned())
            .collect()
    };

    for serializable in [false, true] {
        let got = kv
            .range(pb::RangeRequest {
                serializable,
                ..on_prefix()
            })
            .await
            .unwrap();
        assert_eq!(
            (got.kvs.clone(), got.count, got.more, rev_of(&got)),
            (want.clone(), 4, false, current),
            "{}: serializable={serializable}",
            r.name()
        );

        // keys_only: every field but the value.
        let got = kv
            .range(pb::RangeRequest {
                serializable,
                keys_only: true,
                ..on_prefix()
            })
            .await
            .unwrap();
        let no_values: Vec<KeyValue> = want
            .iter()
            .map(|k| KeyValue {
                value: Vec::new(),
                ..k.clone()
            })
            .collect();
        assert_eq!((got.kvs, got.count), (no_values, 4));

        // count_only, with or without a limit.
        for limit in [0, 2] {
            let got = kv
                .range(pb::RangeRequest {
                    serializable,
                    count_only: true,
                    limit,
                    ..on_prefix()
                })
                .await
                .unwrap();
            assert_eq!(
                (got.kvs.len(), got.count, got.more),
                (0, 4, false),
                "count_only, limit {limit}"
            );
        }

        // limit and more.
        for (limit, n, more) in [(1, 1, true), (3, 3, true), (4, 4, false), (10, 4, false)] {
            let got = kv
                .range(pb::RangeRequest {
                    serializable,
                    limit,
                    ..on_prefix()
                })
                .await
                .unwrap();
            assert_eq!(
                (got.kvs, got.count, got.more),
                (want[..n].to_vec(), 4, more),
                "{}: limit {limit}",
                r.name()
            );
        }
    }

    // Sorting (with a limit: sorted first, then cut). Expected: the keys
    // after "svc/".
    use pb::range_request::{SortOrder as O, SortTarget as T};
    for (order, target, limit, expected) in [
        (O::Descend, T::Key, 0, "d/e c b a"),
        (O::Ascend, T::Key, 2, "a b"),
        (O::Ascend, T::Version, 0, "b a c d/e"),
        (O::Descend, T::Version, 2, "d/e c"),
        (O::Ascend, T::Create, 0, "b d/e a c"),
        (O::Descend, T::Mod, 3, "c a d/e"),
        (O::Ascend, T::Value, 0, "d/e c a b"),
        // A target without an order sorts ascending (etcd's rule).
        (O::None, T::Value, 0, "d/e c a b"),
        (O::Descend, T::Value, 1, "b"),
    ] {
        let expected: Vec<String> = expected.split(' ').map(|k| format!("svc/{k}")).collect();
        for serializable in [false, true] {
            let got = kv
                .range(pb::RangeRequest {
                    sort_order: order as i32,
                    sort_target: target as i32,
                    limit,
                    serializable,
                    ..on_prefix()
                })
                .await
                .unwrap();
            assert_eq!(
                (keys(&got.kvs), got.count, got.more),
                (expected.clone(), 4, limit > 0 && limit < 4),
                "{}: {order:?} by {target:?}, limit {limit}",
                r.name()
            );
        }
    }

    // A serializable read at an old revision: when svc/d/e was created.
    let got = kv
        .range(pb::RangeRequest {
            serializable: true,
            revision: want[3].create_revision,
            ..on_prefix()
        })
        .await
        .unwrap();
    assert_eq!(keys(&got.kvs), ["svc/b", "svc/d/e"]);
    assert_eq!(got.kvs[1].value, b("1"));
    assert_eq!(
        rev_of(&got),
        current,
        "an old read's header: the current revision"
    );
}

fn rev_of(r: &pb::RangeResponse) -> i64 {
    r.header.as_ref().map_or(-1, |h| h.revision)
}

// ---------------------------------------------------------------------------
// 6. Compaction.
// ---------------------------------------------------------------------------

/// A read at a compacted revision fails with OutOfRange "etcdserver: mvcc:
/// required revision has been compacted" (serializable too), a future one
/// with "... is a future revision". A watch from a compacted revision is
/// created, then canceled with `compact_revision` (clientv3's
/// `ErrCompacted`, header revision 0); the stream keeps serving. The Go
/// clients then re-list and watch from the list's revision + 1, or from
/// the compact revision, which replays it (with no `prev_kv` for it: the
/// revision before it is gone).
async fn compacted_revision_answers_and_the_clients_recovery(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let r1 = kv.put("svc/a", "1").await;
    let r2 = kv.put("svc/a", "2").await;
    let r3 = kv.put("svc/a", "3").await;
    kv.compact(r2).await;
    let on_prefix = |revision, serializable| pb::RangeRequest {
        key: b("svc/"),
        range_end: pb::prefix_range_end(b"svc/"),
        revision,
        serializable,
        ..Default::default()
    };
    for serializable in [false, true] {
        let e = kv.range(on_prefix(r1, serializable)).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            ),
            "{}: serializable={serializable}",
            r.name()
        );
        let e = kv.range(on_prefix(r3 + 1, serializable)).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision"
            )
        );
        let got = kv.range(on_prefix(r2, serializable)).await.unwrap();
        assert_eq!(got.kvs, vec![kval("svc/a", "2", r1, r2, 2, 0)]);
    }

    let mut s = Stream::open(
        &ch,
        vec![create(pb::WatchCreateRequest {
            start_revision: r1,
            prev_kv: true,
            ..prefix("svc/")
        })],
        false,
    )
    .await;
    let created = s.next().await;
    assert!(created.created && !created.canceled, "{created:?}");
    assert_eq!((created.watch_id, rev(&created)), (0, r3));
    let compacted = s.next().await;
    assert_eq!(
        (
            compacted.watch_id,
            compacted.canceled,
            compacted.compact_revision,
            rev(&compacted),
            compacted.events.len(),
            compacted.cancel_reason.as_str(),
        ),
        (0, true, r2, 0, 0, ""),
        "{}: {compacted:?}",
        r.name()
    );

    // Re-list, then watch from after the list on the same stream.
    let listed = kv.range(on_prefix(0, true)).await.unwrap();
    assert_eq!(rev_of(&listed), r3);
    let id = s
        .watch(pb::WatchCreateRequest {
            start_revision: rev_of(&listed) + 1,
            prev_kv: true,
            ..prefix("svc/")
        })
        .await;
    let r4 = kv.put("svc/a", "4").await;
    let resp = s.next().await;
    assert_eq!(resp.watch_id, id);
    assert_eq!(
        events_of(&resp),
        (
            r4,
            vec![put_event(
                kval("svc/a", "4", r1, r4, 4, 0),
                Some(kval("svc/a", "3", r1, r3, 3, 0))
            )]
        )
    );

    // From the compact revision itself.
    let (mut s, _) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            start_revision: r2,
            prev_kv: true,
            ..prefix("svc/")
        },
    )
    .await;
    let a2 = kval("svc/a", "2", r1, r2, 2, 0);
    let a3 = kval("svc/a", "3", r1, r3, 3, 0);
    assert_eq!(
        events_of(&s.next().await),
        (
            r4,
            vec![
                put_event(a2.clone(), None),
                put_event(a3.clone(), Some(a2)),
                put_event(kval("svc/a", "4", r1, r4, 4, 0), Some(a3)),
            ]
        ),
        "{}",
        r.name()
    );
}

// ---------------------------------------------------------------------------
// 7. Watched ranges.
// ---------------------------------------------------------------------------

/// The ranges the Go clients watch, on one stream: kratos's
/// `{namespace}/{name}` prefix (no trailing slash: it also matches
/// `{name}-2` and `{name}/…`), go-zero's `key/`, a single key, from-key
/// (range end "\0": every key >= key), every key ("\0".."\0", or an empty
/// key with end "\0"), a prefix of 0xff bytes (its range end is "\0"),
/// and an empty key alone (etcd reads it as "\0").
async fn watch_ranges_the_go_clients_use(r: Box<dyn Registry>) {
    let ch = connect(&*r).await;
    let mut kv = Kv::new(&ch);
    let sentinel_key = "\u{1}sentinel";
    let (mut s, sentinel) = Stream::with_watch(&ch, watch_req(sentinel_key, b"")).await;
    let watches: Vec<(&str, pb::WatchCreateRequest)> = vec![
        ("kratos prefix", prefix("ns/name")),
        ("go-zero prefix", prefix("key/")),
        ("single key", watch_req("ns/name", b"")),
        ("from key", watch_req("m", b"\0")),
        ("everything", watch_req("\0", b"\0")),
        ("empty key from", watch_req("", b"\0")),
        (
            "0xff prefix",
            pb::WatchCreateRequest {
                key: b"\xff".to_vec(),
                range_end: pb::prefix_range_end(b"\xff"),
                ..Default::default()
            },
        ),
        ("empty key", watch_req("", b"")),
    ];
    assert_eq!(
        pb::prefix_range_end(b"\xff"),
        b"\0",
        "etcd's prefix end of 0xff bytes"
    );
    let mut ids = Vec::new();
    for (_, w) in &watches {
        ids.push(s.watch(w.clone()).await);
    }
    let written: Vec<Vec<u8>> = [
        &b"ns/name"[..],
        b"ns/name/1",
        b"ns/name-2",
        b"ns/nam",
        b"ns/namf",
        b"ns/names",
        b"key",
        b"key/",
        b"key/1",
        b"key0",
        b"l",
        b"m",
        b"zzz",
        b"\0",
        b"\xff",
        b"\xff\xff/x",
    ]
    .iter()
    .map(|k| k.to_vec())
    .collect();
    for key in &written {
        kv.0.put(pb::PutRequest {
            key: key.clone(),
            value: b("v"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    kv.put(sentinel_key, "end").await;
    let expected = |name: &str| -> Vec<&[u8]> {
        let keys: &[&[u8]] = match name {
            "kratos prefix" => &[b"ns/name", b"ns/name/1", b"ns/name-2", b"ns/names"],
            "go-zero prefix" => &[b"key/", b"key/1"],
            "single key" => &[b"ns/name"],
            "from key" => &[
                b"ns/name",
                b"ns/name/1",
                b"ns/name-2",
                b"ns/nam",
                b"ns/namf",
                b"ns/names",
                b"m",
                b"zzz",
                b"\xff",
                b"\xff\xff/x",
            ],
            "everything" | "empty key from" => &[],
            "0xff prefix" => &[b"\xff", b"\xff\xff/x"],
            "empty key" => &[b"\0"],
            _ => unreachable!(),
        };
        if keys.is_empty() {
            // Every key, the sentinel too.
            let mut all: Vec<&[u8]> = written.iter().map(Vec::as_slice).collect();
            all.push(sentinel_key.as_bytes());
            all
        } else {
            keys.to_vec()
        }
    };
    let everything = [ids[4], ids[5]];
    // Until the sentinel watcher and both every-key watchers have seen the
    // sentinel: everything for earlier revisions has arrived.
    let got = s
        .until(|got| {
            [sentinel, everything[0], everything[1]].iter().all(|id| {
                got.iter().any(|r| {
                    r.watch_id == *id
                        && r.events
                            .iter()
                            .any(|e| e.kv.as_ref().unwrap().key == sentinel_key.as_bytes())
                })
            })
        })
        .await;
    for ((name, _), id) in watches.iter().zip(&ids) {
        let keys: Vec<&[u8]> = got
            .iter()
            .filter(|r| r.watch_id == *id)
            .flat_map(|r| r.events.iter())
            .map(|e| e.kv.as_ref().unwrap().key.as_slice())
            .collect();
        assert_eq!(keys, expected(name), "{}: the {name} watch", r.name());
    }
}

// ---------------------------------------------------------------------------
// Progress notifications (etcd started with a short interval).
// ---------------------------------------------------------------------------

/// How often the progress-notify tests' registries notify (etcd's minimum
/// is 100 ms).
const NOTIFY_INTERVAL: Duration = Duration::from_millis(200);

/// A `progress_notify` watch with nothing to report gets, every interval,
/// a response with its own watch id, no events and the current revision;
/// a watch on the same stream that did not ask gets none. After a write
/// the notifications carry the new revision.
async fn progress_notify_reaches_quiet_watchers(endpoint: String) {
    let ch = connect_to(&endpoint).await;
    let mut kv = Kv::new(&ch);
    let current = kv.put("svc/a", "1").await;
    let (mut s, notified) = Stream::with_watch(
        &ch,
        pb::WatchCreateRequest {
            progress_notify: true,
            ..prefix("svc/")
        },
    )
    .await;
    let silent = s.watch(prefix("svc/")).await;
    let is_notify = |r: &pb::WatchResponse| {
        r.watch_id == notified && !r.created && !r.canceled && r.events.is_empty()
    };
    let got = s
        .until(|got| got.iter().filter(|r| is_notify(r)).count() == 2)
        .await;
    assert!(
        got.iter().all(|r| is_notify(r) && rev(r) == current),
        "{got:?}"
    );

    let later = kv.put("svc/b", "2").await;
    let got = s
        .until(|got| got.iter().any(|r| is_notify(r) && rev(r) == later))
        .await;
    for resp in &got {
        if resp.events.is_empty() {
            assert!(is_notify(resp), "only the watch that asked: {resp:?}");
        } else {
            assert!(resp.watch_id == notified || resp.watch_id == silent);
            assert_eq!(rev(resp), later);
        }
    }
    assert_eq!(
        got.iter().filter(|r| !r.events.is_empty()).count(),
        2,
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_reaches_quiet_watchers_on_etcd() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    muster_testkit::init_tracing();
    let mut opts = muster_testkit::EtcdOptions::default();
    opts.extra_args.push(format!(
        "--experimental-watch-progress-notify-interval={}ms",
        NOTIFY_INTERVAL.as_millis()
    ));
    let etcd = muster_testkit::EtcdNode::start_with(opts).expect("start etcd");
    progress_notify_reaches_quiet_watchers(etcd.endpoint()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_reaches_quiet_watchers_on_embedded() {
    let mut config = muster_server::ServerConfig::in_memory();
    config.progress_notify_interval = NOTIFY_INTERVAL;
    let server = muster_server::Server::start(config).await.unwrap();
    progress_notify_reaches_quiet_watchers(server.endpoint()).await;
}

// ---------------------------------------------------------------------------
// The embedded server's ordering guarantee.
// ---------------------------------------------------------------------------

/// The embedded server answers a progress request only once every watcher
/// of the stream is current, and behind what they were sent: a client
/// (clientv3 resumes from a progress answer's revision) never skips
/// history it has not seen. etcd 3.4.23 may answer ahead of a catch-up
/// (etcd-io/etcd#15220); later etcd releases answer as this does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_answer_never_overtakes_history() {
    let server = muster_server::Server::start(muster_server::ServerConfig::in_memory())
        .await
        .unwrap();
    let ch = connect_to(&server.endpoint()).await;
    let mut kv = Kv::new(&ch);
    let first = kv.put("svc/0", "x").await;
    let mut current = first;
    for i in 1..200 {
        current = kv.put(&format!("svc/{i}"), "x").await;
    }
    for _ in 0..10 {
        let mut s = Stream::open(
            &ch,
            vec![
                create(pb::WatchCreateRequest {
                    start_revision: first,
                    ..prefix("svc/")
                }),
                progress(),
                progress(),
            ],
            false,
        )
        .await;
        s.created().await;
        let got = s
            .until(|got| got.iter().filter(|r| is_progress(r)).count() == 2)
            .await;
        let events: usize = got.iter().map(|r| r.events.len()).sum();
        assert_eq!(events, 200, "the history came before the answers: {got:?}");
        assert!(
            got.iter()
                .filter(|r| is_progress(r))
                .all(|r| rev(r) == current)
        );
    }
}
