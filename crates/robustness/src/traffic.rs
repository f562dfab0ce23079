//! Traffic: concurrent clients issuing random etcd requests over a small
//! keyspace, so that their operations conflict, each request and its result
//! recorded into a [`History`]; and watchers recording every response.
//!
//! The clients speak etcd's v3 gRPC API directly (no retries, no client
//! library in between), so the history holds exactly what the registry
//! answered. A request that fails in a way that leaves its effect unknown
//! (the connection broke, the registry was unavailable or did not answer in
//! time) is recorded as [`Outcome::Unknown`]: it may or may not have taken
//! effect, as in etcd's model. Reads with unknown results constrain nothing
//! and are left out.
//!
//! Leases are granted with TTLs longer than any run and are not kept
//! alive: their expiry is not part of what this traffic checks (revoke is).

use std::time::{Duration, Instant};

use muster_proto as pb;
use pb::compare::{CompareResult, CompareTarget as PbTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::history::{
    ClientId, Compare, CompareOp, CompareTarget, EtcdError, History, KeyValue, Operation, Outcome,
    Request, Response, ResponseBody, TxnOp, TxnOpResult,
};
use crate::watch::{Event, EventKind, WatchRecord, WatchResponseRecord};

/// What traffic to make.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// Concurrent clients, each on its own connection.
    pub clients: u32,
    /// Keys `key-0` .. `key-{keys-1}`.
    pub keys: u32,
    /// How long the clients run.
    pub duration: Duration,
    /// A request not answered within this is recorded as unknown.
    pub request_timeout: Duration,
    /// Seeds every client's choices (client `i` uses `seed + i`).
    pub seed: u64,
    /// TTL of granted leases, in seconds (longer than the run).
    pub lease_ttl: i64,
    /// Requests per second across all clients (0: as fast as answered).
    /// The checker's work grows with the history: etcd's suite paces its
    /// traffic too.
    pub rate: u32,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            clients: 8,
            keys: 10,
            duration: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            seed: 1,
            lease_ttl: 600,
            rate: 0,
        }
    }
}

/// The prefix of every key the traffic writes.
pub const KEY_PREFIX: &str = "key-";

/// Where a run's clients and watchers connect, and when it started.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port` of the registry (or of a proxy in front of it),
    /// for the clients.
    pub endpoint: String,
    /// For the watcher, when it connects apart (so that its stream alone
    /// can be dropped); `None`: `endpoint`.
    pub watch_endpoint: Option<String>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The KV and lease operations.
    pub history: History,
    /// The watch streams.
    pub watches: Vec<WatchRecord>,
    /// Operations recorded with an unknown outcome, before the watch
    /// resolved what it could ([`patch_unknown`]).
    pub lost_answers: usize,
    /// What [`crate::pin::pin_unknown`] resolved of the lost deletes and
    /// revokes.
    pub pinned: crate::pin::PinStats,
}

