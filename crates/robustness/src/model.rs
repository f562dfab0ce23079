//! etcd's KV store and leases as a deterministic state machine.
//!
//! [`State`] holds the keys (value, create/mod revision, version, lease), the
//! store revision, the leases with their attached keys, and a persistent log
//! of every revision's changes (for reads at a past revision, serializable
//! reads, and the watch validation). The rules are etcd 3.4's:
//!
//! * The store starts empty at revision 1.
//! * A request takes one revision iff it changes something: every put does;
//!   a delete only when the key exists; a transaction when the branch that
//!   ran changed at least one key (all its changes share that revision); a
//!   lease revoke when keys were attached (they are deleted in one revision).
//! * The header revision of an answer is the store's revision after it.
//! * A put with a lease that does not exist fails with "lease not found",
//!   so do revoke and keep-alive of a missing lease; a read at a revision
//!   ahead of the store fails with "future revision".
//!
//! * Lease expiry is the registry's own revoke, [`Request::LeaseExpire`]:
//!   the run adds one of unknown outcome for every lease whose TTL could run
//!   out during the history, so it may take effect at any point after the
//!   lease was granted, or never; the watch pins most of them to the
//!   revision that deleted the lease's keys ([`crate::pin`]). The model has
//!   no clock: when it may happen is [`crate::lease`]'s check.
//! * A keep-alive answered with TTL > 0 means the lease existed at its
//!   linearization point, one answered TTL 0 that it did not; its header
//!   revision is not checked (a keep-alive is served by the lessor, apart
//!   from the store).
//!
//! Not modelled: compaction (a `Compacted` error is
//! accepted as a no-op anywhere), `prev_kv`, and grants of unknown outcome
//! that let the server choose the id (they are treated as never applied).
//!
//! Serializable reads are checked loosely: the answer must be the store as
//! it was at the answer's header revision, and that revision no newer than
//! the point where the read is linearized; the per-client "no older than
//! what this client saw" guarantee is not checked.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::history::{
    Compare, CompareOp, CompareTarget, EtcdError, History, KeyValue, Operation, Outcome, Request,
    Response, ResponseBody, TxnOp, TxnOpResult,
};
use crate::linearizability::Model;
use crate::shard::Sharded;
use crate::watch::{Event, EventKind, WatchRecord};

/// The store at one point of a linearization. Cheap to clone (shared maps,
/// copied on write).
#[derive(Debug, Clone)]
pub struct State {
    revision: i64,
    kvs: Sharded<String, KeyValue>,
    leases: Sharded<i64, BTreeSet<String>>,
    log: Option<Arc<LogNode>>,
    log_hash: u64,
}

/// The changes of one revision, and the revisions before it.
#[derive(Debug)]
struct LogNode {
    revision: i64,
    events: Vec<Event>,
    prev: Option<Arc<LogNode>>,
}

impl Drop for LogNode {
    // Iterative, so dropping a log of 100k revisions does not overflow
    // the stack.
    fn drop(&mut self) {
        let mut next = self.prev.take();
        while let Some(node) = next {
            match Arc::try_unwrap(node) {
                Ok(mut node) => next = node.prev.take(),
                Err(_) => break,
            }
        }
    }
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        // The log is compared by its chained hash.
        self.revision == other.revision
            && self.log_hash == other.log_hash
            && self.kvs == other.kvs
            && self.leases == other.leases
    }
}

impl Eq for State {}

impl Hash for State {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.revision.hash(state);
        self.log_hash.hash(state);
        self.kvs.hash(state);
        self.leases.hash(state);
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

impl State {
    /// An empty store at revision 1, as a fresh etcd.
    pub fn new() -> State {
        State {
            revision: 1,
            kvs: Sharded::default(),
            leases: Sharded::default(),
            log: None,
            log_hash: 0,
        }
    }

    /// The store revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The current key-value of `key`.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kvs.get(key)
    }

