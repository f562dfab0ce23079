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
//! Leases are of two kinds. Most are granted with TTLs longer than any run
//! and revoked explicitly. The others ([`TrafficConfig::short_lease_ttl`],
//! 2–4 s) expire during the run: each gets keys of its own
//! (`key-l{client}-{n}`, written once, with the lease, and read back now
//! and then), is kept alive by `LeaseKeepAlive` requests every third of its
//! TTL for up to [`TrafficConfig::keep_alive_for`], then abandoned; a third
//! of the abandoned ones get one more keep-alive after their TTL, which
//! must be answered TTL 0. Expiry is the registry's own revoke: the run adds
//! one of unknown outcome per lease that could expire ([`add_expiries`]).

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
    /// TTL of the long leases, in seconds (longer than the run).
    pub lease_ttl: i64,
    /// TTLs of the short leases, in seconds (from, to; inclusive), which
    /// expire during the run; `None`: no short leases.
    pub short_lease_ttl: Option<(i64, i64)>,
    /// How long a short lease is kept alive at most (each one for a random
    /// share of it) before it is abandoned.
    pub keep_alive_for: Duration,
    /// Also send every abandoned short lease a keep-alive right at its
    /// expected expiry (0–20 ms after the last keep-alive's send time plus
    /// the TTL) and, when that is answered TTL 0, a put onto the lease,
    /// which must fail: a registry that answers TTL 0 for a lease it has
    /// not revoked yet shows as a history that is not linearizable. (etcd
    /// answers a keep-alive of an expired lease only once its revoke is
    /// applied.)
    pub edge_probes: bool,
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
            // etcd raises TTLs below 1.5 election timeouts (2 s by default)
            // to that: 2 s is the shortest both registries grant as asked.
            short_lease_ttl: Some((2, 4)),
            keep_alive_for: Duration::from_secs(6),
            edge_probes: false,
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
    let watcher = tokio::spawn(watch_all(
        channel(watch_endpoint)?,
        watch_endpoint.clone(),
        stop,
        base,
    ));
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
    let with_expiries = add_expiries(&recorded.history);
    let mut history = crate::watch::patch_history(&with_expiries, &recorded.watches);
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
    // Leases whose expiry is not in the history as an operation: their
    // deletes stay ambiguous.
    let expiring: std::collections::HashSet<i64> = history
        .operations
        .iter()
        .filter_map(|op| match op.request {
            Request::LeaseExpire { id } => Some(id),
            _ => None,
        })
        .collect();
    let unmodelled = may_expire(&history)
        .difference(&expiring)
        .copied()
        .collect();
    let (history, pinned) =
        crate::pin::pin_unknown(&history, &recorded.watches, watch_complete, &unmodelled);
    recorded.history = history;
    recorded.pinned = pinned;
}

/// `history` with one [`Request::LeaseExpire`] of unknown outcome (client
/// [`crate::history::REGISTRY`]) for every lease granted once whose TTL
/// could have run out before the end ([`may_expire`]), unless it is there
/// already. It is invoked at the grant's invocation, or later: after the
/// invocation of the last answer that saw the lease alive (a keep-alive
/// answered TTL > 0, a put attaching a key to it, a linearizable read of a
/// key attached to it), since the expiry took effect after that answer's
/// linearization point, itself after its invocation. So it may be placed
/// anywhere the registry could have placed it, or nowhere.
pub fn add_expiries(history: &History) -> History {
    use std::collections::HashMap;
    let mut grants: HashMap<i64, (usize, u64)> = HashMap::new();
    let mut expiring = std::collections::HashSet::new();
    for op in &history.operations {
        match (&op.request, &op.outcome) {
            (
                Request::LeaseGrant { .. },
                Outcome::Response(Response {
                    body: ResponseBody::LeaseGrant { id },
                    ..
                }),
            ) => {
                let g = grants.entry(*id).or_insert((0, op.invoke));
                g.0 += 1;
                g.1 = g.1.min(op.invoke);
            }
            (Request::LeaseExpire { id }, _) => {
                expiring.insert(*id);
            }
            _ => {}
        }
    }
    let candidates = may_expire(history);
    let mut since: HashMap<i64, u64> = grants
        .iter()
        .filter(|(id, (n, _))| *n == 1 && candidates.contains(id) && !expiring.contains(id))
        .map(|(id, (_, invoke))| (*id, *invoke))
        .collect();
    for op in &history.operations {
        for id in saw_alive(op) {
            if let Some(t) = since.get_mut(&id) {
                *t = (*t).max(op.invoke);
            }
        }
    }
    let mut out = history.clone();
    let mut added: Vec<(i64, u64)> = since.into_iter().collect();
    added.sort_unstable();
    out.operations
        .extend(added.into_iter().map(|(id, invoke)| Operation {
            client: crate::history::REGISTRY,
            invoke,
            return_time: None,
            request: Request::LeaseExpire { id },
            outcome: Outcome::Unknown,
        }));
    out.operations.sort_by_key(|op| op.invoke);
    out
}