/// Nanoseconds since `base`.
fn nanos(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn channel(endpoint: &str) -> Result<Channel, String> {
    Ok(Channel::from_shared(endpoint.to_string())
        .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy())
}

/// Runs `config.clients` clients and one watcher against `target` for the
/// configured duration; `base` is the instant every recorded time counts
/// from. Faults are injected by the caller meanwhile.
pub async fn run(
    target: &Target,
    config: &TrafficConfig,
    base: Instant,
) -> Result<Recorded, String> {
    let deadline = tokio::time::Instant::now() + config.duration;
    let (stop_tx, stop) = watch::channel(false);
    let watch_endpoint = target.watch_endpoint.as_ref().unwrap_or(&target.endpoint);
    let watcher = tokio::spawn(watch_all(channel(watch_endpoint)?, stop));
    let mut clients = Vec::new();
    for id in 0..config.clients {
        let ch = channel(&target.endpoint)?;
        let config = config.clone();
        clients.push(tokio::spawn(async move {
            Client::new(id, ch, &config)
                .run(&config, base, deadline)
                .await
        }));
    }
    let mut history = History::default();
    for c in clients {
        let ops = c.await.map_err(|e| format!("a client panicked: {e}"))?;
        history.operations.extend(ops);
    }
    // The watcher catches up on the last writes before it stops: until it
    // has seen the registry's current revision (or gives up).
    let _ = stop_tx.send(true);
    let (watches, complete) = watcher
        .await
        .map_err(|e| format!("the watcher panicked: {e}"))?;
    history.operations.sort_by_key(|op| op.invoke);
    let lost_answers = history
        .operations
        .iter()
        .filter(|op| !op.is_known())
        .count();
    let mut recorded = Recorded {
        history,
        watches,
        lost_answers,
        pinned: Default::default(),
    };
    patch_unknown(&mut recorded, complete);
    Ok(recorded)
}

/// Resolves writes of unknown outcome from what the watch saw, as etcd's
/// robustness suite does: every written value is unique, so a put (or a
/// txn's put) whose value a watch delivered did happen, at that revision
/// ([`crate::watch::patch_history`]); one whose value no watch delivered,
/// when the watch saw every revision, did not happen and has no effect to
/// check (a txn that did not put took its read-only branch or was not
/// applied), so it is dropped. A grant whose id the client never learned is
/// dropped too: nothing refers to its lease. Deletes and revokes are then
/// pinned to the revisions the watch shows they made, or dropped
/// ([`crate::pin::pin_unknown`]); what stays ambiguous is left to the
/// checker.
pub fn patch_unknown(recorded: &mut Recorded, watch_complete: bool) {
    let mut history = crate::watch::patch_history(&recorded.history, &recorded.watches);
    history.operations.retain(|op| {
        if op.is_known() {
            return true;
        }
        if matches!(op.request, Request::LeaseGrant { .. }) {
            return false;
        }
        // Unseen by a complete watch: the put did not happen. A txn is
        // dropped only when its other branch writes nothing either.
        let unseen_put = crate::watch::put_of(&op.request).is_some()
            && match &op.request {
                Request::Txn { failure, .. } => {
                    failure.iter().all(|o| matches!(o, TxnOp::Get { .. }))
                }
                _ => true,
            };
        !(unseen_put && watch_complete)
    });
    let (history, pinned) = crate::pin::pin_unknown(
        &history,
        &recorded.watches,
        watch_complete,
        &may_expire(&history),
    );
    recorded.history = history;
    recorded.pinned = pinned;
}

/// The leases of `history` whose TTL could have run out before its last
/// recorded instant (keep-alives not counted: an overestimate).
pub fn may_expire(history: &History) -> std::collections::HashSet<i64> {
    let end = history
        .operations
        .iter()
        .map(|op| op.return_time.unwrap_or(op.invoke))
        .max()
        .unwrap_or(0);
    history
        .operations
        .iter()
        .filter_map(|op| {
            let Request::LeaseGrant { ttl, id } = &op.request else {
                return None;
            };
            let id = match &op.outcome {
                Outcome::Response(Response {
                    body: ResponseBody::LeaseGrant { id },
                    ..
                }) => *id,
                _ => *id,
            };
            let ttl_nanos = u64::try_from(*ttl)
                .unwrap_or(0)
                .saturating_mul(1_000_000_000);
            (id != 0 && op.invoke.saturating_add(ttl_nanos) <= end).then_some(id)
        })
        .collect()
}

struct Client {
    id: ClientId,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    rng: fastrand::Rng,
    keys: u32,
    /// Leases this client granted and has not seen revoked.
    leases: Vec<i64>,
    /// The last version this client saw of each key (for txn compares).
    versions: Vec<i64>,
    next_value: u64,
    timeout: Duration,
}

impl Client {
    fn new(id: ClientId, ch: Channel, config: &TrafficConfig) -> Client {
        Client {
            id,
            kv: KvClient::new(ch.clone()),
            lease: LeaseClient::new(ch),
            rng: fastrand::Rng::with_seed(config.seed.wrapping_add(u64::from(id))),
            keys: config.keys.max(1),
            leases: Vec::new(),
            versions: vec![0; config.keys.max(1) as usize],
            next_value: 0,
            timeout: config.request_timeout,
        }
    }

    fn key(&mut self) -> (usize, String) {
        let i = self.rng.u32(..self.keys) as usize;
        (i, format!("{KEY_PREFIX}{i}"))
    }

    /// A value no other write has: `c{client}-{n}`.
    fn value(&mut self) -> String {
        self.next_value += 1;
        format!("c{}-{}", self.id, self.next_value)
    }

    /// The next request, by weight: get 30, put 25, delete 10, txn 20,
    /// lease grant 5, put with a lease 5, lease revoke 5.
    fn next_request(&mut self) -> Request {
        let (i, key) = self.key();
        match self.rng.u32(..100) {
            0..30 => Request::Get {
                key,
                revision: 0,
                serializable: false,
            },
            30..55 => Request::Put {
                key,
                value: self.value(),
                lease: 0,
            },
            55..65 => Request::Delete { key },
            65..85 => Request::Txn {
                compares: vec![Compare {
                    key: key.clone(),
                    op: CompareOp::Equal,
                    target: CompareTarget::Version(self.versions[i]),
                }],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: self.value(),
                    lease: 0,
                }],
                failure: vec![TxnOp::Get { key }],
            },
            85..90 => Request::LeaseGrant {
                ttl: 0, // filled in by the caller's config
                id: 0,
            },
            90..95 if !self.leases.is_empty() => {
                let lease = self.leases[self.rng.usize(..self.leases.len())];
                Request::Put {
                    key,
                    value: self.value(),
                    lease,
                }
            }
            95.. if !self.leases.is_empty() => {
                let at = self.rng.usize(..self.leases.len());
                Request::LeaseRevoke {
                    id: self.leases.swap_remove(at),
                }
            }
            _ => Request::Get {
                key,
                revision: 0,
                serializable: false,
            },
        }
    }

    async fn run(
        mut self,
        config: &TrafficConfig,
        base: Instant,
        deadline: tokio::time::Instant,
    ) -> Vec<Operation> {
        let mut ops = Vec::new();
        // Each client's share of the rate, as a fixed interval between its
        // requests (skipping what it fell behind on).
        let mut pace = (config.rate > 0).then(|| {
            let every =
                Duration::from_secs_f64(f64::from(config.clients.max(1)) / f64::from(config.rate));
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            t
        });
        while tokio::time::Instant::now() < deadline {
            if let Some(pace) = pace.as_mut() {
                pace.tick().await;
            }
            let mut request = self.next_request();
            if let Request::LeaseGrant { ttl, .. } = &mut request {
                *ttl = config.lease_ttl;
            }
            let invoke = nanos(base);
            let outcome = match tokio::time::timeout(self.timeout, self.send(&request)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Unknown,
            };
            let return_time = match outcome {
                Outcome::Unknown => None,
                _ => Some(nanos(base)),
            };
            self.learn(&request, &outcome);
            let unknown = matches!(outcome, Outcome::Unknown);
            if !(unknown && request.is_read_only()) {
                ops.push(Operation {
                    client: self.id,
                    invoke,
                    return_time,
                    request,
                    outcome,
                });
            }
            if unknown {
                // The registry is down or cut off: do not spin on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ops
    }

    /// Keeps what the traffic needs from an answer: versions for the next
    /// compares, granted leases.
    fn learn(&mut self, request: &Request, outcome: &Outcome) {
        let Outcome::Response(resp) = outcome else {
            return;
        };
        let mut seen = |kv: &Option<KeyValue>, key: &str| {
            if let Some(i) = key
                .strip_prefix(KEY_PREFIX)
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|i| *i < self.versions.len())
            {
                self.versions[i] = kv.as_ref().map_or(0, |kv| kv.version);
            }
        };
        match (&resp.body, request) {
            (ResponseBody::Get { kv }, Request::Get { key, .. }) => seen(kv, key),
            (ResponseBody::Txn { results, .. }, Request::Txn { failure, .. }) => {
                for (result, op) in results.iter().zip(failure) {
                    if let (TxnOpResult::Get { kv }, TxnOp::Get { key }) = (result, op) {
                        seen(kv, key);
                    }
                }
            }
            (ResponseBody::LeaseGrant { id }, _) => self.leases.push(*id),
            _ => {}
        }
    }

    async fn send(&mut self, request: &Request) -> Outcome {
        match request {
            Request::Get {
                key,
                revision,
                serializable,
            } => {
                let req = pb::RangeRequest {
                    key: key.clone().into_bytes(),
                    revision: *revision,
                    serializable: *serializable,
                    ..Default::default()
                };
                match self.kv.range(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        response(
                            r.header.as_ref(),
                            ResponseBody::Get {
                                kv: r.kvs.first().map(kv_of),
                            },
                        )
                    }
                    Err(s) => failure(&s),
                }
            }
            Request::Range { .. } | Request::LeaseKeepAlive { .. } => {
                Outcome::Error(EtcdError::Other("not generated".into()))
            }
            Request::Put { key, value, lease } => {
                match self.kv.put(put_request(key, value, *lease)).await {
                    Ok(r) => response(r.into_inner().header.as_ref(), ResponseBody::Put),
                    Err(s) => failure(&s),
                }
            }
            Request::Delete { key } => match self.kv.delete_range(delete_request(key)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    response(
                        r.header.as_ref(),
                        ResponseBody::Delete { deleted: r.deleted },
                    )
                }
                Err(s) => failure(&s),
            },
            Request::Txn {
                compares,
                success,
                failure: otherwise,
            } => {
                let req = pb::TxnRequest {
                    compare: compares.iter().map(compare_of).collect(),
                    success: success.iter().map(op_of).collect(),
                    failure: otherwise.iter().map(op_of).collect(),
                };
                match self.kv.txn(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let results = r.responses.into_iter().map(result_of).collect();
                        response(
                            r.header.as_ref(),
                            ResponseBody::Txn {
                                succeeded: r.succeeded,
                                results,
                            },
                        )
                    }
                    Err(s) => failure(&s),
                }
            }
            Request::LeaseGrant { ttl, id } => {
                match self
                    .lease
                    .lease_grant(pb::LeaseGrantRequest { ttl: *ttl, id: *id })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        if !r.error.is_empty() {
                            return Outcome::Error(EtcdError::Other(r.error));
                        }
                        response(r.header.as_ref(), ResponseBody::LeaseGrant { id: r.id })
                    }
                    Err(s) => failure(&s),
                }
            }
            Request::LeaseRevoke { id } => {
                match self
                    .lease
                    .lease_revoke(pb::LeaseRevokeRequest { id: *id })
                    .await
                {
                    Ok(r) => response(r.into_inner().header.as_ref(), ResponseBody::LeaseRevoke),
                    Err(s) => failure(&s),
                }
            }
        }
    }
}

