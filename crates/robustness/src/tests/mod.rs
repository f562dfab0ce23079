//! The crate's tests: hand-written histories, the model's rules, watch
//! streams, and generated histories of a correct concurrent server.

mod generate;
mod histories;
mod leases;
mod model_rules;
mod pins;
mod watches;

use crate::history::*;

/// An operation of client `client` from `invoke` to `ret` (`None`: unknown).
pub(crate) fn op(
    client: ClientId,
    invoke: u64,
    ret: Option<u64>,
    request: Request,
    outcome: Outcome,
) -> Operation {
    Operation {
        client,
        invoke,
        return_time: ret,
        request,
        outcome,
    }
}

pub(crate) fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.into(),
        value: value.into(),
        lease: 0,
    }
}

pub(crate) fn get(key: &str) -> Request {
    Request::Get {
        key: key.into(),
        revision: 0,
        serializable: false,
    }
}

pub(crate) fn ok(revision: i64, body: ResponseBody) -> Outcome {
    Outcome::Response(Response { revision, body })
}

pub(crate) fn put_ok(revision: i64) -> Outcome {
    ok(revision, ResponseBody::Put)
}

pub(crate) fn got(revision: i64, kv: Option<KeyValue>) -> Outcome {
    ok(revision, ResponseBody::Get { kv })
}

pub(crate) fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: 0,
    }
}

/// A watch event of `kind` on `key` at `rev` (a put creates its key).
pub(crate) fn ev(
    kind: crate::watch::EventKind,
    key: &str,
    value: &str,
    rev: i64,
    lease: i64,
) -> crate::watch::Event {
    use crate::watch::{Event, EventKind};
    Event {
        kind,
        key: key.into(),
        value: value.into(),
        mod_revision: rev,
        create_revision: if kind == EventKind::Put { rev } else { 0 },
        version: i64::from(kind == EventKind::Put),
        lease,
    }
}