    /// Whether lease `id` exists.
    pub fn has_lease(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// The keys attached to lease `id`.
    pub fn lease_keys(&self, id: i64) -> Option<&BTreeSet<String>> {
        self.leases.get(&id)
    }

    /// Every revision's changes, oldest first: what a watch from revision 1
    /// on all keys would deliver.
    pub fn changes(&self) -> Vec<(i64, Vec<Event>)> {
        let mut out = Vec::new();
        let mut node = self.log.as_deref();
        while let Some(n) = node {
            out.push((n.revision, n.events.clone()));
            node = n.prev.as_deref();
        }
        out.reverse();
        out
    }

    /// The changes that made the current revision (none at revision 1).
    pub fn last_changes(&self) -> &[Event] {
        match self.log.as_deref() {
            Some(n) if n.revision == self.revision => &n.events,
            _ => &[],
        }
    }

    /// `key` as it was at `revision` (at most the current one).
    pub fn get_at(&self, key: &str, revision: i64) -> Option<KeyValue> {
        if revision >= self.revision {
            return self.kvs.get(key).cloned();
        }
        let mut node = self.log.as_deref();
        while let Some(n) = node {
            if n.revision <= revision
                && let Some(e) = n.events.iter().find(|e| e.key == key)
            {
                return match e.kind {
                    EventKind::Put => Some(event_kv(e)),
                    EventKind::Delete => None,
                };
            }
            node = n.prev.as_deref();
        }
        None
    }

    /// Every key starting with `prefix` as it was at `revision`, by key.
    pub fn range_at(&self, prefix: &str, revision: i64) -> Vec<KeyValue> {
        if revision >= self.revision {
            return self
                .kvs
                .sorted()
                .into_iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect();
        }
        let mut seen: BTreeMap<&str, Option<KeyValue>> = BTreeMap::new();
        let mut node = self.log.as_deref();
        while let Some(n) = node {
            if n.revision <= revision {
                for e in n.events.iter().filter(|e| e.key.starts_with(prefix)) {
                    seen.entry(&e.key).or_insert_with(|| match e.kind {
                        EventKind::Put => Some(event_kv(e)),
                        EventKind::Delete => None,
                    });
                }
            }
            node = n.prev.as_deref();
        }
        seen.into_values().flatten().collect()
    }

    /// Runs `request` as etcd would: the next state and the answer. A grant
    /// with id 0 gets the smallest free id.
    pub fn apply(&self, request: &Request) -> (State, Outcome) {
        match self.execute(request, None) {
            Ok((state, response)) => (state, Outcome::Response(response)),
            Err(e) => (self.clone(), Outcome::Error(e)),
        }
    }

    /// The next state iff `outcome` is what this state would answer to
    /// `request`. An unknown outcome is applied (see [`State::step_unknown`]).
    pub fn step(&self, request: &Request, outcome: &Outcome) -> Option<State> {
        match outcome {
            Outcome::Unknown => self.step_unknown(request),
            Outcome::Error(observed) => self
                .error_consistent(request, observed)
                .then(|| self.clone()),
            Outcome::Response(observed) => {
                if let Some(ok) = self.serializable_read(request, observed) {
                    return ok.then(|| self.clone());
                }
                if let (Request::LeaseKeepAlive { id }, ResponseBody::LeaseKeepAlive { ttl }) =
                    (request, &observed.body)
                {
                    return ((*ttl > 0) == self.has_lease(*id)).then(|| self.clone());
                }
                // Every other answer names the revision after it: the
                // current one or the next. Anything else cannot fit here
                // (a cheap test before running the request).
                if observed.revision != self.revision && observed.revision != self.revision + 1 {
                    return None;
                }
                let granted = match (&request, &observed.body) {
                    (Request::LeaseGrant { .. }, ResponseBody::LeaseGrant { id }) => Some(*id),
                    _ => None,
                };
                let (next, expected) = self.execute(request, granted).ok()?;
                (expected == *observed).then_some(next)
            }
        }
    }

    /// The state after `request` took effect here, for a request whose
    /// outcome is unknown; `None` when it would have failed here (or is a
    /// grant without a client-chosen id), i.e. it cannot have taken effect
    /// at this point. Not taking effect at all is always possible too.
    pub fn step_unknown(&self, request: &Request) -> Option<State> {
        if let Request::LeaseGrant { id: 0, .. } = request {
            return None;
        }
        self.execute(request, None).ok().map(|(s, _)| s)
    }

    fn serializable_read(&self, request: &Request, observed: &Response) -> Option<bool> {
        let header = observed.revision;
        let ok = match (request, &observed.body) {
            (
                Request::Get {
                    key,
                    revision,
                    serializable: true,
                },
                ResponseBody::Get { kv },
            ) => {
                let at = if *revision > 0 { *revision } else { header };
                header <= self.revision && at <= header && *kv == self.get_at(key, at)
            }
            (
                Request::Range {
                    prefix,
                    revision,
                    serializable: true,
                },
                ResponseBody::Range { kvs },
            ) => {
                let at = if *revision > 0 { *revision } else { header };
                header <= self.revision && at <= header && *kvs == self.range_at(prefix, at)
            }
            (
                Request::Get {
                    serializable: true, ..
                }
                | Request::Range {
                    serializable: true, ..
                },
                _,
            ) => false,
            _ => return None,
        };
        Some(ok && header >= 1)
    }

    fn error_consistent(&self, request: &Request, observed: &EtcdError) -> bool {
        match observed {
            EtcdError::Compacted | EtcdError::Other(_) => true,
            EtcdError::FutureRevision => match request {
                // A serializable read may be served by a lagging member.
                Request::Get {
                    serializable: true, ..
                }
                | Request::Range {
                    serializable: true, ..
                } => true,
                _ => self.execute(request, None) == Err(EtcdError::FutureRevision),
            },
            EtcdError::LeaseNotFound => {
                self.execute(request, None) == Err(EtcdError::LeaseNotFound)
            }
        }
    }

    fn execute(
        &self,
        request: &Request,
        granted: Option<i64>,
    ) -> Result<(State, Response), EtcdError> {
        let current = self.revision;
        let read_rev = |revision: i64| {
            if revision > current {
                Err(EtcdError::FutureRevision)
            } else if revision <= 0 {
                Ok(current)
            } else {
                Ok(revision)
            }
        };
        let respond = |state: State, body| {
            let revision = state.revision;
            Ok((state, Response { revision, body }))
        };
        match request {
            Request::Get { key, revision, .. } => {
                let at = read_rev(*revision)?;
                let kv = self.get_at(key, at);
                respond(self.clone(), ResponseBody::Get { kv })
            }
            Request::Range {
                prefix, revision, ..
            } => {
                let at = read_rev(*revision)?;
                let kvs = self.range_at(prefix, at);
                respond(self.clone(), ResponseBody::Range { kvs })
            }
            Request::Put { key, value, lease } => {
                if *lease != 0 && !self.has_lease(*lease) {
                    return Err(EtcdError::LeaseNotFound);
                }
                let mut w = Writer::new(self);
                w.put(key, value, *lease);
                respond(w.finish(), ResponseBody::Put)
            }
            Request::Delete { key } => {
                let mut w = Writer::new(self);
                let deleted = w.delete(key);
                respond(w.finish(), ResponseBody::Delete { deleted })
            }
            Request::Txn {
                compares,
                success,
                failure,
            } => {
                let succeeded = compares.iter().all(|c| compare(self.kvs.get(&c.key), c));
                let ops = if succeeded { success } else { failure };
                for op in ops {
                    if let TxnOp::Put { lease, .. } = op
                        && *lease != 0
                        && !self.has_lease(*lease)
                    {
                        return Err(EtcdError::LeaseNotFound);
                    }
                }
                let mut w = Writer::new(self);
                let results = ops
                    .iter()
                    .map(|op| match op {
                        TxnOp::Get { key } => TxnOpResult::Get {
                            kv: w.kvs.get(key).cloned(),
                        },
                        TxnOp::Put { key, value, lease } => {
                            w.put(key, value, *lease);
                            TxnOpResult::Put
                        }
                        TxnOp::Delete { key } => TxnOpResult::Delete {
                            deleted: w.delete(key),
                        },
                    })
                    .collect();
                respond(w.finish(), ResponseBody::Txn { succeeded, results })
            }
            Request::LeaseGrant { id, .. } => {
                let id = match (*id, granted) {
                    (0, Some(g)) => g,
                    (0, None) => (1..).find(|i| !self.has_lease(*i)).unwrap_or(1),
                    (id, Some(g)) if g != id => return Err(EtcdError::Other("wrong id".into())),
                    (id, _) => id,
                };
                if id <= 0 || self.has_lease(id) {
                    return Err(EtcdError::Other("lease already exists".into()));
                }
                let mut next = self.clone();
                next.leases.insert(id, BTreeSet::new());
                respond(next, ResponseBody::LeaseGrant { id })
            }
            Request::LeaseRevoke { id } | Request::LeaseExpire { id } => {
                let Some(keys) = self.leases.get(id) else {
                    return Err(EtcdError::LeaseNotFound);
                };
                let mut w = Writer::new(self);
                for key in keys {
                    w.delete(key);
                }
                w.leases.remove(id);
                respond(w.finish(), ResponseBody::LeaseRevoke)
            }
            Request::LeaseKeepAlive { id } => {
                if !self.has_lease(*id) {
                    return Err(EtcdError::LeaseNotFound);
                }
                // Any TTL > 0: the model keeps no time.
                respond(self.clone(), ResponseBody::LeaseKeepAlive { ttl: 1 })
            }
        }
    }
}

/// etcd's `applyCompare` for one key.
fn compare(kv: Option<&KeyValue>, c: &Compare) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match (&c.target, kv) {
        // A value compare on a missing key always fails, whatever the op.
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(kv)) => kv.value.as_bytes().cmp(v.as_bytes()),
        (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
        (CompareTarget::ModRevision(v), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(v),
        (CompareTarget::CreateRevision(v), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(v),
    };
    match c.op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Less => ord == Ordering::Less,
        CompareOp::Greater => ord == Ordering::Greater,
    }
}

fn event_kv(e: &Event) -> KeyValue {
    KeyValue {
        key: e.key.clone(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        version: e.version,
        lease: e.lease,
    }
}

/// The changes of one request, all at revision `current + 1`.
struct Writer {
    base: i64,
    kvs: Sharded<String, KeyValue>,
    leases: Sharded<i64, BTreeSet<String>>,
    log: Option<Arc<LogNode>>,
    log_hash: u64,
    events: Vec<Event>,
}

impl Writer {
    fn new(s: &State) -> Writer {
        Writer {
            base: s.revision,
            kvs: s.kvs.clone(),
            leases: s.leases.clone(),
            log: s.log.clone(),
            log_hash: s.log_hash,
            events: Vec::new(),
        }
    }

    fn detach(&mut self, key: &str, lease: i64) {
        if lease != 0 {
            self.leases.update(&lease, false, |keys| {
                keys.remove(key);
            });
        }
    }

    fn put(&mut self, key: &str, value: &str, lease: i64) {
        let rev = self.base + 1;
        let old = self.kvs.get(key).cloned();
        if let Some(old) = &old {
            self.detach(key, old.lease);
        }
        if lease != 0 {
            self.leases.update(&lease, true, |keys| {
                keys.insert(key.to_string());
            });
        }
        let kv = KeyValue {
            key: key.to_string(),
            value: value.to_string(),
            create_revision: old.as_ref().map_or(rev, |o| o.create_revision),
            mod_revision: rev,
            version: old.as_ref().map_or(1, |o| o.version + 1),
            lease,
        };
        self.events.push(Event {
            kind: EventKind::Put,
            key: kv.key.clone(),
            value: kv.value.clone(),
            create_revision: kv.create_revision,
            mod_revision: rev,
            version: kv.version,
            lease,
        });
        self.kvs.insert(key.to_string(), kv);
    }

    fn delete(&mut self, key: &str) -> i64 {
        let Some(old) = self.kvs.remove(key) else {
            return 0;
        };
        self.detach(key, old.lease);
        self.events.push(Event {
            kind: EventKind::Delete,
            key: key.to_string(),
            value: String::new(),
            create_revision: 0,
            mod_revision: self.base + 1,
            version: 0,
            lease: 0,
        });
        1
    }

    fn finish(self) -> State {
        if self.events.is_empty() {
            return State {
                revision: self.base,
                kvs: self.kvs,
                leases: self.leases,
                log: self.log,
                log_hash: self.log_hash,
            };
        }
        let revision = self.base + 1;
        let mut h = DefaultHasher::new();
        self.log_hash.hash(&mut h);
        revision.hash(&mut h);
        self.events.hash(&mut h);
        State {
            revision,
            kvs: self.kvs,
            leases: self.leases,
            log_hash: h.finish(),
            log: Some(Arc::new(LogNode {
                revision,
                events: self.events,
                prev: self.log,
            })),
        }
    }
}

/// The revision an answered operation says it made: a put's, a delete's
/// that deleted, a transaction's that wrote. (A revoke's answer does not
/// say: its header is the current revision when the lease had no keys.)
pub fn claimed_revision(op: &Operation) -> Option<i64> {
    match (&op.request, &op.outcome) {
        (Request::Put { .. }, Outcome::Response(r)) => Some(r.revision),
        (
            Request::Delete { .. },
            Outcome::Response(Response {
                revision,
                body: ResponseBody::Delete { deleted: 1.. },
            }),
        ) => Some(*revision),
        (
            Request::Txn { .. },
            Outcome::Response(Response {
                revision,
                body: ResponseBody::Txn { results, .. },
            }),
        ) if results
            .iter()
            .any(|r| matches!(r, TxnOpResult::Put | TxnOpResult::Delete { deleted: 1.. })) =>
        {
            Some(*revision)
        }
        _ => None,
    }
}

/// The etcd model for the [linearizability checker](crate::linearizability),
/// over recorded [`Operation`]s.
///
/// It knows which revisions answered writes claim (a put's, a delete's that
/// deleted, a transaction's that wrote), so an operation of unknown outcome
/// is never applied where it would take a revision some answered write owns:
/// every revision is made by exactly one request. This keeps histories with
/// many lost answers cheap to check.
///
/// It also knows at which revision every value that answered reads saw was
/// written (values are unique), so a lost put of such a value can only take
/// effect at that revision.
#[derive(Debug, Clone, Default)]
pub struct EtcdModel {
    claimed: HashSet<i64>,
    observed: HashMap<(String, String), i64>,
    watched: HashMap<i64, Vec<(EventKind, String, String)>>,
}

/// The changes of one revision as compared with the watch: kind, key and
/// value, sorted.
fn summary<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<(EventKind, String, String)> {
    let mut out: Vec<_> = events
        .into_iter()
        .map(|e| (e.kind, e.key.clone(), e.value.clone()))
        .collect();
    out.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
    out
}

impl EtcdModel {
    /// The model for checking `history`.
    pub fn new(history: &History) -> EtcdModel {
        let claimed = history
            .operations
            .iter()
            .filter_map(claimed_revision)
            .collect();
        let mut observed = HashMap::new();
        for op in &history.operations {
            let Outcome::Response(r) = &op.outcome else {
                continue;
            };
            let kvs: Vec<&KeyValue> = match &r.body {
                ResponseBody::Get { kv } => kv.iter().collect(),
                ResponseBody::Range { kvs } => kvs.iter().collect(),
                ResponseBody::Txn { results, .. } => results
                    .iter()
                    .filter_map(|r| match r {
                        TxnOpResult::Get { kv } => kv.as_ref(),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            for kv in kvs {
                observed.insert((kv.key.clone(), kv.value.clone()), kv.mod_revision);
            }
        }
        EtcdModel {
            claimed,
            observed,
            watched: HashMap::new(),
        }
    }

    /// The model for checking `history` whose writes `watches` saw: an
    /// operation of unknown outcome may only make a revision the watch
    /// delivered if it made exactly the changes the watch delivered there.
    /// (A watch that lies then shows as a history that is not
    /// linearizable, instead of a watch violation.)
    pub fn with_watches(history: &History, watches: &[WatchRecord]) -> EtcdModel {
        let mut model = EtcdModel::new(history);
        model.watched = crate::pin::events_by_revision(watches)
            .into_iter()
            .map(|(rev, events)| (rev, summary(&events)))
            .collect();
        model
    }
}

impl Model for EtcdModel {
    type State = State;
    type Op = Operation;

    fn init(&self) -> State {
        State::new()
    }

    fn interval(&self, op: &Operation) -> (u64, u64) {
        (op.invoke, op.effective_return())
    }

    fn must_linearize(&self, op: &Operation) -> bool {
        op.is_known()
    }

    fn step(&self, state: &State, op: &Operation) -> Option<State> {
        let next = state.step(&op.request, &op.outcome)?;
        if !op.is_known() && next.revision != state.revision {
            if self.claimed.contains(&next.revision) {
                return None;
            }
            let elsewhere = next.last_changes().iter().any(|e| {
                e.kind == EventKind::Put
                    && self
                        .observed
                        .get(&(e.key.clone(), e.value.clone()))
                        .is_some_and(|&rev| rev != next.revision)
            });
            if elsewhere {
                return None;
            }
            if let Some(seen) = self.watched.get(&next.revision)
                && *seen != summary(next.last_changes())
            {
                return None;
            }
        }
        Some(next)
    }
}