fn response(header: Option<&pb::ResponseHeader>, body: ResponseBody) -> Outcome {
    Outcome::Response(Response {
        revision: header.map_or(0, |h| h.revision),
        body,
    })
}

/// A gRPC error as the history records it: definite etcd errors (nothing
/// happened), or unknown (it may have happened).
fn failure(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::NotFound if message.contains("lease not found") => {
            Outcome::Error(EtcdError::LeaseNotFound)
        }
        Code::OutOfRange if message.contains("compacted") => Outcome::Error(EtcdError::Compacted),
        Code::OutOfRange if message.contains("future revision") => {
            Outcome::Error(EtcdError::FutureRevision)
        }
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted => {
            Outcome::Error(EtcdError::Other(format!("{:?}: {message}", status.code())))
        }
        // Unavailable, DeadlineExceeded, Cancelled, Unknown, Internal,
        // Aborted: the request may have been applied before the failure.
        _ => Outcome::Unknown,
    }
}

fn kv_of(kv: &pb::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn put_request(key: &str, value: &str, lease: i64) -> pb::PutRequest {
    pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease,
        ..Default::default()
    }
}

fn delete_request(key: &str) -> pb::DeleteRangeRequest {
    pb::DeleteRangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn compare_of(c: &Compare) -> pb::Compare {
    let result = match c.op {
        CompareOp::Equal => CompareResult::Equal,
        CompareOp::NotEqual => CompareResult::NotEqual,
        CompareOp::Less => CompareResult::Less,
        CompareOp::Greater => CompareResult::Greater,
    };
    let (target, union) = match &c.target {
        CompareTarget::Value(v) => (PbTarget::Value, TargetUnion::Value(v.as_bytes().to_vec())),
        CompareTarget::Version(v) => (PbTarget::Version, TargetUnion::Version(*v)),
        CompareTarget::ModRevision(r) => (PbTarget::Mod, TargetUnion::ModRevision(*r)),
        CompareTarget::CreateRevision(r) => (PbTarget::Create, TargetUnion::CreateRevision(*r)),
    };
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: c.key.as_bytes().to_vec(),
        target_union: Some(union),
        ..Default::default()
    }
}