/// The leases an answered operation saw alive at its linearization point.
fn saw_alive(op: &Operation) -> Vec<i64> {
    let Outcome::Response(r) = &op.outcome else {
        return Vec::new();
    };
    let kv_leases = |kvs: &mut dyn Iterator<Item = &KeyValue>| -> Vec<i64> {
        kvs.map(|kv| kv.lease).filter(|l| *l != 0).collect()
    };
    match (&op.request, &r.body) {
        (Request::LeaseKeepAlive { id }, ResponseBody::LeaseKeepAlive { ttl }) if *ttl > 0 => {
            vec![*id]
        }
        (Request::Put { lease, .. }, ResponseBody::Put) if *lease != 0 => vec![*lease],
        (
            Request::Get {
                revision: 0,
                serializable: false,
                ..
            },
            ResponseBody::Get { kv },
        ) => kv_leases(&mut kv.iter()),
        (
            Request::Range {
                revision: 0,
                serializable: false,
                ..
            },
            ResponseBody::Range { kvs },
        ) => kv_leases(&mut kvs.iter()),
        (
            Request::Txn {
                success, failure, ..
            },
            ResponseBody::Txn { succeeded, results },
        ) => {
            let ran = if *succeeded { success } else { failure };
            let mut out: Vec<i64> = ran
                .iter()
                .filter_map(|o| match o {
                    TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
                    _ => None,
                })
                .collect();
            out.extend(results.iter().filter_map(|r| match r {
                TxnOpResult::Get { kv: Some(kv) } if kv.lease != 0 => Some(kv.lease),
                _ => None,
            }));
            out
        }
        _ => Vec::new(),
    }
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

/// A short lease a client keeps alive, until `until`.
struct Short {
    id: i64,
    ttl: i64,
    /// When its last keep-alive (or its grant's answer) was sent.
    last_sent: tokio::time::Instant,
    next_keep_alive: tokio::time::Instant,
    until: tokio::time::Instant,
}

struct Client {
    id: ClientId,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    rng: fastrand::Rng,
    keys: u32,
    /// Long leases this client granted and has not seen revoked.
    leases: Vec<i64>,
    /// Short leases it keeps alive.
    short: Vec<Short>,
    /// Abandoned short leases to send one more keep-alive, and when.
    probes: Vec<(tokio::time::Instant, i64)>,
    /// Requests to send before any other (a short lease's puts).
    pending: std::collections::VecDeque<Request>,
    /// The keys of its latest short leases, to read back.
    lease_keys: std::collections::VecDeque<String>,
    next_lease_key: u64,
    short_ttl: Option<(i64, i64)>,
    keep_alive_for: Duration,
    edge_probes: bool,
    /// Leases probed at their expiry, awaiting the answer.
    edge_probed: std::collections::HashSet<i64>,
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
            short: Vec::new(),
            probes: Vec::new(),
            pending: Default::default(),
            lease_keys: Default::default(),
            next_lease_key: 0,
            short_ttl: config.short_lease_ttl,
            keep_alive_for: config.keep_alive_for,
            edge_probes: config.edge_probes,
            edge_probed: Default::default(),
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

    /// What is due before any random request: a short lease's puts, a
    /// keep-alive (every third of the TTL), a probe of an abandoned lease.
    /// Short leases whose keep-alive time is over are abandoned here.
    fn due(&mut self, now: tokio::time::Instant) -> Option<Request> {
        if let Some(r) = self.pending.pop_front() {
            return Some(r);
        }
        let mut i = 0;
        while i < self.short.len() {
            if self.short[i].until <= now {
                let s = self.short.swap_remove(i);
                if self.edge_probes {
                    let after = Duration::from_secs(s.ttl as u64)
                        + Duration::from_millis(self.rng.u64(..=20));
                    self.probes.push((s.last_sent + after, s.id));
                    self.edge_probed.insert(s.id);
                }
                if self.rng.u32(..3) == 0 {
                    let after = Duration::from_secs(s.ttl as u64) + Duration::from_secs(2);
                    self.probes.push((now + after, s.id));
                }
                continue;
            }
            i += 1;
        }
        if let Some(at) = self.probes.iter().position(|(t, _)| *t <= now) {
            let (_, id) = self.probes.swap_remove(at);
            return Some(Request::LeaseKeepAlive { id });
        }
        let s = self.short.iter_mut().find(|s| s.next_keep_alive <= now)?;
        s.next_keep_alive = now + Duration::from_millis(s.ttl as u64 * 1000 / 3);
        s.last_sent = now;
        Some(Request::LeaseKeepAlive { id: s.id })
    }

    /// The next request, by weight: get 30 (a sixth of them of a short
    /// lease's key, when there is one), put 25, delete 10, txn 20, long
    /// lease grant 4, short lease grant 1 (long without short leases), put
    /// with a long lease 5, lease revoke 5.
    fn next_request(&mut self) -> Request {
        let (i, key) = self.key();
        match self.rng.u32(..100) {
            0..5 if !self.lease_keys.is_empty() => Request::Get {
                key: self.lease_keys[self.rng.usize(..self.lease_keys.len())].clone(),
                revision: 0,
                serializable: false,
            },
            89 if self.short_ttl.is_some() => {
                let (from, to) = self.short_ttl.unwrap_or((2, 2));
                Request::LeaseGrant {
                    ttl: self.rng.i64(from..=to.max(from)),
                    id: 0,
                }
            }
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
            let mut request = match self.due(tokio::time::Instant::now()) {
                Some(r) => r,
                None => self.next_request(),
            };
            if let Request::LeaseGrant { ttl: ttl @ 0, .. } = &mut request {
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
            // A keep-alive of unknown outcome may have renewed its lease:
            // the lease check needs it.
            let keep = !unknown
                || !request.is_read_only()
                || matches!(request, Request::LeaseKeepAlive { .. });
            if keep {
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
        let gone = |s: &mut Vec<Short>, id: i64| s.retain(|s| s.id != id);
        let resp = match outcome {
            Outcome::Response(resp) => resp,
            Outcome::Error(EtcdError::LeaseNotFound) => {
                if let Request::Put { lease, .. } | Request::LeaseKeepAlive { id: lease } = request
                {
                    gone(&mut self.short, *lease);
                }
                return;
            }
            _ => return,
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
            (ResponseBody::LeaseGrant { id }, Request::LeaseGrant { ttl, .. })
                if self.short_ttl.is_some_and(|(_, to)| *ttl <= to.max(2)) && *id != 0 =>
            {
                let now = tokio::time::Instant::now();
                let ttl = *ttl;
                let keep = self.keep_alive_for.mul_f64(self.rng.f64());
                self.short.push(Short {
                    id: *id,
                    ttl,
                    last_sent: now,
                    next_keep_alive: now + Duration::from_millis(ttl as u64 * 1000 / 3),
                    until: now + keep,
                });
                for _ in 0..=self.rng.u32(..2) {
                    self.next_lease_key += 1;
                    let key = format!("{KEY_PREFIX}l{}-{}", self.id, self.next_lease_key);
                    self.lease_keys.push_back(key.clone());
                    if self.lease_keys.len() > 8 {
                        self.lease_keys.pop_front();
                    }
                    let value = self.value();
                    self.pending.push_back(Request::Put {
                        key,
                        value,
                        lease: *id,
                    });
                }
            }
            (ResponseBody::LeaseGrant { id }, _) => self.leases.push(*id),
            (ResponseBody::LeaseKeepAlive { ttl: 0 }, Request::LeaseKeepAlive { id }) => {
                gone(&mut self.short, *id);
                if self.edge_probed.remove(id) {
                    // Gone, so this must fail with "lease not found".
                    self.next_lease_key += 1;
                    let key = format!("{KEY_PREFIX}l{}-{}", self.id, self.next_lease_key);
                    let value = self.value();
                    self.pending.push_front(Request::Put {
                        key,
                        value,
                        lease: *id,
                    });
                }
            }
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
            Request::Range { .. } | Request::LeaseExpire { .. } => {
                Outcome::Error(EtcdError::Other("not generated".into()))
            }
            Request::LeaseKeepAlive { id } => {
                // One request on a stream of its own, and its one answer.
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                if tx
                    .send(pb::LeaseKeepAliveRequest { id: *id })
                    .await
                    .is_err()
                {
                    return Outcome::Unknown;
                }
                let stream = self
                    .lease
                    .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await;
                let outcome = match stream {
                    Ok(s) => match s.into_inner().message().await {
                        Ok(Some(r)) => response(
                            r.header.as_ref(),
                            ResponseBody::LeaseKeepAlive { ttl: r.ttl },
                        ),
                        Ok(None) => Outcome::Unknown,
                        Err(s) => failure(&s),
                    },
                    Err(s) => failure(&s),
                };
                drop(tx);
                outcome
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
/// seconds passed). Each stream is one [`WatchRecord`]. A stream that does
/// not open within [`OPEN_TIMEOUT`] is given up, and the next one goes over
/// a new connection (`endpoint`): through kills and cuts, a request on the
/// old one once waited for ever, holding the whole run.
async fn watch_all(
    mut ch: Channel,
    endpoint: String,
    mut stop: watch::Receiver<bool>,
    base: Instant,
) -> (Vec<WatchRecord>, bool) {
    const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
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
        let stream = tokio::time::timeout(
            OPEN_TIMEOUT,
            WatchClient::new(ch.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(req_rx)),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(_)) => {
                records.pop();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                records.pop();
                if let Ok(fresh) = channel(&endpoint) {
                    kv = KvClient::new(fresh.clone());
                    ch = fresh;
                }
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
                received: nanos(base),
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