fn op_of(op: &TxnOp) -> pb::RequestOp {
    use pb::request_op::Request as R;
    let request = match op {
        TxnOp::Get { key } => R::RequestRange(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        }),
        TxnOp::Put { key, value, lease } => R::RequestPut(put_request(key, value, *lease)),
        TxnOp::Delete { key } => R::RequestDeleteRange(delete_request(key)),
    };
    pb::RequestOp {
        request: Some(request),
    }
}

fn result_of(op: pb::ResponseOp) -> TxnOpResult {
    use pb::response_op::Response as R;
    match op.response {
        Some(R::ResponseRange(r)) => TxnOpResult::Get {
            kv: r.kvs.first().map(kv_of),
        },
        Some(R::ResponseDeleteRange(r)) => TxnOpResult::Delete { deleted: r.deleted },
        Some(R::ResponsePut(_)) | Some(R::ResponseTxn(_)) | None => TxnOpResult::Put,
    }
}

/// Watches every traffic key from revision 1, resuming after each broken
/// stream from the revision after the last one delivered, until `stop` and
/// the watch has reached the registry's revision at that moment (or a few
/// seconds passed). Each stream is one [`WatchRecord`].
async fn watch_all(ch: Channel, mut stop: watch::Receiver<bool>) -> (Vec<WatchRecord>, bool) {
    let mut records = Vec::new();
    let mut next = 1;
    let mut kv = KvClient::new(ch.clone());
    let mut target: Option<i64> = None;
    let mut compacted = false;
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        if *stop.borrow() && target.is_none() {
            // The revision to reach: the registry's now.
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(2),
                kv.range(pb::RangeRequest {
                    key: KEY_PREFIX.as_bytes().to_vec(),
                    ..Default::default()
                }),
            )
            .await
            {
                target = r.into_inner().header.map(|h| h.revision);
            }
            give_up.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(5));
        }
        if let Some(t) = target
            && next > t
        {
            return (records, !compacted);
        }
        if give_up.is_some_and(|at| tokio::time::Instant::now() > at) {
            return (records, false);
        }
        let record = WatchRecord {
            key: KEY_PREFIX.to_string(),
            prefix: true,
            start_revision: next,
            responses: Vec::new(),
        };
        records.push(record);
        let record = records.last_mut().expect("just pushed");
        let (req_tx, req_rx) = tokio::sync::mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: KEY_PREFIX.as_bytes().to_vec(),
                    range_end: muster_proto::prefix_range_end(KEY_PREFIX.as_bytes()),
                    start_revision: next,
                    ..Default::default()
                },
            )),
        };
        if req_tx.send(create).await.is_err() {
            return (records, false);
        }
        let stream = WatchClient::new(ch.clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                records.pop();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed(), if !*stop.borrow() => break,
                // Once stopping, look up every 100 ms: for the target
                // revision if it is not known yet (the lookup can fail
                // while faults act), and for the give-up deadline.
                _ = tokio::time::sleep(Duration::from_millis(100)), if *stop.borrow() => break,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                _ => break,
            };
            if resp.created && resp.events.is_empty() && !resp.canceled {
                continue;
            }
            let events: Vec<Event> = resp.events.iter().filter_map(event_of).collect();
            if let Some(last) = events.last() {
                next = last.mod_revision + 1;
            }
            let canceled = resp.canceled;
            record.responses.push(WatchResponseRecord {
                header_revision: resp.header.as_ref().map_or(0, |h| h.revision),
                events,
                compact_revision: resp.compact_revision,
                canceled,
            });
            if resp.compact_revision > 0 {
                // Revisions below it are gone: the watch is no longer a
                // complete record.
                compacted = true;
                next = resp.compact_revision;
            }
            if canceled {
                break;
            }
            if let Some(t) = target
                && next > t
            {
                return (records, !compacted);
            }
        }
        drop(req_tx);
    }
}

fn event_of(e: &pb::Event) -> Option<Event> {
    let kv = e.kv.as_ref()?;
    let kind = if e.r#type == pb::EventType::Delete as i32 {
        EventKind::Delete
    } else {
        EventKind::Put
    };
    let kv = kv_of(kv);
    Some(Event {
        kind,
        key: kv.key,
        value: kv.value,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        version: kv.version,
        lease: kv.lease,
    })
}
